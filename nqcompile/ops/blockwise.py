"""Blockwise softmax attention with bounded transient memory: tile sizes from a budget, score tiles, online softmax.

Layouts: queries ``[B, Hq, q, D]``; keys and values ``[B, H, n, D]`` with ``Hq = H * G`` (GQA: query head
``h * G + g`` reads KV head ``h``, as ``F.scaled_dot_product_attention(enable_gqa=True)``); visibility masks
``[B, q or 1, n]`` bool (``1``: one mask for every query). A score tile is ``[B, H, G, query_tile, key_block]``
in the compute dtype: float32, float64 for a float64 query.

Online softmax (Milakov & Gimelshein 2018, "Online normalizer calculation for softmax", arXiv:1805.02867;
the tiling of FlashAttention, Dao et al. 2022, arXiv:2205.14135): keys arrive in blocks; each query keeps a
running max ``m``, a running sum ``l = sum exp(s - m)`` and an accumulator ``acc = sum exp(s - m) v``, rescaled
by ``exp(m_old - m_new)`` when the max grows, so ``acc / l`` equals the dense softmax average and
``m + log l`` the log-sum-exp, while only one score tile exists at a time.

Loop order: key blocks outer, query tiles inner, so each key block is produced (decoded, for codes) once;
the state of all ``q`` queries (``acc`` ``[B, Hq, q, D]``, ``m``, ``l``) grows with the queries of a call, not with
the keys. Transient memory: the state, one key/value block (:data:`KEY_BLOCK_BYTES` each, plus whatever
producing it takes) and one score tile (:data:`SCORE_TILE_BYTES`, exponentiated in place, plus its 0 / -inf mask
bias ``[B, query_tile, key_block]``).
Both budgets are read at call time; tests shrink them to force many tiles.

Every loop bound is a shape, so the functions never synchronize with the device (CUDA-graph capturable).
"""

from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["SCORE_TILE_BYTES", "KEY_BLOCK_BYTES", "compute_dtype", "tile_sizes", "score_tile", "attention_blocks",
           "logsumexp_blocks"]

