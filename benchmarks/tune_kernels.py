"""Launch configurations of the Triton kernels, measured: the sweep that writes ``nqcompile/kernels/launch_table.json``.

Issue 10, build item 5 (configurations keyed by head_dim, bits and context length; no autotuning at run time, so
none inside a CUDA-graph capture): this script times every candidate launch on the GPU and ``--write-table`` writes
the table the kernels read (:mod:`nqcompile.kernels.launch_configs`).

* decode attention (``nqcompile::e8_decode_attention``): candidates ``--blocks`` x ``--warps`` x ``--programs``
  (slots per block, warps per program, programs per multiprocessor of the split target), for each head_dim of
  ``--dims`` (its model's head shape: 64 SmolLM2-135M, 3 KV heads x 3; 128 Llama-3.1-8B, 8 x 4; 256 Gemma 3 270M,
  1 x 4), each ``--bits`` pair and each context of ``--lengths`` at batch 1, plus batch ``--big-batch`` at
  ``--big-batch-lengths``. head_dims of ``--reduced-dims`` get the smaller grid ``--reduced-blocks`` x
  ``--reduced-warps`` and only ``--reduced-bits``; a block over ``--max-block-per-warp`` slots per warp is
  skipped. Inputs as ``benchmarks/decode_attention.py`` builds them (random labels, scale codes near 1),
  ``--exact`` exact tokens and the rest codes (``T - exact`` slots), no warm tier;
* dequant (``nqcompile::e8_dequant_kv``): ``--blocks`` x ``--warps`` on ``--dequant-tokens`` tokens (a prefill
  chunk as the chunk path decodes it), batch 1, the same head shapes and bits.

Each candidate: its float32 output (``decode_attention_float32``, the op before its cast; the dequant's keys and
values) is compared with the default configuration's on the same inputs, and a candidate more than ``--tolerance``
away (relative L2) is reported and never chosen; then it is timed as CUDA-graph replays (CUDA events over
``--iters`` replays after ``--warmup`` calls, as ``decode_attention.py``). Kernels that fail to compile or launch
are reported and skipped. Before timing, ``--jobs`` worker processes run every candidate once, so that Triton's
compiler runs in parallel and the timing process finds the kernels in Triton's cache.

The choice per table key (decode: head_dim, bits, context bucket of ``launch_configs.CONTEXT_BUCKETS``; dequant:
head_dim, bits): the candidate with the smallest geometric mean, over the key's cases (batch 1 and the big batch),
of its time over the case's fastest time; the default stays unless the chosen one is more than ``--min-gain``
faster by that measure. Prints a markdown table per kernel, the command and the versions; ``--out`` gets every
measurement as JSON. Cases run in order of importance (head_dim 128 first, longest contexts first); past
``--budget-s`` seconds of timing (counted once every candidate has compiled) the remaining cases are skipped and
reported. On one GPU::

    python benchmarks/tune_kernels.py --out out/tune_kernels.json --write-table nqcompile/kernels/launch_table.json
    python benchmarks/tune_kernels.py --smoke     # CPU, Triton's interpreter, tiny: checks the script runs
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import math
import multiprocessing
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv:  # before anything imports Triton: the interpreter is chosen when kernels are decorated
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import decode_attention as bench  # noqa: E402  (benchmarks/decode_attention.py: inputs and timing)
from _common import failure, markdown, write_json  # noqa: E402
from nqcompile.kernels import decode_attention as kernel  # noqa: E402
from nqcompile.kernels import dequant_kv  # noqa: E402
from nqcompile.kernels import launch_configs as lc  # noqa: E402

#: The head shape (``decode_attention.SHAPES``) each head_dim is measured with.
SHAPE_OF_DIM = {64: "smollm2", 128: "llama", 256: "gemma3"}
#: What ``--smoke`` changes (flags given explicitly still win).
SMOKE = dict(device="cpu", dims="64", bits="4,2", lengths="48", big_batch=2, big_batch_lengths="48",
             blocks="16,32", warps="4", programs="1,2", dequant_tokens=32, iters=1, warmup=0, jobs=0, exact=16)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see ``--help``); ``--smoke`` changes the defaults to :data:`SMOKE`."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dims", default="128,64,256", help=f"comma-separated head_dims of {sorted(SHAPE_OF_DIM)}")
    p.add_argument("--bits", default="4,2;3,2;2,2", help="semicolon-separated key,value bit pairs")
    p.add_argument("--lengths", default="131072,32768,4096", help="comma-separated token counts T (batch 1)")
    p.add_argument("--big-batch", type=int, default=16, help="the second batch size (0: none)")
    p.add_argument("--big-batch-lengths", default="32768", help="the T at which the second batch size runs")
    p.add_argument("--blocks", default="16,32,64", help="slots per block (BLOCK_N)")
    p.add_argument("--warps", default="2,4,8", help="warps per program")
    p.add_argument("--programs", default="1,2,4", help="programs per multiprocessor (the split target)")
    p.add_argument("--max-block-per-warp", type=int, default=16,
                   help="skip (block, warps) with block > this x warps (64 slots on 2 warps spill 34 KB per thread "
                        "and take ptxas a minute at head_dim 128)")
    p.add_argument("--reduced-dims", default="256", help="head_dims swept on the reduced grid")
    p.add_argument("--reduced-blocks", default="16,32")
    p.add_argument("--reduced-warps", default="4,8")
    p.add_argument("--reduced-bits", default="4,2")
    p.add_argument("--dequant-tokens", type=int, default=8192, help="tokens per KV head of the dequant cases")
    p.add_argument("--exact", type=int, default=32, help="exact tokens of each decode case (the rest are codes)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--tolerance", type=float, default=1e-3,
                   help="largest relative L2 distance from the default configuration's float32 output")
    p.add_argument("--min-gain", type=float, default=0.03, help="how much faster a configuration must be than "
                   "the default to replace it (geometric mean of the time ratios)")
    p.add_argument("--jobs", type=int, default=14, help="processes compiling the candidates first (0: none)")
    p.add_argument("--budget-s", type=float, default=200.0, help="skip the cases not started this many seconds after the candidates compiled")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, default=None, help="JSON results file")
    p.add_argument("--write-table", type=Path, default=None,
                   help="write the launch table there (the kernels read nqcompile/kernels/launch_table.json)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny CPU check: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in SMOKE.items()))
    args = p.parse_args(argv)
    if args.smoke:
        p.set_defaults(**SMOKE)
        args = p.parse_args(argv)
    ints = lambda text: [int(x) for x in str(text).split(",") if x.strip()]  # noqa: E731
    pairs = lambda text: [tuple(int(b) for b in pair.split(",")) for pair in str(text).split(";") if pair]  # noqa: E731
    for name in ("dims", "lengths", "big_batch_lengths", "blocks", "warps", "programs", "reduced_dims",
                 "reduced_blocks", "reduced_warps"):
        setattr(args, name, ints(getattr(args, name)))
    args.bits, args.reduced_bits = pairs(args.bits), pairs(args.reduced_bits)
    unknown = sorted(set(args.dims) - set(SHAPE_OF_DIM))
    if unknown:
        p.error(f"unknown --dims {unknown}; choose from {sorted(SHAPE_OF_DIM)}")
    if min(args.lengths + args.big_batch_lengths) <= args.exact:
        p.error("every length must exceed --exact (the rest are codes)")
    for name, allowed in (("blocks", lc.BLOCKS), ("reduced_blocks", lc.BLOCKS), ("warps", lc.WARPS),
                          ("reduced_warps", lc.WARPS)):
        if set(getattr(args, name)) - set(allowed):
            p.error(f"--{name.replace('_', '-')} must be among {allowed}")
    return args


def grid(args: argparse.Namespace, dim: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """``(bit pairs, [(block, warps), ...])`` swept at head_dim ``dim``; the default configuration is always in."""
    reduced = dim in args.reduced_dims
    bits = args.reduced_bits if reduced else args.bits
    shapes = [(b, w) for b in (args.reduced_blocks if reduced else args.blocks)
              for w in (args.reduced_warps if reduced else args.warps) if b <= args.max_block_per_warp * w]
    for default in (lc.default_decode_config(dim)[:2], tuple(lc.default_dequant_config(dim))):
        if default not in shapes:
            shapes.append(default)
    return bits, shapes


def decode_cases(args: argparse.Namespace, dim: int) -> list[tuple[int, int]]:
    """``(batch, T)`` of the decode cases at one head_dim, longest first."""
    cases = [(1, t) for t in sorted(args.lengths, reverse=True)]
    if args.big_batch:
        cases += [(args.big_batch, t) for t in sorted(args.big_batch_lengths, reverse=True)]
    return cases


def decode_inputs(args: argparse.Namespace, dim: int, batch: int, length: int, key_bits: int, value_bits: int) -> dict:
    """``decode_attention.inputs`` for one case: ``T - exact`` code slots, ``exact`` exact tokens, no warm tier."""
    return bench.inputs(argparse.Namespace(warm=0, exact=args.exact, device=args.device), SHAPE_OF_DIM[dim], batch,
                        length, key_bits, value_bits)


def decode_float(a: dict) -> torch.Tensor:
    """``decode_attention_float32`` (the decode op before its cast) on :func:`decode_inputs`: float32 ``[B, Hq, D]``."""
    return kernel.decode_attention_float32(
        a["query"], a["k_codes"], a["k_scales"], a["v_codes"], a["v_scales"], a["code_pos"], a["code_len"],
        a["warm_k_codes"], a["warm_k_scales"], a["warm_v_codes"], a["warm_v_scales"], a["warm_pos"], a["warm_mask"],
        a["warm_bits"], a["exact_k"], a["exact_v"], a["exact_mask"], a["hadamard"], a["inv_freq"], a["norm_mean"],
        a["norm_scale"], kernel.centroid_table(a["query"].device), a["key_bits"], a["value_bits"],
        a["attention_scaling"], a["rotary_dim"], a["layout"], a["scaling"])


def dequant_run(a: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``nqcompile::e8_dequant_kv`` of the codes of :func:`decode_inputs` ``a`` (float32 keys and values)."""
    return dequant_kv.e8_dequant_kv(a["k_codes"], a["k_scales"], a["v_codes"], a["v_scales"], a["code_pos"],
                                    a["hadamard"], a["inv_freq"], a["norm_mean"], a["norm_scale"],
                                    kernel.centroid_table(a["query"].device), a["key_bits"], a["value_bits"],
                                    a["attention_scaling"], a["rotary_dim"], a["layout"])


