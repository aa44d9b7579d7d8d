"""Reconstruction scores (KVzip) and the allocation of one eviction budget across layers.

Kim et al. 2025, "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction"
(arXiv:2505.23416, NeurIPS 2025): after a prefill chunk, the model reads the chunk a second time as if it
were repeating it; a key/value pair's importance is the largest attention probability that any query of
that re-reading (and any query head of its GQA group) pays it. Pairs that nothing needs in order to
reproduce the context can go, whatever question comes later, so the scores are query-agnostic.

The scores are probabilities, comparable across heads and layers, so KVzip ranks all pairs of all layers
together. Here every head of a layer keeps the same number of tokens (the storage holds one length per
sequence and layer): layer ``l``'s ``j``-th slot is worth the ``j``-th best score of its best head, and
the ``total`` best slots over all layers win (:func:`allocate_across_layers`). Every head then keeps at
least the tokens that KVzip's own threshold would keep for it.

The re-reading is one more forward pass over the chunk (:meth:`nqcompile.NexusCache.reconstruct`, run by
the hook that :func:`nqcompile.optimize` installs), in pieces of :data:`REREAD_TOKENS` tokens.
"""

from __future__ import annotations

import torch

__all__ = ["REREAD_TOKENS", "reconstruction_scores", "allocate_across_layers"]

#: Tokens of the chunk re-read per forward call (KVzip re-reads long contexts in pieces of 2K tokens).
REREAD_TOKENS = 2048
_QUERY_BLOCK = 256


def reconstruction_scores(query: torch.Tensor, key: torch.Tensor, visible: torch.Tensor, *, scaling: float,
                          target: slice) -> torch.Tensor:
    """Largest attention probability each target key receives from any query of the re-reading.

    Args:
        query: ``[B, Hq, q, D]`` post-RoPE queries of the re-reading, ``Hq`` a multiple of ``Hkv`` (GQA).
        key: ``[B, Hkv, N, D]`` post-RoPE keys the queries attend to (exact: sinks, warm tier decoded, window,
            the chunk being scored, and the re-reading's own keys).
        visible: ``[B, q, N]`` bool, which keys each query sees (padding and causality); a query that sees
            nothing contributes nothing.
        scaling: softmax scale.
        target: the key slots to score (the chunk).

    Returns:
        ``[B, Hkv, len(target)]`` float32 scores in [0, 1] (float64 for float64 inputs): max over the
        queries and the query heads of each KV head's group of ``softmax(q k^T * scaling)``, the softmax taken
        over all ``N`` keys.
    """
    batch, n_q_heads, q_len, head_dim = query.shape
    n_kv_heads = key.shape[1]
    compute = torch.promote_types(query.dtype, torch.float32)
    k = key.to(compute)
    best = torch.zeros(batch, n_kv_heads, k[:, :, target].shape[2], dtype=compute, device=query.device)
    for start in range(0, q_len, _QUERY_BLOCK):
        q = query[:, :, start:start + _QUERY_BLOCK].to(compute)
        q = q.view(batch, n_kv_heads, n_q_heads // n_kv_heads, q.shape[2], head_dim)
        logits = torch.einsum("bhgqd,bhkd->bhgqk", q, k).mul_(scaling)
        logits.masked_fill_(~visible[:, None, None, start:start + _QUERY_BLOCK], float("-inf"))
        # max over queries of p = exp(logit - logsumexp): only the target slice is exponentiated.
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        lse = lse.masked_fill(lse == float("-inf"), float("inf"))  # a query that sees nothing pays nothing
        best = torch.maximum(best, (logits[..., target] - lse).amax(dim=(2, 3)).exp())
    return best


def allocate_across_layers(scores: list[torch.Tensor], total: torch.Tensor) -> list[torch.Tensor]:
    """Split a budget of ``total[b]`` kept tokens per sequence across layers by their scores.

    Args:
        scores: per layer, ``[B, H, L_l]`` scores (higher is better), ``-inf`` for tokens that are not
            candidates. Heads of one layer keep the same number of tokens.
        total: ``[B]`` int64, kept tokens per sequence summed over the layers (each layer's count is per head).

    Returns:
        per layer, ``[B]`` int64 counts summing to ``min(total[b], candidates)`` over the layers. Layer
        ``l``'s ``j``-th slot is worth ``max_h`` of the ``j``-th best score of head ``h``; the best
        ``total[b]`` slots over all layers are taken (ties: the earlier layer, then the earlier slot).
    """
    envelope = [s.float().sort(dim=-1, descending=True).values.amax(dim=1) for s in scores]  # [B, L_l]
    pooled = torch.cat(envelope, dim=1)
    owner = torch.cat([torch.full((e.shape[1],), i, device=pooled.device) for i, e in enumerate(envelope)])
    order = pooled.sort(dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(pooled.shape[1], device=pooled.device)
                                             .expand_as(order).contiguous())
    taken = (rank < total[:, None]) & (pooled > float("-inf"))
    return [(taken & (owner == i)[None]).sum(1) for i in range(len(scores))]
