"""The exact window, the warm tier and the compressed past: how tokens move between them.

A decode token enters the exact window; when the window is full its oldest :data:`~nqcompile.ops.layout.BLOCK_TOKENS`
tokens are flushed (:func:`decode_steps`). With a warm tier, flushed tokens and the kept tokens of a chunk
(:func:`store_kept`) join the tier (coded at ``warm_bits``) behind its older tokens; when it overflows, its
oldest tokens are decoded and coded once more at the layer's bits into the code buffers
(:func:`warm_flow`), so a token is coded from its warm code however the steps are grouped. The past stays in
time order: codes, then the tier, then the window.

:func:`decode_steps` has static shapes (they depend on the number of new tokens only) and, when compiled, never
reads a length on the host: every flush decision is a mask computed on the device, every write lands at
device-side offsets, and the buffers are updated in place. Run eagerly, it reads two numbers on the host (whether
anything is flushed, and how many code slots are held) so as to skip the writes and the empty code slots. The code buffers must have room for it, which
:meth:`~nqcompile.cache.storage.LayerStorage.reserve_for_decode` plans at the end of each prefill chunk.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import ops
from ..ops.layout import BLOCK_TOKENS, round_up_to_block
from ..ops.reference import write_slots
from .storage import LayerStorage, first_slots, take_slots

__all__ = ["decode_steps", "store_kept", "warm_flow", "WindowStream", "window_stream", "keep_unflushed"]


class WindowStream(NamedTuple):
    """The exact window's tokens and ``q`` new ones in time order, and what ``q`` steps flush of them
    (:func:`window_stream`). ``R``: the window's capacity; ``q``: the new tokens."""

    #: ``[B]`` tokens in the window before the steps.
    old_len: torch.Tensor
    #: ``[B, q]`` stream tokens flushed once step ``t`` has added its token (whole blocks, oldest first).
    flushed: torch.Tensor
    #: ``[B]`` stream tokens the ``q`` steps flush (``flushed[:, -1]``).
    total: torch.Tensor
    #: ``[B, H, R + q, D]`` keys and values of the stream (slots past ``old_len + q`` repeat the last token).
    keys: torch.Tensor
    values: torch.Tensor
    #: ``[B, R + q]`` int64 positions of the stream.
    positions: torch.Tensor

    def visible(self) -> torch.Tensor:
        """``[B, q, R + q]`` bool: stream token ``i`` is in the window at step ``t`` while
        ``flushed[t] <= i <= old_len + t``."""
        q_len = self.flushed.shape[1]
        i = torch.arange(self.keys.shape[2], device=self.keys.device)[None, None]
        t = torch.arange(q_len, device=self.keys.device)[None, :, None]
        return (i >= self.flushed[:, :, None]) & (i <= self.old_len[:, None, None] + t)


def window_stream(st: LayerStorage, key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor) -> WindowStream:
    """The window's tokens followed by ``key``/``value`` ``[B, H, q, D]`` at ``positions`` ``[B, q]``, and the
    16-token blocks ``q`` decode steps flush from its front when it is full (static shapes: they depend on ``q``).

    The new tokens are rounded to the window's dtype first, as each would be on entering the window one step at a
    time: ``q`` steps at once attend to (and flush) exactly what ``q`` single steps would."""
    r_cap, q_len, dev = st.win_k.shape[2], key.shape[2], st.device
    old_len = st.win_len.clone()
    steps = torch.arange(q_len, device=dev)
    over = (old_len[:, None] + steps[None] + 1 - r_cap).clamp(min=0)
    flushed = (over + BLOCK_TOKENS - 1) // BLOCK_TOKENS * BLOCK_TOKENS
    i = torch.arange(r_cap + q_len, device=dev)[None]
    src = torch.where(i < old_len[:, None], i, r_cap + i - old_len[:, None]).clamp(max=r_cap + q_len - 1)
    hsrc = src[:, None].expand(-1, st.heads, -1)
    key, value = key.to(st.window_dtype), value.to(st.window_dtype)
    return WindowStream(old_len, flushed, flushed[:, -1], ops.gather_tokens(torch.cat([st.win_k, key], 2), hsrc),
                        ops.gather_tokens(torch.cat([st.win_v, value], 2), hsrc),
                        torch.cat([st.win_pos, positions.to(torch.int64)], 1).gather(1, src))


