"""Quality benchmark: every preset against the exact cache, in one run (``docs/design.md``, "Evaluation protocol").

For the uncompressed baseline (``DynamicCache``) and every preset in ``nqcompile.PRESETS`` (or those given
with ``--presets``, plus any defined on the command line with ``--custom``) on SmolLM2-135M-Instruct (or
``--model``):

* measured byte ratio: ``memory_report().compression_ratio`` (bf16 bytes of the same tokens / bytes the
  cache allocated) at the end of each perplexity window, averaged over windows; unused preallocated
  capacity is reported too;
* perplexity change: per window, prefill ``--prefix`` tokens (compressed at the end of the chunk), then
  ``--continuation`` tokens one at a time through the cache; mean % change against the baseline on the
  same windows, with a 95% bootstrap interval over windows;
* needle recall: query-agnostic needle in a haystack at each ``--needle-lengths`` x ``--needle-depths``;
* decode speed: single-token steps per second during the perplexity continuation (this machine; on the
  CPU it measures the torch reference path, not the GPU kernels).

Prints a markdown table and the command line it was run with; ``--out`` writes everything as JSON.

    python benchmarks/quality.py --windows 8 --out out/quality.json
    python benchmarks/quality.py --presets '' --custom '{"k4v2": {"key_bits": 4, "value_bits": 2}}' --needle-lengths ''
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import DynamicCache

import nqcompile
from nqcompile.eval import bootstrap_ci, needle_recall, perplexity, perplexity_windows, ppl_change_percent, run_windows
from nqcompile.models import load_pretrained

BASELINE = "exact"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _custom(text: str) -> dict:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f'not JSON ({err}); expected {{"name": {{"key_bits": 4, ...}}}}') from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise argparse.ArgumentTypeError('expected {"name": {Preset fields}, ...}')
    return data


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's argument parser (see ``--help``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("--model", default=None, help="local model folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="model dtype (default: float32)")
    p.add_argument("--presets", type=lambda s: [x for x in s.split(",") if x], default=None,
                   help="comma-separated preset names (default: all); '' runs the baseline only")
    p.add_argument("--custom", type=_custom, default={},
                   help='more caches as JSON, {"name": {Preset fields}}: run after --presets (ablations; default: none)')
    p.add_argument("--windows", type=int, default=8, help="perplexity windows (0: skip perplexity; default: 8)")
    p.add_argument("--prefix", type=int, default=3584, help="prefill tokens per window (default: 3584)")
    p.add_argument("--continuation", type=int, default=512, help="continuation tokens per window (default: 512)")
    p.add_argument("--needle-lengths", type=_ints, default=[2048, 4096], help="comma-separated context lengths ('': skip; default: 2048,4096)")
    p.add_argument("--needle-depths", type=_floats, default=[0.0, 0.25, 0.5, 0.75, 1.0], help="comma-separated depths in [0, 1] (default: 0,0.25,0.5,0.75,1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the window draw, the needles and the bootstrap (default: 0)")
    p.add_argument("--out", type=Path, default=None, help="write all results as JSON here (default: only print the table)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the benchmark's command line (see ``--help``)."""
    return build_parser().parse_args(argv)


def _cache_factory(model, preset: nqcompile.Preset | None):
    """``max_cache_len -> fresh cache``: DynamicCache for the baseline, else a NexusCache with ``preset``."""
    if preset is None:
        return lambda n: DynamicCache()
    return lambda n: nqcompile.NexusCache(model.config, preset=preset, max_cache_len=n)


def evaluate(model, tokenizer, args: argparse.Namespace, presets: dict[str, nqcompile.Preset]) -> dict:
    """Run the baseline and every preset; return ``{name: results}`` (JSON-ready), baseline under ``"exact"``."""
    windows = perplexity_windows(tokenizer, n_windows=args.windows, prefix=args.prefix, continuation=args.continuation, seed=args.seed) if args.windows else []
    results: dict[str, dict] = {}
    base_nll = None
    for name in [BASELINE, *presets]:
        preset = None if name == BASELINE else name
        factory = _cache_factory(model, presets.get(name))
        entry: dict = {"preset": preset}
        if preset is not None:
            entry["fields"] = presets[name].to_dict()
        t0 = time.perf_counter()
        if windows:
            runs = run_windows(model, windows, factory, desc=f"{name}: perplexity")
            nll = np.array([r.nll_sum for r in runs])
            n_tok = runs[0].n_tokens
            entry["windows"] = [
                {"source": w.source, "start": w.start, "nll_sum": r.nll_sum, "n_tokens": r.n_tokens, "perplexity": r.perplexity,
                 "prefill_s": r.prefill_s, "decode_s": r.decode_s, "decode_steps": r.decode_steps,
                 "memory": _memory_dict(r.memory)}
                for w, r in zip(windows, runs)
            ]
            entry["perplexity"] = perplexity(float(nll.sum()), n_tok * len(runs))
            entry["decode_tokens_per_s"] = sum(r.decode_steps for r in runs) / sum(r.decode_s for r in runs)
            if preset is None:
                base_nll = nll
            else:
                changes = [ppl_change_percent(a, b, n_tok) for a, b in zip(nll, base_nll)]
                ci = bootstrap_ci(changes, seed=args.seed)
                entry["ppl_change_percent"] = {"per_window": changes, "mean": ci.mean, "ci95": [ci.low, ci.high]}
                ratios = [r.memory.compression_ratio for r in runs]
                entry["byte_ratio"] = {"mean": float(np.mean(ratios)), "min": float(np.min(ratios)), "max": float(np.max(ratios))}
        if args.needle_lengths:
            needles = needle_recall(model, tokenizer, factory, lengths=args.needle_lengths, depths=args.needle_depths, seed=args.seed, desc=f"{name}: needle")
            entry["needle"] = needles.to_dict()
        entry["seconds"] = time.perf_counter() - t0
        results[name] = entry
        if args.out:
            _write(args, results)
    return results