#: Budget of one score tile ``[B, Hq, query_tile, key_block]`` in the compute dtype, bytes.
SCORE_TILE_BYTES = 64 * 2**20
#: Budget of one block of keys (and one of values) ``[B, H, key_block, D]`` in the compute dtype, bytes.
KEY_BLOCK_BYTES = 16 * 2**20


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype scores and softmax state are computed in: float64 for float64 queries, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tile_sizes(batch: int, q_heads: int, kv_heads: int, head_dim: int, q_len: int, n_keys: int,
               dtype: torch.dtype) -> tuple[int, int]:
    """Query tile and key block (both >= 1) for the budgets :data:`SCORE_TILE_BYTES` and :data:`KEY_BLOCK_BYTES`.

    Args:
        batch, q_heads, kv_heads, head_dim: ``B``, ``Hq``, ``H``, ``D``.
        q_len: queries of the call. n_keys: keys of the call (the key block never exceeds it).
        dtype: compute dtype (its item size prices the tiles).

    Returns:
        ``(query_tile, key_block)``: the largest key block whose ``[B, H, key_block, D]`` keys fit
        :data:`KEY_BLOCK_BYTES` (and one query's scores ``[B, Hq, 1, key_block]`` :data:`SCORE_TILE_BYTES`),
        then the query tile: as many tiles as the largest one whose scores ``[B, Hq, query_tile, key_block]`` fit
        :data:`SCORE_TILE_BYTES` needs to cover ``q_len``, split evenly (``ceil(q_len / tiles)``; even GEMMs run
        faster than a large one and a small remainder). A budget smaller than one token still gets tiles of 1.
    """
    item = dtype.itemsize
    key_block = min(KEY_BLOCK_BYTES // max(1, batch * kv_heads * head_dim * item),
                    SCORE_TILE_BYTES // max(1, batch * q_heads * item), n_keys)
    key_block = max(1, key_block)
    largest = max(1, min(q_len, SCORE_TILE_BYTES // max(1, batch * q_heads * key_block * item)))
    tiles = max(1, -(-q_len // largest))
    return max(1, -(-q_len // tiles)), key_block  # as many tiles as the largest needs, evenly split


def score_tile(query: torch.Tensor, key: torch.Tensor, visible: torch.Tensor, rows: slice,
               scaling: float) -> torch.Tensor:
    """Masked scaled scores of the queries ``rows`` against one key block.

    Args:
        query: ``[B, Hq, q, D]`` any float dtype. key: ``[B, H, n, D]`` in the compute dtype.
        visible: ``[B, q or 1, n]`` bool. rows: the query tile, a slice of ``q``.
        scaling: softmax scale.

    Returns:
        ``[B, H, G, t, n]`` scores ``scaling * q . k`` in ``key``'s dtype, ``-inf`` where not visible.
    """
    batch, q_heads, _, head_dim = query.shape
    kv_heads, n = key.shape[1], key.shape[2]
    q = query[:, :, rows].to(key.dtype) * scaling  # [B, Hq, t, D]
    t = q.shape[2]
    s = torch.matmul(q.reshape(batch, kv_heads, q_heads // kv_heads * t, head_dim), key.transpose(-1, -2))
    seen = visible if visible.shape[1] == 1 else visible[:, rows]  # [B, t or 1, n]
    # Adding a 0 / -inf bias broadcast over the heads costs far less (on CPU) than masked_fill_ over the tile.
    bias = torch.zeros(seen.shape, dtype=s.dtype, device=s.device).masked_fill_(~seen, float("-inf"))
    return s.view(batch, kv_heads, q_heads // kv_heads, t, n).add_(bias[:, None, None])


def _absorb_tile(m, l, acc, coded, query, key, value, visible, value_scale, rows, scaling) -> None:
    """Fold one score tile (queries ``rows`` x one key block) into the running state ``m``, ``l`` ``[B, H, G, q]``
    and ``acc`` ``[B, H, G, q, D]`` (or None), in place; the tile dies on return. ``coded`` is None or the
    ``(acc, l)`` of the blocks whose values are coded (``value_scale`` ``[B, H, n]`` given): those add
    ``exp(s - m) * value_scale`` weighted values there instead of into ``acc`` (both states are rescaled together)."""
    s = score_tile(query, key, visible, rows, scaling)  # [B, H, G, t, n]
    m_old, l_old = m[..., rows], l[..., rows]
    m_new = torch.maximum(m_old, s.amax(-1))
    m_use = m_new.masked_fill(m_new == float("-inf"), 0.0)  # nothing seen yet: exp(-inf - 0) = 0, never NaN
    alpha = (m_old - m_use).exp_()
    p = s.sub_(m_use[..., None]).exp_()
    p_sum = p.sum(-1)
    l_old.mul_(alpha).add_(p_sum)
    if acc is not None:
        target = acc[..., rows, :].mul_(alpha[..., None])
        if coded is not None:
            coded_acc, coded_l = coded[0][..., rows, :].mul_(alpha[..., None]), coded[1][..., rows].mul_(alpha)
            if value_scale is not None:
                target = coded_acc
                coded_l.add_(p_sum)
                p = p.mul_(value_scale[:, :, None, None, :].to(p.dtype))
        pv = torch.matmul(p.view(*p.shape[:2], -1, p.shape[-1]), value)  # [B, H, G * t, D]
        target.add_(pv.view(target.shape))
    m_old.copy_(m_new)


def _online_softmax(query, blocks, scaling, query_tile, with_values, value_map=None):
    batch, q_heads, q_len, head_dim = query.shape
    compute = compute_dtype(query.dtype)
    m = torch.full((batch, q_heads, q_len), float("-inf"), dtype=compute, device=query.device)
    l = torch.zeros_like(m)
    acc = torch.zeros(batch, q_heads, q_len, head_dim, dtype=compute, device=query.device) if with_values else None
    coded = (torch.zeros_like(acc), torch.zeros_like(l)) if value_map is not None else None
    for key, value, visible, *value_scale in blocks:
        value_scale = value_scale[0] if value_scale else None
        if value_scale is not None and coded is None:
            raise ValueError("a block with value scales (coded values) needs attention_blocks(..., value_map=...)")
        key, value = key.to(compute), value.to(compute) if with_values else None
        grouped = (batch, key.shape[1], q_heads // key.shape[1], q_len)  # [B, H, G, q]
        state = (m.view(grouped), l.view(grouped), acc.view(*grouped, head_dim) if with_values else None,
                 None if coded is None else (coded[0].view(*grouped, head_dim), coded[1].view(grouped)))
        for start in range(0, q_len, query_tile):
            _absorb_tile(*state, query, key, value, visible, value_scale, slice(start, start + query_tile), scaling)
        del key, value, visible  # dropped before the next block is produced: one block alive at a time
    lse = m + l.log()  # -inf for a query that saw nothing (m = -inf, l = 0)
    if coded is not None:
        acc.add_(value_map(*coded))
    out = acc.div_(l.clamp(min=1.0)[..., None]) if with_values else None  # l >= 1 once anything was seen
    return out, lse


def attention_blocks(query: torch.Tensor, blocks: Iterable[tuple[torch.Tensor, ...]], *, scaling: float,
                     query_tile: int, value_map=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``query`` over key/value blocks, by online softmax (module docstring).

    Args:
        query: ``[B, Hq, q, D]`` post-RoPE queries, any float dtype.
        blocks: ``(key, value, visible)`` per key block: float ``[B, H, n_i, D]`` (cast to the compute dtype
            one block at a time) and bool ``[B, q or 1, n_i]``; consumed once, in order. A block of coded values
            adds a fourth element, float ``[B, H, n_i]`` scales ``s``: its ``value`` rows are ``x`` with the
            values ``f(s * x)`` for a linear map plus offset ``f`` (the codec's, :func:`~nqcompile.codec.kv.fold_values`),
            so the weighted sum ``sum_t p_t s_t x_t`` is accumulated and mapped once at the end.
        scaling: softmax scale. query_tile: queries per score tile (:func:`tile_sizes`).
        value_map: with coded blocks, ``value_map(weighted, weight)`` turns ``weighted`` ``[B, Hq, q, D]``
            ``= sum_t p_t s_t x_t`` and ``weight`` ``[B, Hq, q]`` ``= sum_t p_t`` (over the coded tokens, ``p`` the
            unnormalized softmax weights) into ``sum_t p_t f(s_t x_t)``, in the compute dtype.

    Returns:
        ``(out, lse)`` in the compute dtype: ``out`` ``[B, Hq, q, D]`` the softmax-weighted values, ``lse``
        ``[B, Hq, q]`` the natural log of ``sum exp(scaling * q . k)`` over the visible keys. A query that sees
        no key gets ``out = 0`` and ``lse = -inf`` (never NaN).

    Raises:
        ValueError: a block with scales but no ``value_map``.
    """
    return _online_softmax(query, blocks, scaling, query_tile, with_values=True, value_map=value_map)


def logsumexp_blocks(query: torch.Tensor, blocks: Iterable[tuple[torch.Tensor, torch.Tensor]], *, scaling: float,
                     query_tile: int) -> torch.Tensor:
    """``lse`` of :func:`attention_blocks` without values: ``blocks`` yield ``(key, visible)``.

    Returns:
        ``[B, Hq, q]`` in the compute dtype, ``-inf`` for a query that sees no key.
    """
    return _online_softmax(query, ((key, None, visible) for key, visible in blocks), scaling, query_tile,
                           with_values=False)[1]