def programs(args: argparse.Namespace, dim: int) -> list[int]:
    """Programs per multiprocessor swept at head_dim ``dim`` (``--programs`` and the default's)."""
    return sorted(set(args.programs) | {lc.default_decode_config(dim).programs_per_sm})


def decode_table(a: dict, config: lc.DecodeConfig) -> lc.LaunchTable:
    """A table holding ``config`` for the decode key of the inputs ``a`` (head_dim, bits, the bucket of its code
    capacity; every other key at its default)."""
    key = (a["query"].shape[-1], a["key_bits"], a["value_bits"], lc.context_bucket(a["k_codes"].shape[2]))
    return lc.LaunchTable({}, {key: config}, {})


def dequant_table(dim: int, key_bits: int, value_bits: int, config: lc.DequantConfig) -> lc.LaunchTable:
    """A table holding ``config`` for the dequant key (every other key at its default)."""
    return lc.LaunchTable({}, {}, {(dim, key_bits, value_bits): config})


def relative_error(out, ref) -> float:
    """``|out - ref| / |ref|`` (L2, float64) over a tensor or a tuple of tensors."""
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    num = sum(float((o.double() - r.double()).norm()) ** 2 for o, r in zip(outs, refs))
    den = sum(float(r.double().norm()) ** 2 for r in refs)
    return math.sqrt(num / den)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def precompile(task: tuple) -> tuple[tuple, str | None, int | None, float]:
    """Worker of :func:`compile_all`: run every candidate launch of one ``(kind, dim, key_bits, value_bits, block,
    warps)`` once, on every case it is timed on (the shapes decide Triton's specializations), so that the kernel is
    in Triton's cache; compiled afresh (``TRITON_ALWAYS_COMPILE``) with ptxas's log (``TRITON_DUMP_PTXAS_LOG``).
    Returns ``(task, error or None, the most spill stores the log reports in bytes per thread or None, seconds)``."""
    (kind, dim, key_bits, value_bits, block, warps), args = task[:6], task[6]
    device = torch.device(args.device)
    os.environ.update(TRITON_ALWAYS_COMPILE="1", TRITON_DUMP_PTXAS_LOG="1")
    t0 = time.perf_counter()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            precompile_calls(args, kind, dim, key_bits, value_bits, block, warps)
        sync(device)
    except Exception as error:  # noqa: BLE001  (reported: the timing process skips the candidate)
        return task[:6], failure(error)["error"], None, time.perf_counter() - t0
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", log.getvalue())]
    return task[:6], None, max(spills, default=None), time.perf_counter() - t0