def _memory_dict(report) -> dict | None:
    """A memory report as a plain dict (its dataclass fields plus the ratio), or None."""
    if report is None:
        return None
    keys = ("logical_tokens", "physical_tokens", "allocated_bytes", "unused_capacity_bytes", "bf16_bytes",
            "compression_ratio", "layer_key_bits")
    return {k: getattr(report, k) for k in keys if hasattr(report, k)}


def markdown_table(results: dict, args: argparse.Namespace) -> str:
    """The results as a markdown table, one row per cache (baseline first)."""
    lengths = args.needle_lengths
    head = ["cache", "byte ratio (vs bf16)", "perplexity", f"ppl change, mean [95% CI] over {args.windows} windows"]
    head += [f"needle @{n}" for n in lengths] + ["continuation tok/s (replayed decode steps, this CPU)"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in results.items():
        if "byte_ratio" in e:
            b = e["byte_ratio"]
            ratio = f"{b['mean']:.2f}x" + (f" ({b['min']:.2f}-{b['max']:.2f})" if b["max"] - b["min"] > 0.005 else "")
        else:
            ratio = "- (exact, model dtype)" if e["preset"] is None else "-"
        ppl = f"{e['perplexity']:.3f}" if "perplexity" in e else "-"
        if "ppl_change_percent" in e:
            c = e["ppl_change_percent"]
            change = f"{c['mean']:+.2f}% [{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}]"
        else:
            change = "baseline" if e["preset"] is None and "perplexity" in e else "-"
        needle = []
        for n in lengths:
            trials = [t for t in e.get("needle", {}).get("trials", []) if t["length"] == n]
            needle.append(f"{sum(t['found'] for t in trials)}/{len(trials)}" if trials else "-")
        speed = f"{e['decode_tokens_per_s']:.1f}" if "decode_tokens_per_s" in e else "-"
        label = "exact (DynamicCache)" if e["preset"] is None else f"`{name}`"
        rows.append("| " + " | ".join([label, ratio, ppl, change, *needle, speed]) + " |")
    return "\n".join(rows)


def _command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def _write(args: argparse.Namespace, results: dict) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": _command_line(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__},
        "threads": torch.get_num_threads(),
    }
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=float))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints the table and the command line. Returns the exit status."""
    args = parse_args(argv)
    names = list(nqcompile.PRESETS) if args.presets is None else args.presets
    unknown = [p for p in names if p not in nqcompile.PRESETS]
    if unknown:
        print(f"unknown presets {unknown}; known: {sorted(nqcompile.PRESETS)}", file=sys.stderr)
        return 2
    presets = {name: nqcompile.PRESETS[name] for name in names}
    for name, fields in args.custom.items():
        if name in presets or name == BASELINE:
            print(f"--custom name {name!r} is taken; choose another", file=sys.stderr)
            return 2
        try:
            presets[name] = nqcompile.Preset(name=name, **fields)
        except (TypeError, ValueError) as err:
            print(f"--custom {name!r}: {err}", file=sys.stderr)
            return 2
    if any(not 0 <= d <= 1 for d in args.needle_depths):
        print("--needle-depths must lie in [0, 1]", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_pretrained(args.model, dtype=DTYPES[args.dtype])
    if presets:
        # The attention is registered once; each cache carries its own preset, and DynamicCache runs exact SDPA.
        model = nqcompile.optimize(model, preset=next(iter(presets.values())))
    t0 = time.perf_counter()
    results = evaluate(model, tokenizer, args, presets)
    print()
    print(markdown_table(results, args))
    print()
    print(f"command: {_command_line()}")
    print(
        f"model: {args.model or 'SmolLM2-135M-Instruct'} ({args.dtype}, cpu); torch {torch.__version__}, transformers "
        f"{transformers.__version__}, {torch.get_num_threads()} threads; windows: {args.windows} x ({args.prefix} + "
        f"{args.continuation}) tokens, seed {args.seed}; total {time.perf_counter() - t0:.0f} s"
    )
    if args.out:
        _write(args, results)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
