"""End-to-end prefill and decode: NexusCache against a bf16 DynamicCache on a Llama-3.1-8B-shaped model.

The model is built from a ``LlamaConfig`` with the shape of Llama-3.1-8B (32 layers, hidden 4096, intermediate
14336, 32 query / 8 KV heads, head_dim 128, vocab 128256, rope_theta 500000, max_position_embeddings 262144;
``--layers``, ``--hidden``, ``--intermediate`` and ``--vocab`` shrink it) with random weights in bf16, so no
download is needed. For each context length T (``--lengths``) and a random prompt of T tokens, one row per
cache and mode (run in the order: every preset, then the two bf16 rows):

* ``bf16 DynamicCache``, eager, ``sdpa`` attention: the baseline;
* ``bf16 StaticCache``, the decode step compiled by Inductor with ``mode="reduce-overhead"`` (transformers'
  static cache, ``max_cache_len = T + every decode step``, preallocated for all of them: the fastest uncompressed
  cache transformers offers for decoding; ``--no-baseline`` skips both baselines);
* ``NexusCache`` of each preset (``--presets``) after ``nqcompile.optimize(model, preset, keep_line_breaks=False)``
  (the random prompt is no text, so it has no line breaks to keep), built with
  ``max_cache_len = T + every decode step run on it``, in mode ``eager`` and ``compiled`` (the same decode
  step under ``torch.compile(backend=--backend, mode=--compile-mode, fullgraph=True)``: by default nqcompile's
  ``nexusquant`` backend with ``reduce-overhead``; ``--backend inductor`` is the default Inductor backend). The two
  modes of a preset share one prefill: the compiled steps continue the cache the eager steps left.

Measured per row:

* prefill seconds: the prompt fed in chunks of ``--chunk`` tokens through ``model(...)`` with
  ``logits_to_keep=1``; compression at each chunk's end and, for presets that score by reconstruction
  (``balanced``), the re-reading that the hook of ``nqcompile.optimize`` runs after each chunk are included;
  for a preset, after a throwaway prefill of the first two chunks into another cache that builds the kernels
  (Triton compiles each on its first launch: minutes on a fresh machine), timed apart as the note's "kernel
  warm-up prefill";
* decode ms/token: mean over ``--steps`` single-token steps after ``--warmup`` untimed steps (the step feeds a
  fixed token and its position; 16 steps span one flush of the exact window into codes). In compiled mode the
  first call, which compiles, is timed on its own (``compile s``; Inductor's on-disk cache can shorten it on later
  rows and runs) before the warm-up steps, and the graphs Dynamo compiled and the times Inductor ran without CUDA
  graphs are counted: a recompilation during the timed steps, or skipped CUDA graphs, is reported in the note;
* peak GiB: ``torch.cuda.max_memory_allocated()`` over the prefill and this mode's decode steps (reset before
  each row's prefill, and again before each mode; ``-`` on the CPU);
* the cache's bytes: ``memory_report()`` of a NexusCache after the row's decode (allocated, of which unused
  preallocated capacity, bf16 bytes of the same tokens, and their ratio); for the DynamicCache and the StaticCache
  the bytes their keys and values hold (the StaticCache's include its unused capacity);
* 128K sequences: how many sequences of 131,072 tokens would fit on the card at once with this cache (CUDA only):
  ``(card memory - weights - workspace) / (131,072 x cache bytes per token)``, rounded down, where the bytes per
  token are the row's allocated bytes over the tokens it holds (a StaticCache: over its capacity) and the workspace
  is the row's peak memory less the weights and the cache (the activations of one chunk of prefill and a decode
  step, needed once when the sequences are prefilled one after another).

A row that fails (out of memory, a compile error) reports the exception's type and first line in its note
(the JSON keeps the end of the traceback) and the run goes on; the cache is freed between rows. Random weights
give near-uniform attention, so which tokens are evicted and which layers ``relax_key_kl`` lowers to 3-bit keys
differ from the real model: the byte ratios are indicative, the times and memory are what this shape costs.

Prints the rows as they finish, then a markdown table, the command line and the versions; ``--out`` gets all of
it as JSON, rewritten after every row (a run cut short keeps what it measured). For example, on one GPU::

    python benchmarks/e2e_decode.py --lengths 32768 --out out/e2e_32k.json
    python benchmarks/e2e_decode.py --lengths 131072 --modes eager
    python benchmarks/e2e_decode.py --smoke        # tiny model on the CPU, about a minute
"""

