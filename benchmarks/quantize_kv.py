"""Quantize-on-write (``nqcompile::write_kv``, E8 codes): the Triton kernel against the torch reference.

One write of ``T`` new tokens per row of ``--tokens`` (a prefill chunk, a flushed block, a single decode token) for a
Llama-3.1-8B layer (batch 1, 8 KV heads, head_dim 128; ``--heads`` and ``--dim`` change it), bfloat16 keys and
values with per-channel offsets, at each ``key,value`` bit pair of ``--bits`` (``4,2`` is ``quant_only``, ``3,2`` is
``asym``). Per row:

* kernel us: :func:`nqcompile.kernels.quantize_kv.e8_quantize_kv` (keys and values, both launches), timed as
  CUDA-graph replays (the kernel reads nothing back to the host, so it can be captured);
* reference us: the torch reference (:func:`nqcompile.ops.reference._write`, what ``write_kv`` runs elsewhere) on
  the same device, timed as eager calls (it reads ``count`` back and sizes its search by the data);
* MB written and GB/s: the code and scale bytes the write stores; MB read: the new keys, values and positions;
* differing blocks: 8-dim blocks whose codes (or scale code) differ from the reference's (float32 rounding,
  ``tests/test_kernel_quantize_kv.py``).

Times are CUDA-event means over ``--iters`` calls after ``--warmup``; the host clock on the CPU. Prints a markdown
table, the command and the versions; ``--out`` gets them as JSON. On one GPU::

    python benchmarks/quantize_kv.py --out out/quantize_kv.json
    python benchmarks/quantize_kv.py --smoke     # CPU, Triton's interpreter, tiny: checks the script runs
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

from nqcompile.codec.hadamard import hadamard_matrix  # noqa: E402
from nqcompile.kernels import quantize_kv as kernel  # noqa: E402
from nqcompile.kernels.lattice import centroid_table  # noqa: E402
from nqcompile.ops.reference import _write  # noqa: E402

#: What ``--smoke`` changes (flags given explicitly still win).
SMOKE = dict(device="cpu", tokens="8,1", heads=1, dim=64, iters=1, warmup=0)
_STORAGE = ("k_codes", "k_scales", "v_codes", "v_scales")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see ``--help``); ``--smoke`` changes the defaults to :data:`SMOKE`."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tokens", default="8192,16,1", help="comma-separated new tokens per write")
    p.add_argument("--bits", default="4,2;3,2", help="semicolon-separated key,value bit pairs")
    p.add_argument("--heads", type=int, default=8, help="KV heads")
    p.add_argument("--dim", type=int, default=128, help="head_dim")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, default=None, help="JSON results file")
    p.add_argument("--smoke", action="store_true",
                   help="tiny CPU check: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in SMOKE.items()))
    args = p.parse_args(argv)
    if args.smoke:
        p.set_defaults(**SMOKE)
        args = p.parse_args(argv)
    args.tokens = [int(x) for x in str(args.tokens).split(",")]
    args.bits = [tuple(int(b) for b in pair.split(",")) for pair in args.bits.split(";")]
    return args


def inputs(args: argparse.Namespace, tokens: int, key_bits: int, value_bits: int, seed: int = 0) -> dict:
    """Keyword arguments of ``write_kv`` for one write of ``tokens`` new tokens at slot 100 (batch 1)."""
    dev, h, d = torch.device(args.device), args.heads, args.dim
    g = torch.Generator(device=dev).manual_seed(seed)
    capacity = 100 + tokens
    return dict(
        k_codes=torch.zeros(1, h, capacity, key_bits * d // 8, dtype=torch.uint8, device=dev),
        k_scales=torch.zeros(1, h, capacity, dtype=torch.uint8, device=dev),
        v_codes=torch.zeros(1, h, capacity, value_bits * d // 8, dtype=torch.uint8, device=dev),
        v_scales=torch.zeros(1, h, capacity, dtype=torch.uint8, device=dev),
        key=(torch.randn(1, h, tokens, d, device=dev, generator=g) * 2
             + torch.randn(d, device=dev, generator=g)).to(torch.bfloat16),
        value=(torch.randn(1, h, tokens, d, device=dev, generator=g)
               + torch.randn(d, device=dev, generator=g)).to(torch.bfloat16),
        positions=torch.arange(100, 100 + tokens, device=dev).expand(1, h, tokens).contiguous(),
        dest=torch.tensor([100], device=dev), count=torch.tensor([tokens], device=dev),
        hadamard=hadamard_matrix(d, device=dev),
        inv_freq=1.0 / 500000.0 ** (torch.arange(0, d, 2, device=dev) / d),
        norm_mean=torch.randn(2, 1, h, d, device=dev, generator=g) * 0.5,
        norm_scale=torch.rand(2, 1, h, d, device=dev, generator=g) + 0.5,
        kind="e8", key_bits=key_bits, value_bits=value_bits, attention_scaling=1.0, rotary_dim=d, layout="half")


def run_kernel(a: dict) -> None:
    """The kernel op on :func:`inputs` (writes its storage)."""
    dev = a["key"].device
    kernel.e8_quantize_kv(a["k_codes"], a["k_scales"], a["v_codes"], a["v_scales"], a["key"], a["value"],
                          a["positions"], a["dest"], a["count"], a["hadamard"], a["inv_freq"], a["norm_mean"],
                          a["norm_scale"], centroid_table(dev), kernel.encoder_table(dev), a["key_bits"],
                          a["value_bits"], a["attention_scaling"], a["rotary_dim"], a["layout"])


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
    with torch.cuda.stream(stream):  # warm-up (compilation) off the capture, as CUDA graphs require
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


def differing_blocks(a: dict, b: dict) -> int:
    """8-dim blocks of the written slots whose codes or scale code differ between the storages of ``a`` and ``b``."""
    total = 0
    for codes, scales, bits in (("k_codes", "k_scales", a["key_bits"]), ("v_codes", "v_scales", a["value_bits"])):
        x, y = a[codes][:, :, 100:], b[codes][:, :, 100:]
        differs = (x.reshape(*x.shape[:3], -1, bits) != y.reshape(*y.shape[:3], -1, bits)).any(-1)
        differs |= (a[scales][:, :, 100:] != b[scales][:, :, 100:])[..., None]
        total += int(differs.sum())
    return total


def row(args: argparse.Namespace, tokens: int, key_bits: int, value_bits: int) -> dict:
    """One table row (see the module docstring)."""
    device = torch.device(args.device)
    a = inputs(args, tokens, key_bits, value_bits)
    ref = {k: v.clone() if k in _STORAGE else v for k, v in a.items()}
    result = dict(tokens=tokens, bits=f"K{key_bits}V{value_bits}", heads=args.heads, dim=args.dim)
    result["kernel_us"] = timed_us(lambda: run_kernel(a), device, args.iters, args.warmup, graph=True)
    result["reference_us"] = timed_us(lambda: _write(*ref.values()), device, max(1, args.iters // 5),
                                      min(1, args.warmup), graph=False)
    written = sum(a[k][:, :, 100:].nbytes for k in _STORAGE)
    result["bytes_written"] = written
    result["mb_read"] = (a["key"].nbytes + a["value"].nbytes + a["positions"].nbytes) / 1e6
    result["gb_per_s"] = (written + result["mb_read"] * 1e6) / result["kernel_us"] / 1e3
    result["speedup"] = result["reference_us"] / result["kernel_us"]
    result["blocks"] = 2 * args.heads * tokens * args.dim // 8
    result["differing_blocks"] = differing_blocks(a, ref)
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the rows, print them as a markdown table with the command and versions, write ``--out``."""
    args = parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for tokens in args.tokens:
        for key_bits, value_bits in args.bits:
            rows.append(row(args, tokens, key_bits, value_bits))
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
    print("\n| tokens | bits | kernel us | reference us | speed-up | MB written | MB read | GB/s | differing blocks |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']} | {r['bits']} | {r['kernel_us']:.1f} | {r['reference_us']:.0f} | {r['speedup']:.1f}x | "
              f"{r['bytes_written'] / 1e6:.3f} | {r['mb_read']:.3f} | {r['gb_per_s']:.1f} | "
              f"{r['differing_blocks']} of {r['blocks']} |")
    meta = dict(command="python benchmarks/quantize_kv.py " + shlex.join(sys.argv[1:] if argv is None else argv),
                torch=torch.__version__, python=platform.python_version(),
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                triton=__import__("triton").__version__, date=time.strftime("%Y-%m-%d"))
    print(f"\ncommand: {meta['command']}\n{meta['device']}, torch {meta['torch']}, triton {meta['triton']}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
