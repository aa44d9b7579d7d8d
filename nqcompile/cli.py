"""Command line: ``nqcompile generate`` (the default, also for ``python -m nqcompile``) and ``nqcompile diff``.

Nothing heavy is imported at module level, so ``nqcompile --help`` and the argument errors answer at once; torch
and transformers are imported once the arguments and the prompt file have been checked. Unless the environment
already sets it, ``OMP_WAIT_POLICY`` is set to ``PASSIVE`` before torch loads: OpenMP threads that spin while
waiting make a busy CPU several times slower.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

__all__ = ["build_parser", "main", "PRESET_NAMES", "DTYPE_NAMES", "DEFAULT_PROMPT"]

SUBCOMMANDS = ("generate", "diff")
#: ``sorted(nqcompile.PRESETS)``, spelled out so that the parser needs no torch (a test checks they agree).
PRESET_NAMES = ("asym", "balanced", "high", "max", "quant_only")
DTYPE_NAMES = ("bfloat16", "float16", "float32")
DEFAULT_PROMPT = Path(__file__).resolve().parent / "data" / "prompt.txt"
#: Prompt tokens of the untimed warm-up run of the compressed cache (enough for a compression, an eviction and a
#: re-read under every preset).
WARM_UP_TOKENS = 512

GENERATE_HELP = """\
Continue a prompt greedily with a compressed KV cache and with the uncompressed one (DynamicCache), and print:
the continuation; what the compressed cache holds (bytes against a bf16 cache of the same tokens, the ratio);
the wall time of each prefill and the generation speed of each cache in tokens/s (wall time of generate over
the new tokens, after an untimed warm-up run that builds the compressed cache's kernels); and the perplexity
change of a held-out continuation. The held-out check reuses each cache as its prefill left it: the last
--held-tokens tokens of the prompt file, which the model is not shown, are fed as decode steps and scored, so it
measures what compressing the prompt costs the next tokens. Progress bars go to stderr (TQDM_DISABLE=1 hides
them); --json writes every figure. OMP_WAIT_POLICY is set to PASSIVE unless the environment sets it (OpenMP
threads spinning on a busy CPU slow torch down several times)."""

DIFF_HELP = """\
Load a model, prepare it with a preset (--preset none: leave it unprepared), prefill the first --prompt-tokens
tokens of a vendored Austen passage eagerly, compile --steps decode steps with the nexusquant backend and print,
for each graph the backend compiled, every attention and cache site and what became of it (rewritten, fused, or
left alone and why), the per-pass rewrite counts, and the graph breaks and recompiles. --html FILE also writes a
page with each graph's code before and after the passes side by side."""


class UsageError(Exception):
    """A problem with the command line or its input files: printed as one line on stderr, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    """Return the ``nqcompile`` argument parser (subcommands ``generate`` and ``diff``); imports no torch."""
    parser = argparse.ArgumentParser(
        prog="nqcompile",
        description="Compressed KV cache for HuggingFace causal LMs (token eviction + E8 lattice quantization). "
                    "Without a subcommand, runs generate.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{generate,diff}")
    gen = sub.add_parser(
        "generate",
        help="continue a prompt with a compressed KV cache; report bytes, speed and perplexity change (default)",
        description=GENERATE_HELP,
    )
    gen.add_argument("--model", default=None, help="local HuggingFace model folder (default: SmolLM2-135M-Instruct)")
    gen.add_argument("--preset", default="balanced", choices=PRESET_NAMES, help="compression preset (default: balanced)")
    gen.add_argument("--prompt-file", type=Path, default=DEFAULT_PROMPT, metavar="FILE",
                     help="UTF-8 text file to continue; its last --held-tokens tokens are held out "
                          "(default: a vendored Austen passage, 1,822 tokens with SmolLM2's tokenizer)")
    gen.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate (default: 64)")
    gen.add_argument("--held-tokens", type=int, default=256, metavar="N",
                     help="tokens at the end of the prompt file held out for the perplexity check; 0 = feed the "
                          "whole file and skip the check (default: 256)")
    gen.add_argument("--threads", type=int, default=None, metavar="N",
                     help="torch CPU threads (default: torch's choice, one per core)")
    gen.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write every figure to FILE as JSON")
    gen.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                     help="model dtype (default: float32 on CPU, bfloat16 on CUDA)")
    gen.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")

    diff = sub.add_parser(
        "diff",
        help="compile a decode step with the nexusquant backend and show what it did to each graph",
        description=DIFF_HELP,
    )
    diff.add_argument("--model", default=None, help="local HuggingFace model folder (default: SmolLM2-135M-Instruct)")
    diff.add_argument("--preset", default="balanced", choices=[*PRESET_NAMES, "none"],
                      help="compression preset; none = compile the unprepared model (default: balanced)")
    diff.add_argument("--html", type=Path, default=None, metavar="FILE",
                      help="also write an HTML page with each graph's code before and after the passes")
    diff.add_argument("--steps", type=int, default=4, help="decode steps to compile and run (default: 4)")
    diff.add_argument("--prompt-tokens", type=int, default=64,
                      help="prompt length, taken from the start of a vendored Austen passage (default: 64)")
    diff.add_argument("--mode", default=None,
                      help="torch.compile mode, one of torch._inductor.list_mode_options(): reduce-overhead, "
                           "max-autotune, max-autotune-no-cudagraphs, ... (default: Inductor's default)")
    return parser


def _read_prompt(path: Path) -> str:
    """Return the text of a prompt file, or raise :class:`UsageError` with a one-line reason.

    Raises:
        UsageError: the file cannot be read (missing, a folder, no permission), is binary (a NUL byte, or not
            UTF-8), or holds only whitespace.
    """
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise UsageError(f"--prompt-file {path} is a folder; pass a text file") from None
    except OSError as err:
        raise UsageError(f"cannot read --prompt-file {path}: {err.strerror or err}") from None
    try:
        if b"\x00" in data:
            raise UnicodeDecodeError("utf-8", data, data.index(b"\x00"), data.index(b"\x00") + 1, "NUL byte")
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"--prompt-file {path} is not text (binary data at byte {err.start}); pass a UTF-8 "
                         "text file") from None
    if not text.strip():
        raise UsageError(f"--prompt-file {path} is empty; pass a text file with the prompt to continue")
    return text


def _split_prompt(n_tokens: int, held: int, exact: int, path: Path, describe_exact: str) -> tuple[int, int, str]:
    """Split a prompt file of ``n_tokens`` tokens into ``(prompt tokens, held-out tokens, note)``.

    The prompt must be longer than the ``exact`` tokens the cache keeps uncompressed; when the file minus ``held``
    is not, the whole file is fed without a perplexity check (``note`` says so), and when the whole file is not
    either, :class:`UsageError` explains why the ratio would be below 1."""
    if n_tokens - held > exact:
        return n_tokens - held, held, ""
    if n_tokens <= exact:
        raise UsageError(
            f"the prompt in {path} has {n_tokens} tokens, no more than the {exact} the cache keeps exact "
            f"({describe_exact}), so nothing would be compressed and the cache would hold more bytes than a bf16 "
            f"cache (ratio below 1); pass a longer --prompt-file (well over {exact} tokens)")
    note = (f"note: {path} has only {n_tokens} tokens; feeding all of it, no perplexity check (that needs more "
            f"than {held + exact}: --held-tokens {held} plus the {exact} tokens kept exact)") if held else ""
    return n_tokens, 0, note


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def _threads(torch) -> str:
    n = torch.get_num_threads()
    return f"{n} thread" + ("s" if n != 1 else "")


def _decoder_layers(model) -> list:
    """The model's decoder layers (each called once per forward), or ``[model]`` when they cannot be found."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    layers = getattr(decoder, "layers", None)
    return list(layers) if layers is not None and len(layers) else [model]


@contextlib.contextmanager
def _layer_bars(model, *phases: tuple[str, int]):
    """Progress bars (stderr) over the decoder layers' forward calls while the block runs.

    Each ``(description, calls)`` phase gets a bar, opened at its first call and closed when its count is reached;
    a phase that no call reaches (a re-reading that the preset does not do) shows no bar. Yields a dict whose
    ``"calls"`` counts the layer calls so far."""
    from tqdm import tqdm

    layers = _decoder_layers(model)
    pending = list(phases)
    state: dict = {"bar": None, "left": 0, "calls": 0}

    def step(*_):
        state["calls"] += 1
        if state["left"] == 0:
            if state["bar"] is not None:
                state["bar"].close()
                state["bar"] = None
            if not pending:
                return
            desc, total = pending.pop(0)
            state["bar"] = tqdm(total=total, desc=desc, unit="layer", file=sys.stderr, leave=True)
            state["left"] = total
        state["bar"].update()
        state["left"] -= 1

    handles = [layer.register_forward_hook(step) for layer in layers]
    try:
        yield state
    finally:
        for handle in handles:
            handle.remove()
        if state["bar"] is not None:
            state["bar"].close()


def _token_bar(desc: str, total: int):
    """A ``generate`` streamer that advances a progress bar (stderr) by one for every new token."""
    from tqdm import tqdm
    from transformers.generation.streamers import BaseStreamer

    class TokenBar(BaseStreamer):
        def __init__(self) -> None:
            self.bar = tqdm(total=total, desc=desc, unit="token", file=sys.stderr)
            self.prompt_seen = False

        def put(self, value) -> None:
            if self.prompt_seen:
                self.bar.update(int(value.numel()))
            self.prompt_seen = True  # the first put is the prompt

        def end(self) -> None:
            self.bar.close()

    return TokenBar()


def _greedy(model, tokenizer, ids, cache, max_new_tokens: int, **kwargs):
    """``model.generate``, greedy, from ``ids`` ``[1, L]`` into ``cache``; returns its output ids."""
    import torch

    with warnings.catch_warnings():
        # transformers 5.2x renamed generate's `past_key_values` to `cache` (the name optimize()'s wrapper and
        # transformers 5.17 read) and warns about the old name: noise here.
        warnings.filterwarnings("ignore", message=r".*`past_key_values` is deprecated", category=FutureWarning)
        return model.generate(
            ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            **kwargs)


def _run_cache(model, tokenizer, label: str, cache, prompt, held_ids, max_new_tokens: int) -> dict:
    """Prefill ``prompt`` ``[1, L]`` minus its last token into ``cache`` (timed), then ``model.generate`` from it
    (timed), and score ``held_ids`` (the prompt's last token, then the held-out tokens) through a copy of the
    prefilled cache; returns the figures and the new token ids."""
    import torch

    from nqcompile.eval.perplexity import continuation_nll
    from nqcompile.models import cache_kwarg_name
    from nqcompile.policy.reconstruction import REREAD_TOKENS

    n = prompt.shape[1] - 1
    layers = len(_decoder_layers(model))
    pieces = math.ceil(n / REREAD_TOKENS)
    with torch.inference_mode():
        start = time.perf_counter()
        with _layer_bars(model, (f"{label}: prefill, {n:,} tokens", layers),
                         (f"{label}: re-read of the prefill, to score tokens", layers * pieces)) as calls:
            model(prompt[:, :-1], logits_to_keep=1, use_cache=True, **{cache_kwarg_name(model): cache})
        prefill_s = time.perf_counter() - start
        held_cache = None
        if held_ids is not None:
            held_cache = copy.deepcopy(cache)
            if hasattr(held_cache, "reserve"):  # a NexusCache sized for the generation: room for the held-out tokens
                held_cache.reserve(held_ids.shape[1] - 1)
        start = time.perf_counter()
        out = _greedy(model, tokenizer, prompt, cache, max_new_tokens,
                      streamer=_token_bar(f"{label}: generate", max_new_tokens))
        generate_s = time.perf_counter() - start
        new = out[0, prompt.shape[1]:]
        figures = {"prefill_tokens": n, "prefill_s": prefill_s, "reread": calls["calls"] > layers, "new_tokens": len(new), "generate_s": generate_s,
                   "tokens_per_s": len(new) / generate_s}
        if held_cache is not None:
            with _layer_bars(model, (f"{label}: perplexity check, {held_ids.shape[1] - 1} tokens", layers)):
                nll, count = continuation_nll(model, held_ids, held_cache)
            figures.update(held_nll=nll, held_tokens=count, perplexity=math.exp(nll / count))
    return figures | {"ids": new.tolist()}


def _warm_up(model, tokenizer, preset, prompt) -> float:
    """Run ``model.generate`` once on the first :data:`WARM_UP_TOKENS` tokens of ``prompt`` ``[1, L]`` with a
    throwaway compressed cache, for enough new tokens to flush the exact window into codes once, so that what the
    codec builds on first use in a process (its Inductor-generated CPU kernels, ``nqcompile/codec/cpu_kernel.py``,
    loaded from Inductor's on-disk cache after the first run; on CUDA the Triton kernels) is not timed as prefill
    or generation. Returns its wall time in seconds."""
    import torch

    import nqcompile
    from nqcompile.ops.layout import BLOCK_TOKENS
    from nqcompile.policy.reconstruction import REREAD_TOKENS

    ids = prompt[:, :min(prompt.shape[1], WARM_UP_TOKENS)]
    steps = preset.recent_window + BLOCK_TOKENS
    cache = nqcompile.NexusCache(model.config, preset, max_cache_len=ids.shape[1] + steps)
    forwards = steps + (math.ceil(ids.shape[1] / REREAD_TOKENS) if preset.scorer == "reconstruction" else 0)
    start = time.perf_counter()
    bar = (f"{preset.name}: warm-up", len(_decoder_layers(model)) * forwards)
    with torch.inference_mode(), _layer_bars(model, bar):
        _greedy(model, tokenizer, ids, cache, steps, min_new_tokens=steps)
    return time.perf_counter() - start


def _generate(args: argparse.Namespace) -> int:
    """Run ``nqcompile generate``; returns the exit status.

    Raises:
        UsageError: bad arguments, an unusable prompt file or a prompt too short to compress (before the model's
            weights load; the demo model's one-time conversion comes first, its tokenizer is needed).
    """
    if args.max_new_tokens < 1 or args.held_tokens < 0 or (args.threads is not None and args.threads < 1):
        raise UsageError("--max-new-tokens and --threads must be >= 1, --held-tokens >= 0")
    text = _read_prompt(args.prompt_file)

    started = time.perf_counter()
    import torch
    from transformers import AutoTokenizer, DynamicCache

    import nqcompile
    from nqcompile.eval.perplexity import loglik_change, ppl_change_percent, tokenize_text
    from nqcompile.models import load_pretrained, model_path

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if device == "cpu" else torch.bfloat16)
    dtype_name = str(dtype).removeprefix("torch.")
    preset = nqcompile.get_preset(args.preset)
    name = args.model or "SmolLM2-135M-Instruct"
    try:
        path = model_path(args.model)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ImportError) as err:  # a missing folder, an unknown hub id offline, a missing demo package
        raise UsageError(f"cannot load model {name}: {' '.join(str(err).split())}") from None
    ids = torch.tensor([tokenize_text(tokenizer, text)], dtype=torch.long)
    exact = preset.sink_tokens + preset.recent_window
    n_prompt, held, note = _split_prompt(
        ids.shape[1], args.held_tokens, exact, args.prompt_file,
        f"{preset.sink_tokens} attention sinks + the {preset.recent_window} most recent tokens, in {dtype_name}")

    t0 = time.perf_counter()
    model, tokenizer = load_pretrained(path, dtype=dtype, device=device)
    print(f"model: {name} ({dtype_name}, {device}, {_threads(torch)}), loaded in "
          f"{time.perf_counter() - t0:.1f} s")
    if note:
        print(note)
    ids = ids.to(device)
    prompt = ids[:, :n_prompt]
    held_ids = ids[:, n_prompt - 1:n_prompt + held] if held else None
    print(f"prompt: {n_prompt:,} tokens from {args.prompt_file}"
          + (f" ({held} more held out for the perplexity check)" if held else ""), flush=True)

    model = nqcompile.optimize(model, preset=preset, tokenizer=tokenizer)
    warm_up_s = _warm_up(model, tokenizer, preset, prompt)
    print(f"warm-up: {args.preset} on the prompt's first {min(n_prompt, WARM_UP_TOKENS):,} tokens in {warm_up_s:.1f} s "
          "(builds or loads the compressed cache's kernels; not in the timings below)", flush=True)
    cache = nqcompile.NexusCache(model.config, preset, max_cache_len=n_prompt + args.max_new_tokens)
    runs = {"compressed": _run_cache(model, tokenizer, args.preset, cache, prompt, held_ids, args.max_new_tokens),
            "uncompressed": _run_cache(model, tokenizer, "uncompressed", DynamicCache(), prompt, held_ids,
                                       args.max_new_tokens)}
    new, exact_new = runs["compressed"].pop("ids"), runs["uncompressed"].pop("ids")
    agree = next((i for i, (a, b) in enumerate(zip(new, exact_new)) if a != b), min(len(new), len(exact_new)))

    print(f"\n--- continuation ({len(new)} tokens, greedy, preset {args.preset}) ---")
    print(tokenizer.decode(new, skip_special_tokens=True))
    print(f"\n--- the uncompressed cache's continuation (the same for the first {agree} of {len(exact_new)} tokens) ---")
    print(tokenizer.decode(exact_new, skip_special_tokens=True))

    report = cache.memory_report()
    print(f"\n--- KV cache after generation (preset {args.preset}) ---")
    print(report)
    print(f"held: {_fmt_bytes(report.allocated_bytes)}; a bf16 cache of the same {report.logical_tokens:,} tokens: "
          f"{_fmt_bytes(report.bf16_bytes)}; ratio {report.compression_ratio:.2f}x; of the bytes held, preallocated "
          f"but not yet used: {_fmt_bytes(report.unused_capacity_bytes)}")
    if report.compression_ratio < 1:
        print(f"note: the ratio is below 1 because the prompt is short: the cache keeps {exact} tokens per layer "
              f"exact ({dtype_name}; float32 takes twice bf16's bytes) and holds fixed parts (normalization "
              f"statistics) that only a longer prompt pays for")

    print(f"\n--- speed (wall clock, this machine, {_threads(torch)}) ---")
    for key, label in (("uncompressed", "uncompressed (DynamicCache)"), ("compressed", f"compressed ({args.preset})")):
        r = runs[key]
        print(f"{label:<30} prefill {r['prefill_tokens']:,} tokens in {r['prefill_s']:6.1f} s   generate "
              f"{r['new_tokens']} tokens in {r['generate_s']:5.1f} s = {r['tokens_per_s']:5.1f} tokens/s")
    print("prefill: one forward over the prompt but its last token"
          + (", the compression at its end and the re-reading that scores tokens" if runs["compressed"]["reread"] else
             " and the compression at its end")
          + "; generate: model.generate from that cache, wall time over the new tokens")

    quality = None
    if held:
        exact_nll, comp_nll = runs["uncompressed"]["held_nll"], runs["compressed"]["held_nll"]
        change = ppl_change_percent(comp_nll, exact_nll, runs["compressed"]["held_tokens"])
        nats = loglik_change(comp_nll, exact_nll, runs["compressed"]["held_tokens"])
        quality = {"held_tokens": held, "perplexity_uncompressed": runs["uncompressed"]["perplexity"],
                   "perplexity_compressed": runs["compressed"]["perplexity"], "change_percent": change,
                   "loglik_change_nats": nats}
        print(f"\n--- quality: perplexity of the {held} held-out tokens that follow the prompt ---")
        print("(each cache as its prefill left it; the held-out tokens are fed as decode steps and scored)")
        print(f"{'uncompressed (DynamicCache)':<30} perplexity {quality['perplexity_uncompressed']:.3f}")
        print(f"{f'compressed ({args.preset})':<30} perplexity {quality['perplexity_compressed']:.3f} ({change:+.2f}%; "
              f"log-likelihood {nats:+.4f} nats per token)")

    total_s = time.perf_counter() - started
    print(f"\ntotal: {total_s:.0f} s")
    if args.json is not None:
        figures = {
            "model": name, "preset": preset.to_dict(), "dtype": dtype_name, "device": device,
            "threads": torch.get_num_threads(), "prompt_file": str(args.prompt_file), "prompt_tokens": n_prompt,
            "continuation": tokenizer.decode(new, skip_special_tokens=True),
            "continuation_uncompressed": tokenizer.decode(exact_new, skip_special_tokens=True), "agreeing_tokens": agree,
            "memory": report.to_dict(), "speed": runs, "quality": quality, "warm_up_s": warm_up_s, "total_s": total_s,
            "versions": {"python": platform.python_version(), "torch": torch.__version__},
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1))
        print(f"figures written to {args.json}")
    return 0


