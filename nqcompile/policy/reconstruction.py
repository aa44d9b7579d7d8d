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
least the tokens that KVzip's own threshold would keep for it. With ``Preset.keep_mass`` the total is the model's:
at least the slots whose scores carry that share of all the slots' score mass (:func:`mass_budget`), so a model
whose attention needs more tokens (few global layers, sharp attention) keeps more than ``eviction_ratio`` leaves.

The re-reading is one more forward pass over the chunk (:meth:`nqcompile.NexusCache.reconstruct`, run by
the hook that :func:`nqcompile.optimize` installs), in pieces of :data:`REREAD_TOKENS` tokens.

A probability needs its query's softmax normalizer (log-sum-exp) over everything held, but only the
candidates' scores: :func:`max_attention_probability` takes the normalizer from the attention call itself
(``nqcompile::dequant_attention_lse``) and scores the candidate keys alone; :func:`reconstruction_scores`
computes it from float keys. Both work blockwise (:mod:`nqcompile.ops.blockwise`), with transients bounded
by one score tile whatever the context length.
"""

from __future__ import annotations

import torch

from ..ops.blockwise import compute_dtype, logsumexp_blocks, score_tile, tile_sizes

__all__ = ["REREAD_TOKENS", "reconstruction_scores", "max_attention_probability", "allocate_across_layers",
           "mass_budget"]

#: Tokens of the chunk re-read per forward call (KVzip re-reads long contexts in pieces of 2K tokens).
REREAD_TOKENS = 2048


def reconstruction_scores(query: torch.Tensor, key: torch.Tensor, visible: torch.Tensor, *, scaling: float,
                          target: slice) -> torch.Tensor:
    """Largest attention probability each target key receives from any query of the re-reading.

    Blockwise, in two passes over key blocks and query tiles sized by :func:`~nqcompile.ops.blockwise.tile_sizes`:
    each query's log-sum-exp over all ``N`` keys by online softmax (Milakov & Gimelshein 2018,
    arXiv:1805.02867), then :func:`max_attention_probability` over the target keys; no ``[B, Hq, q, N]`` tensor
    is materialized.

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
    batch, q_heads, q_len, head_dim = query.shape
    query_tile, key_block = tile_sizes(batch, q_heads, key.shape[1], head_dim, q_len, key.shape[2],
                                       compute_dtype(query.dtype))
    blocks = ((key[:, :, s:s + key_block], visible[:, :, s:s + key_block]) for s in range(0, key.shape[2], key_block))
    lse = logsumexp_blocks(query, blocks, scaling=scaling, query_tile=query_tile)
    return max_attention_probability(query, key[:, :, target], visible[:, :, target], lse, scaling=scaling)


