"""The exact window, the warm tier and the compressed past: how tokens move between them.

A decode token enters the exact window; when the window is full its oldest :data:`~nqcompile.ops.layout.BLOCK_TOKENS`
tokens are flushed (:func:`decode_steps`). With a warm tier, flushed tokens and the kept tokens of a chunk
(:func:`store_kept`) join the tier (coded at ``warm_bits``) behind its older tokens; when it overflows, its
oldest tokens are decoded and coded once more at the layer's bits into the code buffers
(:func:`warm_flow`), so a token is coded from its warm code however the steps are grouped. The past stays in
time order: codes, then the tier, then the window.
"""

from __future__ import annotations

import torch

from .. import ops
from ..ops.layout import BLOCK_TOKENS
from .storage import LayerStorage, first_slots, ordered_index, scatter_tokens

__all__ = ["decode_steps", "store_kept", "warm_flow"]


def decode_steps(st: LayerStorage, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 positions: torch.Tensor, scaling: float, *, spare: int | None) -> torch.Tensor:
    """``q`` decode steps at once (``q == 1`` in generation): attention, then each new token enters the window,
    and whenever a window is full its oldest 16 tokens are flushed (into the warm tier if there is one, whose
    overflow goes on into codes; else into codes directly).

    For ``q > 1`` the result equals ``q`` sequential calls: query ``t`` sees the codes, warm tokens and
    window as they stood at step ``t``; the flushes are the same 16-token blocks.

    Args:
        query: ``[B, Hq, q, D]``; key, value: ``[B, H, q, D]`` post-RoPE, model dtype; positions: ``[B, q]`` int64.
        scaling: softmax scale. spare: logical tokens still to come (capacity sizing), or ``None``.

    Returns:
        ``[B, Hq, q, D]`` attention output in the query's dtype.
    """
    r_cap, q_len = st.win_k.shape[2], key.shape[2]
    old_win = list(st.host_win_len)
    # Host-side replay of the window: flushed[b][t] = stream tokens flushed before step t.
    flushed = [[0] * q_len for _ in range(st.batch)]
    for b, w in enumerate(old_win):
        gone = 0
        for t in range(q_len):
            if w + t - gone >= r_cap:
                gone += BLOCK_TOKENS
            flushed[b][t] = gone
    total = [f[-1] for f in flushed]
    dev = st.device
    # The stream of exact tokens: the old window (slots < win_len) then the new tokens.
    sk, sv = torch.cat([st.win_k, key], 2), torch.cat([st.win_v, value], 2)
    spos = torch.cat([st.win_pos, positions.to(torch.int64)], 1)
    new = torch.ones(st.batch, q_len, dtype=torch.bool, device=dev)
    stream_valid = torch.cat([first_slots(st.win_len, r_cap), new], 1)
    order = ordered_index(stream_valid, r_cap + q_len)  # stream slot of stream token i
    n_flush = torch.tensor(total, device=dev)
    idx = order[:, None, :max(total)].expand(-1, st.heads, -1)
    fk, fv = ops.gather_tokens(sk, idx), ops.gather_tokens(sv, idx)  # flushed tokens, oldest first
    fpos = spos[:, None, :].expand(-1, st.heads, -1).gather(2, idx)
    sink_valid = first_slots(st.sink_len, st.sink_k.shape[2])
    exact_k, exact_v, exact_mask = [st.sink_k], [st.sink_v], [sink_valid[:, None, :].expand(-1, q_len, -1)]
    if st.warm_cap:
        old_warm = list(st.host_warm_len)
        to_codes = [[max(0, w + f - st.warm_cap) for f in fl] for w, fl in zip(old_warm, flushed)]
        tier, src_pos = warm_flow(st, fk, fv, fpos, n_flush, to_codes)
        src_k, src_v = st.decode_warm(tier, src_pos)
        # Warm slot i (old tier, then this call's flushes) is in the tier at step t while
        # to_codes[t] <= i < old_warm + flushed[t].
        i = torch.arange(src_k.shape[2], device=dev)
        lo = torch.tensor(to_codes, device=dev)
        hi = torch.tensor(old_warm, device=dev)[:, None] + torch.tensor(flushed, device=dev)
        exact_k, exact_v = exact_k + [src_k], exact_v + [src_v]
        exact_mask.append((i[None, None] >= lo[:, :, None]) & (i[None, None] < hi[:, :, None]))
    else:
        to_codes, (src_k, src_v, src_pos) = flushed, (fk, fv, fpos)
    code_start = st.code_len.clone()
    n_codes = [c[-1] for c in to_codes]
    if max(n_codes):
        st.ensure_capacity(max(c + n for c, n in zip(st.host_code_len, n_codes)), spare)
        m = max(n_codes)
        st.write(src_k[:, :, :m], src_v[:, :, :m], src_pos[:, :, :m], torch.tensor(n_codes, device=dev))
    # Stream token i is visible to query t while flushed[t] <= i <= old_win + t.
    f = torch.tensor(flushed, device=dev)  # [B, q]
    t = torch.arange(q_len, device=dev)
    rank = torch.where(stream_valid, stream_valid.long().cumsum(1) - 1, -1)  # stream index of each slot
    last = torch.tensor(old_win, device=dev)[:, None] + t[None]  # [B, q]
    exact_mask.append((rank[:, None, :] >= f[:, :, None]) & (rank[:, None, :] <= last[:, :, None]))
    exact_k, exact_v = exact_k + [sk], exact_v + [sv]
    out = st.attend(query, torch.cat(exact_k, 2), torch.cat(exact_v, 2), torch.cat(exact_mask, 2), scaling,
                    code_len=code_start[:, None] + torch.tensor(to_codes, device=dev))
    # The window keeps the stream tokens not flushed, left-aligned.
    keep = stream_valid & (rank >= n_flush[:, None])
    st.take(keep, sk, sv, spos, "win")
    st.win_len = keep.sum(1)
    st.host_win_len = [w + q_len - n for w, n in zip(old_win, total)]
    return out


