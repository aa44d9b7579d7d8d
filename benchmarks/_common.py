"""Helpers shared by the benchmarks (the decode timings, ``quality.py``, ``genre_cost.py``).

Not part of the library: each script puts its own folder on ``sys.path`` before importing it, so that it also
imports when a test loads the script by its file path.

* command line: :func:`names`, :func:`ints` (lists), :func:`preset_fields` (``--custom``'s JSON),
  :func:`parse_with_smoke` (``--smoke`` defaults and known presets), :func:`build_caches` (``{name: Preset}`` from
  ``--presets`` and ``--custom``);
* timing: :func:`prefill` (chunks; the re-reading of a ``reconstruction`` preset timed apart; the last logits),
  :func:`time_calls` (warm-up, then timed calls; a compiled callable's first call timed on its own, and the graphs
  Dynamo compiled counted), :func:`compile_counts`;
* models: :func:`byte_level_tokenizer` (the tokenizer of the random-weight models with 256-id vocabularies);
* output: :func:`failure` (a failed row's fields), :func:`write_json` (``{"meta", "rows"}``), :func:`markdown`
  (a table from header and cells), :func:`progress` (a finished row as one line).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Sequence

import torch

import nqcompile
from nqcompile.models import cache_kwarg_name


def byte_level_tokenizer():
    """A byte-level BPE tokenizer without merges (one token per byte, 256 ids, numbered in the sorted order of the
    byte-level alphabet so that every build gives the same ids) and no special tokens: the tokenizer of the
    random-weight models with 256-id vocabularies (``--smoke``; presets that keep line breaks need one), built
    without any download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}  # alphabet(): a set
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def names(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]`` (a comma-separated flag)."""
    return [x.strip() for x in text.split(",") if x.strip()]


def ints(text: str) -> list[int]:
    """``"1,2"`` -> ``[1, 2]``."""
    return [int(x) for x in names(text)]


def preset_fields(text: str) -> dict:
    """``--custom``'s argument: JSON ``{"name": {Preset fields}, ...}`` -> that dict (``argparse`` type)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f'not JSON ({err}); expected {{"name": {{"key_bits": 4, ...}}}}') from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise argparse.ArgumentTypeError('expected {"name": {Preset fields}, ...}')
    return data


def build_caches(parser: argparse.ArgumentParser, presets: Sequence[str], custom: dict,
                 reserved: str) -> dict[str, "nqcompile.Preset"]:
    """``{name: Preset}``: the named ``presets``, then a :class:`~nqcompile.Preset` per ``custom`` entry (name ->
    fields). A ``custom`` name already used or equal to ``reserved`` (the baseline's label), and fields the
    ``Preset`` refuses, are usage errors (``parser.error``: exit status 2)."""
    caches = {name: nqcompile.PRESETS[name] for name in presets}
    for name, fields in custom.items():
        if name in caches or name == reserved:
            parser.error(f"--custom name {name!r} is taken; choose another")
        try:
            caches[name] = nqcompile.Preset(name=name, **fields)
        except (TypeError, ValueError) as err:
            parser.error(f"--custom {name!r}: {err}")
    return caches


def parse_with_smoke(parser: argparse.ArgumentParser, argv: list[str] | None, smoke: dict) -> argparse.Namespace:
    """Parse ``argv``; with ``--smoke``, parse again with ``smoke`` as the defaults (flags on the command line still
    win). The parser must have ``--smoke`` and ``--presets`` (a list of names); an unknown preset is a usage error."""
    args = parser.parse_args(argv)
    if args.smoke:
        parser.set_defaults(**smoke)
        args = parser.parse_args(argv)
    unknown = [x for x in args.presets if x not in nqcompile.PRESETS]
    if unknown:
        parser.error(f"unknown presets {unknown}; known: {sorted(nqcompile.PRESETS)}")
    return args


def _no_sync() -> None:
    pass


class Prefill(NamedTuple):
    """What :func:`prefill` measured: ``seconds`` in all, ``reread_s`` of them in ``cache.reconstruct``, and the
    last chunk's ``logits`` (``[1, 1, V]``, ``logits_to_keep=1``)."""

    seconds: float
    reread_s: float
    logits: torch.Tensor


