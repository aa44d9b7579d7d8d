"""Query-agnostic needle in a haystack.

A random 7-digit needle sentence is inserted at depth ``d`` (0 = start, 1 = end of the haystack) into a
passage of Austen, inside one user turn of the model's chat template, followed by a question. The chat
string is built once and split token-wise into

* the context chunk: everything up to the end of the haystack (about ``length`` tokens), after the special tokens the
  tokenizer puts before a text (Gemma's ``<bos>``; none where the chat template writes them or the tokenizer adds
  none), fed first, so a compressed cache compresses it at the end of the chunk BEFORE the question is seen;
* the question chunk: the question, the end of the user turn, the assistant prefix of the chat template
  and a short answer prefix, fed as a second chunk through the same cache;

then the answer is decoded greedily, one token at a time. The trial counts as found when the needle's 7
digits appear in the output (separators between digits, such as ``4,829,163``, are ignored).
"""

from __future__ import annotations

import bisect
import re
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from nqcompile.eval.perplexity import NOVELS, leading_special_ids, read_data_text, tokenize_text
from nqcompile.models import cache_kwarg_name

__all__ = ["NeedleCase", "build_needle_case", "NeedleTrial", "NeedleResults", "run_needle_case", "needle_recall"]

NEEDLE = "The special magic number is {number}."
QUESTION = "What is the special magic number mentioned in the text above? Answer with the number only."
ANSWER_PREFIX = "The special magic number is"
_SENTENCE_END = re.compile(r"[.!?][\"')_]*\s+")


@dataclass
class NeedleCase:
    """One haystack with its needle, tokenized and split into the two chunks.

    Attributes:
        context_ids: ``(1, Lc)`` int64, the context chunk (leading special tokens + chat prefix + haystack with the
            needle).
        question_ids: ``(1, Lq)`` int64, the question chunk (question, end of turn, assistant prefix).
        needle: the 7 digits, as a string.
        depth: the requested depth in [0, 1].
        needle_span: ``(start, end)`` token indices of the needle sentence in ``context_ids``.
        haystack_span: ``(start, end)`` token indices of the haystack (needle included) in ``context_ids``.
        source: the novel the haystack comes from.
    """

    context_ids: torch.Tensor = field(repr=False)
    question_ids: torch.Tensor = field(repr=False)
    needle: str
    depth: float
    needle_span: tuple[int, int]
    haystack_span: tuple[int, int]
    source: str

    @property
    def actual_depth(self) -> float:
        """Depth the needle really landed at: tokens of haystack before it / haystack tokens without it."""
        hay = self.haystack_span[1] - self.haystack_span[0] - (self.needle_span[1] - self.needle_span[0])
        return (self.needle_span[0] - self.haystack_span[0]) / max(hay, 1)


def _insertion_point(text: str, offsets: list[tuple[int, int]], depth: float, max_snap: int) -> int:
    """Character index in ``text`` where the needle goes.

    Aims at the token ``round(depth * n_tokens)`` and moves to the nearest sentence start within
    ``max_snap`` tokens, else to the start of the word at the target. Always an index right after
    whitespace, or 0, or ``len(text)``.
    """
    n = len(offsets)
    target = min(max(round(depth * n), 0), n)
    if target == 0:
        return 0
    if target == n:
        return len(text)
    starts = [s for s, _ in offsets]
    candidates = [m.end() for m in _SENTENCE_END.finditer(text) if m.end() < len(text)]
    best, best_dist = None, max_snap + 1
    for c in candidates:
        dist = abs(bisect.bisect_left(starts, c) - target)
        if dist < best_dist:
            best, best_dist = c, dist
    if best is not None:
        return best
    c = starts[target]
    while c < len(text) and not text[c - 1].isspace():  # token offsets of " word" start at the space
        c += 1
    return c


