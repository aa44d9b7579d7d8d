"""Key-norm scorer: keep the keys with the smallest L2 norm.

Devoto et al. 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression"
(arXiv:2406.11430): keys with a low norm receive high attention, so ``score = -||k||_2``. Needs no
queries, hence no attention probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import TokenScorer

__all__ = ["KeyNormScorer"]


@dataclass(frozen=True)
class KeyNormScorer(TokenScorer):
    """``score = -||key||_2`` per (sequence, KV head, token), float32 ``[B, Hkv, Lk]``."""

    def score(self, *, query, key, query_time, key_time, key_valid, scaling) -> torch.Tensor:
        return -key.to(torch.promote_types(key.dtype, torch.float32)).norm(dim=-1)
