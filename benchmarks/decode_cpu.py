"""Decode tokens/s on the CPU: every NexusCache preset, eager and compiled, against a DynamicCache on SmolLM2.

The model is SmolLM2-135M-Instruct in float32 (``nqcompile.models.load_pretrained``; ``--model`` takes another
local folder), the prompt the first T tokens of *Persuasion* (vendored in ``nqcompile/data/``). For each context
length T (``--lengths``) and each CPU thread count (``--threads``, ``torch.set_num_threads``), one row per cache and
mode:

* ``DynamicCache``, eager (``sdpa`` attention): the reference of the ratios and targets; and, with
  ``--baseline-modes`` holding ``compiled``, the same decode step under ``torch.compile(fullgraph=True)`` with the
  default Inductor backend (a DynamicCache grows every step: Dynamo compiles a second, dynamic-length graph at the
  second call, which the warm-up absorbs);
* ``NexusCache`` of each preset (``--presets``, default every one of ``nqcompile.PRESETS``) on a copy of the model
  prepared by ``nqcompile.optimize(model, preset, tokenizer=tokenizer)``, with ``max_cache_len = T + every decode
  call run on it``, in mode ``eager`` and ``compiled`` (``torch.compile(model.forward, backend="nexusquant",
  fullgraph=True)``, ``--backend``). The two modes of a cache share one prefill: the compiled steps continue the
  cache (and the greedy text) the eager steps left.

Measured per row:

* prefill s: the prompt fed in chunks of ``--chunk`` tokens through ``model(..., logits_to_keep=1)``, including
  the compression at each chunk's end and, for presets that score by reconstruction (``balanced``, ``max``), the
  re-reading ``cache.reconstruct(model, ids)`` that ``optimize``'s hook runs after each chunk; that re-reading
  (with the compression it decides) is also reported on its own (``re-read s``);
* decode ms/token and tokens/s: the mean over ``--steps`` timed greedy steps (each feeds the argmax of the
  previous logits) after ``--warmup`` untimed ones; in compiled mode the first call, which compiles, is timed on
  its own (``compile s``; Inductor's on-disk cache can shorten it on later rows and runs), and a graph compiled
  during the timed steps is reported in the note; ``step_ms`` in the JSON has every timed step;
* tokens/s and prefill against the eager ``DynamicCache`` row of the same T and thread count, checked against
  the targets of issue 13 (reported, never asserted): eager decode at least 0.33x the DynamicCache's tokens/s,
  compiled at least 0.5x, prefill (compression included) at most 1.5x, 2.5x with the reconstruction re-read;
* the cache's bytes after the row's decode: ``memory_report()`` of a NexusCache (allocated MiB, of which unused
  preallocated capacity, and the ratio against a bf16 DynamicCache of the same tokens); for the DynamicCache the
  bytes of its float32 keys and values (so its ratio against bf16 is 0.5x).

A row that fails (a compile error) reports the exception in its note, the JSON keeps the end of the traceback,
and the run goes on. Times on a shared machine are noisy; run with ``OMP_WAIT_POLICY=PASSIVE`` (the script warns
otherwise: spinning OpenMP threads steal the cores of the other thread count and of anything else running).

Prints the rows as they finish, then a markdown table, the command line and the versions; ``--out`` gets all of
it as JSON, rewritten after every row (a run cut short keeps what it measured). For example::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/decode_cpu.py                   # 3K and 8K, 1 and 2 threads
    OMP_WAIT_POLICY=PASSIVE python benchmarks/decode_cpu.py --lengths 3072 --threads 2 --steps 8 --warmup 2
    OMP_WAIT_POLICY=PASSIVE python benchmarks/decode_cpu.py --presets quant_only --modes eager
    python benchmarks/decode_cpu.py --smoke        # tiny random model, a minute or two
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import transformers
from tqdm import tqdm
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

import nqcompile
from nqcompile.eval.perplexity import read_data_text, tokenize_text
from nqcompile.models import cache_kwarg_name
from nqcompile.policy.registry import SCORERS

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # benchmarks/_common.py, also when a test loads this script by its path
    sys.path.insert(0, _HERE)
from _common import byte_level_tokenizer, failure, ints, markdown, names, parse_with_smoke, prefill  # noqa: E402
from _common import progress, time_calls  # noqa: E402
from _common import write_json  # noqa: E402

BASELINE = "DynamicCache"
MODES = ("eager", "compiled")
#: Issue 13's targets: tokens/s of each mode at least this fraction of the eager DynamicCache's ...
DECODE_TARGETS = {"eager": 0.33, "compiled": 0.5}
#: ... and prefill (compression included) at most this multiple of the DynamicCache's; with the reconstruction
#: re-read (a scorer that needs the model: ``balanced``, ``max``) at most the second.
PREFILL_TARGETS = {"plain": 1.5, "reread": 2.5}
PROMPT_TEXT = "persuasion.txt"
#: What ``--smoke`` changes (flags given explicitly still win): a tiny random Llama, short lengths, few steps.
SMOKE = dict(lengths="512", threads="1,2", steps=3, warmup=1, chunk=512)
MIB = 2.0**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the benchmark's command line (see ``--help``); ``--smoke`` changes the defaults to :data:`SMOKE`."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--lengths", type=ints, default="3072,8192", help="comma-separated context lengths T")
    p.add_argument("--threads", type=ints, default="1,2", help="comma-separated CPU thread counts")
    p.add_argument("--presets", type=names, default=",".join(nqcompile.PRESETS),
                   help="comma-separated NexusCache presets ('': the baseline only)")
    p.add_argument("--modes", type=names, default=",".join(MODES),
                   help="comma-separated NexusCache modes: eager, compiled (eager runs first)")
    p.add_argument("--baseline-modes", type=names, default=",".join(MODES),
                   help="DynamicCache modes ('': no baseline rows, and no ratios); compiled uses Inductor")
    p.add_argument("--backend", default="nexusquant", help="torch.compile backend of the NexusCache's compiled mode")
    p.add_argument("--chunk", type=int, default=8192, help="prefill chunk in tokens")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per row")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed decode steps before the timed ones (compiled mode: after the compiling first call)")
    p.add_argument("--model", default=None, help="model name or local folder for load_pretrained (default SmolLM2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --smoke model and prompt")
    p.add_argument("--out", type=Path, default=Path("out/decode_cpu.json"), help="JSON results file")
    p.add_argument("--smoke", action="store_true",
                   help="tiny random Llama instead of SmolLM2: " + " ".join(f"--{k} {v}" for k, v in SMOKE.items()))
    args = parse_with_smoke(p, argv, SMOKE)
    for flag, modes in (("--modes", args.modes), ("--baseline-modes", args.baseline_modes)):
        if any(m not in MODES for m in modes):
            p.error(f"{flag} must name some of {MODES}, got {modes}")
    if not args.modes and args.presets:
        p.error("--modes is empty")
    args.modes = [m for m in MODES if m in args.modes]  # eager first: the compiled steps continue its cache
    args.baseline_modes = [m for m in MODES if m in args.baseline_modes]
    if min(args.lengths + args.threads + [args.chunk, args.steps]) < 1 or args.warmup < 0:
        p.error("--lengths, --threads, --chunk and --steps must be positive, --warmup non-negative")
    return args


def load_model(args: argparse.Namespace) -> tuple[torch.nn.Module, object, torch.Tensor, str]:
    """``(model, tokenizer, prompt ids [1, max T], description)``: SmolLM2 (or ``--model``) in float32 and the first
    tokens of *Persuasion*; with ``--smoke`` a seeded random 2-layer Llama with a 256-id vocabulary read as bytes
    (:func:`_common.byte_level_tokenizer`) and random tokens."""
    if args.smoke:
        config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=8192)
        torch.manual_seed(args.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").eval()
        generator = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(0, config.vocab_size, (1, max(args.lengths)), generator=generator)
        return model, byte_level_tokenizer(), ids, "random Llama, 2 layers x hidden 256 (--smoke), float32"
    from nqcompile.models import load_pretrained

    model, tokenizer = load_pretrained(args.model)
    tokens = tokenize_text(tokenizer, read_data_text(PROMPT_TEXT))
    if len(tokens) < max(args.lengths):
        raise SystemExit(f"{PROMPT_TEXT} has {len(tokens)} tokens, fewer than T={max(args.lengths)}")
    name = args.model or "SmolLM2-135M-Instruct"
    return model, tokenizer, torch.tensor([tokens[:max(args.lengths)]]), f"{name}, float32, prompt: {PROMPT_TEXT}"


def _log(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def _memory_fields(cache) -> dict:
    """The row's bytes: a NexusCache's ``memory_report()``, or a DynamicCache's keys and values."""
    if isinstance(cache, nqcompile.NexusCache):
        report = cache.memory_report()
        return {"allocated_mib": report.allocated_bytes / MIB, "unused_mib": report.unused_capacity_bytes / MIB,
                "bf16_mib": report.bf16_bytes / MIB, "ratio": report.compression_ratio,
                "layer_key_bits": list(report.layer_key_bits)}
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    bf16 = sum(2 * (layer.keys.numel() + layer.values.numel()) for layer in cache.layers)
    return {"allocated_mib": held / MIB, "unused_mib": 0.0, "bf16_mib": bf16 / MIB, "ratio": bf16 / held}


