"""Perplexity through a (compressed) KV cache, the way generation would use it.

Protocol (``docs/design.md``, "Evaluation protocol"): for one window of ``prefix + continuation`` tokens, prefill
the first ``prefix`` tokens in one chunk (exact attention; a compressed cache compresses at the end of the
chunk), then run the continuation through the same cache as decode steps (teacher forcing, exactly as
``generate`` would: a ``NexusCache`` replays the ``continuation - 1`` steps in one forward with
``replay_as_decode``, same codes and logits as one token at a time) and sum the negative log-likelihood
of the continuation's tokens. The first continuation token is predicted by the prefill's last logits, so
``continuation`` tokens are scored. The baseline is the same with ``DynamicCache()``.

Windows come from the texts vendored in ``nqcompile/data/``, by genre (:data:`GENRES`: Austen's novels, the Python
Language Reference, Python source code; ``nqcompile/data/README.md`` gives their sources and licences); they are
chosen deterministically from non-overlapping slots by a seeded generator. A window starts with the special tokens the
tokenizer puts before a text (:func:`leading_special_ids`: Gemma's ``<bos>``, nothing for SmolLM2), as the model saw
texts start in training.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from nqcompile.models import cache_kwarg_name

__all__ = [
    "DATA_DIR",
    "GENRES",
    "NOVELS",
    "read_data_text",
    "tokenize_text",
    "leading_special_ids",
    "Window",
    "perplexity_windows",
    "window_nll",
    "window_token_nll",
    "continuation_nll",
    "WindowResult",
    "run_windows",
    "perplexity",
    "ppl_change_percent",
    "loglik_change",
    "BootstrapCI",
    "bootstrap_ci",
]

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
#: The vendored texts (files in ``DATA_DIR``) perplexity windows are drawn from, by genre: literary prose (Austen),
#: technical reference text (the Python Language Reference) and source code (Python's ``argparse`` module).
GENRES = {
    "prose": ("persuasion.txt", "northanger_abbey.txt"),
    "technical": ("python_reference.txt",),
    "code": ("argparse.py.txt",),
}
#: Novels (files in ``DATA_DIR``) that prose windows and needle haystacks are drawn from.
NOVELS = GENRES["prose"]


def read_data_text(name: str) -> str:
    """Return the text of a file vendored in ``nqcompile/data/`` (e.g. ``"prompt.txt"``).

    Raises:
        FileNotFoundError: no such file in the package's data folder.
    """
    path = DATA_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"{name} is not in {DATA_DIR}")
    return path.read_text(encoding="utf-8")


def tokenize_text(tokenizer, text: str) -> list[int]:
    """Tokenize a long text without special tokens (no BOS) and without length warnings.

    Returns:
        The token ids, a ``list[int]``.
    """
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def leading_special_ids(tokenizer) -> list[int]:
    """The token ids a tokenizer puts before a text when it adds special tokens (``[bos]`` for Gemma, ``[]`` for
    SmolLM2, whose tokenizer adds none), read from how it encodes ``"a"`` with and without them.

    Returns:
        The ids, a ``list[int]`` (empty when it adds nothing in front).

    Raises:
        ValueError: the text's own tokens are not found among those it encodes with special tokens.
    """
    bare = tokenize_text(tokenizer, "a")
    full = list(tokenizer("a", verbose=False)["input_ids"])
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            return full[:i]
    raise ValueError(f"the tokenizer encodes 'a' as {bare} without special tokens but {full} with them")


@dataclass(frozen=True)
class Window:
    """One perplexity window.

    Attributes:
        source: file name of the text it comes from.
        start: index of its first text token in that text's token sequence (after the leading special tokens).
        prefix: number of prefill tokens (the rest is the continuation).
        input_ids: ``(1, prefix + continuation)`` int64 token ids, on the CPU.
    """

    source: str
    start: int
    prefix: int
    input_ids: torch.Tensor = field(repr=False)

    @property
    def continuation(self) -> int:
        """Number of continuation tokens (the tokens that are scored)."""
        return self.input_ids.shape[1] - self.prefix


def perplexity_windows(
    tokenizer,
    *,
    n_windows: int = 8,
    prefix: int = 3584,
    continuation: int = 512,
    seed: int = 0,
    sources: Sequence[str] = NOVELS,
) -> list[Window]:
    """Draw ``n_windows`` deterministic token windows from vendored texts (by default the novels).

    Each text is tokenized whole (no special tokens) and cut into non-overlapping slots of
    ``prefix + continuation - len(lead)`` tokens, where ``lead`` is :func:`leading_special_ids`; ``n_windows``
    slots are drawn without replacement by ``numpy.random.default_rng(seed)`` and returned sorted by (text order,
    start), each as ``lead`` followed by the slot's tokens. The lead counts in the prefix, so every window has
    ``prefix + continuation`` tokens and scores ``continuation`` of them.

    Args:
        tokenizer: a HuggingFace tokenizer.
        n_windows: number of windows (>= 1).
        prefix: prefill length P in tokens (>= 1).
        continuation: scored continuation length C in tokens (>= 1).
        seed: seed of the slot draw; same seed and tokenizer give the same windows.
        sources: file names in ``nqcompile/data/`` (a genre's: ``GENRES[genre]``).

    Returns:
        A list of :class:`Window`, each with ``input_ids`` of shape ``(1, prefix + continuation)``.

    Raises:
        ValueError: non-positive sizes, a prefix no longer than the lead, or more windows asked for than the texts
            hold.
    """
    lead = leading_special_ids(tokenizer)
    if n_windows < 1 or prefix <= len(lead) or continuation < 1:
        raise ValueError(f"n_windows, prefix - {len(lead)} (the tokenizer's leading special tokens) and continuation "
                         f"must be >= 1, got {n_windows}, {prefix}, {continuation}")
    span = prefix + continuation - len(lead)
    token_lists = {name: tokenize_text(tokenizer, read_data_text(name)) for name in sources}
    slots = [(name, start) for name in sources for start in range(0, len(token_lists[name]) - span + 1, span)]
    if n_windows > len(slots):
        raise ValueError(f"asked for {n_windows} windows of {span} tokens but {', '.join(sources)} hold only "
                         f"{len(slots)}")
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(slots), size=n_windows, replace=False).tolist())
    windows = []
    for i in chosen:
        name, start = slots[i]
        ids = torch.tensor([lead + token_lists[name][start : start + span]], dtype=torch.long)
        windows.append(Window(source=name, start=start, prefix=prefix, input_ids=ids))
    return windows


@torch.inference_mode()
def window_token_nll(
    model,
    input_ids: torch.Tensor,
    prefix: int,
    cache,
    *,
    timings: dict | None = None,
) -> torch.Tensor:
    """Per-token negative log-likelihood of a continuation fed through ``cache`` as decode steps.

    Prefills ``input_ids[:, :prefix]`` in one forward call, then runs the continuation
    ``input_ids[:, prefix:T-1]`` as decode steps, scoring tokens ``prefix .. T-1``. A
    :class:`~nqcompile.NexusCache` replays those steps in one forward
    (:meth:`~nqcompile.NexusCache.replay_as_decode`: the same codes, flushes and logits as feeding one token
    at a time, which ``tests/test_cache_compressed.py`` checks); a ``DynamicCache`` gives the same logits
    for a chunk as for single tokens.

    Args:
        model: a HuggingFace causal LM (in eval mode).
        input_ids: ``(B, T)`` int64 token ids, no padding; moved to the model's device.
        prefix: number of prefill tokens, ``1 <= prefix < T``.
        cache: a fresh, empty ``transformers.Cache`` (``DynamicCache()`` or ``nqcompile.NexusCache``).
        timings: if a dict is given, it receives ``prefill_s`` (prefill forward, including the cache's
            compression at the end of the chunk), ``decode_s`` (the continuation) and ``decode_steps``
            (its number of tokens), wall-clock seconds.

    Returns:
        ``(B, T - prefix)`` float32 tensor on the CPU: the NLL in nats of each scored token (column ``j`` is token
        ``prefix + j``).

    Raises:
        ValueError: ``input_ids`` is not 2-D or ``prefix`` is out of range.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
    total = input_ids.shape[1]
    if not 1 <= prefix < total:
        raise ValueError(f"prefix must be in [1, {total - 1}], got {prefix}")
    kw = {cache_kwarg_name(model): cache, "use_cache": True}
    ids = input_ids.to(model.device)
    t0 = time.perf_counter()
    first = model(ids[:, :prefix], logits_to_keep=1, **kw).logits[:, -1:]
    t1 = time.perf_counter()
    replay = cache.replay_as_decode() if hasattr(cache, "replay_as_decode") else contextlib.nullcontext()
    with replay:
        rest = model(ids[:, prefix : total - 1], **kw).logits if total - prefix > 1 else first[:, :0]
    logits = torch.cat([first, rest], 1).float()
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, prefix:].flatten(), reduction="none")
    t2 = time.perf_counter()
    if timings is not None:
        timings.update(prefill_s=t1 - t0, decode_s=t2 - t1, decode_steps=total - prefix - 1)
    return nll.view(ids.shape[0], total - prefix).cpu()