def build_needle_case(
    tokenizer,
    *,
    length: int,
    depth: float,
    number: int,
    source: str = NOVELS[0],
    start: int = 0,
    answer_prefix: str | None = ANSWER_PREFIX,
    max_snap: int | None = None,
) -> NeedleCase:
    """Build one needle case whose context chunk is ``length`` tokens (within a few tokens).

    Args:
        tokenizer: a HuggingFace tokenizer with a chat template (or none: then plain text is used).
        length: target length of the context chunk in tokens (leading special tokens + chat prefix + haystack).
        depth: where the needle goes, 0.0 (start of the haystack) to 1.0 (end).
        number: the needle, 1,000,000 to 9,999,999.
        source: novel file in ``nqcompile/data/`` the haystack is cut from.
        start: first token of the haystack in that novel's token sequence.
        answer_prefix: text appended after the assistant prefix of the chat template (None: nothing).
        max_snap: how far (tokens) the needle may move to land at a sentence start; default
            ``length // 50``.

    Returns:
        A :class:`NeedleCase`.

    Raises:
        ValueError: ``depth`` outside [0, 1], a number that is not 7 digits, a length too small for the
            template, or a novel too short for ``start + length``.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if not 1_000_000 <= number <= 9_999_999:
        raise ValueError(f"number must have 7 digits, got {number}")
    max_snap = length // 50 if max_snap is None else max_snap
    needle = NEEDLE.format(number=number)
    novel = read_data_text(source)
    novel_offsets = tokenizer(novel, add_special_tokens=False, return_offsets_mapping=True, verbose=False)["offset_mapping"]

    def chat(doc: str) -> tuple[str, int, int]:
        """Full chat string, char index where the haystack starts, char index where the question starts."""
        marker_doc, marker_q = "\x00DOC\x00", "\x00Q\x00"
        content = f"{marker_doc}\n\n{marker_q}"
        if getattr(tokenizer, "chat_template", None):
            s = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
        else:
            s = content + "\n"
        s = s + (answer_prefix or "")
        hay_at = s.index(marker_doc)
        s = s.replace(marker_doc, doc)
        q_at = s.index(marker_q)
        return s.replace(marker_q, QUESTION), hay_at, q_at

    empty, _, q_empty = chat("")
    lead = leading_special_ids(tokenizer)
    if tokenize_text(tokenizer, empty)[: len(lead)] == lead:
        lead = []  # the chat template writes them itself
    overhead = len(lead) + len(tokenize_text(tokenizer, empty[:q_empty])) + len(tokenize_text(tokenizer, " " + needle))
    n_hay = length - overhead
    if n_hay < 16:
        raise ValueError(f"length {length} leaves only {n_hay} haystack tokens")
    for _ in range(8):  # token counts shift by a few at the joins: adjust n_hay until the length is right
        if start + n_hay >= len(novel_offsets):
            raise ValueError(f"{source} has {len(novel_offsets)} tokens, too few for start {start} + {n_hay}")
        c0, c1 = novel_offsets[start][0], novel_offsets[start + n_hay - 1][1]
        sentence = _SENTENCE_END.search(novel, c0, c1) if start > 0 else None
        hay = novel[sentence.end() if sentence else c0 : c1].strip()  # start at a sentence start
        hay_offsets = tokenizer(hay, add_special_tokens=False, return_offsets_mapping=True, verbose=False)["offset_mapping"]
        at = _insertion_point(hay, hay_offsets, depth, max_snap)
        before, after = hay[:at], hay[at:]
        if before and not before[-1].isspace():
            before += " "
        doc = before + needle + (" " if after else "") + after
        text, hay_at, q_at = chat(doc)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        starts = [s for s, _ in enc["offset_mapping"]]
        split = bisect.bisect_left(starts, q_at)
        if split >= len(starts) or starts[split] != q_at:
            raise RuntimeError("the question does not start at a token boundary; change QUESTION or the template")
        if len(lead) + split == length:
            break
        n_hay += length - len(lead) - split
    ids = lead + enc["input_ids"]
    split += len(lead)
    needle_at = hay_at + len(before)

    ends = [e for _, e in enc["offset_mapping"]]

    def tok_at(char: int) -> int:
        """Index in ``ids`` of the first token ending after ``char``."""
        return len(lead) + bisect.bisect_right(ends, char)

    hay_end = tok_at(hay_at + len(doc) - 1) + 1
    return NeedleCase(
        context_ids=torch.tensor([ids[:split]], dtype=torch.long),
        question_ids=torch.tensor([ids[split:]], dtype=torch.long),
        needle=str(number),
        depth=float(depth),
        needle_span=(tok_at(needle_at), tok_at(needle_at + len(needle) - 1) + 1),
        haystack_span=(tok_at(hay_at), hay_end),
        source=source,
    )


@dataclass
class NeedleTrial:
    """Outcome of one needle case.

    Attributes:
        length: requested context length (tokens); context_tokens: actual context chunk length.
        depth: requested depth; actual_depth: where the needle landed.
        needle: the 7 digits; output: the decoded answer; found: whether the digits appear in it.
        compression_ratio: the cache's ``memory_report().compression_ratio`` at the end, if it has one.
    """

    length: int
    depth: float
    actual_depth: float
    context_tokens: int
    needle: str
    output: str
    found: bool
    compression_ratio: float | None = None


@dataclass
class NeedleResults:
    """All trials of :func:`needle_recall`."""

    trials: list[NeedleTrial]

    def recall(self, length: int | None = None) -> float:
        """Fraction of trials found (at one context ``length``, or over all); NaN if there are none."""
        sel = [t for t in self.trials if length is None or t.length == length]
        return sum(t.found for t in sel) / len(sel) if sel else float("nan")

    def by_length(self) -> dict[int, float]:
        """``{length: recall}`` for every length tried."""
        return {n: self.recall(n) for n in sorted({t.length for t in self.trials})}

    def to_dict(self) -> dict:
        """JSON-ready dict: recall per length and every trial."""
        return {"recall": self.recall(), "by_length": self.by_length(), "trials": [asdict(t) for t in self.trials]}


def _found(needle: str, output: str) -> bool:
    """Whether the needle's digits appear in ``output``, ignoring spaces and commas between digits."""
    return needle in re.sub(r"(?<=\d)[ ,](?=\d)", "", output)


