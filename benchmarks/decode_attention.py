"""Decode attention over E8 codes: the Triton kernel against the torch reference and dense bf16 SDPA.

One decode step's attention (one query per sequence) for a Llama-3.1-8B-shaped layer (8 KV heads, GQA group 4,
head_dim 128; ``--kv-heads``, ``--group``, ``--dim`` change it) over T tokens, for each T of ``--lengths`` and each
code width of ``--bits`` (``key,value`` pairs: ``4,2`` is ``quant_only``, ``3,2`` is ``asym``). The T tokens are
``--exact`` exact tokens (sinks and window), a ``--warm``-token warm tier at 4 bits and the rest as codes. Codes are
random labels and scale codes near 1 (every label decodes to a codeword, so this times the real work; the encoder is
not timed). Per row:

* kernel ms: ``nqcompile::e8_decode_attention`` (codes, warm tier and exact segment, the merge included);
* reference ms: ``nqcompile.ops.fused.cache_attention_reference``, the torch path the CUDA implementations fall
  back to (skipped above ``--reference-max`` tokens);
* SDPA ms: ``F.scaled_dot_product_attention`` over T dense bf16 keys and values (``enable_gqa``), the attention an
  uncompressed cache runs;
* GB/s: the bytes the kernel must read (codes, scales, positions, exact tokens) per kernel second;
* rel err: ``|kernel - reference| / |reference|`` over the outputs for the same query in float32 (rows with a
  reference).

Times are CUDA-event means over ``--iters`` calls after ``--warmup`` calls. Prints a markdown table, the command
and the versions; ``--out`` gets them as JSON. On one GPU::

    python benchmarks/decode_attention.py --lengths 4096,32768,131072 --out out/decode_attention.json
    python benchmarks/decode_attention.py --smoke     # CPU, Triton's interpreter, tiny: checks the script runs

Not yet run on a GPU: no results are recorded here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv:  # before anything imports Triton: the interpreter is chosen when kernels are decorated
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from nqcompile.codec.hadamard import hadamard_matrix  # noqa: E402
from nqcompile.kernels import decode_attention as kernel  # noqa: E402
from nqcompile.ops.fused import cache_attention_reference  # noqa: E402

#: What ``--smoke`` changes (flags given explicitly still win).
SMOKE = dict(device="cpu", lengths="96", kv_heads=2, group=2, dim=64, warm=16, exact=16, iters=1, warmup=0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see ``--help``); ``--smoke`` changes the defaults to :data:`SMOKE`."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--lengths", default="4096,32768,131072", help="comma-separated token counts T")
    p.add_argument("--bits", default="4,2;3,2", help="semicolon-separated key,value bit pairs")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--group", type=int, default=4, help="query heads per KV head")
    p.add_argument("--dim", type=int, default=128, help="head_dim")
    p.add_argument("--warm", type=int, default=256, help="warm-tier tokens (4 bits)")
    p.add_argument("--exact", type=int, default=36, help="exact tokens (sinks + window)")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--reference-max", type=int, default=32768, help="largest T timed with the torch reference")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, default=None, help="JSON results file")
    p.add_argument("--smoke", action="store_true",
                   help="tiny CPU check: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in SMOKE.items()))
    args = p.parse_args(argv)
    if args.smoke:
        p.set_defaults(**SMOKE)
        args = p.parse_args(argv)
    args.lengths = [int(x) for x in str(args.lengths).split(",")]
    args.bits = [tuple(int(b) for b in pair.split(",")) for pair in args.bits.split(";")]
    if min(args.lengths) <= args.warm + args.exact:
        p.error("every length must exceed --warm + --exact (the rest are codes)")
    return args


def inputs(args: argparse.Namespace, length: int, key_bits: int, value_bits: int, seed: int = 0) -> dict:
    """Keyword arguments of ``cache_attention_reference`` (no write) for one decode step over ``length`` tokens."""
    dev, b, h, d = torch.device(args.device), args.batch, args.kv_heads, args.dim
    g = torch.Generator(device=dev).manual_seed(seed)
    n_codes = length - args.warm - args.exact

    def codes(n, bits):
        return torch.randint(0, 256, (b, h, n, bits * d // 8), dtype=torch.uint8, device=dev, generator=g)

    def scales(n):
        return torch.randint(120, 137, (b, h, n), dtype=torch.uint8, device=dev, generator=g)

    rotary = d
    return dict(
        query=torch.randn(b, h * args.group, 1, d, device=dev, generator=g).to(torch.bfloat16),
        k_codes=codes(n_codes, key_bits), k_scales=scales(n_codes), v_codes=codes(n_codes, value_bits),
        v_scales=scales(n_codes), code_pos=torch.arange(4, 4 + n_codes, device=dev).expand(b, 1, n_codes),
        code_len=torch.full((b,), n_codes, device=dev),
        warm_k_codes=codes(args.warm, 4), warm_k_scales=scales(args.warm), warm_v_codes=codes(args.warm, 4),
        warm_v_scales=scales(args.warm),
        warm_pos=torch.arange(n_codes, n_codes + args.warm, device=dev).expand(b, h, -1),
        warm_mask=torch.ones(b, 1, args.warm, dtype=torch.bool, device=dev), warm_offset=0, warm_bits=4,
        exact_k=torch.randn(b, h, args.exact, d, device=dev, generator=g).to(torch.bfloat16),
        exact_v=torch.randn(b, h, args.exact, d, device=dev, generator=g).to(torch.bfloat16),
        exact_mask=torch.ones(b, 1, args.exact, dtype=torch.bool, device=dev),
        new_k=None, new_v=None, new_pos=None, new_dest=None, new_count=None,
        hadamard=hadamard_matrix(d, device=dev),
        inv_freq=1.0 / 500000.0 ** (torch.arange(0, rotary, 2, device=dev) / rotary),
        norm_mean=torch.randn(2, b, h, d, device=dev, generator=g) * 0.1,
        norm_scale=torch.rand(2, b, h, d, device=dev, generator=g) + 0.5,
        kind="e8", key_bits=key_bits, value_bits=value_bits, attention_scaling=1.0, rotary_dim=rotary, layout="half",
        scaling=d ** -0.5)


def run_kernel(a: dict) -> torch.Tensor:
    """The kernel op on :func:`inputs`."""
    return kernel.e8_decode_attention(
        a["query"], a["k_codes"], a["k_scales"], a["v_codes"], a["v_scales"], a["code_pos"], a["code_len"],
        a["warm_k_codes"], a["warm_k_scales"], a["warm_v_codes"], a["warm_v_scales"], a["warm_pos"], a["warm_mask"],
        a["warm_bits"], a["exact_k"], a["exact_v"], a["exact_mask"], a["hadamard"], a["inv_freq"], a["norm_mean"],
        a["norm_scale"], kernel.centroid_table(a["query"].device), a["key_bits"], a["value_bits"],
        a["attention_scaling"], a["rotary_dim"], a["layout"], a["scaling"])


def timed_ms(fn, device: torch.device, iters: int, warmup: int) -> float:
    """Mean milliseconds of ``fn()`` over ``iters`` calls after ``warmup`` (CUDA events on CUDA)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(iters):
            fn()
        stop.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(stop) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) * 1e3 / iters


