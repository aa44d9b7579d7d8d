"""Chunk-end compression: what happens to a prefill chunk once its attention is done.

The window plus the chunk are split (:func:`split`) into the first chunk's sinks, the new window and the
middle; the middle is scored and ``eviction_ratio`` of it dropped (not in a chunk shorter than
``min_evict_tokens``), and the rest is RoPE-removed, normalized per channel (statistics of the first chunk),
Hadamard-rotated, E8-quantized and stored (:func:`compress_chunk`, through :func:`~.tiers.store_kept`). No
float copy survives. With ``relax_key_kl`` the first chunk also decides the layer's key width
(:mod:`nqcompile.policy.key_bits`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .. import ops
from ..codec.kv import channel_statistics
from ..codec.rope import apply_rotary
from ..policy import TokenScorer, select_kept
from ..policy.key_bits import MIN_TRIAL_TOKENS, trial_key_kl
from ..presets import Preset
from .storage import LayerStorage, first_slots, ordered_index
from .tiers import store_kept

__all__ = ["ChunkPolicy", "Split", "split", "compress_chunk", "relax_key_bits", "set_norm"]


@dataclass(frozen=True)
class ChunkPolicy:
    """How a layer compresses a chunk.

    Attributes:
        preset: the cache's preset.
        eviction_ratio: fraction of each chunk's tokens this layer evicts.
        scorer: the token scorer, or ``None`` when the scores come from the model's re-reading (a scorer that
            ``needs_model`` in :data:`nqcompile.policy.SCORERS`).
        relaxable: whether the first chunk may lower the key bits (``Preset.relax_key_kl``).
    """

    preset: Preset
    eviction_ratio: float
    scorer: TokenScorer | None
    relaxable: bool

    @property
    def evicting(self) -> bool:
        return self.eviction_ratio > 0.0


class Split(NamedTuple):
    """The exact window followed by a chunk (``[B, H, R + L, D]`` keys/values, ``[B, R + L]`` positions and
    masks), split three ways, with the nominal keep budget of the middle (``[B]`` int64 counts)."""

    pk: torch.Tensor
    pv: torch.Tensor
    ppos: torch.Tensor
    preal: torch.Tensor
    is_sink: torch.Tensor
    is_win: torch.Tensor
    middle: torch.Tensor
    n_sink: torch.Tensor
    n_win: torch.Tensor
    budget: torch.Tensor


def split(st: LayerStorage, policy: ChunkPolicy, key: torch.Tensor, value: torch.Tensor, real: torch.Tensor,
          positions: torch.Tensor, *, first_chunk: bool) -> Split:
    """The window plus a chunk (keys/values ``[B, H, L, D]``, ``real`` ``[B, L]`` bool, ``positions`` ``[B, L]``),
    split into the first chunk's sinks, the new window and the middle, with the middle's nominal keep budget per
    sequence (``eviction_ratio``; all of it in a chunk shorter than ``min_evict_tokens``)."""
    s_cap, r_cap = st.sink_k.shape[2], st.win_k.shape[2]
    pk, pv = torch.cat([st.win_k, key], 2), torch.cat([st.win_v, value], 2)
    ppos = torch.cat([st.win_pos, positions.to(torch.int64)], 1)
    preal = torch.cat([first_slots(st.win_len, r_cap), real], 1)
    rank = preal.cumsum(1) - 1
    n_real = preal.sum(1)
    n_sink = n_real.clamp(max=s_cap) if first_chunk else torch.zeros_like(n_real)
    n_win = (n_real - n_sink).clamp(max=r_cap)
    is_sink = preal & (rank < n_sink[:, None])
    is_win = preal & (rank >= (n_real - n_win)[:, None])
    middle = preal & ~is_sink & ~is_win
    budget = (n_real.double() * (1.0 - policy.eviction_ratio)).round().long() - n_sink - n_win
    budget = torch.where(real.sum(1) < policy.preset.min_evict_tokens, middle.sum(1), budget)  # short chunk: keep all
    return Split(pk, pv, ppos, preal, is_sink, is_win, middle, n_sink, n_win, budget.clamp(min=0))


def compress_chunk(st: LayerStorage, policy: ChunkPolicy, query: torch.Tensor | None, key: torch.Tensor,
                   value: torch.Tensor, real: torch.Tensor, positions: torch.Tensor, scaling: float, *,
                   first_chunk: bool, spare: int | None, scores: torch.Tensor | None = None,
                   budget: torch.Tensor | None = None) -> float | None:
    """Split window + chunk into sinks (first chunk), kept-and-quantized middle and the new window, and store them.

    Args:
        query: the chunk's last ``query.shape[2]`` queries ``[B, Hq, n, D]`` (observation scores, the key-bit
            trial), or None.
        key, value: ``[B, H, L, D]`` the chunk, post-RoPE, model dtype. real: ``[B, L]`` bool, False for padding.
        positions: ``[B, L]`` int64. scaling: softmax scale.
        first_chunk: the layer holds nothing yet (sinks, normalization statistics, key-bit trial).
        spare: logical tokens still to come, for which the code buffers are sized
            (:meth:`~nqcompile.cache.storage.LayerStorage.reserve_for_decode`), or ``None`` when unbounded.
        scores, budget: ``[B, H, R + L]`` scores and ``[B]`` keep counts that replace the scorer's and the
            nominal budget (reconstruction scoring).

    Returns:
        the attention KL measured by the key-bit trial (nats), or None when none ran.

    Raises:
        ValueError: without eviction, positions that do not continue the compressed past one by one.
    """
    sp = split(st, policy, key, value, real, positions, first_chunk=first_chunk)
    pk, pv, ppos, preal, middle = sp.pk, sp.pv, sp.ppos, sp.preal, sp.middle
    width = pk.shape[2]
    time = torch.arange(width, device=st.device)
    key_time = time[None].expand_as(preal)
    qtime = None
    if query is not None:
        q_real = real[:, real.shape[1] - query.shape[2]:]
        qtime = torch.where(q_real, time[width - query.shape[2]:][None], torch.full_like(q_real, -1, dtype=torch.int64))
    key_kl = None
    if first_chunk:
        set_norm(st, pk, pv, ppos, preal & ~sp.is_sink)
        if policy.relaxable:
            key_kl = relax_key_bits(st, policy.preset, query, pk, pv, ppos, middle, qtime, key_time, preal, scaling)
        st.take(sp.is_sink, pk, pv, None, "sink")
        st.sink_len = sp.n_sink
    if policy.evicting:
        if scores is None and policy.scorer is None:  # reconstruction, chunk too short to evict: keeps all
            scores = torch.zeros(pk.shape[:3], device=st.device)
        elif scores is None:
            scores = policy.scorer.score(query=query, key=pk, query_time=qtime, key_time=key_time, key_valid=preal,
                                         scaling=scaling)
        index, count = select_kept(scores, middle, sp.budget if budget is None else budget,
                                   pooling_kernel=policy.preset.pooling_kernel)
    else:
        count = middle.sum(1)
        index = ordered_index(middle, int(count.max()))[:, None].expand(-1, st.heads, -1)
        _check_contiguous(st, ppos, index, count)
    kept_pos = ppos[:, None, :].expand(-1, st.heads, -1).gather(2, index)
    store_kept(st, ops.gather_tokens(pk, index), ops.gather_tokens(pv, index), kept_pos, count)
    st.take(sp.is_win, pk, pv, ppos, "win")
    st.win_len = sp.n_win
    st.reserve_for_decode(spare)
    return key_kl


def relax_key_bits(st: LayerStorage, preset: Preset, query, pk, pv, ppos, coded, qtime, key_time, key_valid,
                   scaling) -> float | None:
    """Store keys at ``key_bits - 1`` if that moves the last ``trial_queries`` queries' attention by less than
    ``relax_key_kl`` (:func:`~nqcompile.policy.key_bits.trial_key_kl` over
    :meth:`~nqcompile.cache.storage.LayerStorage.round_trip_keys`; ``coded``: the tokens that become codes)
    in every sequence that codes at least ``MIN_TRIAL_TOKENS`` tokens; with none, the layer keeps its bits.
    Returns the KL measured (the largest over the sequences measured), or None.

    The width is one per layer, so a sequence batched with others may keep wider keys than it would alone.
    """
    measured = coded.sum(1) >= MIN_TRIAL_TOKENS
    if not bool(measured.any()):
        return None
    c = st.codec
    trial = st.round_trip_keys(pk, pv, ppos, c.key_bits - 1)
    kl = trial_key_kl(query, pk, trial, coded, query_time=qtime, key_time=key_time, key_valid=key_valid,
                      window=preset.trial_queries, scaling=scaling)
    key_kl = float(kl[measured].max())
    if key_kl < preset.relax_key_kl:
        st.set_key_bits(c.key_bits - 1)  # nothing is coded or warm before the first chunk ends
    return key_kl


def set_norm(st: LayerStorage, pk, pv, ppos, select) -> None:
    """Normalization statistics (:func:`~nqcompile.codec.kv.channel_statistics`) of the first chunk's real
    tokens other than the sinks (``select``; window and evicted tokens included); keys before RoPE."""
    c = st.codec
    if c.kind == "exact":
        return
    pre = apply_rotary(pk.to(torch.promote_types(pk.dtype, torch.float32)), ppos[:, None, :], c.inv_freq,
                       attention_scaling=c.attention_scaling, rotary_dim=c.rotary_dim, layout=c.layout, inverse=True)
    for i, (x, mode) in enumerate(((pre, st.preset.key_norm), (pv, st.preset.value_norm))):
        c.norm_mean[i], c.norm_scale[i] = channel_statistics(x, select, mode, rotary_dim=c.rotary_dim, layout=c.layout)


def _check_contiguous(st: LayerStorage, ppos, index, count) -> None:
    """Without eviction, code positions are implicit (``code_pos0 + slot``): check that the chunk's tokens
    continue the compressed past (codes, then the warm tier) position by position."""
    if int(count.max()) == 0:
        return
    got = ppos.gather(1, index[:, 0])
    after = st.code_pos0 + st.code_len  # the position that continues the compressed past
    if st.warm_cap:
        last_warm = st.warm_pos[:, 0].gather(1, (st.warm_len - 1).clamp(min=0)[:, None])[:, 0]
        after = torch.where(st.warm_len > 0, last_warm.long() + 1, after)
    first = torch.where(st.code_len + st.warm_len == 0, got[:, 0], after)
    expected = first[:, None] + torch.arange(index.shape[2], device=st.device)
    ok = (got == expected) | (torch.arange(index.shape[2], device=st.device)[None] >= count[:, None])
    if not bool(ok.all()):
        raise ValueError("without eviction NexusCache stores positions implicitly and needs consecutive "
                         "position_ids per sequence; got non-consecutive ones (use eviction_ratio > 0)")