def _diff(args: argparse.Namespace) -> int:
    """Run ``nqcompile diff``; returns the exit status.

    Raises:
        UsageError: bad arguments (an unknown --mode), a model that cannot be loaded, or more prompt tokens than the
            passage holds.
    """
    if args.steps < 1 or args.prompt_tokens < 1:
        raise UsageError("diff: --steps and --prompt-tokens must be >= 1")
    import torch

    from nqcompile.compile import graph_diff
    from nqcompile.eval.perplexity import read_data_text, tokenize_text
    from nqcompile.models import load_pretrained

    modes = sorted(torch._inductor.list_mode_options())
    if args.mode is not None and args.mode not in modes:
        raise UsageError(f"diff: --mode {args.mode} is not a torch.compile mode; pass one of {', '.join(modes)}")
    name = args.model or "SmolLM2-135M-Instruct"
    print(f"loading model {name} ...", flush=True)
    t0 = time.perf_counter()
    try:
        model, tokenizer = load_pretrained(args.model)
    except (OSError, ImportError) as err:  # a missing folder, an unknown hub id offline, a missing demo package
        raise UsageError(f"diff: cannot load model {name}: {' '.join(str(err).split())}") from None
    print(f"model: {name}, loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    ids = tokenize_text(tokenizer, read_data_text("prompt.txt"))
    if len(ids) < args.prompt_tokens:
        raise UsageError(f"diff: the vendored prompt has only {len(ids)} tokens; pass --prompt-tokens {len(ids)} "
                         "or fewer")
    preset = None if args.preset == "none" else args.preset
    if preset is not None:
        print(f"preparing the model with nqcompile.optimize(model, {preset!r}, tokenizer=tokenizer)", flush=True)
    result = graph_diff(model, preset, input_ids=torch.tensor([ids[: args.prompt_tokens]]), steps=args.steps,
                        mode=args.mode, tokenizer=tokenizer, progress=lambda line: print(line, flush=True))
    print()
    print(result.to_text())
    if args.html is not None:
        print(f"\nHTML report (code before and after the passes, side by side): {result.to_html(args.html)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``nqcompile`` command; with no subcommand it runs ``generate``.

    Args:
        argv: arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        The process exit status: 0 on success, 2 for a usage error (one line on stderr, ``nqcompile: ...``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["generate", *argv]
    args = build_parser().parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read by OpenMP when torch loads (after this line)
    try:
        return _diff(args) if args.command == "diff" else _generate(args)
    except UsageError as err:
        print(f"nqcompile: {err}", file=sys.stderr)
        return 2
