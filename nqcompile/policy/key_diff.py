"""KeyDiff scorer: keep the keys least similar to the chunk's mean key.

Park et al. 2025, "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference in
Resource-Constrained Environments" (arXiv:2504.15364): keys that point away from the average key are the
distinctive ones, and attention to them cannot be replaced by attention to their neighbours. The score is
``-cos(k, mean_k)`` per (sequence, KV head), with the mean over every valid key the cache passes (the
chunk, the recent window it pushes out and, on the first chunk, the sinks). It needs
no queries, so it does not depend on what the end of the context happens to ask for (query-agnostic
needle retrieval is what it is for).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import TokenScorer

__all__ = ["KeyDiffScorer"]


@dataclass(frozen=True)
class KeyDiffScorer(TokenScorer):
    """``score = -cos(key, mean key of the sequence's valid tokens)``, float32 (float64 for float64 keys) ``[B, Hkv, Lk]``."""

    def score(self, *, query, key, query_time, key_time, key_valid, scaling) -> torch.Tensor:
        k = key.to(torch.promote_types(key.dtype, torch.float32))
        w = key_valid[:, None, :, None].to(k.dtype)
        mean = (k * w).sum(2, keepdim=True) / w.sum(2, keepdim=True).clamp(min=1.0)
        return -torch.nn.functional.cosine_similarity(k, mean, dim=-1)
