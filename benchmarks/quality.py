"""Quality benchmark: every preset against the exact cache, on every model and genre, in one run (``docs/design.md``,
"Evaluation protocol").

For each model of ``--models`` (SmolLM2-135M-Instruct and Gemma 3 270M, converted once by
``nqcompile.models.load_pretrained``) and each cache, the uncompressed baseline (``DynamicCache``) and every preset in
``nqcompile.PRESETS`` (or those given with ``--presets``, plus any defined on the command line with ``--custom``):

* perplexity on ``--windows`` windows of each genre of ``--genres`` (``nqcompile.eval.GENRES``: Austen's prose, the
  Python Language Reference, Python source code), each window a prefill of ``--prefix`` tokens (compressed at the end
  of the chunk), then ``--continuation`` tokens as decode steps through the cache; per genre and overall (all
  windows): the mean change of perplexity in % and of mean log-likelihood in nats per token against the baseline on
  the same windows, with 95% bootstrap intervals over windows;
* measured byte ratio: ``memory_report().compression_ratio`` (bf16 bytes of the same tokens / bytes the cache
  allocated) at the end of each window, averaged over windows;
* needle recall: query-agnostic needle in an Austen haystack at each ``--needle-lengths`` x ``--needle-depths``;
* decode speed (JSON only): replayed decode steps per second during the continuations (this machine).

Prints a markdown table (one row per cache; per model, a column per genre, overall, byte ratio and needle length) and
the command line it was run with; ``--out`` writes everything as JSON, after every cache. A cache that fails (a preset
a model's config refuses, say) is recorded with its error, and the exit status is then 1. With ``--jobs N`` up to N
models run at once, each in its own process with ``--threads`` threads; each process writes its model's results,
after every cache, beside ``--out`` (``quality.smollm2.json`` for ``--out quality.json``), and the whole run goes to
``--out`` at the end.

    python benchmarks/quality.py --threads 2 --out out/quality.json
    python benchmarks/quality.py --jobs 2 --threads 1 --windows 3 --out out/quality.json   # the two models at once
    python benchmarks/quality.py --models smollm2 --presets '' --custom '{"k4v2": {"key_bits": 4, "value_bits": 2}}' --needle-lengths ''
    python benchmarks/quality.py --smoke      # two tiny random models (Llama, Gemma 3), a minute on a CPU
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import build_caches, byte_level_tokenizer, failure, ints, markdown, names, parse_with_smoke  # noqa: E402
from _common import preset_fields  # noqa: E402

import nqcompile  # noqa: E402
from nqcompile.eval import (GENRES, bootstrap_ci, loglik_change, needle_recall, perplexity,  # noqa: E402
                            perplexity_windows, ppl_change_percent, run_windows)
from nqcompile.models import PRETRAINED, load_pretrained  # noqa: E402

BASELINE = "exact"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Models ``--smoke`` builds from configs (random weights, seeded) with a byte-level tokenizer: a Llama, and a Gemma 3
#: with sliding-window layers (a 64-token window) and QK-norm.
TINY = {
    "tiny-llama": lambda: transformers.LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, max_position_embeddings=2048),
    "tiny-gemma3": lambda: transformers.Gemma3TextConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, query_pre_attn_scalar=64, max_position_embeddings=2048, sliding_window=64,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], pad_token_id=0),
}
#: What ``--smoke`` changes (flags given explicitly still win).
SMOKE = dict(models=",".join(TINY), presets="quant_only,balanced", windows=2, prefix=256, continuation=64,
             needle_lengths="256,512", needle_depths="0,1")


def _floats(text: str) -> list[float]:
    return [float(x) for x in names(text)]


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's argument parser (see ``--help``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("--models", type=names, default="smollm2,gemma3-270m",
                   help=f"comma-separated models: names of nqcompile.models.PRETRAINED {sorted(PRETRAINED)} or local "
                        f"HuggingFace folders, and {sorted(TINY)} (the --smoke models) (default: smollm2,gemma3-270m)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="model dtype (default: float32)")
    p.add_argument("--device", default="cpu", help="torch device the models run on (default: cpu)")
    p.add_argument("--presets", type=names, default=",".join(nqcompile.PRESETS),
                   help="comma-separated preset names; '' runs the baseline only (default: all)")
    p.add_argument("--custom", type=preset_fields, default={},
                   help='more caches as JSON, {"name": {Preset fields}}: run after --presets (ablations; default: none)')
    p.add_argument("--compress-layers", choices=("all", "global_only"), default=None,
                   help="set every preset's compress_layers (global_only: sliding-window layers stay transformers' "
                        "own; default: each preset's own)")
    p.add_argument("--genres", type=names, default=",".join(GENRES),
                   help=f"comma-separated genres of nqcompile.eval.GENRES (default: {','.join(GENRES)})")
    p.add_argument("--windows", type=int, default=4, help="perplexity windows per genre (0: skip perplexity; default: 4)")
    p.add_argument("--prefix", type=int, default=3584, help="prefill tokens per window (default: 3584)")
    p.add_argument("--continuation", type=int, default=512, help="continuation tokens per window (default: 512)")
    p.add_argument("--needle-lengths", type=ints, default="2048,4096",
                   help="comma-separated context lengths ('': skip; default: 2048,4096)")
    p.add_argument("--needle-depths", type=_floats, default="0,0.25,0.5,0.75,1",
                   help="comma-separated depths in [0, 1] (default: 0,0.25,0.5,0.75,1)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the window draw, the needles, the bootstrap and the --smoke models (default: 0)")
    p.add_argument("--out", type=Path, default=None, help="write all results as JSON here (default: only print the table)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (of each process with --jobs; default: torch's choice)")
    p.add_argument("--jobs", type=int, default=1,
                   help="models evaluated at once, each in its own process (default: 1: one after the other)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny random models instead of the real ones: " + " ".join(f"--{k.replace('_', '-')} {v}"
                                                                                   for k, v in SMOKE.items()))
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the benchmark's command line (see ``--help``); ``--smoke`` changes the defaults to :data:`SMOKE`.

    Adds ``args.caches``: ``{name: Preset}`` of ``--presets`` then ``--custom``, with ``--compress-layers`` applied;
    and ``args.command``, the command line (``argv`` defaults to ``sys.argv[1:]``).
    Unknown presets or genres, a taken or invalid ``--custom`` name or field, depths outside [0, 1] and non-positive
    sizes are usage errors (exit status 2).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    p = build_parser()
    args = parse_with_smoke(p, argv, SMOKE)
    args.command = shlex.join(["python", "benchmarks/quality.py", *argv])
    if [g for g in args.genres if g not in GENRES] or not args.genres and args.windows:
        p.error(f"--genres {','.join(args.genres)!r}: choose among {list(GENRES)}")
    if not args.models:
        p.error("--models is empty")
    if any(not 0 <= d <= 1 for d in args.needle_depths):
        p.error("--needle-depths must lie in [0, 1]")
    if args.jobs < 1:
        p.error(f"--jobs {args.jobs}: must be >= 1")
    args.jobs = min(args.jobs, len(args.models))  # the processes a run can use
    if args.windows < 0 or min(args.prefix, args.continuation, *args.needle_lengths) < 1:
        p.error("--windows must be >= 0; --prefix, --continuation and --needle-lengths positive")
    caches = build_caches(p, args.presets, args.custom, BASELINE)
    if args.compress_layers:
        try:
            caches = {name: preset.replace(compress_layers=args.compress_layers) for name, preset in caches.items()}
        except ValueError as err:
            p.error(f"--compress-layers {args.compress_layers}: {err}")
    args.caches = caches
    return args


def load_model(name: str, args: argparse.Namespace) -> tuple[torch.nn.Module, object, str]:
    """``(model, tokenizer, description)`` for a ``--models`` entry, in eval mode on ``--device`` in ``--dtype``: a
    :data:`TINY` name builds a seeded random model, anything else goes to ``load_pretrained``."""
    dtype = DTYPES[args.dtype]
    if name in TINY:
        torch.manual_seed(args.seed)
        model = transformers.AutoModelForCausalLM.from_config(TINY[name](), dtype=dtype).to(args.device).eval()
        return model, byte_level_tokenizer(), f"random weights (seed {args.seed}), byte-level tokenizer"
    model, tokenizer = load_pretrained(name, dtype=dtype, device=args.device)
    known = next((m.title for m in PRETRAINED.values() if name.lower() in m.aliases), name)
    return model, tokenizer, f"{known} ({type(model).__name__})"


def _cache_factory(model, preset: nqcompile.Preset | None):
    """``max_cache_len -> fresh cache``: DynamicCache for the baseline, else a NexusCache with ``preset``."""
    if preset is None:
        return lambda n: DynamicCache()
    return lambda n: nqcompile.NexusCache(model.config, preset=preset, max_cache_len=n)


def _summary(values: list[float], seed: int) -> dict:
    """``{"per_window", "mean", "ci95"}`` of per-window figures (95% bootstrap interval of the mean)."""
    ci = bootstrap_ci(values, seed=seed)
    return {"per_window": values, "mean": ci.mean, "ci95": [ci.low, ci.high]}


def _memory_dict(report) -> dict | None:
    """A memory report as a plain dict (its dataclass fields plus the ratio), or None."""
    if report is None:
        return None
    keys = ("logical_tokens", "physical_tokens", "allocated_bytes", "unused_capacity_bytes", "bf16_bytes",
            "compression_ratio", "layer_key_bits")
    return {k: getattr(report, k) for k in keys if hasattr(report, k)}


def run_cache(model, tokenizer, windows: dict[str, list], preset: nqcompile.Preset | None, base: dict | None,
              args: argparse.Namespace, label: str) -> dict:
    """Perplexity on every window and needle recall through one cache (``preset`` None: the baseline).

    Returns the cache's JSON-ready entry: ``windows`` (each with its genre, NLL, timings and memory report), ``genres``
    (per genre and ``"overall"``: perplexity, and against ``base``, the baseline's entry, the changes of perplexity in %
    and of mean log-likelihood in nats per token, and the byte ratio), ``decode_tokens_per_s``, ``needle``.
    """
    factory = _cache_factory(model, preset)
    entry: dict = {"preset": None if preset is None else preset.to_dict()}
    flat = [(genre, w) for genre, ws in windows.items() for w in ws]
    if flat:
        runs = run_windows(model, [w for _, w in flat], factory, desc=f"{label}: perplexity windows")
        entry["windows"] = [
            {"genre": g, "source": w.source, "start": w.start, "nll_sum": r.nll_sum, "n_tokens": r.n_tokens,
             "perplexity": r.perplexity, "prefill_s": r.prefill_s, "decode_s": r.decode_s,
             "decode_steps": r.decode_steps, "memory": _memory_dict(r.memory)}
            for (g, w), r in zip(flat, runs)
        ]
        entry["decode_tokens_per_s"] = sum(r.decode_steps for r in runs) / sum(r.decode_s for r in runs)
        entry["genres"] = {}
        for genre in [*windows, "overall"]:
            idx = [i for i, (g, _) in enumerate(flat) if genre in (g, "overall")]
            nll = [runs[i].nll_sum for i in idx]
            n_tok = [runs[i].n_tokens for i in idx]
            stats: dict = {"windows": len(idx), "perplexity": perplexity(sum(nll), sum(n_tok))}
            if base is not None:
                ref = [base["windows"][i]["nll_sum"] for i in idx]
                stats["ppl_change_percent"] = _summary(
                    [ppl_change_percent(a, b, n) for a, b, n in zip(nll, ref, n_tok)], args.seed)
                stats["loglik_change_nats"] = _summary(
                    [loglik_change(a, b, n) for a, b, n in zip(nll, ref, n_tok)], args.seed)
            ratios = [runs[i].memory.compression_ratio for i in idx if runs[i].memory is not None]
            if ratios:
                stats["byte_ratio"] = {"mean": float(np.mean(ratios)), "min": float(np.min(ratios)),
                                       "max": float(np.max(ratios))}
            entry["genres"][genre] = stats
    if args.needle_lengths:
        needles = needle_recall(model, tokenizer, factory, lengths=args.needle_lengths, depths=args.needle_depths,
                                seed=args.seed, desc=f"{label}: needle")
        entry["needle"] = needles.to_dict()
    return entry


def evaluate_model(name: str, args: argparse.Namespace, results: dict) -> None:
    """Load one model and run the baseline and every cache of ``args.caches`` on it, into ``results[name]``
    (``{"description", "seconds", "caches": {cache: entry}}``; a failed cache's entry holds its error), writing
    ``--out`` after every cache."""
    t0 = time.perf_counter()
    model, tokenizer, description = load_model(name, args)
    if args.caches:
        # The attention is registered once; each cache carries its own preset, and DynamicCache runs exact SDPA.
        model = nqcompile.optimize(model, preset=next(iter(args.caches.values())), tokenizer=tokenizer)
    windows = {g: perplexity_windows(tokenizer, n_windows=args.windows, prefix=args.prefix,
                                     continuation=args.continuation, seed=args.seed, sources=GENRES[g])
               for g in args.genres} if args.windows else {}
    record = results[name] = {"description": description, "caches": {}}
    for cache in [BASELINE, *args.caches]:
        preset = args.caches.get(cache)
        base = record["caches"].get(BASELINE) if preset is not None else None
        t1 = time.perf_counter()
        if base is not None and "error" in base:
            entry = {"preset": preset.to_dict(), "error": "the baseline failed"}
        else:
            try:
                entry = run_cache(model, tokenizer, windows, preset, base, args, f"{name} {cache}")
            except Exception as err:  # recorded in the table and the JSON, and the exit status is 1
                entry = {"preset": None if preset is None else preset.to_dict(), **failure(err)}
                print(f"{name} {cache}: {entry['error']}", file=sys.stderr, flush=True)
        entry["seconds"] = time.perf_counter() - t1
        record["caches"][cache] = entry
        if args.out:
            _write(args, results)
    record["seconds"] = time.perf_counter() - t0


def _cell_change(stats: dict, ci: bool) -> str:
    """``+0.97% / -0.0097`` (perplexity change, log-likelihood change in nats per token), with the perplexity
    change's interval when ``ci``."""
    p, ll = stats["ppl_change_percent"], stats["loglik_change_nats"]
    interval = f" [{p['ci95'][0]:+.2f}, {p['ci95'][1]:+.2f}]" if ci and stats["windows"] > 1 else ""
    return f"{p['mean']:+.2f}%{interval} / {ll['mean']:+.4f}"


def markdown_table(results: dict, args: argparse.Namespace) -> str:
    """The results as one markdown table: a row per cache (baseline first); per model, a column per genre and
    overall (perplexity change in % / log-likelihood change in nats per token; the baseline's perplexity), the byte
    ratio (mean over windows, range where they differ) and the needles found at each length."""
    genres = [*args.genres, "overall"] if args.windows else []
    head = ["cache"]
    for model in results:
        head += [f"{model} {g}" for g in genres]
        head += [f"{model} byte ratio"] * bool(genres) + [f"{model} needle @{n}" for n in args.needle_lengths]
    rows = []
    for cache in [BASELINE, *args.caches]:
        row = ["exact (DynamicCache)" if cache == BASELINE else f"`{cache}`"]
        for model, record in results.items():
            e = record["caches"].get(cache, {})
            width = len(genres) + bool(genres) + len(args.needle_lengths)
            if "error" in e:
                row += [f"error: {e['error']}"[:80]] + ["-"] * (width - 1)
                continue
            stats = e.get("genres", {})
            for g in genres:
                if g not in stats:
                    row.append("-")
                elif cache == BASELINE:
                    row.append(f"ppl {stats[g]['perplexity']:.3f}")
                else:
                    row.append(_cell_change(stats[g], ci=g == "overall"))
            if genres:
                b = stats.get("overall", {}).get("byte_ratio")
                row.append("-" if b is None else f"{b['mean']:.2f}x"
                           + (f" ({b['min']:.2f}-{b['max']:.2f})" if b["max"] - b["min"] > 0.005 else ""))
            for n in args.needle_lengths:
                trials = [t for t in e.get("needle", {}).get("trials", []) if t["length"] == n]
                row.append(f"{sum(t['found'] for t in trials)}/{len(trials)}" if trials else "-")
        rows.append(row)
    return markdown(head, rows)


def _meta(args: argparse.Namespace) -> dict:
    return {
        "command": args.command,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("caches", "command")},
        "caches": {name: preset.to_dict() for name, preset in args.caches.items()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "threads": torch.get_num_threads(),
        "device": args.device,
    }


def _write(args: argparse.Namespace, results: dict) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": _meta(args), "results": results}, indent=1, default=float))


def model_out(out: Path, name: str) -> Path:
    """Where a ``--jobs`` process writes model ``name``'s results as it goes: beside ``out``, the model's name
    (made a valid file name) before the suffix."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(name).name)
    return out.with_name(f"{out.stem}.{safe}{out.suffix}")


def _evaluate_alone(name: str, args: argparse.Namespace) -> dict:
    """``--jobs``: one model in a process of its own (``args.threads`` threads), writing its results beside
    ``--out``; returns ``results[name]``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    own = argparse.Namespace(**{**vars(args), "out": args.out and model_out(args.out, name)})
    results: dict = {}
    evaluate_model(name, own, results)
    return results[name]


def evaluate_models(args: argparse.Namespace) -> dict:
    """Every model of ``--models``: one after the other in this process, or with ``--jobs`` in that many processes
    at once (``spawn``); ``{model: results}`` in ``--models`` order."""
    if args.jobs == 1:
        results: dict = {}
        for name in args.models:
            evaluate_model(name, args, results)
        return results
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return dict(zip(args.models, pool.map(_evaluate_alone, args.models, [args] * len(args.models))))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints the table and the command line. Returns the exit status (1 if a cache failed)."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        results = evaluate_models(args)
    finally:
        torch.set_num_threads(threads)
    print()
    print(markdown_table(results, args))
    print()
    print("Cells: perplexity change in % (mean over windows; overall: over all windows, [95% bootstrap interval]) / "
          "change of mean log-likelihood in nats per token (negative: worse); the exact row gives the perplexity.")
    print(f"command: {args.command}")
    models = "; ".join(f"{name}: {r['description']}, {r['seconds']:.0f} s" for name, r in results.items())
    processes = f" in each of {args.jobs} processes" if args.jobs > 1 else ""
    print(f"models: {models}; {args.dtype} on {args.device}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, {args.threads or threads} threads{processes}; windows: {args.windows} per genre "
          f"x ({args.prefix} + {args.continuation}) tokens, seed {args.seed}; total {time.perf_counter() - t0:.0f} s")
    if args.out:
        _write(args, results)
        print(f"wrote {args.out}")
    failed = [f"{m} {c}" for m, r in results.items() for c, e in r["caches"].items() if "error" in e]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