def window_nll(
    model,
    input_ids: torch.Tensor,
    prefix: int,
    cache,
    *,
    timings: dict | None = None,
) -> tuple[float, int]:
    """Summed negative log-likelihood of a continuation fed through ``cache`` as decode steps
    (:func:`window_token_nll`, which gives it per token; same arguments and errors).

    Returns:
        ``(nll_sum, n_tokens)``: summed NLL in nats (float) and the number of scored tokens
        ``B * (T - prefix)``. Perplexity is ``exp(nll_sum / n_tokens)``.
    """
    nll = window_token_nll(model, input_ids, prefix, cache, timings=timings)
    return float(nll.double().sum()), nll.numel()


@torch.inference_mode()
def continuation_nll(model, input_ids: torch.Tensor, cache) -> tuple[float, int]:
    """Negative log-likelihood of a continuation through a cache that already holds its context.

    ``cache`` holds a prefilled context except its last token, ``input_ids[:, 0]``. The tokens
    ``input_ids[:, :-1]`` are fed as decode steps (a :class:`~nqcompile.NexusCache` replays them in one forward,
    :meth:`~nqcompile.NexusCache.replay_as_decode`) and ``input_ids[:, 1:]`` are scored: how ``nqcompile generate``
    checks a held-out continuation against the cache its prefill left, without a second prefill. The cache is
    changed (it then holds the continuation too); pass a copy to keep it.

    Args:
        model: a HuggingFace causal LM (in eval mode).
        input_ids: ``(B, 1 + C)`` int64 token ids: the context's last token, then the ``C`` tokens to score.
        cache: a ``transformers.Cache`` holding the context before ``input_ids[:, 0]``.

    Returns:
        ``(nll_sum, n_tokens)``: summed NLL in nats and the number of scored tokens ``B * C``.

    Raises:
        ValueError: ``input_ids`` is not 2-D or has fewer than 2 tokens.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be (batch, 1 + tokens to score) with at least 2 tokens, got shape "
                         f"{tuple(input_ids.shape)}")
    ids = input_ids.to(model.device)
    replay = cache.replay_as_decode() if hasattr(cache, "replay_as_decode") else contextlib.nullcontext()
    with replay:
        logits = model(ids[:, :-1], **{cache_kwarg_name(model): cache, "use_cache": True}).logits.float()
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
    return float(nll), ids.shape[0] * (ids.shape[1] - 1)


@dataclass
class WindowResult:
    """Outcome of one window through one cache.

    Attributes:
        nll_sum: summed NLL of the continuation, nats.
        n_tokens: number of scored tokens.
        prefill_s, decode_s: wall-clock seconds of the prefill and of the single-token steps.
        decode_steps: number of single-token steps.
        memory: the cache's ``memory_report()`` at the end of the window, or None if it has none.
    """

    nll_sum: float
    n_tokens: int
    prefill_s: float
    decode_s: float
    decode_steps: int
    memory: object | None = None

    @property
    def perplexity(self) -> float:
        """``exp(nll_sum / n_tokens)``."""
        return perplexity(self.nll_sum, self.n_tokens)


def run_windows(
    model,
    windows: Sequence[Window],
    cache_factory: Callable[[int], object],
    *,
    desc: str = "windows",
    progress: bool = True,
) -> list[WindowResult]:
    """Run :func:`window_nll` on every window with a fresh cache from ``cache_factory``.

    Args:
        model: a HuggingFace causal LM.
        windows: from :func:`perplexity_windows`.
        cache_factory: ``cache_factory(max_cache_len: int) -> Cache``; called once per window with the
            window's total length in tokens.
        desc: tqdm label.
        progress: show tqdm bars.

    Returns:
        One :class:`WindowResult` per window, in order.
    """
    results = []
    for w in tqdm(windows, desc=desc, disable=not progress):
        cache = cache_factory(w.input_ids.shape[1])
        timings: dict = {}
        nll, n = window_nll(model, w.input_ids, w.prefix, cache, timings=timings)
        memory = cache.memory_report() if hasattr(cache, "memory_report") else None
        results.append(WindowResult(nll, n, timings["prefill_s"], timings["decode_s"], timings["decode_steps"], memory))
    return results


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """Perplexity ``exp(nll_sum / n_tokens)`` from a summed NLL in nats."""
    return math.exp(nll_sum / n_tokens)


def ppl_change_percent(nll_sum: float, baseline_nll_sum: float, n_tokens: int) -> float:
    """Perplexity change in percent of a run against a baseline on the same tokens.

    ``100 * (exp((nll_sum - baseline_nll_sum) / n_tokens) - 1)``; positive means worse than the baseline.
    """
    return 100.0 * math.expm1((nll_sum - baseline_nll_sum) / n_tokens)


def loglik_change(nll_sum: float, baseline_nll_sum: float, n_tokens: int) -> float:
    """Change of the mean log-likelihood per token, in nats, of a run against a baseline on the same tokens.

    ``(baseline_nll_sum - nll_sum) / n_tokens``; negative means worse than the baseline. It equals
    ``-log(1 + ppl_change_percent / 100)``: the same comparison on an additive scale (nats per token), which reads
    alike on texts of very different perplexity (source code against prose).
    """
    return (baseline_nll_sum - nll_sum) / n_tokens


@dataclass(frozen=True)
class BootstrapCI:
    """Mean of a sample and its percentile-bootstrap confidence interval.

    Attributes:
        mean: sample mean.
        low, high: interval bounds (equal to ``mean`` for a single value).
        confidence: e.g. 0.95.
        n: sample size.
    """

    mean: float
    low: float
    high: float
    confidence: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    *,
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> BootstrapCI:
    """Percentile-bootstrap confidence interval of the mean (e.g. of per-window % perplexity changes).

    Resamples ``values`` with replacement ``n_resamples`` times with ``numpy.random.default_rng(seed)``,
    and takes the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of the resampled means.

    Args:
        values: 1-D sample (finite floats), at least one value.
        confidence: in (0, 1).
        n_resamples: number of bootstrap resamples (>= 1).
        seed: generator seed; the same inputs give the same interval.

    Returns:
        A :class:`BootstrapCI`.

    Raises:
        ValueError: empty or non-finite sample, or arguments out of range.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"bootstrap_ci got non-finite values: {x}")
    if not 0.0 < confidence < 1.0 or n_resamples < 1:
        raise ValueError(f"confidence must be in (0, 1) and n_resamples >= 1, got {confidence}, {n_resamples}")
    mean = float(x.mean())
    if x.size == 1:
        return BootstrapCI(mean, mean, mean, confidence, 1)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_resamples, x.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return BootstrapCI(mean, float(low), float(high), confidence, int(x.size))
