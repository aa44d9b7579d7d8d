"""Reconstruction deferral (KVzip): a prefill chunk held exactly until the model has re-read it.

With ``scorer="reconstruction"`` a layer that would evict from a prefill chunk holds the chunk as a
:class:`Deferred` instead. :meth:`nqcompile.NexusCache.reconstruct` then has the model read the chunk's tokens
again; each layer attends over everything it holds plus the deferred chunk and stores nothing
(:func:`reread_piece`), noting for every candidate token the largest attention probability any re-reading
query pays it. The candidates' scores (:func:`candidate_scores`) decide what the chunk keeps once the budget
of all layers has been shared (:func:`~nqcompile.policy.reconstruction.allocate_across_layers`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..policy.reconstruction import max_attention_probability
from .compress import ChunkPolicy, split
from .storage import LayerStorage

__all__ = ["Deferred", "reread_piece", "candidate_scores"]


class Deferred(NamedTuple):
    """A prefill chunk held exactly until its re-reading.

    Attributes:
        query_tail: ``[B, Hq, w, D]`` the chunk's last ``trial_queries`` queries (the key-bit trial of a
            first chunk), or None.
        key, value: ``[B, H, L, D]`` post-RoPE, model dtype. real: ``[B, L]`` bool, False for padding.
        positions: ``[B, L]`` int64. scaling: softmax scale.
    """

    query_tail: torch.Tensor | None
    key: torch.Tensor
    value: torch.Tensor
    real: torch.Tensor
    positions: torch.Tensor
    scaling: float


def reread_piece(st: LayerStorage, deferred: Deferred | None, query: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor, real: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of a piece of the re-reading over everything the layer holds, its deferred chunk and the piece
    itself; nothing is stored.

    Args:
        query: ``[B, Hq, r, D]``; key, value: ``[B, H, r, D]`` the deferred chunk's tokens read again.
        real: ``[B, r]`` bool. scaling: softmax scale.

    Returns:
        ``(out [B, Hq, r, D], scores)``: with a deferred chunk, ``scores`` ``[B, H, R + L]`` holds for each
        candidate (window, then chunk: :func:`~.compress.split`'s order) the largest attention probability (softmax
        over everything the layer holds and the piece) that any real query of the piece pays it
        (:func:`~nqcompile.policy.reconstruction.max_attention_probability` against the attention's own
        log-sum-exp); else None.
    """
    held_back = (deferred.key, deferred.value, deferred.real) if deferred is not None else None
    out, lse, keys, mask = st.attend_chunk(query, key, value, real, scaling, held_back, with_lse=held_back is not None)
    if held_back is None:
        return out, None
    # Probabilities of the softmax the attention took, over everything the layer holds (codes of earlier turns
    # included): its log-sum-exp normalizes them, so the codes need no second decoding.
    end = keys.shape[2] - key.shape[2]  # end of the deferred chunk
    target = slice(end - deferred.key.shape[2] - st.win_k.shape[2], end)  # window, then the chunk
    scores = max_attention_probability(query, keys[:, :, target], mask[:, :, target] & real[:, :, None], lse,
                                       scaling=scaling)
    return out, scores


def candidate_scores(st: LayerStorage, policy: ChunkPolicy, deferred: Deferred, scores: torch.Tensor,
                     *, first_chunk: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstruction scores of the deferred chunk's eviction candidates, ``[B, H, R + L]`` float (``-inf``
    for sinks, window and padding), and their nominal keep budget ``[B]`` int64."""
    sp = split(st, policy, deferred.key, deferred.value, deferred.real, deferred.positions, first_chunk=first_chunk)
    return scores.masked_fill(~sp.middle[:, None], float("-inf")), sp.budget