def cache_rows(model, cache, ids: torch.Tensor, name: str, modes: list[str], backend: str,
               args: argparse.Namespace, bar: tqdm | None = None) -> list[dict]:
    """One row per mode in ``modes`` for ``cache`` (empty) named ``name`` at ``T = ids.shape[1]``: one prefill,
    then each mode's greedy decode steps continuing the same cache (eager first)."""
    T, threads = ids.shape[1], torch.get_num_threads()
    rows = [{"T": T, "threads": threads, "cache": name, "mode": mode} for mode in modes]
    label = f"T={T} threads={threads} {name}"
    kwarg = cache_kwarg_name(model)
    if bar is not None:
        bar.set_postfix_str(f"{label}: prefill")
    try:
        pre = prefill(model, cache, ids, args.chunk, label)
    except Exception as err:  # noqa: BLE001 - any failure is a result of the row
        for row in rows:
            row.update(failure(err))
        return rows
    token = pre.logits[:, -1:].argmax(-1)
    for i, row in enumerate(rows):
        row.update(prefill_s=pre.seconds, reread_s=pre.reread_s)
        if i and "error" in rows[i - 1]:  # a step that failed half-way leaves the shared cache inconsistent
            row["error"] = f"not run: the {rows[i - 1]['mode']} row failed on the cache they share"
            continue
        compiled = row["mode"] == "compiled"
        if bar is not None:
            bar.set_postfix_str(f"{label}: {row['mode']} decode" + (" (compiling)" if compiled else ""))
        tokens: list[int] = []

        def call(fn) -> None:
            nonlocal token
            logits = fn(input_ids=token, use_cache=True, logits_to_keep=1, **{kwarg: cache}).logits
            token = logits[:, -1:].argmax(-1)
            tokens.append(int(token))

        try:
            if compiled:
                torch.compiler.reset()
                fn = torch.compile(model.forward, backend=backend, fullgraph=True)
                row["backend"] = backend
            else:
                fn = model  # with its hooks, as generate calls it
            timing = time_calls(lambda: call(fn), warmup=args.warmup, steps=args.steps, compiled=compiled,
                                per_step=True)
            timing.pop("cudagraph_skips", None)  # no CUDA graphs on the CPU
            row.update(timing)
            row["tokens_per_s"] = 1e3 / row["decode_ms_per_token"]
            row["median_step_ms"] = sorted(row["step_ms"])[len(row["step_ms"]) // 2]
            if compiled:
                _log(f"{label} compiled: first call {row['compile_s']:.1f} s, {row['graphs']} graph(s)")
            row.update(_memory_fields(cache))
        except Exception as err:  # noqa: BLE001
            row.update(failure(err))
        finally:
            row["tokens"] = tokens
            if compiled:
                torch.compiler.reset()  # drops the compiled step's guards on the cache
            gc.collect()
    return rows


def add_ratios(rows: list[dict], reference: dict | None) -> None:
    """Tokens/s and prefill of ``rows`` against ``reference`` (the eager DynamicCache row of the same T and
    threads), and issue 13's targets on the NexusCache rows."""
    if reference is None or "error" in reference:
        return
    for row in rows:
        if "error" in row:
            continue
        row["speed_ratio"] = row["tokens_per_s"] / reference["tokens_per_s"]
        row["prefill_ratio"] = row["prefill_s"] / reference["prefill_s"]
        if row["cache"] != BASELINE:
            row["decode_target"] = DECODE_TARGETS[row["mode"]]
            row["decode_pass"] = row["speed_ratio"] >= row["decode_target"]
            rereads = SCORERS[nqcompile.get_preset(row["cache"]).scorer].needs_model
            row["prefill_target"] = PREFILL_TARGETS["reread" if rereads else "plain"]
            row["prefill_pass"] = row["prefill_ratio"] <= row["prefill_target"]


def _note(row: dict, rows: list[dict]) -> str:
    """The table's note: the failure, else the compile's graphs and recompiles, shared prefill, unused capacity."""
    if "error" in row:
        return row["error"]
    parts = []
    if "compile_s" in row:
        parts.append(f"{row['graphs']} graph(s)")
        if row["graphs"] > 1 and row.get("warmup_ms"):
            parts.append(f"the warm-up, which compiled the others, took {sum(row['warmup_ms']) / 1e3:.1f} s")
        if row["timed_recompiles"]:
            parts.append(f"recompiled {row['timed_recompiles']} time(s) during the timed steps")
        if any(r is not row and (r["cache"], r["T"], r["threads"]) == (row["cache"], row["T"], row["threads"])
               for r in rows):
            parts.append("prefill shared with the eager row")
    if row.get("unused_mib", 0) >= 0.05:
        parts.append(f"unused capacity {row['unused_mib']:.1f} MiB")
    return "; ".join(parts)


def _target(row: dict, kind: str) -> str:
    if f"{kind}_pass" not in row:
        return "-"
    sign = ">=" if kind == "decode" else "<="
    return f"{'pass' if row[f'{kind}_pass'] else 'FAIL'} ({sign} {row[f'{kind}_target']}x)"


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table (T, threads, cache, mode, prefill, compile, decode, ratios, targets, note)."""
    def num(row: dict, key: str, fmt: str, suffix: str = "") -> str:
        return "-" if row.get(key) is None else format(row[key], fmt) + suffix

    head = ["T", "threads", "cache", "mode", "prefill s", "re-read s", "prefill vs DC", "compile s",
            "decode ms/token", "tokens/s", "tokens/s vs DC", "ratio vs bf16", "decode target", "prefill target",
            "note"]
    lines = []
    for row in rows:
        cache = row["cache"] if row["cache"] == BASELINE else f"`{row['cache']}`"
        reread = num(row, "reread_s", ".2f") if row.get("reread_s") else "-"
        lines.append([f"{row['T']:,}", str(row["threads"]), cache, row["mode"], num(row, "prefill_s", ".2f"), reread,
                      num(row, "prefill_ratio", ".2f", "x"), num(row, "compile_s", ".1f"),
                      num(row, "decode_ms_per_token", ".1f"), num(row, "tokens_per_s", ".2f"),
                      num(row, "speed_ratio", ".3f", "x"), num(row, "ratio", ".2f", "x"), _target(row, "decode"),
                      _target(row, "prefill"), _note(row, rows)])
    return markdown(head, lines)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _environment() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
            "torch_threads_at_start": torch.get_num_threads(),
            "inductor_fx_graph_cache": bool(torch._inductor.config.fx_graph_cache)}


def _progress(row: dict) -> str:
    keys = ("prefill_s", "reread_s", "compile_s", "decode_ms_per_token", "tokens_per_s", "speed_ratio",
            "prefill_ratio", "ratio", "error")
    return progress(row, keys, f"T={row['T']} threads={row['threads']} {row['cache']} {row['mode']}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints every row as it finishes, then the table, the command line and the versions.

    Returns the exit status (0, also when rows failed: their notes say why). ``argv`` defaults to ``sys.argv[1:]``.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    env = _environment()
    meta = {"command": shlex.join(["python", "benchmarks/decode_cpu.py", *argv]), **env,
            "targets": {"decode": DECODE_TARGETS, "prefill": PREFILL_TARGETS},
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    print(f"{meta['command']}\n{env['cpu']} ({env['cpu_count']} cores); torch {env['torch']}, transformers "
          f"{env['transformers']}, OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']}", flush=True)
    if (env["OMP_WAIT_POLICY"] or "").upper() != "PASSIVE":
        print("warning: OMP_WAIT_POLICY is not PASSIVE: idle OpenMP threads spin and skew the timings on a shared "
              "machine; run with OMP_WAIT_POLICY=PASSIVE", flush=True)
    t0 = time.perf_counter()
    base, tokenizer, prompt, description = load_model(args)
    model = copy.deepcopy(base)  # nqcompile.optimize prepares this copy; the baseline runs the untouched model
    meta["model"] = description
    print(f"model: {description}, {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M parameters, loaded in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    per_group = len(args.baseline_modes) + len(args.presets) * len(args.modes)
    rows: list[dict] = []
    threads0 = torch.get_num_threads()
    bar = tqdm(total=len(args.lengths) * len(args.threads) * per_group, unit="row", disable=None, file=sys.stderr)
    try:
        for T in args.lengths:
            ids = prompt[:, :T]
            for threads in args.threads:
                torch.set_num_threads(threads)
                reference = None
                for preset in ([None] if args.baseline_modes else []) + list(args.presets):
                    if preset is None:
                        new = cache_rows(base, DynamicCache(), ids, BASELINE, args.baseline_modes, "inductor", args,
                                         bar)
                        reference = next((r for r in new if r["mode"] == "eager"), None)
                    else:
                        nqcompile.optimize(model, preset, tokenizer=tokenizer)
                        calls = sum(args.warmup + args.steps + (mode == "compiled") for mode in args.modes)
                        cache = nqcompile.NexusCache(model.config, preset, max_cache_len=T + calls)
                        new = cache_rows(model, cache, ids, preset, args.modes, args.backend, args, bar)
                        del cache
                    add_ratios(new, reference)
                    for row in new:
                        rows.append(row)
                        bar.update()
                        tqdm.write(_progress(row), file=sys.stdout)
                        sys.stdout.flush()
                        if "traceback" in row:
                            print(row["traceback"], file=sys.stderr, flush=True)
                    gc.collect()
                    write_json(args.out, meta, rows)
    finally:
        bar.close()
        torch.set_num_threads(threads0)
    print()
    print(markdown_table(rows))
    print()
    print(f"command: {meta['command']}")
    print(f"cpu: {env['cpu']} ({env['cpu_count']} cores), threads {args.threads}, OMP_WAIT_POLICY="
          f"{env['OMP_WAIT_POLICY']}; python {env['python']}, torch {env['torch']}, transformers "
          f"{env['transformers']}; model {description}; chunk {args.chunk}, {args.warmup} warm-up + {args.steps} "
          f"timed steps; compiled: backend {args.backend} (DynamicCache: inductor); total "
          f"{time.perf_counter() - t0:.0f} s")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