@torch.inference_mode()
def run_needle_case(model, tokenizer, case: NeedleCase, cache, *, max_new_tokens: int = 12) -> str:
    """Feed the context chunk, then the question chunk, then decode greedily token by token.

    Args:
        model: a HuggingFace causal LM.
        tokenizer: its tokenizer (to decode the answer).
        case: from :func:`build_needle_case`.
        cache: a fresh, empty cache with room for ``Lc + Lq + max_new_tokens`` tokens.
        max_new_tokens: tokens to decode at most (stops early at the end-of-sequence token).

    Returns:
        The decoded answer (special tokens skipped).
    """
    kw = {cache_kwarg_name(model): cache, "use_cache": True, "logits_to_keep": 1}
    device = model.device
    model(case.context_ids.to(device), **kw)
    logits = model(case.question_ids.to(device), **kw).logits[:, -1]
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    out: list[int] = []
    for i in range(max_new_tokens):
        tok = int(logits.argmax(-1)[0])
        if tok in eos:
            break
        out.append(tok)
        if i + 1 < max_new_tokens:
            logits = model(torch.tensor([[tok]], device=device), **kw).logits[:, -1]
    return tokenizer.decode(out, skip_special_tokens=True)


def needle_recall(
    model,
    tokenizer,
    cache_factory: Callable[[int], object],
    *,
    lengths: Sequence[int] = (2048, 4096),
    depths: Sequence[float] = (0, 0.25, 0.5, 0.75, 1.0),
    seed: int = 0,
    max_new_tokens: int = 12,
    answer_prefix: str | None = ANSWER_PREFIX,
    progress: bool = True,
    desc: str = "needle",
) -> NeedleResults:
    """Exact-match needle recall over every (length, depth) pair, one trial each.

    For each pair a generator seeded with ``(seed, length, round(1000 * depth))`` draws the novel, the
    haystack's start and the 7-digit number, so every cache sees the very same cases.

    Args:
        model: a HuggingFace causal LM.
        tokenizer: its tokenizer (with a chat template for instruct models).
        cache_factory: ``cache_factory(max_cache_len: int) -> Cache``, a fresh cache per trial, e.g.
            ``lambda n: DynamicCache()`` or ``lambda n: NexusCache(model.config, preset, max_cache_len=n)``.
        lengths: context chunk lengths in tokens.
        depths: needle depths in [0, 1].
        seed: base seed.
        max_new_tokens: answer tokens decoded at most.
        answer_prefix: text after the chat template's assistant prefix (None: nothing).
        progress: show a tqdm bar.
        desc: tqdm label.

    Returns:
        :class:`NeedleResults`.
    """
    sizes = {name: len(tokenize_text(tokenizer, read_data_text(name))) for name in NOVELS}
    trials = []
    pairs = [(n, d) for n in lengths for d in depths]
    for length, depth in tqdm(pairs, desc=desc, disable=not progress):
        rng = np.random.default_rng([seed, int(length), int(round(1000 * depth))])
        source = NOVELS[int(rng.integers(len(NOVELS)))]
        start = int(rng.integers(0, sizes[source] - 2 * length))
        number = int(rng.integers(1_000_000, 10_000_000))
        case = build_needle_case(tokenizer, length=length, depth=depth, number=number, source=source, start=start, answer_prefix=answer_prefix)
        cache = cache_factory(case.context_ids.shape[1] + case.question_ids.shape[1] + max_new_tokens)
        output = run_needle_case(model, tokenizer, case, cache, max_new_tokens=max_new_tokens)
        ratio = cache.memory_report().compression_ratio if hasattr(cache, "memory_report") else None
        trials.append(
            NeedleTrial(length, float(depth), case.actual_depth, case.context_ids.shape[1], case.needle, output, _found(case.needle, output), ratio)
        )
    return NeedleResults(trials)
