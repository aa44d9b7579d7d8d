"""The scorer interface: one small dataclass per method overriding :meth:`TokenScorer.score`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TokenScorer"]


@dataclass(frozen=True)
class TokenScorer:
    """Ranks candidate tokens of a prefill chunk for eviction: a higher score means more worth keeping.

    Subclasses override :meth:`score`; everything is per (sequence, KV head), so a batch of left-padded
    prompts gets exactly the scores each prompt would get alone. A subclass's fields are named after the
    :class:`~nqcompile.Preset` fields that set them (:func:`~nqcompile.policy.registry.make_scorer` fills them),
    and it is registered in :data:`~nqcompile.policy.registry.SCORERS`.
    """

    def score(
        self,
        *,
        query: torch.Tensor,
        key: torch.Tensor,
        query_time: torch.Tensor,
        key_time: torch.Tensor,
        key_valid: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        """Score every key.

        Args:
            query: ``[B, Hq, Lq, D]`` queries of the chunk (post-RoPE, model dtype).
            key: ``[B, Hkv, Lk, D]`` candidate keys (post-RoPE), ``Hq`` a multiple of ``Hkv`` (GQA).
            query_time: ``[B, Lq]`` int64 time order of each query, ``-1`` for padding queries.
            key_time: ``[B, Lk]`` int64 time order of each key on the same clock (causality: a query sees
                keys with ``key_time <= query_time``).
            key_valid: ``[B, Lk]`` bool, False for padding keys.
            scaling: softmax scale of the attention (usually ``head_dim ** -0.5``).

        Returns:
            ``[B, Hkv, Lk]`` float scores (float32, or float64 for float64 inputs); invalid keys may hold any value (the caller masks them).
        """
        raise NotImplementedError