def max_attention_probability(query: torch.Tensor, key: torch.Tensor, visible: torch.Tensor, lse: torch.Tensor, *,
                              scaling: float) -> torch.Tensor:
    """Per key, the largest ``exp(scaling * q . k - lse)`` over the queries that see it and the query heads of its
    KV head's group: attention probabilities of a softmax whose normalizer ``lse`` was computed elsewhere.

    Blockwise over key blocks and query tiles (:func:`~nqcompile.ops.blockwise.tile_sizes`): the transient is one
    score tile, whatever the number of keys.

    Args:
        query: ``[B, Hq, q, D]`` post-RoPE queries, ``Hq`` a multiple of ``Hkv`` (GQA).
        key: ``[B, Hkv, T, D]`` post-RoPE keys to score.
        visible: ``[B, q, T]`` bool, which of them each query sees (and counts: mask out padding queries here).
        lse: ``[B, Hq, q]`` each query's log-sum-exp of ``scaling * q . k`` over everything it attends to (the
            second output of ``nqcompile::dequant_attention_lse``); ``-inf`` for a query that sees nothing,
            which contributes nothing.
        scaling: softmax scale.

    Returns:
        ``[B, Hkv, T]`` float32 (float64 for a float64 query) probabilities in [0, 1]; 0 for a key no query sees.
    """
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads, n_keys = key.shape[1], key.shape[2]
    compute = compute_dtype(query.dtype)
    query_tile, key_block = tile_sizes(batch, q_heads, kv_heads, head_dim, q_len, n_keys, compute)
    lse = lse.to(compute).masked_fill(lse == float("-inf"), float("inf"))  # p = exp(s - inf) = 0
    lse = lse.view(batch, kv_heads, q_heads // kv_heads, q_len)
    best = torch.empty(batch, kv_heads, n_keys, dtype=compute, device=query.device)
    for start in range(0, n_keys, key_block):
        cols = slice(start, start + key_block)
        best[..., cols] = _column_max(query, key[:, :, cols].to(compute), visible[:, :, cols], lse, scaling,
                                      query_tile).exp_()
    return best


def _column_max(query, key, visible, lse, scaling, query_tile) -> torch.Tensor:
    """``max`` over queries and group of ``scaling * q . k - lse`` for one key block: ``[B, H, n]`` (``-inf`` where
    no query sees the key), one score tile alive at a time."""
    top = torch.full(key.shape[:3], float("-inf"), dtype=key.dtype, device=key.device)
    for start in range(0, query.shape[2], query_tile):
        rows = slice(start, start + query_tile)
        top = torch.maximum(top, score_tile(query, key, visible, rows, scaling).sub_(lse[..., rows, None])
                            .amax(dim=(2, 3)))
    return top


def allocate_across_layers(scores: list[torch.Tensor], total: torch.Tensor,
                           keep_mass: float = 0.0) -> list[torch.Tensor]:
    """Split a budget of at least ``total[b]`` kept tokens per sequence across layers by their scores.

    Args:
        scores: per layer, ``[B, H, L_l]`` scores (higher is better; attention probabilities for ``keep_mass``),
            ``-inf`` for tokens that are not candidates. Heads of one layer keep the same number of tokens.
        total: ``[B]`` int64, the least kept tokens per sequence summed over the layers (each layer's count is
            per head).
        keep_mass: share in [0, 1] of the pooled slots' score mass that the kept slots must carry
            (:func:`mass_budget`): a sequence keeps ``max(total[b], slots carrying keep_mass)``; 0 keeps ``total``.

    Returns:
        per layer, ``[B]`` int64 counts summing to ``min(budget[b], candidates)`` over the layers. Layer
        ``l``'s ``j``-th slot is worth ``max_h`` of the ``j``-th best score of head ``h``; the best
        ``budget[b]`` slots over all layers are taken (ties: the earlier layer, then the earlier slot).
    """
    envelope = [s.float().sort(dim=-1, descending=True).values.amax(dim=1) for s in scores]  # [B, L_l]
    pooled = torch.cat(envelope, dim=1)
    owner = torch.cat([torch.full((e.shape[1],), i, device=pooled.device) for i, e in enumerate(envelope)])
    order = pooled.sort(dim=1, descending=True, stable=True).indices
    if keep_mass > 0:
        total = torch.maximum(total, mass_budget(pooled.gather(1, order), keep_mass))
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(pooled.shape[1], device=pooled.device)
                                             .expand_as(order).contiguous())
    taken = (rank < total[:, None]) & (pooled > float("-inf"))
    return [(taken & (owner == i)[None]).sum(1) for i in range(len(scores))]


def mass_budget(ranked: torch.Tensor, keep_mass: float) -> torch.Tensor:
    """The fewest best slots whose scores carry ``keep_mass`` of a sequence's score mass.

    Args:
        ranked: ``[B, N]`` non-negative scores (attention probabilities) sorted in descending order per row,
            ``-inf`` (no candidate, sorted last) counting as 0.
        keep_mass: target share in [0, 1] of each row's summed scores.

    Returns:
        ``[B]`` int64, per row the smallest ``k`` with ``sum(ranked[b, :k]) >= keep_mass * sum(ranked[b])``
        (summed in float64): 0 for ``keep_mass=0`` or a row without mass, never more than the row's positive scores.
    """
    cum = torch.nn.functional.pad(ranked.double().clamp(min=0), (1, 0)).cumsum(dim=1)  # cum[:, k]: the k best
    return (cum < keep_mass * cum[:, -1:]).sum(1)