def keep_unflushed(st: LayerStorage, stream: WindowStream) -> None:
    """The window keeps the stream tokens the steps did not flush, left-aligned (in place)."""
    r_cap, q_len = st.win_k.shape[2], stream.flushed.shape[1]
    keep = (torch.arange(r_cap, device=st.device)[None] + stream.total[:, None]).clamp(max=r_cap + q_len - 1)
    st.win_k.copy_(ops.gather_tokens(stream.keys, keep[:, None].expand(-1, st.heads, -1)))
    st.win_v.copy_(ops.gather_tokens(stream.values, keep[:, None].expand(-1, st.heads, -1)))
    st.win_pos.copy_(stream.positions.gather(1, keep))
    st.win_len.copy_(stream.old_len + q_len - stream.total)


def decode_steps(st: LayerStorage, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 positions: torch.Tensor, scaling: float) -> torch.Tensor:
    """``q`` decode steps at once (``q == 1`` in generation): attention, then each new token enters the window,
    and whenever a window is full its oldest 16 tokens are flushed (into the warm tier if there is one, whose
    overflow goes on into codes; else into codes directly).

    For ``q > 1`` the result equals ``q`` sequential calls: query ``t`` sees the codes, warm tokens and
    window as they stood at step ``t``; the flushes are the same 16-token blocks. Shapes depend on ``q`` only.

    Args:
        query: ``[B, Hq, q, D]``; key, value: ``[B, H, q, D]`` post-RoPE, model dtype; positions: ``[B, q]`` int64.
        scaling: softmax scale.

    Returns:
        ``[B, Hq, q, D]`` attention output in the query's dtype.
    """
    q_len, dev = key.shape[2], st.device
    n_flush = round_up_to_block(q_len)  # the most stream tokens q steps can flush
    stream = window_stream(st, key, value, positions)
    flushed, total, sk, sv, spos = stream.flushed, stream.total, stream.keys, stream.values, stream.positions
    fk, fv, fpos = sk[:, :, :n_flush], sv[:, :, :n_flush], spos[:, None, :n_flush].expand(-1, st.heads, -1)
    sink_valid = first_slots(st.sink_len, st.sink_k.shape[2])
    exact_k, exact_v, exact_mask = [st.sink_k], [st.sink_v], [sink_valid[:, None, :].expand(-1, q_len, -1)]
    code_start = st.code_len.clone()
    # A compiled step always runs the block writes and reads every code slot (static shapes); an eager one reads
    # on the host whether anything is flushed and how many slots are held, and skips the rest.
    compiling = torch.compiler.is_compiling()
    flushing = compiling or bool(total.any())
    if st.warm_cap:
        old_warm = st.warm_len.clone()
        to_codes = (old_warm[:, None] + flushed - st.warm_cap).clamp(min=0)  # tier tokens coded by step t
        if flushing:
            tier, tier_pos = warm_flow(st, fk, fv, fpos, total, to_codes[:, -1])
            tier_k, tier_v = st.decode_warm(tier, tier_pos)
            st.write(tier_k[:, :, :n_flush], tier_v[:, :, :n_flush], tier_pos[:, :, :n_flush], to_codes[:, -1])
        else:
            tier_k, tier_v = st.decode_warm(st.warm_tensors(), st.warm_pos)
        # Tier slot j (old tier, then this call's flushes) is in the tier at step t while
        # to_codes[t] <= j < old_warm + flushed[t].
        j = torch.arange(tier_k.shape[2], device=dev)[None, None]
        exact_k, exact_v = exact_k + [tier_k], exact_v + [tier_v]
        exact_mask.append((j >= to_codes[:, :, None]) & (j < (old_warm[:, None] + flushed)[:, :, None]))
    else:
        to_codes = flushed
        if flushing:
            st.write(fk, fv, fpos, total)
    exact_mask.append(stream.visible())
    out = st.attend(query, torch.cat(exact_k + [sk], 2), torch.cat(exact_v + [sv], 2), torch.cat(exact_mask, 2),
                    scaling, code_len=code_start[:, None] + to_codes, full=compiling)
    keep_unflushed(st, stream)
    return out