def precompile_calls(args: argparse.Namespace, kind: str, dim: int, key_bits: int, value_bits: int, block: int,
                     warps: int) -> None:
    """The launches of :func:`precompile` (outputs discarded)."""
    if kind == "decode":
        for batch, length in decode_cases(args, dim):
            a = decode_inputs(args, dim, batch, length, key_bits, value_bits)
            for per_sm in programs(args, dim):
                with lc.using(decode_table(a, lc.DecodeConfig(block, warps, per_sm))):
                    decode_float(a)
                    bench.run_kernel(a)
    else:
        a = decode_inputs(args, dim, 1, args.dequant_tokens + args.exact, key_bits, value_bits)
        with lc.using(dequant_table(dim, key_bits, value_bits, lc.DequantConfig(block, warps))):
            dequant_run(a)


def compile_all(args: argparse.Namespace) -> tuple[dict, dict]:
    """Run :func:`precompile` for every candidate in ``--jobs`` processes (none: skipped). Returns ``(failed,
    spills)``: ``{(kind, dim, key_bits, value_bits, block, warps): error}`` of the candidates that failed and
    ``{same key: spill stores in bytes per thread}`` of those whose ptxas log reported them."""
    if args.jobs <= 0:
        return {}, {}
    tasks = []
    for dim in args.dims:
        bits, shapes = grid(args, dim)
        tasks += [(kind, dim, kb, vb, b, w, args) for kind in ("decode", "dequant") for kb, vb in bits
                  for b, w in shapes]
    failed, spills, t0 = {}, {}, time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        for done, (key, error, spill, seconds) in enumerate(pool.map(precompile, tasks), 1):
            if error is not None:
                failed[key] = error
                print(f"  compile/launch failed {key}: {error}", flush=True)
            if spill is not None:
                spills[key] = spill
            if done % 10 == 0 or done == len(tasks):
                print(f"[{time.perf_counter() - t0:.0f} s] compiled {done}/{len(tasks)} (the last in {seconds:.0f} s)",
                      flush=True)
    return failed, spills


