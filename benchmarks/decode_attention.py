"""Decode attention over E8 codes: the Triton kernel against the torch reference and dense bf16 SDPA.

One decode step's attention (one query per sequence) over T tokens for each head shape of ``--shapes``
(``llama``: Llama-3.1-8B, 8 KV heads, GQA group 4, head_dim 128; ``smollm2``: SmolLM2-135M, 3 KV heads, group 3,
head_dim 64), batch size of ``--batches``, T of ``--lengths`` and code width of ``--bits`` (``key,value`` pairs:
``4,2`` is ``quant_only``, ``3,2`` is ``asym``). The T tokens are ``--exact`` exact tokens (sinks and window), a
``--warm``-token warm tier at 4 bits and the rest as codes (no eviction). Codes are random labels and scale codes
near 1 (every label decodes to a codeword, so this times the real work; the encoder is not timed). Per row:

* kernel us: ``nqcompile::e8_decode_attention`` (codes, warm tier and exact segment, the merge included), timed
  as CUDA-graph replays (how the compiled model runs it under ``mode="reduce-overhead"``); eager us: the same op
  called from Python, launch overheads included;
* SDPA us: ``F.scaled_dot_product_attention`` (``enable_gqa``; PyTorch picks flash or cuDNN) over T dense bf16
  keys and values, the attention an uncompressed cache runs, timed the same way; FlashInfer's bf16 decode too
  where ``flashinfer`` is installed (the run says when it is not);
* MB read: the bytes the kernel must read (codes, scales, positions, exact tokens, query), and TB/s on them; the
  copy bandwidth of the card (a device-to-device copy, bytes read plus written) is measured in the same run and
  each row gives its fraction of it;
* speed-up: SDPA us over kernel us;
* rel err: ``|kernel - reference| / |reference|`` against ``nqcompile.ops.fused.cache_attention_reference`` (the
  torch path the CUDA implementations fall back to) for the same query in float32; batch 1 and T up to
  ``--reference-max`` only (the reference materializes float32 keys and values).

Targets of issue 10, checked in the printout (never asserted): at 128K tokens, batch 1, at least 4x faster than
bf16 SDPA and at least 75% of the copy bandwidth on the bytes read. Times are CUDA-event means over ``--iters``
replays after ``--warmup`` calls. Prints a markdown table, the command and the versions; ``--out`` gets them as
JSON. On one GPU::

    python benchmarks/decode_attention.py --out out/decode_attention.json
    python benchmarks/decode_attention.py --smoke     # CPU, Triton's interpreter, tiny: checks the script runs

Results: ``benchmarks/README.md`` ("Decode attention on the GPU").
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

#: Head shapes ``name: (KV heads, query heads per KV head, head_dim)`` (``gemma3``: Gemma 3 270M's global layers).
SHAPES = {"llama": (8, 4, 128), "smollm2": (3, 3, 64), "gemma3": (1, 4, 256), "tiny": (2, 2, 64)}
#: What ``--smoke`` changes (flags given explicitly still win).
SMOKE = dict(device="cpu", lengths="96", batches="1", shapes="tiny", warm=16, exact=16, iters=1, warmup=0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see ``--help``); ``--smoke`` changes the defaults to :data:`SMOKE`."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--lengths", default="4096,32768,131072", help="comma-separated token counts T")
    p.add_argument("--bits", default="4,2;3,2", help="semicolon-separated key,value bit pairs")
    p.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    p.add_argument("--shapes", default="llama,smollm2", help=f"comma-separated head shapes of {sorted(SHAPES)}")
    p.add_argument("--warm", type=int, default=256, help="warm-tier tokens (4 bits)")
    p.add_argument("--exact", type=int, default=36, help="exact tokens (sinks + window)")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reference-max", type=int, default=32768, help="largest T compared with the torch reference")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, default=None, help="JSON results file")
    p.add_argument("--smoke", action="store_true",
                   help="tiny CPU check: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in SMOKE.items()))
    args = p.parse_args(argv)
    if args.smoke:
        p.set_defaults(**SMOKE)
        args = p.parse_args(argv)
    args.lengths = [int(x) for x in str(args.lengths).split(",")]
    args.batches = [int(x) for x in str(args.batches).split(",")]
    args.bits = [tuple(int(b) for b in pair.split(",")) for pair in args.bits.split(";")]
    args.shapes = [x.strip() for x in str(args.shapes).split(",")]
    unknown = sorted(set(args.shapes) - set(SHAPES))
    if unknown:
        p.error(f"unknown --shapes {unknown}; choose from {sorted(SHAPES)}")
    if min(args.lengths) <= args.warm + args.exact:
        p.error("every length must exceed --warm + --exact (the rest are codes)")
    return args


def inputs(args: argparse.Namespace, shape: str, batch: int, length: int, key_bits: int, value_bits: int,
           seed: int = 0) -> dict:
    """Keyword arguments of ``cache_attention_reference`` (no write) for one decode step over ``length`` tokens."""
    dev, b = torch.device(args.device), batch
    h, group, d = SHAPES[shape]
    g = torch.Generator(device=dev).manual_seed(seed)
    n_codes = length - args.warm - args.exact

    def codes(n, bits):
        return torch.randint(0, 256, (b, h, n, bits * d // 8), dtype=torch.uint8, device=dev, generator=g)

    def scales(n):
        return torch.randint(120, 137, (b, h, n), dtype=torch.uint8, device=dev, generator=g)

    rotary = d
    return dict(
        query=torch.randn(b, h * group, 1, d, device=dev, generator=g).to(torch.bfloat16),
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


def bytes_read(a: dict) -> int:
    """Bytes the kernel must read for :func:`inputs` ``a``: every code, scale, position (a position row shared by
    the heads counts once) and exact token, and the query."""
    names = ("query", "k_codes", "k_scales", "v_codes", "v_scales", "warm_k_codes", "warm_k_scales", "warm_v_codes",
             "warm_v_scales", "exact_k", "exact_v")
    positions = sum(a[k][:, :1].numel() * a[k].element_size() if a[k].stride(1) == 0 else a[k].nbytes
                    for k in ("code_pos", "warm_pos"))
    return sum(a[k].nbytes for k in names) + positions


def run_kernel(a: dict) -> torch.Tensor:
    """The kernel op on :func:`inputs`."""
    return kernel.e8_decode_attention(
        a["query"], a["k_codes"], a["k_scales"], a["v_codes"], a["v_scales"], a["code_pos"], a["code_len"],
        a["warm_k_codes"], a["warm_k_scales"], a["warm_v_codes"], a["warm_v_scales"], a["warm_pos"], a["warm_mask"],
        a["warm_bits"], a["exact_k"], a["exact_v"], a["exact_mask"], a["hadamard"], a["inv_freq"], a["norm_mean"],
        a["norm_scale"], kernel.centroid_table(a["query"].device), a["key_bits"], a["value_bits"],
        a["attention_scaling"], a["rotary_dim"], a["layout"], a["scaling"])


def timed_us(fn, device: torch.device, iters: int, warmup: int, graph: bool) -> float:
    """Mean microseconds of ``fn()`` over ``iters`` calls after ``warmup``: CUDA events around ``iters`` replays of
    one captured CUDA graph (``graph``) or around ``iters`` Python calls; the host clock on the CPU."""
    if device.type != "cuda":
        for _ in range(warmup):
            fn()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) * 1e6 / iters
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):  # warm-up (compilation, autotuning) off the capture, as CUDA graphs require
        for _ in range(max(1, warmup)):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    call = fn
    if graph:
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            fn()
        call = captured.replay
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    for _ in range(iters):
        call()
    stop.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(stop) * 1e3 / iters


def copy_tb_per_s(device: torch.device, iters: int) -> float | None:
    """The card's device-to-device copy bandwidth (bytes read plus written per second, TB/s) over a 2 GiB copy;
    None off CUDA."""
    if device.type != "cuda":
        return None
    src = torch.empty(2**30, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    us = timed_us(lambda: dst.copy_(src), device, iters, 2, graph=False)
    return 2 * src.nbytes / us / 1e6


def flashinfer_reason() -> str | None:
    """None when FlashInfer imports, else why its column is empty."""
    try:
        import flashinfer  # noqa: F401
    except ImportError as error:
        return f"FlashInfer not installed ({error})"
    return None


def flashinfer_us(a: dict, k: torch.Tensor, v: torch.Tensor, args: argparse.Namespace) -> float:
    """FlashInfer's single-request bf16 decode (``single_decode_with_kv_cache``, NHD layout) per sequence of the
    batch, summed: microseconds per batch."""
    import flashinfer

    q = a["query"][:, :, 0]  # [B, Hq, D]
    kn, vn = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()  # [B, T, H, D]
    device = torch.device(args.device)
    return sum(timed_us(lambda i=i: flashinfer.single_decode_with_kv_cache(q[i], kn[i], vn[i]), device, args.iters,
                        args.warmup, graph=True) for i in range(q.shape[0]))


def row(args: argparse.Namespace, shape: str, batch: int, length: int, key_bits: int, value_bits: int,
        copy: float | None) -> dict:
    """One table row (see the module docstring)."""
    device = torch.device(args.device)
    a = inputs(args, shape, batch, length, key_bits, value_bits)
    result = dict(shape=shape, batch=batch, T=length, bits=f"K{key_bits}V{value_bits}")
    result["kernel_us"] = timed_us(lambda: run_kernel(a), device, args.iters, args.warmup, graph=True)
    result["eager_us"] = timed_us(lambda: run_kernel(a), device, args.iters, args.warmup, graph=False)
    result["mb_read"] = bytes_read(a) / 1e6
    result["tb_per_s"] = result["mb_read"] / result["kernel_us"]
    result["copy_fraction"] = None if copy is None else result["tb_per_s"] / copy
    result["reference_us"] = result["rel_err"] = None
    if batch == 1 and length <= args.reference_max:
        result["reference_us"] = timed_us(lambda: cache_attention_reference(**a), device, 3, 1, graph=False)
        exact = dict(a, query=a["query"].float())  # float32 outputs: the comparison is not hidden by bf16 rounding
        out, ref = run_kernel(exact).double(), cache_attention_reference(**exact).double()
        result["rel_err"] = float((out - ref).norm() / ref.norm())
    heads, _, dim = SHAPES[shape]
    k = torch.randn(batch, heads, length, dim, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    result["sdpa_us"] = timed_us(lambda: F.scaled_dot_product_attention(a["query"], k, v, enable_gqa=True), device,
                                 args.iters, args.warmup, graph=device.type == "cuda")
    result["speedup"] = result["sdpa_us"] / result["kernel_us"]
    result["flashinfer_us"] = flashinfer_us(a, k, v, args) if flashinfer_reason() is None and device.type == "cuda" \
        else None
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the rows, print them as a markdown table with the command and versions, write ``--out``."""
    args = parse_args(argv)
    device = torch.device(args.device)
    copy = copy_tb_per_s(device, args.iters)
    rows = []
    for shape in args.shapes:
        for batch in args.batches:
            for length in args.lengths:
                for key_bits, value_bits in args.bits:
                    rows.append(row(args, shape, batch, length, key_bits, value_bits, copy))
                    print({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
                    torch.cuda.empty_cache() if device.type == "cuda" else None
    fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    print("\n| shape | batch | T | bits | kernel us | eager us | SDPA bf16 us | FlashInfer us | speed-up | MB read | "
          "TB/s | of copy | reference us | rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['batch']} | {r['T']} | {r['bits']} | {r['kernel_us']:.1f} | {r['eager_us']:.1f} | "
              f"{r['sdpa_us']:.1f} | {fmt(r['flashinfer_us'], '.1f')} | {r['speedup']:.2f}x | {r['mb_read']:.1f} | "
              f"{r['tb_per_s']:.3f} | {fmt(r['copy_fraction'], '.0%')} | {fmt(r['reference_us'], '.0f')} | "
              f"{fmt(r['rel_err'], '.1e')} |")
    meta = dict(command="python benchmarks/decode_attention.py " + shlex.join(sys.argv[1:] if argv is None else argv),
                torch=torch.__version__, python=platform.python_version(),
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                triton=__import__("triton").__version__, copy_tb_per_s=copy, flashinfer=flashinfer_reason() or "used",
                date=time.strftime("%Y-%m-%d"))
    print(f"\ncommand: {meta['command']}\n{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, "
          f"copy bandwidth {fmt(copy, '.2f')} TB/s; {meta['flashinfer']}")
    for r in rows:
        if r["batch"] == 1 and r["T"] >= 131072:
            print(f"target at {r['T']} tokens, batch 1, {r['shape']} {r['bits']}: speed-up {r['speedup']:.2f}x "
                  f"(target >= 4x), {fmt(r['copy_fraction'], '.0%')} of the copy bandwidth (target >= 75%)")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
