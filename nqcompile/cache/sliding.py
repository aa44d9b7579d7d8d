"""``SlidingLayer``: a sliding-window layer of a hybrid model (Gemma 3, Cohere 2, Mistral, ...), compressed.

A query at position ``p`` of a sliding-window layer attends to positions ``p - window + 1 .. p`` (transformers'
``sliding_window_overlay``: key slot ``j`` is visible to query slot ``i`` when ``j > i - window``), so transformers'
``DynamicSlidingWindowLayer`` keeps the last ``window - 1`` tokens. A :class:`SlidingLayer` keeps the same tokens:

* the exact recent window (``recent_window`` tokens in the model's dtype, ``win_k`` ... of
  :class:`~nqcompile.cache.storage.LayerStorage`), which decode tokens enter, as in a full-attention layer;
* older tokens as codes at the layer's bits in a **ring of code blocks**: the storage's code buffers (``k_codes``
  ... ``code_pos``, capacity ``C``, a multiple of 16) written cyclically, each slot's position stored (``-1``: an
  empty slot), ``ring_head`` ``[B]`` the slot the next flushed block goes to, ``code_len`` the slots filled.

What a sliding-window layer does not have: attention sinks (the model's mask hides the first tokens from every
query past the window), a warm tier (every token it holds is recent; its ring is at the layer's bits), eviction
(decode tokens are never evicted, so after ``window`` decode steps the layer would hold its whole window whatever
a prefill kept; the evicting presets' budget is shared among the full-attention layers).

Every attention over the layer masks by position: a held key at position ``k`` is visible to a query at position
``p`` when ``p - k < window``, which is the model's mask wherever padding precedes a sequence's tokens (left padding
of the first chunk; a later chunk with padding is refused). Stale tokens (out of every future query's window) are
dropped at chunk ends and overwritten in the ring during decoding.

A decode step (:func:`ring_steps`) has static shapes, as a full-attention layer's: the flushed block is coded into
a scratch block, the ring (decoded whole, like the warm tier) and the scratch block are attended with the masks
above, and only then is the block copied into the ring (so a chunk replayed as decode steps sees, at each step,
the ring as it stood). The ring's capacity (:func:`ring_capacity`) holds what the next query can see after any
call: at most ``window - recent_window + 14`` coded tokens (the exact window keeps at least
``recent_window - 15`` tokens once it has flushed), fewer when the cache's logical capacity ends sooner.
"""

from __future__ import annotations

import torch

from .. import ops
from ..ops.layout import BLOCK_TOKENS, round_up_to_block
from ..models.rope_spec import RotarySpec
from ..presets import Preset
from .compress import relax_key_bits, set_norm
from .layer import NexusLayer
from .storage import LayerStorage, first_slots, ordered_index, take_slots
from .tiers import keep_unflushed, window_stream

__all__ = ["SlidingLayer", "chunk_attention", "relayout", "ring_capacity", "ring_steps"]

_CODE_BUFFERS = ("k_codes", "k_scales", "v_codes", "v_scales")


def ring_capacity(window: int, recent_window: int, coded: int, win_len: int, spare: int | None) -> int:
    """Code slots per sequence of a sliding-window layer's ring (a multiple of 16, at least 16).

    Args:
        window: the layer's ``sliding_window`` (tokens a query sees, itself included).
        recent_window: exact window capacity (a multiple of 16).
        coded: the most coded tokens any sequence holds now (visible to its next query).
        win_len: the most exact-window tokens any sequence holds now.
        spare: logical tokens still to come, or ``None`` (unbounded).

    Returns:
        ``round_up(window - recent_window + 14)``: after any call the exact window holds at least
        ``recent_window - 15`` tokens (or nothing was ever coded), so the next query sees at most that many coded
        tokens, the most recent ones; with ``spare`` known, no more than ``round_up(coded)`` plus the blocks the
        ``spare`` tokens can flush (the ring then never wraps).
    """
    full = round_up_to_block(max(BLOCK_TOKENS, window - recent_window + BLOCK_TOKENS - 2))
    if spare is None:
        return full
    flushed = round_up_to_block(max(0, win_len + spare - recent_window))
    return min(full, max(BLOCK_TOKENS, round_up_to_block(coded) + flushed))


