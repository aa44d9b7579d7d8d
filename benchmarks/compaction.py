"""Eviction and compaction of the cache's tokens, codes and scales: eager torch against ``torch.compile`` (Inductor).

Issue 10, build item 4 (compaction of codes and scales in place, Inductor-generated or hand-written, whichever
measures faster). The steps the cache runs, on the Llama-3.1-8B shape (8 KV heads, head_dim 128, bfloat16 keys and
values, uint8 codes; the warm tier at 4 bits, 64 bytes per vector) at batch ``--batch``:

* ``chunk_keep`` (``cache.compress.compress_chunk``, at the end of every prefill chunk): the kept tokens of the
  exact window plus an ``--chunk``-token chunk (``[B, 8, 32 + chunk, 128]``), ``--keep`` of them (ascending random
  indices per head), gathered from keys and values, and their positions. Variants: ``op``, the library's code
  (``nqcompile::gather_tokens``, a custom op: opaque to Inductor), and ``gather``, the same gather as plain torch ops
  (which Inductor can fuse). The H200 run of 2026-12-01 measured the op when it still cloned its result (it no longer
  does);
* ``warm_take`` (``cache.tiers.warm_flow``, at every window flush and chunk end): the warm tier's codes, scales and
  positions (``--warm`` slots, plus the ``n`` appended: 16 at a decode flush, ``--warm`` at a chunk end, where
  ``store_kept`` appends the tier's share of the kept tokens) compacted back into the tier's buffers in place
  (``take_slots`` then ``copy_``);
* ``window`` (``cache.tiers.window_stream`` and ``keep_unflushed``, every decode step): the 32-token exact window and
  the new token gathered into the stream, then the unflushed ones back into the window, in place.

Each function is timed eagerly and compiled by ``torch.compile`` (Inductor, ``fullgraph=True``, static shapes), as
mean microseconds per call (``call us``: CUDA events around ``--iters`` Python calls, launch overheads included) and
per CUDA-graph replay (``graph us``: the device time), and the outputs of the two compared exactly. ``MB``: the
least traffic of the step (every output byte written once and read once from its source, and the indices read
once per gather); TB/s on the graph time, against the card's copy bandwidth (bytes read plus written) measured in
the same run. Prints a markdown table, the command and the versions; ``--out`` gets the rows as JSON. On one GPU::

    python benchmarks/compaction.py --out out/compaction.json
    python benchmarks/compaction.py --smoke     # CPU, tiny: checks the script runs

Results and the conclusion (which the cache uses and why): ``benchmarks/README.md`` ("Eviction and compaction").
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import decode_attention as bench  # noqa: E402  (benchmarks/decode_attention.py: timing, copy bandwidth)
from _common import failure, markdown, write_json  # noqa: E402
from nqcompile import ops  # noqa: E402
from nqcompile.cache.storage import take_slots  # noqa: E402
from nqcompile.cache.tiers import keep_unflushed, window_stream  # noqa: E402

HEADS, DIM, WINDOW, WARM_BYTES = 8, 128, 32, 4 * 128 // 8
#: What ``--smoke`` changes (flags given explicitly still win).
SMOKE = dict(device="cpu", chunk=64, keep="0.5", warm=32, batches="1", iters=2, warmup=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see ``--help``); ``--smoke`` changes the defaults to :data:`SMOKE`."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--chunk", type=int, default=8192, help="prefill chunk tokens")
    p.add_argument("--keep", default="0.1,0.5", help="comma-separated fractions of the chunk kept")
    p.add_argument("--warm", type=int, default=256, help="warm-tier slots")
    p.add_argument("--batches", default="1,16", help="comma-separated batch sizes of the decode-step cases")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, default=None, help="JSON results file")
    p.add_argument("--smoke", action="store_true",
                   help="tiny CPU check: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in SMOKE.items()))
    args = p.parse_args(argv)
    if args.smoke:
        p.set_defaults(**SMOKE)
        args = p.parse_args(argv)
    args.keep = [float(x) for x in str(args.keep).split(",")]
    args.batches = [int(x) for x in str(args.batches).split(",")]
    return args


def ascending_subset(generator: torch.Generator, batch: int, width: int, count: int, device) -> torch.Tensor:
    """int64 ``[batch, HEADS, count]``: ``count`` distinct indices below ``width`` per (sequence, head), ascending
    (as ``policy.select_kept`` returns them)."""
    order = torch.rand(batch, HEADS, width, generator=generator, device=device).argsort(-1)
    return order[..., :count].sort(-1).values


def chunk_case(args: argparse.Namespace, keep: float, generator: torch.Generator) -> dict:
    """Inputs of ``chunk_keep``: window plus chunk keys/values ``[1, 8, 32 + chunk, 128]`` bf16, positions
    ``[1, 32 + chunk]`` int64, kept indices ``[1, 8, K]``."""
    dev, width = args.device, WINDOW + args.chunk
    kept = round(keep * args.chunk)
    return dict(pk=torch.randn(1, HEADS, width, DIM, generator=generator, device=dev).to(torch.bfloat16),
                pv=torch.randn(1, HEADS, width, DIM, generator=generator, device=dev).to(torch.bfloat16),
                ppos=torch.arange(width, device=dev)[None], index=ascending_subset(generator, 1, width, kept, dev))


def chunk_keep_op(pk, pv, ppos, index):
    """``compress_chunk``'s compaction: kept keys, values (``nqcompile::gather_tokens``) and positions."""
    kept_pos = ppos[:, None, :].expand(-1, HEADS, -1).gather(2, index)
    return ops.gather_tokens(pk, index), ops.gather_tokens(pv, index), kept_pos