def store_kept(st: LayerStorage, kept_k: torch.Tensor, kept_v: torch.Tensor, kept_pos: torch.Tensor,
               count: torch.Tensor, *, spare: int | None) -> None:
    """Store the kept tokens of a chunk (``[B, H, K, D]`` keys/values, ``[B, H, K]`` positions, the first
    ``count[b]`` of each sequence real): they join the warm tier behind its old tokens; what overflows goes to
    codes, oldest first: old warm tokens (coded again from their warm codes), then the chunk's own (coded
    directly). Without a tier they are coded directly."""
    old_warm = torch.tensor(st.host_warm_len, device=st.device)
    overflow = (old_warm + count - st.warm_cap).clamp(min=0)
    from_warm = torch.minimum(overflow, old_warm)
    direct = overflow - from_warm
    st.ensure_capacity(max(c + n for c, n in zip(st.host_code_len, overflow.tolist())), spare)
    if st.warm_cap and kept_k.shape[2]:
        j = (torch.arange(st.warm_cap, device=st.device)[None] + direct[:, None]).clamp(max=kept_k.shape[2] - 1)
        j = j[:, None, :].expand(-1, st.heads, -1)
        tier, tier_pos = warm_flow(st, ops.gather_tokens(kept_k, j), ops.gather_tokens(kept_v, j),
                                   kept_pos.gather(2, j), count - direct, [[n] for n in from_warm.tolist()])
        n = int(from_warm.max())
        if n:
            wk, wv = st.decode_warm(tuple(t[:, :, :n] for t in tier), tier_pos[:, :, :n])
            st.write(wk, wv, tier_pos[:, :, :n], from_warm)
    m = int(direct.max())
    st.write(kept_k[:, :, :m], kept_v[:, :, :m], kept_pos[:, :, :m], direct)


def warm_flow(st: LayerStorage, key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor, count: torch.Tensor,
              to_codes: list[list[int]]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Append ``count[b]`` tokens (``key``/``value`` ``[B, H, n, D]``, ``positions`` ``[B, H, n]``) to the warm
    tier, coded at ``warm_bits``, and drop its first ``to_codes[b][-1]`` tokens (at most ``warm_cap`` stay).

    Returns the tier before dropping (old tokens, then the appended ones): its code tensors
    ``(k_codes, k_scales, v_codes, v_scales)`` of ``N`` slots and int64 positions ``[B, H, N]``. The caller
    codes the dropped tokens from there, so a token is coded from its warm code however steps are grouped.
    """
    old = st.host_warm_len
    n_ext = max(w + c for w, c in zip(old, count.tolist()))
    tier = st.warm_tensors()
    if int(count.max()):
        ext = [torch.zeros(*x.shape[:2], n_ext, *x.shape[3:], dtype=x.dtype, device=x.device) for x in tier]
        ext_pos = torch.zeros(st.batch, st.heads, n_ext, dtype=torch.int64, device=st.device)
        held = min(st.warm_cap, n_ext)
        for e, x in zip(ext + [ext_pos], list(tier) + [st.warm_pos]):
            e[:, :, :held] = x[:, :, :held].to(e.dtype)
        ops.write_kv(*ext, key, value, positions, st.warm_len, count, *st.warm_codec.as_op_args())
        scatter_tokens(ext_pos, positions, st.warm_len, count)
    else:
        ext, ext_pos = list(tier), st.warm_pos.to(torch.int64)
    dropped = torch.tensor([m[-1] for m in to_codes], device=st.device)
    if int(count.max()):
        sel = (torch.arange(st.warm_cap, device=st.device)[None] + dropped[:, None]).clamp(max=n_ext - 1)
        sel = sel[:, None, :].expand(-1, st.heads, -1)
        names = ("warm_k_codes", "warm_k_scales", "warm_v_codes", "warm_v_scales")
        for name, e in zip(names, ext):
            setattr(st, name, e.gather(2, sel[..., None].expand(-1, -1, -1, e.shape[3])) if e.dim() == 4
                    else e.gather(2, sel))
        st.warm_pos = ext_pos.gather(2, sel).to(st.position_dtype)
        st.warm_len = st.warm_len + count - dropped
        st.host_warm_len = [w + c - d for w, c, d in zip(old, count.tolist(), dropped.tolist())]
    return tuple(ext), ext_pos
