"""Line breaks kept through eviction: which token ids hold a line break.

Hard-wrapped text (e-books, mail, reST and Markdown sources, code) ends its lines where the earlier lines ended,
and a model predicts the next line break by attending to the earlier ones. KVzip's reconstruction scores
(:mod:`nqcompile.policy.reconstruction`) rank line breaks near the bottom: on Gemma 3 270M's hard-wrapped prose
87% of what ``balanced``'s eviction cost fell on line breaks, and keeping them took the prose windows from +7.2%
to +3.4% (``benchmarks/README.md``, "Line breaks"). Keeping separator tokens follows SepLLM (Chen et al. 2024,
arXiv:2412.12094). With ``Preset.keep_line_breaks`` the tokens these ids mark get the highest reconstruction score
(:meth:`nqcompile.NexusCache.reconstruct`'s ``keep``), so the budget takes them first.
"""

from __future__ import annotations

import torch

__all__ = ["line_break_ids"]

#: Characters that end a line.
LINE_BREAKS = ("\n", "\r")


def line_break_ids(tokenizer) -> torch.Tensor:
    """Ids of every token of ``tokenizer`` whose text holds a line break.

    Args:
        tokenizer: a transformers tokenizer (``len(tokenizer)`` ids, ``batch_decode``).

    Returns:
        ``[n]`` int64, sorted: the ids ``i`` for which ``tokenizer.decode([i])`` contains ``"\\n"`` or ``"\\r"``.

    Raises:
        ValueError: the vocabulary has no such token (the line-break rule would keep nothing).
    """
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    ids = [i for i, text in enumerate(texts) if any(c in text for c in LINE_BREAKS)]
    if not ids:
        raise ValueError(f"{type(tokenizer).__name__} has no token whose text holds a line break; "
                         "use keep_line_breaks=False with this tokenizer")
    return torch.tensor(ids, dtype=torch.int64)