def chunk_keep_gather(pk, pv, ppos, index):
    """:func:`chunk_keep_op` with ``gather_tokens``'s gather as plain torch ops (no custom-op boundary)."""
    rows = index[..., None].expand(*index.shape, pk.shape[-1])
    return pk.gather(2, rows), pv.gather(2, rows), ppos[:, None, :].expand(-1, HEADS, -1).gather(2, index)


def warm_case(args: argparse.Namespace, appended: int, generator: torch.Generator) -> dict:
    """Inputs of ``warm_take``: the tier's buffers (``--warm`` slots), the extended tier (old slots and
    ``appended`` new ones: codes ``[1, 8, warm + n, 64]`` uint8, scales ``[1, 8, warm + n]`` uint8, positions int64)
    and the slots kept (``[1, 8, warm]``: the newest, as after dropping the oldest ``n``)."""
    dev, cap = args.device, args.warm
    codes = lambda n: torch.randint(0, 256, (1, HEADS, n, WARM_BYTES), dtype=torch.uint8, device=dev,  # noqa: E731
                                    generator=generator)
    scales = lambda n: torch.randint(0, 256, (1, HEADS, n), dtype=torch.uint8, device=dev,  # noqa: E731
                                     generator=generator)
    width = cap + appended
    keep = (torch.arange(cap, device=dev) + appended).expand(1, HEADS, cap).contiguous()
    return dict(bufs=(codes(cap), scales(cap), codes(cap), scales(cap)),
                ext=(codes(width), scales(width), codes(width), scales(width)),
                warm_pos=torch.zeros(1, HEADS, cap, dtype=torch.int32, device=dev),
                ext_pos=torch.arange(width, device=dev).expand(1, HEADS, width).contiguous(), keep=keep)


def warm_take(bufs, ext, warm_pos, ext_pos, keep):
    """``warm_flow``'s compaction: the kept slots of the extended tier copied into the tier's buffers, in place
    (returned)."""
    for buf, e in zip(bufs, ext):
        buf.copy_(take_slots(e, keep))
    warm_pos.copy_(ext_pos.gather(2, keep).to(warm_pos.dtype))
    return (*bufs, warm_pos)


def window_case(args: argparse.Namespace, batch: int, generator: torch.Generator) -> dict:
    """Inputs of ``window``: a full exact window (``[B, 8, 32, 128]`` bf16, positions, lengths) as the attributes
    ``window_stream`` reads of a layer's storage, and one new token."""
    dev = args.device

    def tokens(n):
        return torch.randn(batch, HEADS, n, DIM, generator=generator, device=dev).to(torch.bfloat16)

    st = SimpleNamespace(win_k=tokens(WINDOW), win_v=tokens(WINDOW),
                         win_pos=torch.arange(WINDOW, device=dev).expand(batch, WINDOW).contiguous(),
                         win_len=torch.full((batch,), WINDOW - 1, device=dev), heads=HEADS, device=torch.device(dev),
                         window_dtype=torch.bfloat16)
    return dict(st=st, key=tokens(1), value=tokens(1), positions=torch.full((batch, 1), WINDOW - 1, device=dev))


def window_step(st, key, value, positions):
    """A decode step's window traffic: the stream (``window_stream``), then the unflushed tokens kept
    (``keep_unflushed``, in place); the stream and the window are returned."""
    stream = window_stream(st, key, value, positions)
    keep_unflushed(st, stream)
    return stream.keys, stream.values, st.win_k, st.win_v, st.win_len


def min_bytes(step: str, case: dict) -> int:
    """The least traffic of a step (module docstring): outputs written and read once, indices read per gather."""
    if step == "chunk_keep":
        out = 2 * case["index"].numel() * DIM * case["pk"].element_size() + case["index"].numel() * 8
        return 2 * out + 3 * case["index"].nbytes
    if step == "warm_take":
        out = sum(b.nbytes for b in case["bufs"]) + case["warm_pos"].nbytes
        return 2 * out + 5 * case["keep"].nbytes
    st = case["st"]
    stream = 2 * st.win_k.shape[0] * HEADS * (WINDOW + 1) * DIM * st.win_k.element_size()
    return 2 * stream + 2 * (st.win_k.nbytes + st.win_v.nbytes)


