"""Where a preset's perplexity cost goes: per kind of token and per layer, on windows of each genre.

Issue 12, item 4: on SmolLM2 ``quant_only`` (no eviction) costs technical text and source code several times what it
costs prose. This benchmark runs the quality protocol's windows (``nqcompile.eval.perplexity_windows``, the same
draw as ``quality.py``: ``--prefix`` tokens prefilled and compressed at the chunk's end, ``--continuation`` tokens as
decode steps) through the exact ``DynamicCache`` and through each cache of ``--presets`` / ``--custom``, keeps the
NLL of every scored token (``nqcompile.eval.window_token_nll``) and reports:

* per genre and cache: the perplexity change in %, the change of mean log-likelihood in nats per token, the byte
  ratio (``memory_report()``) and how many layers kept 4-bit keys (``relax_key_kl``; the JSON has each layer's key
  bits and the attention KL its key-bit trial measured);
* per genre, cache and kind of token: the token count, the exact cache's mean NLL, the mean NLL change and the kind's
  share of the window's total NLL change. Kinds, first match wins: ``copied`` (the token ends a 4-gram of tokens that
  already occurs earlier in the window: what induction heads copy), ``markup`` (no letter or digit: punctuation,
  reST markup, operators, whitespace), ``identifier`` (part of a word holding ``_``, a digit, an inner capital or a
  ``.`` between letters, e.g. ``add_argument``, ``PEP8``, ``os.path``), ``word`` (the rest);
* with ``--per-layer``, per genre and layer: the NLL change in millinats per token when only that layer is stored by
  the first cache of the run (every other layer exact), the direct way to see which layers cost what.

One process, CPU by default. Example (the run in ``benchmarks/README.md``)::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/genre_cost.py --threads 1 --per-layer --out out/genre_cost.json
    python benchmarks/genre_cost.py --presets '' --custom '{"k4v3": {"key_bits": 4, "value_bits": 3}}'
    python benchmarks/genre_cost.py --smoke     # a tiny random Llama with a byte-level tokenizer, seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from tqdm import tqdm
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import build_caches, ints, markdown, names, parse_with_smoke, preset_fields  # noqa: E402
from quality import DTYPES, TINY, load_model  # noqa: E402

import nqcompile  # noqa: E402
from nqcompile.cache.layer import NexusLayer  # noqa: E402
from nqcompile.eval import GENRES, perplexity_windows, window_token_nll  # noqa: E402

KINDS = ("copied", "markup", "identifier", "word")
#: n of the n-gram a ``copied`` token ends.
COPY_NGRAM = 4
SMOKE = dict(model="tiny-llama", presets="quant_only", windows=1, prefix=256, continuation=64)
_WORD = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z_][A-Za-z0-9_]*)*")


def token_kinds(ids: list[int], pieces: list[str], start: int) -> list[str]:
    """The kind (:data:`KINDS`) of each token ``ids[start:]`` of a window.

    Args:
        ids: the window's token ids.
        pieces: the text of each token of ``ids`` (``tokenizer.decode([id])``), as many as ``ids``.
        start: index of the first classified token (the first scored one).

    Returns:
        ``len(ids) - start`` names of :data:`KINDS`.
    """
    n = COPY_NGRAM
    seen = {tuple(ids[i - n + 1:i + 1]) for i in range(n - 1, start)}
    text = "".join(pieces)
    offsets = np.cumsum([0] + [len(p) for p in pieces])
    words = [(m.start(), m.end(), m.group()) for m in _WORD.finditer(text)]
    word_at = np.full(len(text) + 1, -1)
    for k, (a, b, _) in enumerate(words):
        word_at[a:b] = k
    kinds = []
    for i in range(start, len(ids)):
        gram = tuple(ids[i - n + 1:i + 1])
        if i >= n - 1 and gram in seen:
            kinds.append("copied")
        elif not any(ch.isalnum() for ch in pieces[i]):
            kinds.append("markup")
        else:
            a, b = offsets[i], offsets[i + 1]
            hits = {int(k) for k in word_at[a:b] if k >= 0}
            kinds.append("identifier" if any(_is_identifier(words[k][2]) for k in hits) else "word")
        if i >= n - 1:
            seen.add(gram)
    return kinds


def _is_identifier(word: str) -> bool:
    return "_" in word or "." in word or any(ch.isdigit() for ch in word) or any(ch.isupper() for ch in word[1:])


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's argument parser (see ``--help``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2",
                   help=f"a name of nqcompile.models.PRETRAINED or a local HuggingFace folder, or one of "
                        f"{sorted(TINY)} (random weights, byte-level tokenizer) (default: smollm2)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="model dtype (default: float32)")
    p.add_argument("--device", default="cpu", help="torch device the model runs on (default: cpu)")
    p.add_argument("--presets", type=names, default="quant_only",
                   help="comma-separated preset names (default: quant_only)")
    p.add_argument("--custom", type=preset_fields, default={},
                   help='more caches as JSON, {"name": {Preset fields}}, run after --presets (default: none)')
    p.add_argument("--genres", type=names, default=",".join(GENRES),
                   help=f"comma-separated genres of nqcompile.eval.GENRES (default: {','.join(GENRES)})")
    p.add_argument("--windows", type=int, default=1, help="windows per genre (default: 1)")
    p.add_argument("--prefix", type=int, default=3584, help="prefill tokens per window (default: 3584)")
    p.add_argument("--continuation", type=int, default=512, help="continuation tokens per window (default: 512)")
    p.add_argument("--per-layer", action="store_true",
                   help="also run the first cache with one layer coded at a time (layers x windows more runs)")
    p.add_argument("--layers", type=ints, default="",
                   help="with --per-layer, only these layers, comma-separated (default: every layer)")
    p.add_argument("--seed", type=int, default=0, help="seed of the window draw (default: 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=None, help="write every per-token NLL and the tables as JSON here")
    p.add_argument("--smoke", action="store_true",
                   help="a tiny random model: " + " ".join(f"--{k} {v}" for k, v in SMOKE.items()))
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; adds ``args.caches`` (``{name: Preset}``) and ``args.command``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = build_parser()
    args = parse_with_smoke(p, argv, SMOKE)
    args.command = shlex.join(["python", "benchmarks/genre_cost.py", *argv])
    if [g for g in args.genres if g not in GENRES] or not args.genres:
        p.error(f"--genres {','.join(args.genres)!r}: choose among {list(GENRES)}")
    if args.windows < 1 or min(args.prefix, args.continuation) < 1:
        p.error("--windows, --prefix and --continuation must be positive")
    caches = build_caches(p, args.presets, args.custom, "exact")
    if not caches:
        p.error("no cache to measure: give --presets or --custom")
    args.caches = caches
    return args


def one_layer_cache(model, preset: nqcompile.Preset, layer: int, max_cache_len: int) -> nqcompile.NexusCache:
    """A NexusCache that stores layer ``layer`` by ``preset`` and every other layer exactly (in the model's dtype;
    an exact ``NexusLayer`` gives the ``DynamicCache``'s logits, ``tests/test_cache_compressed.py``)."""
    exact = preset.replace(key_bits=None, value_bits=None, relax_key_kl=0.0, warm_tokens=0, eviction_ratio=0.0,
                           keep_mass=0.0, scorer="observation")
    cache = nqcompile.NexusCache(model.config, preset=exact, max_cache_len=max_cache_len)
    coded = nqcompile.NexusCache(model.config, preset=preset, max_cache_len=max_cache_len)
    if not isinstance(coded.layers[layer], NexusLayer):
        raise ValueError(f"layer {layer} is not a full-attention layer; --per-layer supports full-attention models")
    cache.layers[layer] = coded.layers[layer]
    return cache


def _kind_table(kinds: list[str], base: np.ndarray, nll: np.ndarray) -> dict:
    delta = nll - base
    total = float(delta.sum())
    out = {}
    for kind in KINDS:
        mask = np.array([k == kind for k in kinds])
        if mask.any():
            out[kind] = {"tokens": int(mask.sum()), "exact_nll": float(base[mask].mean()),
                         "delta_nll": float(delta[mask].mean()),
                         "share": float(delta[mask].sum() / total) if total else float("nan")}
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints the tables and the command line. Returns 0."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        records, description = measure(args)
    finally:
        torch.set_num_threads(threads)
    print()
    print(tables(records, args))
    print(f"\ncommand: {args.command}")
    print(f"model: {description}, {args.dtype} on {args.device}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, {args.threads or threads} threads; {args.windows} window(s) per genre x "
          f"({args.prefix} + {args.continuation}) tokens, seed {args.seed}; {time.perf_counter() - t0:.0f} s")
    if args.out:
        _write(args, records)
        print(f"wrote {args.out}")
    return 0


def measure(args: argparse.Namespace) -> tuple[list[dict], str]:
    """Every window through the exact cache, each cache and (``--per-layer``) each one-layer cache: the per-window
    records that ``--out`` writes, and the model's description."""
    model, tokenizer, description = load_model(args.model, args)
    model = nqcompile.optimize(model, preset=next(iter(args.caches.values())), tokenizer=tokenizer)
    windows = [(g, w) for g in args.genres
               for w in perplexity_windows(tokenizer, n_windows=args.windows, prefix=args.prefix,
                                           continuation=args.continuation, seed=args.seed, sources=GENRES[g])]
    n_layers = model.config.num_hidden_layers
    if any(not 0 <= i < n_layers for i in args.layers):
        raise SystemExit(f"--layers {args.layers}: the model has layers 0 to {n_layers - 1}")
    layers = (args.layers or list(range(n_layers))) if args.per_layer else []
    records = []
    runs = len(windows) * (1 + len(args.caches) + len(layers))
    bar = tqdm(total=runs, desc="windows x caches", unit="run")
    for genre, w in windows:
        length = w.input_ids.shape[1]
        ids = w.input_ids[0].tolist()
        kinds = token_kinds(ids, [tokenizer.decode([i]) for i in ids], w.prefix)
        base = window_token_nll(model, w.input_ids, w.prefix, DynamicCache())[0].numpy()
        bar.update()
        rec = {"genre": genre, "source": w.source, "start": w.start, "kinds": kinds, "exact_nll": base.tolist(),
               "caches": {}, "layers": {}}
        for name, preset in args.caches.items():
            cache = nqcompile.NexusCache(model.config, preset=preset, max_cache_len=length)
            nll = window_token_nll(model, w.input_ids, w.prefix, cache)[0].numpy()
            report = cache.memory_report()
            rec["caches"][name] = {"nll": nll.tolist(), "byte_ratio": report.compression_ratio,
                                   "layer_key_bits": list(report.layer_key_bits),
                                   "layer_key_kl": [getattr(layer, "key_kl", None) for layer in cache.layers],
                                   "kinds": _kind_table(kinds, base, nll)}
            bar.update()
        for layer in layers:
            cache = one_layer_cache(model, next(iter(args.caches.values())), layer, length)
            nll = window_token_nll(model, w.input_ids, w.prefix, cache)
            rec["layers"][str(layer)] = float((nll[0].numpy() - base).mean())
            bar.update()
        records.append(rec)
        if args.out:
            _write(args, records)
    bar.close()
    return records, description


def tables(records: list[dict], args: argparse.Namespace) -> str:
    """The markdown tables: per genre and cache; per genre, cache and kind; per layer (with ``--per-layer``)."""
    genres = list(dict.fromkeys(r["genre"] for r in records))
    by_genre = {g: [r for r in records if r["genre"] == g] for g in genres}
    rows = []
    for g in genres:
        base = np.concatenate([r["exact_nll"] for r in by_genre[g]])
        for name in args.caches:
            nll = np.concatenate([r["caches"][name]["nll"] for r in by_genre[g]])
            d = float(nll.mean() - base.mean())
            ratio = np.mean([r["caches"][name]["byte_ratio"] for r in by_genre[g]])
            bits = [b for r in by_genre[g] for b in r["caches"][name]["layer_key_bits"]]
            full = sum(b == args.caches[name].key_bits for b in bits) / len(by_genre[g])
            rows.append([g, f"`{name}`", f"{np.exp(base.mean()):.3f}", f"{np.expm1(d) * 100:+.2f}%", f"{-d:+.4f}",
                         f"{ratio:.2f}x", f"{full:.1f} of {len(bits) // len(by_genre[g])}"])
    out = [markdown(["genre", "cache", "exact ppl", "ppl change", "loglik change (nats/token)", "byte ratio",
                     "layers at the full key bits"], rows)]
    rows = []
    for g in genres:
        kinds = [k for r in by_genre[g] for k in r["kinds"]]
        base = np.concatenate([r["exact_nll"] for r in by_genre[g]])
        for name in args.caches:
            nll = np.concatenate([r["caches"][name]["nll"] for r in by_genre[g]])
            for kind, s in _kind_table(kinds, base, nll).items():
                rows.append([g, f"`{name}`", kind, f"{s['tokens']} ({s['tokens'] / len(kinds):.0%})",
                             f"{s['exact_nll']:.3f}", f"{s['delta_nll'] * 1e3:+.1f}", f"{s['share']:.0%}"])
    out.append(markdown(["genre", "cache", "kind", "tokens", "exact NLL (nats)", "NLL change (millinats/token)",
                         "share of the change"], rows))
    if args.per_layer:
        head = ["layer"] + [f"{g}: millinats/token" for g in genres]
        rows = [[i] + [f"{np.mean([r['layers'][i] for r in by_genre[g]]) * 1e3:+.2f}" for g in genres]
                for i in records[0]["layers"]]
        rows.append(["sum over these layers"] + [
            f"{np.mean([sum(r['layers'].values()) for r in by_genre[g]]) * 1e3:+.2f}" for g in genres])
        out.append(f"One layer coded by `{next(iter(args.caches))}` at a time, the others exact:\n\n"
                   + markdown(head, rows))
    return "\n\n".join(out)


def _write(args: argparse.Namespace, records: list[dict]) -> None:
    meta = {"command": args.command, "caches": {n: p.to_dict() for n, p in args.caches.items()},
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__}, "threads": torch.get_num_threads()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "windows": records}))


if __name__ == "__main__":
    raise SystemExit(main())