from __future__ import annotations

import argparse
import gc
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, StaticCache

import nqcompile
import nqcompile.compile
from nqcompile.models import cache_kwarg_name

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # benchmarks/_common.py, also when a test loads this script by its path
    sys.path.insert(0, _HERE)
from _common import failure as _failure, ints as _ints, markdown, names as _names, progress  # noqa: E402
from _common import parse_with_smoke, prefill as _prefill, time_calls, write_json as _write  # noqa: E402

BASELINE = "bf16 DynamicCache"
STATIC = "bf16 StaticCache"
#: Tokens of the sequences counted by ``seqs_128k``.
LONG_SEQUENCE = 131072
MODES = ("eager", "compiled")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
#: What ``--smoke`` changes (flags given explicitly still win): a tiny model on the CPU.
SMOKE = dict(device="cpu", layers=2, hidden=256, intermediate=512, vocab=1024, lengths="512", chunk=256, steps=4,
             warmup=2)
MIB, GIB = 2.0**20, 2.0**30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the benchmark's command line (see ``--help``); ``--smoke`` changes the defaults to :data:`SMOKE`."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--lengths", type=_ints, default="32768,131072", help="comma-separated context lengths T")
    p.add_argument("--presets", type=_names, default="quant_only,balanced",
                   help="comma-separated NexusCache presets ('': the baseline only)")
    p.add_argument("--modes", type=_names, default=",".join(MODES),
                   help="comma-separated NexusCache modes: eager, compiled (eager runs first)")
    p.add_argument("--backend", choices=("nexusquant", "inductor"), default="nexusquant",
                   help="torch.compile backend of the compiled rows (default: nexusquant)")
    p.add_argument("--compile-mode", default="reduce-overhead",
                   help="torch.compile mode of the compiled rows (default: reduce-overhead, CUDA graphs)")
    p.add_argument("--no-baseline", action="store_true", help="skip the bf16 DynamicCache and StaticCache rows")
    p.add_argument("--chunk", type=int, default=8192, help="prefill chunk in tokens")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per row")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed decode steps before the timed ones (compiled mode: after the compiling first call)")
    p.add_argument("--layers", type=int, default=32, help="decoder layers")
    p.add_argument("--hidden", type=int, default=4096, help="hidden size (heads and head_dim stay 32 / 8 x 128)")
    p.add_argument("--intermediate", type=int, default=14336, help="MLP intermediate size")
    p.add_argument("--vocab", type=int, default=128256, help="vocabulary size")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="weights and activations")
    p.add_argument("--device", default="cuda", help="torch device")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the prompt")
    p.add_argument("--out", type=Path, default=Path("out/e2e_decode.json"), help="JSON results file")
    p.add_argument("--smoke", action="store_true",
                   help="tiny CPU check: " + " ".join(f"--{k} {v}" for k, v in SMOKE.items()))
    args = parse_with_smoke(p, argv, SMOKE)
    if any(m not in MODES for m in args.modes) or not args.modes:
        p.error(f"--modes must name some of {MODES}, got {args.modes}")
    args.modes = [m for m in MODES if m in args.modes]  # eager first: the compiled steps continue its cache
    if min(args.lengths + [args.chunk, args.steps]) < 1 or args.warmup < 0:
        p.error("--lengths, --chunk and --steps must be positive, --warmup non-negative")
    return args


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """The Llama-3.1-8B-shaped model (shrunk by ``--layers`` etc.) with seeded random weights, eval, on ``--device``."""
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         max_position_embeddings=262144, rope_theta=500000.0)
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[args.dtype], attn_implementation="sdpa")
    return model.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: torch.device, floor: int = 0) -> float | None:
    """GiB of the allocator's peak since the last reset (at least ``floor`` bytes); None off CUDA."""
    return max(floor, torch.cuda.max_memory_allocated(device)) / GIB if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def prefill(model, cache, ids: torch.Tensor, chunk: int, label: str) -> float:
    """Feed ``ids`` ``[1, T]`` through ``model`` into ``cache`` in chunks of ``chunk`` tokens; returns seconds
    (an optimized model's hook re-reads each chunk inside the same call). Logs each chunk to stderr as ``label``."""
    return _prefill(model, cache, ids, chunk, label, sync=lambda: _sync(ids.device)).seconds