def _decode(st: LayerStorage, codes: tuple[torch.Tensor, ...], positions: torch.Tensor):
    """Keys (RoPE re-applied at ``positions`` ``[B, H or 1, n]``) and values ``[B, H, n, D]`` of ``codes`` (``k_codes,
    k_scales, v_codes, v_scales``): float32 for a codec, the stored model-dtype tensors for exact storage."""
    if st.kind == "exact":
        return codes[0], codes[2]
    return ops.dequant_kv(*codes, positions, *st.codec.as_op_args())


def _encode(st: LayerStorage, key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor,
            count: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Code the first ``count[b]`` (``[B]`` int64) of ``n`` tokens (``[B, H, n, D]`` post-RoPE keys and values,
    ``positions`` ``[B, n]``) into a scratch block of ``n`` slots: ``(k_codes, k_scales, v_codes, v_scales)``."""
    b, h, n = st.batch, st.heads, key.shape[2]
    scales = 0 if st.kind == "exact" else n
    block = (st.k_codes.new_zeros(b, h, n, *st.k_codes.shape[3:]), st.k_scales.new_zeros(b, h, scales),
             st.v_codes.new_zeros(b, h, n, *st.v_codes.shape[3:]), st.v_scales.new_zeros(b, h, scales))
    ops.write_kv(*block, key, value, positions[:, None, :].expand(-1, h, -1).to(torch.int64),
                 torch.zeros_like(count), count, *st.codec.as_op_args())
    return block


def _ring_positions(st: LayerStorage) -> torch.Tensor:
    """Positions of the ring's slots, ``[B, C]`` int64 (``-1``: empty)."""
    return st.code_pos[:, 0].to(torch.int64)


def _sees(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int) -> torch.Tensor:
    """``[B, q, n]`` bool: key ``j`` (``key_pos`` ``[B, n]``, ``-1`` empty) is in the window of query ``t``
    (``query_pos`` ``[B, q]``): ``0 <= query - key < window``."""
    distance = query_pos[:, :, None] - key_pos[:, None, :]
    return (key_pos[:, None, :] >= 0) & (distance >= 0) & (distance < window)


def _attend(st: LayerStorage, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
            scaling: float) -> torch.Tensor:
    """``nqcompile::dequant_attention`` of ``query`` ``[B, Hq, q, D]`` over the exact segment ``keys``/``values``
    ``[B, H, E, D]`` (``mask`` ``[B, q, E]``); the ring is decoded into that segment, so no code slot is passed."""
    none = slice(0, 0)
    return ops.dequant_attention(query, st.k_codes[:, :, none], st.k_scales[:, :, none], st.v_codes[:, :, none],
                                 st.v_scales[:, :, none], st.code_pos[:, :, none], torch.zeros_like(st.code_len),
                                 keys, values, mask, *st.codec.as_op_args(), scaling)


def chunk_attention(st: LayerStorage, window: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    real: torch.Tensor, positions: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention of ``q`` new tokens (keys/values ``[B, H, q, D]``, ``real`` ``[B, q]``, ``positions`` ``[B, q]``) over
    the ring, the exact window and, causally, themselves, each within its ``window``; stores nothing.

    Returns:
        ``[B, Hq, q, D]`` in the query's dtype.
    """
    q_len, positions = key.shape[2], positions.to(torch.int64)
    ring_pos = _ring_positions(st)
    rk, rv = _decode(st, tuple(getattr(st, name) for name in _CODE_BUFFERS), st.code_pos)
    win_pos = torch.where(first_slots(st.win_len, st.win_k.shape[2]), st.win_pos, -1)
    own_pos = torch.where(real, positions, -1)
    own = _sees(positions, own_pos, window) & torch.ones(q_len, q_len, dtype=torch.bool, device=st.device).tril()
    own = own | torch.eye(q_len, dtype=torch.bool, device=st.device)[None]  # a padding query sees itself (no NaN)
    mask = torch.cat([_sees(positions, ring_pos, window), _sees(positions, win_pos, window), own], 2)
    return _attend(st, query, torch.cat([rk, st.win_k, key], 2), torch.cat([rv, st.win_v, value], 2), mask, scaling)


def _ring_write(st: LayerStorage, block: tuple[torch.Tensor, ...], positions: torch.Tensor,
                count: torch.Tensor) -> None:
    """Copy the first ``count[b]`` slots of a coded ``block`` (``n`` slots, positions ``[B, n]``) into the ring at
    ``ring_head``, cyclically (only the last ``C`` when more), in place with static shapes; advances the head."""
    cap, n = st.capacity, positions.shape[1]
    m = min(n, cap)
    skip = (count - cap).clamp(min=0)  # written over within this copy: only the last cap land
    j = torch.arange(m, device=st.device)[None]
    src = (j + skip[:, None]).clamp(max=n - 1)
    slot = (st.ring_head[:, None] + skip[:, None] + j) % cap
    keep = j < (count - skip)[:, None]
    for name, new in zip(_CODE_BUFFERS, block):
        buf = getattr(st, name)
        if buf.shape[2] == 0:  # exact storage keeps no scales
            continue
        shape = (st.batch, 1, m) + (1,) * (buf.dim() - 3)
        index = slot.view(shape).expand(-1, st.heads, -1, *buf.shape[3:])
        picked = take_slots(new, src[:, None].expand(-1, st.heads, -1))
        buf.scatter_(2, index, torch.where(keep.view(shape), picked, buf.gather(2, index)))
    pos = positions.gather(1, src).to(st.code_pos.dtype)[:, None].expand(-1, st.heads, -1)
    index = slot[:, None].expand(-1, st.heads, -1)
    st.code_pos.scatter_(2, index, torch.where(keep[:, None], pos, st.code_pos.gather(2, index)))
    st.ring_head.copy_((st.ring_head + count) % cap)
    st.code_len.copy_((st.code_len + count).clamp(max=cap))


def relayout(st: LayerStorage, window: int, spare: int | None,
             block: tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor] | None = None) -> None:
    """Rebuild the ring (a plan step: a chunk end or a new turn): the coded tokens the next query of each sequence
    sees, from the ring and from ``block`` (codes, positions ``[B, n]``, count ``[B]``: a chunk's newly coded
    tokens, or None), in time order at slots ``[round_up(N) - N, round_up(N))``, in a ring of
    :func:`ring_capacity` slots; the next flushed block goes to slot ``round_up(N)``. The exact window must hold the
    sequence's newest tokens already. Codes are moved, never coded again."""
    held = first_slots(st.win_len, st.win_k.shape[2])
    next_pos = torch.where(held, st.win_pos, -1).amax(1) + 1  # [B]; a query there sees pos > next_pos - window
    codes = [getattr(st, name) for name in _CODE_BUFFERS]
    src_pos = _ring_positions(st)
    if block is not None:
        new, new_pos, count = block
        codes = [torch.cat([old, add], 2) for old, add in zip(codes, new)]
        src_pos = torch.cat([src_pos, torch.where(first_slots(count, new_pos.shape[1]), new_pos, -1)], 1)
    if src_pos.shape[1] == 0:  # nothing held or coded: an empty ring
        src_pos, codes = torch.full_like(next_pos[:, None], -1), [c.new_zeros(*c.shape[:2], 1, *c.shape[3:])
                                                                  for c in codes]
    valid = (src_pos >= 0) & (next_pos[:, None] - src_pos < window)
    n = valid.sum(1)
    most = int(n.max())
    cap = max(round_up_to_block(most), ring_capacity(window, st.win_k.shape[2], most, int(st.win_len.max()), spare))
    start = (n + BLOCK_TOKENS - 1) // BLOCK_TOKENS * BLOCK_TOKENS - n
    j = torch.arange(cap, device=st.device)[None] - start[:, None]
    take = (j >= 0) & (j < n[:, None])
    order = torch.where(valid, src_pos, torch.iinfo(torch.int64).max).argsort(1)  # valid ones first, oldest first
    index = order.gather(1, j.clamp(min=0, max=src_pos.shape[1] - 1))
    for name, src in zip(_CODE_BUFFERS, codes):
        if name.endswith("scales") and st.kind == "exact":  # exact storage keeps no scales
            continue
        moved = take_slots(src, index[:, None].expand(-1, st.heads, -1))
        keep = take.view(st.batch, 1, cap, *([1] * (src.dim() - 3)))
        setattr(st, name, torch.where(keep, moved, torch.zeros((), dtype=src.dtype, device=st.device)).contiguous())
    pos = torch.where(take, src_pos.gather(1, index), -1)
    st.code_pos = pos.to(st.position_dtype)[:, None].expand(-1, st.heads, -1).contiguous()
    st.capacity = cap
    st.code_len = n
    st.ring_head = (n + start) % cap


def ring_steps(st: LayerStorage, window: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               positions: torch.Tensor, scaling: float) -> torch.Tensor:
    """``q`` decode steps of a sliding-window layer at once, equal to ``q`` sequential calls: each new token enters
    the exact window, whose oldest 16 tokens are flushed when it is full; query ``t`` sees the ring, the blocks
    flushed up to its step (coded) and the window as they stood at step ``t``, each within its ``window``. Then
    the flushed blocks are copied into the ring. Shapes depend on ``q`` only; compiled, nothing is read on the
    host (eagerly, whether anything is flushed).

    Args:
        query: ``[B, Hq, q, D]``; key, value: ``[B, H, q, D]`` post-RoPE, model dtype; positions: ``[B, q]`` int64.
        window: the layer's ``sliding_window``. scaling: softmax scale.

    Returns:
        ``[B, Hq, q, D]`` attention output in the query's dtype.
    """
    q_len, dev = key.shape[2], st.device
    n_flush = round_up_to_block(q_len)
    positions = positions.to(torch.int64)
    stream = window_stream(st, key, value, positions)
    flushed, total, sk, sv, spos = stream.flushed, stream.total, stream.keys, stream.values, stream.positions
    ring_pos = _ring_positions(st)
    rk, rv = _decode(st, tuple(getattr(st, name) for name in _CODE_BUFFERS), st.code_pos)
    keys, values, mask = [rk], [rv], [_sees(positions, ring_pos, window)]
    flushing = torch.compiler.is_compiling() or bool(total.any())
    if flushing:
        fpos = spos[:, :n_flush]
        block = _encode(st, sk[:, :, :n_flush], sv[:, :, :n_flush], fpos, total)
        bk, bv = _decode(st, block, fpos[:, None].expand(-1, st.heads, -1))
        j = torch.arange(n_flush, device=dev)[None, None]
        keys, values = keys + [bk], values + [bv]
        mask.append(_sees(positions, fpos, window) & (j < flushed[:, :, None]))
    mask.append(_sees(positions, spos, window) & stream.visible())
    out = _attend(st, query, torch.cat(keys + [sk], 2), torch.cat(values + [sv], 2), torch.cat(mask, 2), scaling)
    if flushing:
        _ring_write(st, block, fpos, total)
    keep_unflushed(st, stream)
    return out


class SlidingLayer(NexusLayer):
    """A sliding-window layer's compressed cache (module docstring): the exact recent window and a ring of code
    blocks, holding the tokens the model's sliding-window mask lets the next query see.

    Args:
        preset: the cache's :class:`~nqcompile.presets.Preset` (its sinks, warm tier and eviction do not apply).
        bits: ``(key_bits, value_bits)``, or ``None`` for exact storage.
        window: the layer's ``sliding_window`` in tokens (a query sees itself and the ``window - 1`` before it).
        rotary: the layer's :class:`~nqcompile.models.rope_spec.RotarySpec`.
        max_cache_len: logical capacity in tokens per sequence, or ``None``.

    Raises:
        ValueError: ``window < 1``.
    """

    is_sliding = True

    def __init__(self, *, preset: Preset, bits: tuple[int, int] | None, window: int, rotary: RotarySpec,
                 max_cache_len: int | None):
        if window < 1:
            raise ValueError(f"sliding_window={window} must be >= 1")
        super().__init__(preset=preset.replace(sink_tokens=0, warm_tokens=0), bits=bits, eviction_ratio=0.0,
                         rotary=rotary, max_cache_len=max_cache_len)
        self.window = window

    def _store_positions(self) -> bool:
        return True  # the ring's slots are not in time order

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.storage.ring_head = torch.zeros_like(self.storage.code_len)

    def bf16_tokens(self) -> int:
        """Tokens per sequence that transformers' bf16 ``DynamicCache`` holds for this layer: the last
        ``window - 1`` (``DynamicSlidingWindowLayer``)."""
        return min(self.seen_tokens(), self.window - 1)

    def _reread_piece(self, query, key, value, real, positions, scaling) -> torch.Tensor:
        return chunk_attention(self.storage, self.window, query, key, value, real, positions, scaling)

    def _decode(self, query, key, value, positions, scaling) -> torch.Tensor:
        return ring_steps(self.storage, self.window, query, key, value, positions, scaling)

    def _chunk(self, query, key, value, real, positions, scaling) -> torch.Tensor:
        if self.chunks and not bool(real.all()):
            raise NotImplementedError(
                "a sliding-window layer of this NexusCache got a chunk with padding after its first chunk: the "
                "model's sliding mask counts the padding slots and the compressed layer counts positions, which "
                "then differ; feed later chunks without padding, or pass compress_layers='global_only'")
        out = chunk_attention(self.storage, self.window, query, key, value, real, positions, scaling)
        self._compress(query, key, value, real, positions, scaling)
        return out

    def _compress(self, query, key, value, real, positions, scaling, *, scores=None, budget=None) -> None:
        """Keep what the next query sees of the exact window plus the chunk (``[B, H, L, D]``, ``real`` and
        ``positions`` ``[B, L]``): the newest ``recent_window`` exact, the rest coded into the ring."""
        st, r_cap = self.storage, self.storage.win_k.shape[2]
        pk, pv = torch.cat([st.win_k, key], 2), torch.cat([st.win_v, value], 2)
        ppos = torch.cat([st.win_pos, positions.to(torch.int64)], 1)
        preal = torch.cat([first_slots(st.win_len, r_cap), real], 1)
        next_pos = torch.where(preal, ppos, -1).amax(1) + 1
        visible = preal & (next_pos[:, None] - ppos < self.window)
        n_vis = visible.sum(1)
        n_win = n_vis.clamp(max=r_cap)
        is_win = visible & (visible.cumsum(1) > (n_vis - n_win)[:, None])
        coded = visible & ~is_win
        if self.chunks == 0:
            set_norm(st, pk, pv, ppos, preal)
            if self.policy.relaxable:  # the trial's keys: those its last query sees
                width = pk.shape[2]
                time = torch.arange(width, device=st.device)
                q_real = real[:, real.shape[1] - query.shape[2]:]
                qtime = torch.where(q_real, time[width - query.shape[2]:][None], -1)
                self.key_kl = relax_key_bits(st, self.preset, query, pk, pv, ppos, coded, qtime,
                                              time[None].expand_as(preal), visible, scaling)
        count = coded.sum(1)
        index = ordered_index(coded, int(count.max()))
        hidx = index[:, None].expand(-1, st.heads, -1)
        new_pos = ppos.gather(1, index)
        block = _encode(st, ops.gather_tokens(pk, hidx), ops.gather_tokens(pv, hidx), new_pos, count)
        st.take(is_win, pk, pv, ppos, "win")
        st.win_len = n_win
        relayout(st, self.window, self._spare(), (block, new_pos, count))
        self.chunks += 1
        self._mark_static()

    def _plan_decode(self) -> None:
        relayout(self.storage, self.window, self._spare())