def store_kept(st: LayerStorage, kept_k: torch.Tensor, kept_v: torch.Tensor, kept_pos: torch.Tensor,
               count: torch.Tensor) -> None:
    """Store the kept tokens of a chunk (``[B, H, K, D]`` keys/values, ``[B, H, K]`` positions, the first
    ``count[b]`` of each sequence real): they join the warm tier behind its old tokens; what overflows goes to
    codes, oldest first: old warm tokens (coded again from their warm codes), then the chunk's own (coded
    directly). Without a tier they are coded directly. Grows the code buffers as needed (host-side: a chunk end)."""
    old_warm = st.warm_len.clone()
    overflow = (old_warm + count - st.warm_cap).clamp(min=0)
    from_warm = torch.minimum(overflow, old_warm)
    direct = overflow - from_warm
    n_warm, n_direct = int(from_warm.max()), int(direct.max())
    st.ensure_capacity(int(st.code_len.max()) + n_warm + n_direct)
    if st.warm_cap and kept_k.shape[2]:
        j = (torch.arange(st.warm_cap, device=st.device)[None] + direct[:, None]).clamp(max=kept_k.shape[2] - 1)
        j = j[:, None, :].expand(-1, st.heads, -1)
        tier, tier_pos = warm_flow(st, ops.gather_tokens(kept_k, j), ops.gather_tokens(kept_v, j),
                                   kept_pos.gather(2, j), count - direct, from_warm)
        if n_warm:
            wk, wv = st.decode_warm(tuple(t[:, :, :n_warm] for t in tier), tier_pos[:, :, :n_warm])
            st.write(wk, wv, tier_pos[:, :, :n_warm], from_warm)
    st.write(kept_k[:, :, :n_direct], kept_v[:, :, :n_direct], kept_pos[:, :, :n_direct], direct)


def warm_flow(st: LayerStorage, key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor, count: torch.Tensor,
              dropped: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Append the first ``count[b]`` of ``n`` tokens (``key``/``value`` ``[B, H, n, D]``, ``positions`` ``[B, H, n]``)
    to the warm tier, coded at ``warm_bits``, and drop its first ``dropped[b]`` tokens (``[B]`` int64; at most
    ``warm_cap`` may stay). Static shapes; the tier is updated in place.

    Returns the tier before dropping (old tokens, then the appended ones): its code tensors
    ``(k_codes, k_scales, v_codes, v_scales)`` of ``warm_cap + n`` slots and int64 positions ``[B, H, warm_cap + n]``.
    The caller codes the dropped tokens from there, so a token is coded from its warm code however steps are grouped.
    """
    n, cap = key.shape[2], st.warm_cap
    ext = [torch.cat([x, x.new_zeros(*x.shape[:2], n, *x.shape[3:])], 2) for x in st.warm_tensors()]
    ext_pos = torch.cat([st.warm_pos.to(torch.int64), positions.new_zeros(*positions.shape[:2], n)], 2)
    ops.write_kv(*ext, key, value, positions, st.warm_len, count, *st.warm_codec.as_op_args())
    write_slots(ext_pos, positions, st.warm_len, count)
    keep = (torch.arange(cap, device=st.device)[None] + dropped[:, None]).clamp(max=cap + n - 1)
    keep = keep[:, None, :].expand(-1, st.heads, -1)
    for buf, e in zip(st.warm_tensors(), ext):
        buf.copy_(take_slots(e, keep))
    st.warm_pos.copy_(ext_pos.gather(2, keep).to(st.warm_pos.dtype))
    st.warm_len.copy_(st.warm_len + count - dropped)
    return tuple(ext), ext_pos