def fresh(value):
    """A copy of an input (a tensor, a tuple of them, or a namespace of them), so a call cannot change the original."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(fresh(x) for x in value)
    if isinstance(value, SimpleNamespace):
        return SimpleNamespace(**{k: fresh(v) for k, v in vars(value).items()})
    return value


def row(args: argparse.Namespace, step: str, label: str, fn, case: dict, copy: float | None) -> dict:
    """Eager and compiled timings of ``fn(**case)``, and whether they agree (module docstring)."""
    device = torch.device(args.device)
    result = dict(step=step, case=label, function=fn.__name__, mb=min_bytes(step, case) / 1e6)
    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    calls, outputs = {"eager": fn, "compiled": compiled}, {}
    for mode, call in calls.items():  # both on copies of the same inputs, before the timed calls change them
        try:
            outputs[mode] = call(**{k: fresh(v) for k, v in case.items()})
        except Exception as error:  # noqa: BLE001  (reported in the row: the other mode still runs)
            result[f"{mode}_error"] = failure(error)["error"]
    if len(outputs) == 2:
        result["equal"] = all(torch.equal(x, y) for x, y in zip(outputs["eager"], outputs["compiled"]))
    for mode in outputs:
        try:
            for graph in (False, True):
                us = bench.timed_us(lambda: calls[mode](**case), device, args.iters, args.warmup,
                                    graph=graph and device.type == "cuda")
                result[f"{mode}_{'graph' if graph else 'call'}_us"] = us
        except Exception as error:  # noqa: BLE001  (reported in the row)
            result[f"{mode}_error"] = failure(error)["error"]
            continue
        result[f"{mode}_tb_per_s"] = result["mb"] / result[f"{mode}_graph_us"]
        result[f"{mode}_of_copy"] = None if copy is None else result[f"{mode}_tb_per_s"] / copy
    return result


def cases(args: argparse.Namespace):
    """``(step, label, function, inputs)`` of every row."""
    g = torch.Generator(device=args.device).manual_seed(0)
    for keep in args.keep:
        case = chunk_case(args, keep, g)
        for fn in (chunk_keep_op, chunk_keep_gather):
            yield "chunk_keep", f"keep {keep:.0%} of {args.chunk}", fn, case
    for appended, label in ((16, "decode flush"), (args.warm, "chunk end")):
        yield "warm_take", f"{label}: {args.warm} + {appended} slots", warm_take, warm_case(args, appended, g)
    for batch in args.batches:
        yield "window", f"batch {batch}", window_step, window_case(args, batch, g)


def main(argv: list[str] | None = None) -> int:
    """Run the rows, print them as a markdown table with the command and versions, write ``--out``."""
    args = parse_args(argv)
    device = torch.device(args.device)
    copy = bench.copy_tb_per_s(device, args.iters)
    rows = []
    for step, label, fn, case in cases(args):
        t0 = time.perf_counter()
        rows.append(row(args, step, label, fn, case, copy))
        print(f"[{time.strftime('%H:%M:%S')}] {step} {label} {fn.__name__}: "
              + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()
                          if k not in ("step", "case", "function"))
              + f" ({time.perf_counter() - t0:.1f} s)", flush=True)
    fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    print("\n" + markdown(
        ["step", "case", "function", "MB", "eager call us", "eager graph us", "eager TB/s", "compiled call us",
         "compiled graph us", "compiled TB/s", "of copy (eager / compiled)", "equal"],
        [[r["step"], r["case"], r["function"], f"{r['mb']:.2f}"]
         + [fmt(r.get(f"{m}_{k}"), ".1f" if k.endswith("us") else ".3f") for m in ("eager", "compiled")
            for k in ("call_us", "graph_us", "tb_per_s")]
         + [f"{fmt(r.get('eager_of_copy'), '.0%')} / {fmt(r.get('compiled_of_copy'), '.0%')}",
            str(r.get("equal", "-"))] for r in rows]))
    meta = dict(command="python benchmarks/compaction.py " + shlex.join(sys.argv[1:] if argv is None else argv),
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                torch=torch.__version__, python=platform.python_version(), copy_tb_per_s=copy,
                date=time.strftime("%Y-%m-%d"))
    print(f"\ncommand: {meta['command']}\n{meta['device']}, torch {meta['torch']}, copy bandwidth "
          f"{fmt(copy, '.2f')} TB/s")
    for r in rows:
        for mode in ("eager", "compiled"):
            if f"{mode}_error" in r:
                print(f"  {r['step']} {r['case']} {r['function']} {mode} failed: {r[f'{mode}_error']}")
    if args.out is not None:
        write_json(args.out, meta, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