def decode_step(model, cache) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``step(token [1, 1], position [1, 1]) -> logits``: one decode step of ``model`` through ``cache``."""
    kwarg = cache_kwarg_name(model)

    def step(token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        return model(input_ids=token, position_ids=position, use_cache=True, logits_to_keep=1, **{kwarg: cache}).logits

    return step


def time_decode(step, token: torch.Tensor, position: torch.Tensor, *, warmup: int, steps: int,
                compiled: bool) -> dict:
    """Run ``warmup`` untimed then ``steps`` timed calls of ``step``, advancing ``position`` (in place) each call.

    Returns ``{"decode_ms_per_token": ...}``; for a compiled ``step`` also ``compile_s`` (its first call, timed on
    its own before the warm-up), ``graphs`` (compiled by the first call and the warm-up), ``timed_recompiles``
    (graphs compiled during the timed calls) and ``cudagraph_skips`` (times Inductor ran a graph without CUDA
    graphs). Every compiled call marks a new CUDA-graph step.
    """
    def call() -> None:
        if compiled:
            torch.compiler.cudagraph_mark_step_begin()
        step(token, position)
        position.add_(1)

    return time_calls(call, warmup=warmup, steps=steps, compiled=compiled, sync=lambda: _sync(token.device))


def _report_fields(report) -> dict:
    """A :class:`nqcompile.CacheMemoryReport` as row fields."""
    return {"allocated_mib": report.allocated_bytes / MIB, "unused_mib": report.unused_capacity_bytes / MIB,
            "bf16_mib": report.bf16_bytes / MIB, "ratio": report.compression_ratio,
            "layer_key_bits": list(report.layer_key_bits)}


def baseline_row(model, ids: torch.Tensor, args: argparse.Namespace) -> dict:
    """The bf16 DynamicCache row (sdpa attention, eager) at ``T = ids.shape[1]``."""
    row = {"T": ids.shape[1], "cache": BASELINE, "mode": "eager"}
    device = ids.device
    model.set_attn_implementation("sdpa")  # the optimize() hook, if installed, ignores a DynamicCache
    cache = DynamicCache()
    _reset_peak(device)
    try:
        row["prefill_s"] = prefill(model, cache, ids, args.chunk, f"T={ids.shape[1]} {BASELINE}")
        token, position = ids[:, -1:].clone(), torch.full((1, 1), ids.shape[1], device=device)
        row.update(time_decode(decode_step(model, cache), token, position, warmup=args.warmup, steps=args.steps,
                               compiled=False))
        row["peak_gib"] = _peak_gib(device)
        kv = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
        row.update(allocated_mib=kv / MIB, unused_mib=0.0, bf16_mib=kv / MIB, ratio=1.0)
    except Exception as err:  # noqa: BLE001 - any failure is a result of the row
        row.update(_failure(err))
    return row


def static_row(model, ids: torch.Tensor, args: argparse.Namespace) -> dict:
    """The bf16 StaticCache row at ``T = ids.shape[1]``: prefill eager, decode step compiled by Inductor with
    ``mode="reduce-overhead"`` (``cache_position`` passed, as ``generate`` does, so the step has no data-dependent
    length)."""
    T, device = ids.shape[1], ids.device
    row = {"T": T, "cache": STATIC, "mode": "compiled", "backend": "inductor", "compile_mode": "reduce-overhead"}
    model.set_attn_implementation("sdpa")
    capacity = T + 1 + args.warmup + args.steps  # the prompt, the first (compiling) call, the warm-up, the timed steps
    cache = StaticCache(config=model.config, max_cache_len=capacity)
    _reset_peak(device)
    try:
        row["prefill_s"] = prefill(model, cache, ids, args.chunk, f"T={T} {STATIC}")
        kwarg = cache_kwarg_name(model)

        def step(token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
            return model(input_ids=token, position_ids=position, cache_position=position[0], use_cache=True,
                         logits_to_keep=1, **{kwarg: cache}).logits

        torch.compiler.reset()
        fn = torch.compile(step, mode="reduce-overhead", fullgraph=True)
        token, position = ids[:, -1:].clone(), torch.full((1, 1), T, device=device)
        row.update(time_decode(fn, token, position, warmup=args.warmup, steps=args.steps, compiled=True))
        row["peak_gib"] = _peak_gib(device)
        kv = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
        row.update(allocated_mib=kv / MIB, unused_mib=0.0, bf16_mib=kv / MIB, ratio=1.0, capacity_tokens=capacity)
    except Exception as err:  # noqa: BLE001 - any failure is a result of the row
        row.update(_failure(err))
    finally:
        torch.compiler.reset()
    return row


def seqs_128k(row: dict, model, device: torch.device) -> int | None:
    """How many :data:`LONG_SEQUENCE`-token sequences fit on the card with the row's cache (module docstring), or
    None off CUDA or for a failed row."""
    if device.type != "cuda" or row.get("allocated_mib") is None or row.get("peak_gib") is None:
        return None
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    cache = row["allocated_mib"] * MIB
    per_token = cache / row.get("capacity_tokens", row["T"])
    workspace = max(0.0, row["peak_gib"] * GIB - weights - cache)
    free = torch.cuda.get_device_properties(device).total_memory - weights - workspace
    return max(0, int(free // (per_token * LONG_SEQUENCE)))


def preset_rows(model, ids: torch.Tensor, preset: str, args: argparse.Namespace) -> list[dict]:
    """One row per mode in ``args.modes`` for a NexusCache of ``preset`` at ``T = ids.shape[1]``; the modes share
    one prefill and the compiled steps continue the cache after the eager ones."""
    T, device = ids.shape[1], ids.device
    rows = [{"T": T, "cache": preset, "mode": mode} for mode in args.modes]
    calls = sum(args.warmup + args.steps + (mode == "compiled") for mode in args.modes)
    try:
        nqcompile.optimize(model, preset, keep_line_breaks=False)  # random ids are no text: no line breaks to keep
        # A throwaway prefill of the first two chunks first: it builds the kernels (Triton compiles each on its first
        # launch, minutes on a fresh machine), so that prefill_s times the prefill, as compile_s is kept apart from
        # the compiled decode.
        warm = min(T, 2 * args.chunk)
        warm_cache = nqcompile.NexusCache(model.config, model.nqcompile_preset, max_cache_len=warm)
        kernel_warmup_s = prefill(model, warm_cache, ids[:, :warm], args.chunk, f"T={T} {preset} kernel warm-up")
        del warm_cache
        _free(device)
        _reset_peak(device)
        cache = nqcompile.NexusCache(model.config, model.nqcompile_preset, max_cache_len=T + calls)
        prefill_s = prefill(model, cache, ids, args.chunk, f"T={T} {preset}")
        prefill_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    except Exception as err:  # noqa: BLE001
        for row in rows:
            row.update(_failure(err))
        return rows
    token, position = ids[:, -1:].clone(), torch.full((1, 1), T, device=device)
    step = decode_step(model, cache)
    for i, row in enumerate(rows):
        row.update(prefill_s=prefill_s, kernel_warmup_s=kernel_warmup_s)
        if i and "error" in rows[i - 1]:  # a step that failed half-way leaves the shared cache inconsistent
            row["error"] = f"not run: the {rows[i - 1]['mode']} row failed on the cache they share"
            continue
        compiled = row["mode"] == "compiled"
        _reset_peak(device)
        try:
            if compiled:
                torch.compiler.reset()
                # The backend function itself, so that the run needs no installed entry point (PYTHONPATH is enough).
                backend = nqcompile.compile.nexusquant if args.backend == "nexusquant" else "inductor"
                fn = torch.compile(step, backend=backend, mode=args.compile_mode, fullgraph=True)
                row.update(backend=args.backend, compile_mode=args.compile_mode)
            else:
                fn = step
            row.update(time_decode(fn, token, position, warmup=args.warmup, steps=args.steps, compiled=compiled))
            if compiled and args.backend == "nexusquant":
                reports = [r for r in nqcompile.compile.last_reports() if r.prepared]
                row["passes"] = dict(reports[-1].pass_counts) if reports else {}
            row["peak_gib"] = _peak_gib(device, prefill_peak)
            row.update(_report_fields(cache.memory_report()))
        except Exception as err:  # noqa: BLE001
            row.update(_failure(err))
        finally:
            if compiled:
                torch.compiler.reset()  # drops the compiled step's guards on the cache and its CUDA graphs
            _free(device)
    return rows


def _note(row: dict, rows: list[dict]) -> str:
    """The table's note: the failure, else the compile time, recompiles and unused capacity."""
    if "error" in row:
        return row["error"]
    parts = []
    if "kernel_warmup_s" in row:
        parts.append(f"kernel warm-up prefill {row['kernel_warmup_s']:.1f} s")
    if "compile_s" in row:
        parts.append(f"first call (compile) {row['compile_s']:.1f} s, {row['graphs']} graph(s)")
        if row["timed_recompiles"]:
            parts.append(f"recompiled {row['timed_recompiles']} time(s) during the timed steps")
        if row["cudagraph_skips"]:
            parts.append(f"CUDA graphs skipped {row['cudagraph_skips']} time(s)")
        if row.get("passes"):
            parts.append("passes: " + ", ".join(f"{name} {n}" for name, n in row["passes"].items()))
        if any(r is not row and r["cache"] == row["cache"] and r["T"] == row["T"] for r in rows):
            parts.append("prefill shared with the eager row")
    if row.get("unused_mib"):
        parts.append(f"unused capacity {row['unused_mib']:.1f} MiB")
    return "; ".join(parts)


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table (T, cache, mode, prefill s, decode ms/token, peak GiB, MiB, ratio, 128K sequences,
    note)."""
    def num(row: dict, key: str, fmt: str) -> str:
        return "-" if row.get(key) is None else format(row[key], fmt)

    head = ["T", "cache", "mode", "prefill s", "decode ms/token", "peak GiB", "allocated MiB", "ratio vs bf16",
            "128K seqs", "note"]
    lines = []
    for row in rows:
        cache = row["cache"] if row["cache"] in (BASELINE, STATIC) else f"NexusCache `{row['cache']}`"
        ratio = "-" if row.get("ratio") is None else f"{row['ratio']:.2f}x"
        mode = f"compiled, {row['backend']}, {row['compile_mode']}" if "backend" in row else row["mode"]
        lines.append([f"{row['T']:,}", cache, mode, num(row, "prefill_s", ".2f"),
                      num(row, "decode_ms_per_token", ".2f"), num(row, "peak_gib", ".2f"),
                      num(row, "allocated_mib", ".1f"), ratio, num(row, "seqs_128k", "d"), _note(row, rows)])
    return markdown(head, lines)


def _environment(device: torch.device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def _progress(row: dict) -> str:
    keys = ("prefill_s", "compile_s", "decode_ms_per_token", "peak_gib", "allocated_mib", "ratio", "error")
    return progress(row, keys, f"T={row['T']} {row['cache']} {row['mode']}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints every row as it finishes, then the table, the command line and the versions.

    Returns the exit status (0, also when rows failed: their notes say why). ``argv`` defaults to ``sys.argv[1:]``.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = torch.device(args.device)
    meta = {"command": shlex.join(["python", "benchmarks/e2e_decode.py", *argv]), **_environment(device),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    print(f"{meta['command']}\n{meta['device']}; torch {meta['torch']}, transformers {meta['transformers']}, "
          f"triton {meta['triton']}", flush=True)
    t0 = time.perf_counter()
    model = build_model(args)
    print(f"model: {args.layers} layers, hidden {args.hidden}, {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B "
          f"parameters ({args.dtype}) built in {time.perf_counter() - t0:.1f} s", flush=True)
    rows: list[dict] = []
    for T in args.lengths:
        generator = torch.Generator(device=device).manual_seed(args.seed)  # the same prompt whatever ran before
        ids = torch.randint(0, args.vocab, (1, T), device=device, generator=generator)
        # The presets first: in one process, after the compiled StaticCache row, the first NexusCache prefill at
        # 32K took 8x longer on the H200 (159 s against 16-20 s alone; benchmarks/README.md).
        for preset in args.presets + ([] if args.no_baseline else [BASELINE, STATIC]):
            if preset == BASELINE:
                new = [baseline_row(model, ids, args)]
            elif preset == STATIC:
                new = [static_row(model, ids, args)]
            else:
                new = preset_rows(model, ids, preset, args)
            for row in new:
                row["seqs_128k"] = seqs_128k(row, model, device)
                rows.append(row)
                print(_progress(row), flush=True)
                if "traceback" in row:
                    print(row["traceback"], file=sys.stderr, flush=True)
            _free(device)
            _write(args.out, meta, rows)
    print()
    print(markdown_table(rows))
    print()
    print(f"command: {meta['command']}")
    print(f"device: {meta['device']}; python {meta['python']}, torch {meta['torch']}, transformers "
          f"{meta['transformers']}, triton {meta['triton']}; model {args.layers} layers x hidden {args.hidden}, "
          f"{args.dtype}; chunk {args.chunk}, {args.warmup} warm-up + {args.steps} timed steps; "
          f"total {time.perf_counter() - t0:.0f} s")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