def measure(fn, check, reference, args: argparse.Namespace) -> dict:
    """One candidate: its relative distance from ``reference`` (``check()``'s output), and, if within tolerance,
    its microseconds (``fn`` as CUDA-graph replays); ``error`` instead when it fails."""
    device = torch.device(args.device)
    try:
        err = relative_error(check(), reference)
        if not err <= args.tolerance:
            return dict(rel_err=err, error=f"output {err:.2e} away from the default configuration's")
        return dict(rel_err=err, us=bench.timed_us(fn, device, args.iters, args.warmup, graph=True))
    except Exception as error:  # noqa: BLE001  (a config that fails to compile or launch is reported, not chosen)
        return failure(error) | {"rel_err": None}


def compile_fields(compiled: tuple[dict, dict], key: tuple) -> dict:
    """A row's fields from :func:`compile_all` for ``key`` ``(kind, dim, key_bits, value_bits, block, warps)``:
    ``spill_stores`` (bytes per thread, None when not known), ``over_budget`` (more than ``max(SPILL_BUDGET, the
    default configuration's spills)``, ``launch_configs.SPILL_BUDGET``: timed, never chosen) and, if it failed,
    ``error``."""
    failed, spills = compiled
    kind, dim = key[:2]
    default = lc.default_decode_config(dim)[:2] if kind == "decode" else tuple(lc.default_dequant_config(dim))
    budget = max(lc.SPILL_BUDGET, spills.get((*key[:4], *default)) or 0)
    spill = spills.get(key)
    fields = dict(spill_stores=spill, over_budget=spill is not None and spill > budget)
    return fields | (dict(error=failed[key], rel_err=None) if key in failed else {})