def row(args: argparse.Namespace, length: int, key_bits: int, value_bits: int) -> dict:
    """One table row (see the module docstring)."""
    device = torch.device(args.device)
    a = inputs(args, length, key_bits, value_bits)
    kernel_ms = timed_ms(lambda: run_kernel(a), device, args.iters, args.warmup)
    result = dict(T=length, bits=f"K{key_bits}V{value_bits}", kernel_ms=kernel_ms, reference_ms=None, rel_err=None)
    read = sum(a[k].nbytes for k in ("k_codes", "k_scales", "v_codes", "v_scales", "code_pos", "warm_k_codes",
                                     "warm_k_scales", "warm_v_codes", "warm_v_scales", "warm_pos", "exact_k",
                                     "exact_v"))
    result["gb_per_s"] = read / kernel_ms / 1e6
    if length <= args.reference_max:
        result["reference_ms"] = timed_ms(lambda: cache_attention_reference(**a), device, args.iters, args.warmup)
        exact = dict(a, query=a["query"].float())  # float32 outputs: the comparison is not hidden by bf16 rounding
        out, ref = run_kernel(exact).double(), cache_attention_reference(**exact).double()
        result["rel_err"] = float((out - ref).norm() / ref.norm())
    b, h, d = args.batch, args.kv_heads, args.dim
    k = torch.randn(b, h, length, d, device=device, dtype=torch.bfloat16)
    result["sdpa_ms"] = timed_ms(lambda: F.scaled_dot_product_attention(a["query"], k, k, enable_gqa=True), device,
                                 args.iters, args.warmup)
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the rows, print them as a markdown table with the command and versions, write ``--out``."""
    args = parse_args(argv)
    rows = []
    for length in args.lengths:
        for key_bits, value_bits in args.bits:
            rows.append(row(args, length, key_bits, value_bits))
            print(rows[-1], flush=True)
    fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    print("\n| T | bits | kernel ms | reference ms | SDPA bf16 ms | kernel GB/s | rel err |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['T']} | {r['bits']} | {r['kernel_ms']:.3f} | {fmt(r['reference_ms'], '.3f')} | "
              f"{r['sdpa_ms']:.3f} | {r['gb_per_s']:.1f} | {fmt(r['rel_err'], '.1e')} |")
    meta = dict(command="python benchmarks/decode_attention.py " + shlex.join(sys.argv[1:] if argv is None else argv),
                torch=torch.__version__, python=platform.python_version(),
                device=torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
                triton=__import__("triton").__version__)
    print(f"\ncommand: {meta['command']}\n{meta['device']}, torch {meta['torch']}, triton {meta['triton']}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