def prefill(model, cache, ids: torch.Tensor, chunk: int, label: str,
            sync: Callable[[], None] = _no_sync) -> Prefill:
    """Feed ``ids`` ``[1, T]`` through ``model`` into ``cache`` in chunks of ``chunk`` tokens (``logits_to_keep=1``).

    A cache whose chunk awaits its reconstruction (``cache.awaiting_reconstruction``: a ``NexusCache`` of a preset
    that scores by re-reading) is re-read after the chunk's forward: the hook of ``nqcompile.optimize`` does it
    inside the same call, and this function calls ``cache.reconstruct(model, chunk_ids)`` itself if the chunk is
    still waiting. Every ``cache.reconstruct`` call is timed (the re-reading forward and the compression it decides).

    Returns:
        a :class:`Prefill`. Logs each chunk to stderr as ``label``.
    """
    kwarg = cache_kwarg_name(model)
    reread = {"s": 0.0, "depth": 0}
    original = getattr(cache, "reconstruct", None)
    if original is not None:
        def timed_reconstruct(*args, **kwargs):
            reread["depth"] += 1
            t = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                reread["depth"] -= 1
                if not reread["depth"]:
                    sync()
                    reread["s"] += time.perf_counter() - t

        cache.reconstruct = timed_reconstruct  # the instance attribute shadows the method for the hook too
    sync()
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            for start in range(0, ids.shape[1], chunk):
                piece = ids[:, start:start + chunk]
                logits = model(input_ids=piece, use_cache=True, logits_to_keep=1, **{kwarg: cache}).logits
                if getattr(cache, "awaiting_reconstruction", False):
                    cache.reconstruct(model, piece)
                sync()
                print(f"  {label}: prefilled {min(start + chunk, ids.shape[1])} tokens in "
                      f"{time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    finally:
        if original is not None:
            del cache.reconstruct
    return Prefill(time.perf_counter() - t0, reread["s"], logits)


def compile_counts() -> tuple[int, int]:
    """Graphs Dynamo has compiled and times Inductor skipped CUDA graphs, so far in this process (their counters)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"]), int(counters["inductor"]["cudagraph_skips"])


def time_calls(call: Callable[[], object], *, warmup: int, steps: int, compiled: bool,
               sync: Callable[[], None] = _no_sync, per_step: bool = False) -> dict:
    """Run ``warmup`` untimed then ``steps`` timed calls of ``call`` (one decode step each).

    Returns ``{"decode_ms_per_token": mean over the timed calls}``; with ``per_step`` also ``step_ms`` and
    ``warmup_ms`` (each timed and each warm-up call, synchronized after each); when ``compiled`` also ``compile_s``
    (the first call, timed on its own before the warm-up), ``graphs`` (compiled by the first call and the warm-up),
    ``timed_recompiles`` (graphs compiled during the timed calls) and ``cudagraph_skips`` (times Inductor ran a graph
    without CUDA graphs).
    """
    result = {}
    with torch.no_grad():
        if compiled:
            graphs0, skips0 = compile_counts()
            t0 = time.perf_counter()
            call()
            sync()
            result["compile_s"] = time.perf_counter() - t0
        warmup_ms = []
        for _ in range(warmup):
            t = time.perf_counter()
            call()
            if per_step:
                sync()
                warmup_ms.append((time.perf_counter() - t) * 1e3)
        sync()
        if per_step:
            result["warmup_ms"] = warmup_ms
        if compiled:
            result["graphs"] = compile_counts()[0] - graphs0
        t0 = time.perf_counter()
        if per_step:
            times = []
            for _ in range(steps):
                t = time.perf_counter()
                call()
                sync()
                times.append((time.perf_counter() - t) * 1e3)
            result["step_ms"] = times
        else:
            for _ in range(steps):
                call()
        sync()
        result["decode_ms_per_token"] = (time.perf_counter() - t0) / steps * 1e3
        if compiled:
            graphs, skips = compile_counts()
            result.update(timed_recompiles=graphs - graphs0 - result["graphs"], cudagraph_skips=skips - skips0)
    return result


def failure(err: BaseException) -> dict:
    """A failed row's fields: the exception's type and first line, and the end of its traceback."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return {"error": f"{type(err).__name__}: {first}"[:300], "traceback": traceback.format_exc()[-4000:]}


def write_json(path: Path, meta: dict, rows: list[dict]) -> None:
    """Write ``{"meta": meta, "rows": rows}`` to ``path`` (folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


def markdown(head: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A markdown table with the column names ``head`` and one line per row of cells."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def progress(row: dict, keys: Sequence[str], label: str) -> str:
    """``[time] label: key=value, ...`` for the ``keys`` the row has (floats to 3 significant digits)."""
    fields = ", ".join(f"{k}={row[k]:.3g}" if isinstance(row[k], float) else f"{k}={row[k]}"
                       for k in keys if row.get(k) is not None)
    return f"[{time.strftime('%H:%M:%S')}] {label}: {fields}"