def sweep_decode(args: argparse.Namespace, dim: int, key_bits: int, value_bits: int, compiled: tuple[dict, dict],
                 deadline: float) -> list[dict]:
    """Rows (one per case and candidate) of the decode kernel at one head_dim and bit pair (``compiled``: what
    :func:`compile_all` returned)."""
    _, shapes = grid(args, dim)
    default = lc.default_decode_config(dim)
    rows = []
    for batch, length in decode_cases(args, dim):
        base = dict(kernel="decode", head_dim=dim, bits=f"K{key_bits}V{value_bits}", key_bits=key_bits,
                    value_bits=value_bits, batch=batch, T=length, context=lc.context_bucket(length - args.exact))
        if time.perf_counter() > deadline:
            rows.append(base | dict(skipped=f"past --budget-s {args.budget_s}"))
            print(f"  skipped (time budget): {base}", flush=True)
            continue
        t0 = time.perf_counter()
        a = decode_inputs(args, dim, batch, length, key_bits, value_bits)
        with lc.using(decode_table(a, default)):
            reference = decode_float(a)
        case = []
        for block, warps in shapes:
            for per_sm in programs(args, dim):
                config = lc.DecodeConfig(block, warps, per_sm)
                row = base | dict(block=block, warps=warps, programs_per_sm=per_sm, default=config == default)
                row |= compile_fields(compiled, ("decode", dim, key_bits, value_bits, block, warps))
                if "error" not in row:
                    with lc.using(decode_table(a, config)):
                        assert lc.decode_config(dim, key_bits, value_bits, a["k_codes"].shape[2]) == config
                        row |= measure(lambda: bench.run_kernel(a), lambda: decode_float(a), reference, args)
                case.append(row)
        rows += case
        ok = sorted((r for r in case if "us" in r), key=lambda r: r["us"])
        base_us = next((r["us"] for r in ok if r["default"]), None)
        top = ", ".join(f"{r['block']}x{r['warps']}x{r['programs_per_sm']} {r['us']:.1f}" for r in ok[:3])
        print(f"[{time.strftime('%H:%M:%S')}] decode d{dim} K{key_bits}V{value_bits} batch {batch} T {length}: "
              f"default {base_us if base_us is None else round(base_us, 1)} us; fastest {top}; "
              f"{len(case) - len(ok)} failed; {time.perf_counter() - t0:.1f} s", flush=True)
    return rows


def sweep_dequant(args: argparse.Namespace, dim: int, key_bits: int, value_bits: int, compiled: tuple[dict, dict],
                  deadline: float) -> list[dict]:
    """Rows (one per candidate) of the dequant kernel at one head_dim and bit pair (``compiled`` as
    :func:`sweep_decode`)."""
    _, shapes = grid(args, dim)
    default = lc.default_dequant_config(dim)
    base = dict(kernel="dequant", head_dim=dim, bits=f"K{key_bits}V{value_bits}", key_bits=key_bits,
                value_bits=value_bits, batch=1, T=args.dequant_tokens)
    if time.perf_counter() > deadline:
        print(f"  skipped (time budget): {base}", flush=True)
        return [base | dict(skipped=f"past --budget-s {args.budget_s}")]
    a = decode_inputs(args, dim, 1, args.dequant_tokens + args.exact, key_bits, value_bits)
    with lc.using(dequant_table(dim, key_bits, value_bits, default)):
        reference = dequant_run(a)
    rows = []
    for block, warps in shapes:
        config = lc.DequantConfig(block, warps)
        row = base | dict(block=block, warps=warps, default=config == default)
        row |= compile_fields(compiled, ("dequant", dim, key_bits, value_bits, block, warps))
        if "error" not in row:
            with lc.using(dequant_table(dim, key_bits, value_bits, config)):
                row |= measure(lambda: dequant_run(a), lambda: dequant_run(a), reference, args)
        rows.append(row)
    ok = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
    print(f"[{time.strftime('%H:%M:%S')}] dequant d{dim} K{key_bits}V{value_bits} {args.dequant_tokens} tokens: "
          + ", ".join(f"{r['block']}x{r['warps']} {r['us']:.1f} us" for r in ok[:3]), flush=True)
    return rows


def choose(rows: list[dict], fields: tuple[str, ...], min_gain: float) -> dict | None:
    """The choice for one table key from its rows (the rule of the module docstring, among the candidates timed on
    every case of the key and within ``launch_configs.SPILL_BUDGET``): ``{"config", "fastest", "score",
    "default_score", "us", "default_us"}`` (configurations as ``{field: value}``, scores as geometric means of time
    over the case's fastest time, microseconds per ``"batch x T"``), or None when no candidate qualifies."""
    cases = sorted({(r["batch"], r["T"]) for r in rows if "skipped" not in r})
    timed = {}
    for r in rows:
        if "us" in r and not r["over_budget"]:
            timed.setdefault(tuple(r[f] for f in fields), {})[r["batch"], r["T"]] = r["us"]
    complete = {config: times for config, times in timed.items() if len(times) == len(cases)}
    if not cases or not complete:
        return None
    fastest = {case: min(times[case] for times in complete.values()) for case in cases}
    scores = {config: math.exp(sum(math.log(times[case] / fastest[case]) for case in cases) / len(cases))
              for config, times in complete.items()}
    best = min(scores, key=scores.get)
    default = next((tuple(r[f] for f in fields) for r in rows if r.get("default")), None)
    chosen = default if default in scores and scores[default] <= scores[best] * (1 + min_gain) else best
    per_case = lambda config: {f"{b}x{t}": complete[config][b, t] for b, t in cases}  # noqa: E731
    return dict(config=dict(zip(fields, chosen)), fastest=dict(zip(fields, best)), score=scores[chosen],
                default_score=scores.get(default), us=per_case(chosen),
                default_us=per_case(default) if default in complete else None)


def table_entries(rows: list[dict], args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """The decode and dequant entries of the table: one per key measured (:func:`choose`), with what was measured
    (``measured``: microseconds of the choice and of the default per ``batch x T`` case, geometric-mean scores)."""
    decode, dequant = [], []
    for kind, fields, out in (("decode", ("block", "warps", "programs_per_sm"), decode),
                              ("dequant", ("block", "warps"), dequant)):
        keys = sorted({(r["head_dim"], r["key_bits"], r["value_bits"], r.get("context")) for r in rows
                       if r["kernel"] == kind})
        for dim, kb, vb, context in keys:
            mine = [r for r in rows if r["kernel"] == kind and (r["head_dim"], r["key_bits"], r["value_bits"],
                                                                  r.get("context")) == (dim, kb, vb, context)]
            choice = choose(mine, fields, args.min_gain)
            if choice is None:
                continue
            entry = dict(head_dim=dim, key_bits=kb, value_bits=vb) | ({"context": context} if kind == "decode" else {})
            entry |= choice["config"] | {"measured": {k: choice[k] for k in ("us", "default_us", "score",
                                                                          "default_score", "fastest")}}
            out.append(entry)
    return decode, dequant


def meta(args: argparse.Namespace, argv: list[str] | None, seconds: float) -> dict:
    """Card, versions, date and command of the run."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    return dict(command="python benchmarks/tune_kernels.py " + shlex.join(sys.argv[1:] if argv is None else argv),
                card=torch.cuda.get_device_name(device) if cuda else "cpu (Triton interpreter)",
                multiprocessors=torch.cuda.get_device_properties(device).multi_processor_count if cuda else None,
                torch=torch.__version__, triton=__import__("triton").__version__, cuda=torch.version.cuda,
                python=platform.python_version(), date=time.strftime("%Y-%m-%d"), seconds=round(seconds, 1),
                rule=f"per key, the smallest geometric mean over its cases of time / the case's fastest time; the "
                     f"default unless more than {args.min_gain:.0%} slower by that measure; outputs within "
                     f"{args.tolerance:g} (relative L2) of the default configuration's; at most max("
                     f"{lc.SPILL_BUDGET}, the default's) bytes of spill stores per thread where ptxas's log was read")


def print_tables(decode: list[dict], dequant: list[dict]) -> None:
    """The chosen entries as markdown."""
    def fmt(entry: dict, field: str) -> str:
        return ", ".join(f"{case} {us:.1f}" for case, us in (entry["measured"][field] or {}).items()) or "-"

    print("\n" + markdown(["head_dim", "bits", "context", "chosen (block x warps x programs/SM)", "fastest",
                           "us (batch x T)", "default us", "default / chosen (geo. mean)"],
                          [[str(e["head_dim"]), f"K{e['key_bits']}V{e['value_bits']}", e["context"],
                            f"{e['block']}x{e['warps']}x{e['programs_per_sm']}",
                            "x".join(str(v) for v in e["measured"]["fastest"].values()), fmt(e, "us"),
                            fmt(e, "default_us"),
                            "-" if e["measured"]["default_score"] is None
                            else f"{e['measured']['default_score'] / e['measured']['score']:.3f}"] for e in decode]))
    print("\n" + markdown(["head_dim", "bits", "chosen (block x warps)", "fastest", "us", "default us"],
                          [[str(e["head_dim"]), f"K{e['key_bits']}V{e['value_bits']}", f"{e['block']}x{e['warps']}",
                            "x".join(str(v) for v in e["measured"]["fastest"].values()), fmt(e, "us"),
                            fmt(e, "default_us")] for e in dequant]))


def main(argv: list[str] | None = None) -> int:
    """Compile, sweep, choose; print the tables and the command; write ``--out`` and ``--write-table``."""
    args = parse_args(argv)
    t0 = time.perf_counter()
    compiled = compile_all(args)
    deadline = time.perf_counter() + args.budget_s  # timing only: compiling can take minutes
    rows = []
    for dim in args.dims:
        bits, _ = grid(args, dim)
        for key_bits, value_bits in bits:
            rows += sweep_decode(args, dim, key_bits, value_bits, compiled, deadline)
            rows += sweep_dequant(args, dim, key_bits, value_bits, compiled, deadline)
            torch.cuda.empty_cache() if args.device.startswith("cuda") else None
    decode, dequant = table_entries(rows, args)
    print_tables(decode, dequant)
    info = meta(args, argv, time.perf_counter() - t0)
    errors = [r for r in rows if "error" in r]
    skipped = [r for r in rows if "skipped" in r]
    print(f"\ncommand: {info['command']}\n{info['card']}, torch {info['torch']}, triton {info['triton']}, "
          f"{info['seconds']:.0f} s; {len(rows) - len(errors) - len(skipped)} candidates timed, {len(errors)} failed "
          f"or rejected, {len(skipped)} cases skipped")
    spills = compiled[1]
    if spills:
        print("spill stores (bytes per thread, ptxas): " + "; ".join(
            f"{k[0]} d{k[1]} K{k[2]}V{k[3]} {k[4]}x{k[5]}: {v}" for k, v in sorted(spills.items())))
    for r in errors:
        print(f"  failed: {r['kernel']} d{r['head_dim']} {r['bits']} T {r['T']} batch {r['batch']} "
              f"{r['block']}x{r['warps']}{'x' + str(r['programs_per_sm']) if 'programs_per_sm' in r else ''}: "
              f"{r['error']}")
    if args.out is not None:
        write_json(args.out, info, rows)
    if args.write_table is not None:
        args.write_table.parent.mkdir(parents=True, exist_ok=True)
        args.write_table.write_text(lc.table_json(info, decode, dequant))
        print(f"table written to {args.write_table}: {len(decode)} decode and {len(dequant)} dequant entries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
