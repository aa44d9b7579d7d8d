"""``NexusLayer``: one attention layer of a :class:`~nqcompile.NexusCache`, holding packed E8 codes instead of
float keys/values.

Each compressed layer holds, per sequence of the batch:

* ``sink_tokens`` attention sinks, exact, in the model's dtype (``sink_k``, ``sink_v``);
* the compressed past: packed codes, one-byte scales and (when evicting) positions, in preallocated
  buffers of static capacity laid out as :mod:`nqcompile.ops.layout` documents;
* optionally a warm tier of the ``warm_tokens`` most recent compressed tokens, coded at ``warm_bits``
  (``warm_k_codes``, ... ``warm_pos``), between the past and the window;
* a recent window of ``recent_window`` exact tokens (``win_k``, ``win_v``) with their positions.

Two lengths are never confused: the logical length (tokens seen, padding included; what
``get_seq_length()``, positions and ``generate``'s input slicing use) and the physical length (tokens
kept; what attention reads).

Life of a token. A prefill chunk attends exactly to itself and to what the cache already holds. When its
attention is done (inside the same attention call, so no extra forward), the layer compresses what it
holds exactly: the first chunk's first ``sink_tokens`` become sinks, the last ``recent_window`` tokens
become the window, and the tokens in between are scored (observation-window attention, KeyDiff or key
norm), ``eviction_ratio`` of them are dropped (not in a chunk shorter than ``min_evict_tokens``), and the
rest are RoPE-removed, normalized per channel (statistics of the first chunk), Hadamard-rotated,
E8-quantized and packed into the code buffers. No float copy survives. A decode token enters the window;
when the window is full its oldest 16 tokens are flushed into codes (never evicted). A later chunk (the
next turn) is compressed the same way; codes already written are never touched again.

With ``scorer="reconstruction"`` (KVzip) a chunk long enough to evict from is held exactly instead, until
:meth:`NexusCache.reconstruct` has had the model re-read it (:meth:`NexusLayer._reread` attends and scores
without storing) and has shared the kept-token budget among the layers; then it is compressed as above.

With ``relax_key_kl`` set, the first chunk also decides each layer's key width: a layer whose observation
queries' attention moves by less than that KL divergence when its keys lose a bit stores them one bit
lower from then on (:mod:`nqcompile.policy.key_bits`).

With a warm tier, the kept tokens of a chunk and the tokens flushed from the window join the tier (coded
at ``warm_bits``) behind its older tokens; when it overflows, its oldest tokens are decoded and coded once
more at the preset's bits (a chunk's own tokens that would overflow at once are coded directly). The past
stays in time order: codes, then the tier, then the window.
"""


from __future__ import annotations

import math
import threading
from typing import NamedTuple

import torch
from transformers.cache_utils import CacheLayerMixin

from .. import ops
from ..codec.hadamard import hadamard_matrix
from ..codec.kv import KVTransform, channel_statistics
from ..codec.lattice import code_for
from ..codec.rope import apply_rotary
from ..models.rope_spec import RotarySpec
from ..policy import make_scorer, select_kept
from ..policy.key_bits import MIN_TRIAL_TOKENS, trial_key_kl
from ..policy.reconstruction import reconstruction_scores
from ..ops.layout import BLOCK_TOKENS
from ..presets import Preset

__all__ = ["NexusLayer", "claim_layer"]


class _Handoff(threading.local):
    """Links a layer's ``update`` to the attention call that follows it in the same attention module."""

    layer: "NexusLayer | None" = None
    key: torch.Tensor | None = None


_HANDOFF = _Handoff()


def claim_layer(key: torch.Tensor) -> "NexusLayer | None":
    """Return the :class:`NexusLayer` whose ``update`` just returned ``key`` (and forget it), else ``None``."""
    layer, expected = _HANDOFF.layer, _HANDOFF.key
    _HANDOFF.layer = _HANDOFF.key = None
    return layer if expected is key else None


class NexusLayer(CacheLayerMixin):
    """One attention layer's compressed key/value cache (see the module docstring for the life of a token).

    Args:
        preset: the cache's :class:`~nqcompile.presets.Preset`.
        bits: ``(key_bits, value_bits)`` for this layer, or ``None`` for exact storage.
        eviction_ratio: fraction of each chunk's tokens evicted in this layer.
        rotary: the layer's :class:`~nqcompile.models.rope_spec.RotarySpec`.
        max_cache_len: logical capacity in tokens per sequence (prompt + new tokens), or ``None`` to let the
            code buffers grow at chunk ends.

    Raises:
        ValueError: ``max_cache_len`` exceeded (the message gives the numbers).
    """

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, *, preset: Preset, bits: tuple[int, int] | None, eviction_ratio: float, rotary: RotarySpec,
                 max_cache_len: int | None):
        super().__init__()
        self.preset = preset
        self.kind = "exact" if bits is None else preset.codec
        self._bits = bits if bits is not None else (0, 0)
        self.key_bits, self.value_bits = self._bits
        #: Warm tier capacity in tokens (0: no tier for this layer); set with the buffers.
        self.warm_cap = 0
        #: Whether the first chunk may lower the key bits (``Preset.relax_key_kl``; not for boundary layers).
        self.relaxable = preset.relax_key_kl > 0 and bits == (preset.key_bits, preset.value_bits)
        #: The attention KL measured for ``key_bits - 1`` at the first chunk (nats, the largest over the
        #: sequences measured), or None.
        self.key_kl: float | None = None
        self.eviction_ratio = eviction_ratio
        self.rotary = rotary
        self.max_cache_len = max_cache_len
        #: None for "reconstruction", whose scores come from NexusCache.reconstruct().
        self.scorer = None if preset.scorer == "reconstruction" else make_scorer(
            preset.scorer, observation_window=preset.observation_window)
        self.logical_len = 0
        self.chunks = 0
        self._host_code_len: list[int] = []
        self._host_win_len: list[int] = []
        self._host_warm_len: list[int] = []
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        #: A prefill chunk held exactly until its reconstruction pass (scorer="reconstruction"), and the
        #: scores that pass gives its candidates.
        self._deferred: tuple | None = None
        self._recon_scores: torch.Tensor | None = None
        #: Set by NexusCache.reconstruct() while the model re-reads a deferred chunk.
        self.rereading = False
        #: Treat a multi-token input as that many decode steps (see NexusCache.replay_as_decode).
        self.replay_as_decode = False

    # ------------------------------------------------------------------ transformers Cache layer API
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        self.batch, self.heads, self.head_dim = batch, heads, dim
        self.dtype, self.device = key_states.dtype, key_states.device
        self.key_bits, self.value_bits = self._bits
        self.key_kl = None
        if self.kind != "exact":
            code_for(self.kind, self.key_bits)  # fail early on an unsupported combination
        kw = dict(dtype=self.dtype, device=self.device)
        s, r = self.preset.sink_tokens, self.preset.recent_window
        self.sink_k = torch.zeros(batch, heads, s, dim, **kw)
        self.sink_v = torch.zeros(batch, heads, s, dim, **kw)
        self.sink_len = torch.zeros(batch, dtype=torch.int64, device=self.device)
        self.win_k = torch.zeros(batch, heads, r, dim, **kw)
        self.win_v = torch.zeros(batch, heads, r, dim, **kw)
        self.win_pos = torch.zeros(batch, r, dtype=torch.int64, device=self.device)
        self.win_len = torch.zeros(batch, dtype=torch.int64, device=self.device)
        self.code_len = torch.zeros(batch, dtype=torch.int64, device=self.device)
        self.code_pos0 = torch.zeros(batch, dtype=torch.int64, device=self.device)
        self.hadamard = hadamard_matrix(dim, device=self.device)
        self.inv_freq = self.rotary.inv_freq.to(self.device)
        self.norm_mean = torch.zeros(2, batch, heads, dim, dtype=torch.float32, device=self.device)
        self.norm_scale = torch.ones(2, batch, heads, dim, dtype=torch.float32, device=self.device)
        for name in ("k_codes", "v_codes", "k_scales", "v_scales", "code_pos"):  # reset(): nothing to copy over
            self.__dict__.pop(name, None)
        self._allocate_codes(0)
        self._allocate_warm()
        self._host_code_len = [0] * batch
        self._host_win_len = [0] * batch
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Stage the new keys/values ``[B, H, q, D]`` for the attention call that follows; returns them unchanged.

        Nothing is stored here: the ``nexusquant`` attention function (which receives these very tensors)
        writes them through :meth:`attend`, where positions and padding are known.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != self.batch or key_states.dtype != self.dtype:
            raise ValueError(
                f"NexusCache layer holds batch {self.batch} in {self.dtype}, got keys of batch {key_states.shape[0]} "
                f"in {key_states.dtype}; use one cache per batch and keep the model's dtype"
            )
        self._pending = (key_states, value_states)
        _HANDOFF.layer, _HANDOFF.key = self, key_states
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.logical_len

    def get_max_length(self) -> int:
        return -1 if self.max_cache_len is None else self.max_cache_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.logical_len + query_length, 0

    def reset(self) -> None:
        self._deferred = self._recon_scores = None
        if self.is_initialized:
            self.lazy_initialization(self.sink_k, self.sink_v)
        self.logical_len = self.chunks = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("NexusCache does not support beam search yet; use greedy or sampling")

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("NexusCache cannot be cropped (evicted and quantized tokens cannot be rolled back); "
                                  "assisted/speculative decoding is not supported")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("NexusCache cannot be expanded after prefill; expand the inputs instead")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("NexusCache does not support batch selection (contrastive search)")

    def ingest(self, key: torch.Tensor, value: torch.Tensor, *, real: torch.Tensor, positions: torch.Tensor) -> None:
        """Store a first chunk of keys/values ``[B, H, L, D]`` without attention (used by ``compress_kv_cache``).

        Args:
            real: ``[B, L]`` bool padding flags. positions: ``[B, L]`` int64 RoPE positions.

        Raises:
            ValueError: the layer already holds tokens, or the scorer needs queries.
        """
        if self.chunks:
            raise ValueError("ingest() only fills an empty layer")
        if self.evicting and self.preset.scorer in ("observation", "reconstruction"):
            raise ValueError("ingest() has no queries (nor a model to re-read with): use scorer='key_diff' or "
                             "'key_norm', or no eviction")
        if self.relaxable:
            raise ValueError("ingest() has no queries to measure relax_key_kl with: pass relax_key_kl=0 "
                             "(every layer then keeps key_bits)")
        if not self.is_initialized:
            self.lazy_initialization(key, value)
        self._check_logical(key.shape[2])
        self.logical_len = key.shape[2]
        self._compress(None, key, value, real, positions, key.shape[-1] ** -0.5)
        self.chunks = 1

    # ------------------------------------------------------------------ storage
    @property
    def evicting(self) -> bool:
        return self.eviction_ratio > 0.0

    def _code_row_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...], torch.dtype]:
        if self.kind == "exact":
            return (self.head_dim,), (self.head_dim,), self.dtype
        return (self.key_bits * self.head_dim // 8,), (self.value_bits * self.head_dim // 8,), torch.uint8

    def _position_dtype(self) -> torch.dtype:
        small = self.max_cache_len is not None and self.max_cache_len <= torch.iinfo(torch.int16).max
        return torch.int16 if small else torch.int32

    def _allocate_codes(self, capacity: int) -> None:
        """(Re)allocate the code buffers with ``capacity`` token slots, copying what is held bit for bit."""
        krow, vrow, dtype = self._code_row_shapes()
        b, h = self.batch, self.heads
        scale_cap = 0 if self.kind == "exact" else capacity
        new = {
            "k_codes": torch.zeros(b, h, capacity, *krow, dtype=dtype, device=self.device),
            "v_codes": torch.zeros(b, h, capacity, *vrow, dtype=dtype, device=self.device),
            "k_scales": torch.zeros(b, h, scale_cap, dtype=torch.uint8, device=self.device),
            "v_scales": torch.zeros(b, h, scale_cap, dtype=torch.uint8, device=self.device),
        }
        if self.evicting:
            new["code_pos"] = torch.zeros(b, h, capacity, dtype=self._position_dtype(), device=self.device)
        for name, tensor in new.items():
            old = getattr(self, name, None)
            if old is not None and old.shape[2] > 0:
                tensor[:, :, : old.shape[2]] = old
            setattr(self, name, tensor)
        self.capacity = capacity

    def _allocate_warm(self) -> None:
        """(Re)allocate an empty warm tier of ``warm_cap`` slots for the layer's bits (``Preset.warm_tokens_for``)."""
        self.warm_cap = self.preset.warm_tokens_for((self.key_bits, self.value_bits)) if self.kind != "exact" else 0
        b, h, w = self.batch, self.heads, self.warm_cap
        row = self.preset.warm_bits * self.head_dim // 8
        u8 = dict(dtype=torch.uint8, device=self.device)
        self.warm_k_codes, self.warm_v_codes = torch.zeros(b, h, w, row, **u8), torch.zeros(b, h, w, row, **u8)
        self.warm_k_scales, self.warm_v_scales = torch.zeros(b, h, w, **u8), torch.zeros(b, h, w, **u8)
        self.warm_pos = torch.zeros(b, h, w, dtype=self._position_dtype(), device=self.device)
        self.warm_len = torch.zeros(b, dtype=torch.int64, device=self.device)
        self._host_warm_len = [0] * b

    def widen_positions(self) -> None:
        """Store positions as int32 once ``max_cache_len`` no longer fits int16 (after ``NexusCache.reserve``)."""
        dtype = self._position_dtype()
        for name in ("code_pos", "warm_pos"):
            if name in self.__dict__ and getattr(self, name).dtype != dtype:
                setattr(self, name, getattr(self, name).to(dtype))

    def _ensure_capacity(self, needed: int) -> None:
        """Make room for ``needed`` physical tokens per sequence, plus the remaining decode budget."""
        if needed <= self.capacity:
            return
        if self.max_cache_len is not None:
            target = needed + max(0, self.max_cache_len - self.logical_len)
        else:
            target = max(needed, int(self.capacity * 1.5))
        self._allocate_codes(math.ceil(target / BLOCK_TOKENS) * BLOCK_TOKENS)

    def _check_logical(self, new_tokens: int) -> None:
        if self.max_cache_len is not None and self.logical_len + new_tokens > self.max_cache_len:
            raise ValueError(
                f"NexusCache is full: it holds {self.logical_len} tokens and was built with "
                f"max_cache_len={self.max_cache_len}; {new_tokens} more do not fit. Build it with a larger "
                "max_cache_len (prompt length + max_new_tokens)"
            )

    def _codec_args(self, bits: tuple[int, int] | None = None) -> tuple:
        """Codec parameters of the ops for the layer's ``(key_bits, value_bits)``, or for ``bits``."""
        r = self.rotary
        key_bits, value_bits = bits if bits is not None else (self.key_bits, self.value_bits)
        return (self.hadamard, self.inv_freq, self.norm_mean, self.norm_scale, self.kind, key_bits, value_bits,
                float(r.attention_scaling), int(r.rotary_dim), r.layout)

    def _warm_args(self) -> tuple:
        return self._codec_args((self.preset.warm_bits, self.preset.warm_bits))

    def _warm_tensors(self) -> tuple[torch.Tensor, ...]:
        return self.warm_k_codes, self.warm_k_scales, self.warm_v_codes, self.warm_v_scales

    def _code_positions(self) -> torch.Tensor:
        if self.evicting:
            return self.code_pos
        slots = torch.arange(self.capacity, device=self.device)
        return (self.code_pos0[:, None] + slots[None, :])[:, None, :]

    # ------------------------------------------------------------------ attention
    def attend(self, query: torch.Tensor, *, real: torch.Tensor, positions: torch.Tensor,
               scaling: float) -> torch.Tensor:
        """Attention for the staged keys/values, then storage of them.

        Args:
            query: ``[B, Hq, q, D]`` post-RoPE queries.
            real: ``[B, q]`` bool, False for padding tokens of a chunk.
            positions: ``[B, q]`` int64 RoPE positions of the new tokens.
            scaling: softmax scale.

        Returns:
            ``[B, Hq, q, D]`` attention output in the query's dtype.
        """
        if self._pending is None:
            raise RuntimeError("NexusLayer.attend called without a preceding update()")
        key, value = self._pending
        self._pending = None
        if self.rereading:
            self.rotary.check_length(int(positions.max()) + 1)
            return self._reread(query, key, value, real, scaling)
        if self._deferred is not None:
            raise RuntimeError("a prefill chunk of this NexusCache awaits its reconstruction pass (scorer="
                               "'reconstruction'): call cache.reconstruct(model, input_ids) after the prefill, or "
                               "prepare the model with nqcompile.optimize(), which does it")
        q_len = key.shape[2]
        self._check_logical(q_len)
        self.rotary.check_length(self.logical_len + q_len)
        self.logical_len += q_len  # before storing: capacity is sized from the tokens still to come
        if self.chunks > 0 and (q_len == 1 or self.replay_as_decode):
            return self._decode(query, key, value, positions, scaling)
        return self._chunk(query, key, value, real, positions, scaling)

    def _warm_floats(self, tensors: tuple[torch.Tensor, ...], positions: torch.Tensor):
        """Decode warm-tier codes (``k_codes, k_scales, v_codes, v_scales``) at ``positions`` ``[B, H, n]``: float32."""
        return ops.dequant_kv(*tensors, positions, *self._warm_args())

    def _exact_segment(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sinks, warm tier (decoded) and window: keys/values ``[B, H, S + W + R, D]``, validity ``[B, S + W + R]``."""
        ks, vs, valid = [self.sink_k], [self.sink_v], [_first(self.sink_len, self.sink_k.shape[2])]
        if self.warm_cap:
            wk, wv = self._warm_floats(self._warm_tensors(), self.warm_pos)
            ks, vs, valid = ks + [wk], vs + [wv], valid + [_first(self.warm_len, self.warm_cap)]
        ks, vs, valid = ks + [self.win_k], vs + [self.win_v], valid + [_first(self.win_len, self.win_k.shape[2])]
        return torch.cat(ks, 2), torch.cat(vs, 2), torch.cat(valid, 1)

    def _decode(self, query, key, value, positions, scaling) -> torch.Tensor:
        """``q`` decode steps at once (``q == 1`` in generation): each new token enters the window, and
        whenever a window is full its oldest 16 tokens are flushed (into the warm tier if there is one, whose
        overflow goes on into codes; else into codes directly).

        For ``q > 1`` the result equals ``q`` sequential calls: query ``t`` sees the codes, warm tokens and
        window as they stood at step ``t``; the flushes are the same 16-token blocks.
        """
        r_cap, q_len = self.win_k.shape[2], key.shape[2]
        old_win = list(self._host_win_len)
        # Host-side replay of the window: flushed[b][t] = stream tokens flushed before step t.
        flushed = [[0] * q_len for _ in range(self.batch)]
        for b, w in enumerate(old_win):
            gone = 0
            for t in range(q_len):
                if w + t - gone >= r_cap:
                    gone += BLOCK_TOKENS
                flushed[b][t] = gone
        total = [f[-1] for f in flushed]
        dev = self.device
        # The stream of exact tokens: the old window (slots < win_len) then the new tokens.
        sk, sv = torch.cat([self.win_k, key], 2), torch.cat([self.win_v, value], 2)
        spos = torch.cat([self.win_pos, positions.to(torch.int64)], 1)
        new = torch.ones(self.batch, q_len, dtype=torch.bool, device=dev)
        stream_valid = torch.cat([_first(self.win_len, r_cap), new], 1)
        order = _ordered_index(stream_valid, r_cap + q_len)  # stream slot of stream token i
        n_flush = torch.tensor(total, device=dev)
        idx = order[:, None, :max(total)].expand(-1, self.heads, -1)
        fk, fv = ops.gather_tokens(sk, idx), ops.gather_tokens(sv, idx)  # flushed tokens, oldest first
        fpos = spos[:, None, :].expand(-1, self.heads, -1).gather(2, idx)
        sink_valid = _first(self.sink_len, self.sink_k.shape[2])
        exact_k, exact_v, exact_mask = [self.sink_k], [self.sink_v], [sink_valid[:, None, :].expand(-1, q_len, -1)]
        if self.warm_cap:
            old_warm = list(self._host_warm_len)
            to_codes = [[max(0, w + f - self.warm_cap) for f in fl] for w, fl in zip(old_warm, flushed)]
            tier, src_pos = self._warm_flow(fk, fv, fpos, n_flush, to_codes)
            src_k, src_v = self._warm_floats(tier, src_pos)
            # Warm slot i (old tier, then this call's flushes) is in the tier at step t while
            # to_codes[t] <= i < old_warm + flushed[t].
            i = torch.arange(src_k.shape[2], device=dev)
            lo = torch.tensor(to_codes, device=dev)
            hi = torch.tensor(old_warm, device=dev)[:, None] + torch.tensor(flushed, device=dev)
            exact_k, exact_v = exact_k + [src_k], exact_v + [src_v]
            exact_mask.append((i[None, None] >= lo[:, :, None]) & (i[None, None] < hi[:, :, None]))
        else:
            to_codes, (src_k, src_v, src_pos) = flushed, (fk, fv, fpos)
        code_start = self.code_len.clone()
        n_codes = [c[-1] for c in to_codes]
        if max(n_codes):
            self._ensure_capacity(max(c + n for c, n in zip(self._host_code_len, n_codes)))
            m = max(n_codes)
            self._write(src_k[:, :, :m], src_v[:, :, :m], src_pos[:, :, :m], torch.tensor(n_codes, device=dev))
        # Stream token i is visible to query t while flushed[t] <= i <= old_win + t.
        f = torch.tensor(flushed, device=dev)  # [B, q]
        t = torch.arange(q_len, device=dev)
        rank = torch.where(stream_valid, stream_valid.long().cumsum(1) - 1, -1)  # stream index of each slot
        last = torch.tensor(old_win, device=dev)[:, None] + t[None]  # [B, q]
        exact_mask.append((rank[:, None, :] >= f[:, :, None]) & (rank[:, None, :] <= last[:, :, None]))
        exact_k, exact_v = exact_k + [sk], exact_v + [sv]
        n = max(self._host_code_len)
        out = ops.dequant_attention(
            query, self.k_codes[:, :, :n], self.k_scales[:, :, :n], self.v_codes[:, :, :n], self.v_scales[:, :, :n],
            self._code_positions()[:, :, :n], code_start[:, None] + torch.tensor(to_codes, device=dev),
            torch.cat(exact_k, 2), torch.cat(exact_v, 2), torch.cat(exact_mask, 2), *self._codec_args(), scaling)
        # The window keeps the stream tokens not flushed, left-aligned.
        keep = stream_valid & (rank >= n_flush[:, None])
        self._take(keep, sk, sv, spos, "win")
        self.win_len = keep.sum(1)
        self._host_win_len = [w + q_len - n for w, n in zip(old_win, total)]
        return out

    def _warm_flow(self, key, value, positions, count, to_codes) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Append ``count[b]`` tokens (``key``/``value`` ``[B, H, n, D]``, ``positions`` ``[B, H, n]``) to the warm
        tier, coded at ``warm_bits``, and drop its first ``to_codes[b][-1]`` tokens (at most ``warm_cap`` stay).

        Returns the tier before dropping (old tokens, then the appended ones): its code tensors
        ``(k_codes, k_scales, v_codes, v_scales)`` of ``N`` slots and int64 positions ``[B, H, N]``. The caller
        codes the dropped tokens from there, so a token is coded from its warm code however steps are grouped.
        """
        old = self._host_warm_len
        n_ext = max(w + c for w, c in zip(old, count.tolist()))
        tier = self._warm_tensors()
        if int(count.max()):
            ext = [torch.zeros(*x.shape[:2], n_ext, *x.shape[3:], dtype=x.dtype, device=x.device) for x in tier]
            ext_pos = torch.zeros(self.batch, self.heads, n_ext, dtype=torch.int64, device=self.device)
            held = min(self.warm_cap, n_ext)
            for e, x in zip(ext + [ext_pos], list(tier) + [self.warm_pos]):
                e[:, :, :held] = x[:, :, :held].to(e.dtype)
            ops.write_kv(*ext, key, value, positions, self.warm_len, count, *self._warm_args())
            _scatter_tokens(ext_pos, positions, self.warm_len, count)
        else:
            ext, ext_pos = list(tier), self.warm_pos.to(torch.int64)
        dropped = torch.tensor([m[-1] for m in to_codes], device=self.device)
        if int(count.max()):
            sel = (torch.arange(self.warm_cap, device=self.device)[None] + dropped[:, None]).clamp(max=n_ext - 1)
            sel = sel[:, None, :].expand(-1, self.heads, -1)
            names = ("warm_k_codes", "warm_k_scales", "warm_v_codes", "warm_v_scales")
            for name, e in zip(names, ext):
                setattr(self, name, e.gather(2, sel[..., None].expand(-1, -1, -1, e.shape[3])) if e.dim() == 4
                        else e.gather(2, sel))
            self.warm_pos = ext_pos.gather(2, sel).to(self._position_dtype())
            self.warm_len = self.warm_len + count - dropped
            self._host_warm_len = [w + c - d for w, c, d in zip(old, count.tolist(), dropped.tolist())]
        return tuple(ext), ext_pos

    def _write(self, key, value, positions, count) -> None:
        """Quantize and append ``count[b]`` tokens ``[B, H, n, D]`` at each sequence's physical end."""
        if key.shape[2] == 0:
            return
        ops.write_kv(self.k_codes, self.k_scales, self.v_codes, self.v_scales, key, value,
                     positions.to(torch.int64), self.code_len, count, *self._codec_args())
        if not self.evicting:
            starts = (self.code_len == 0) & (count > 0)
            self.code_pos0 = torch.where(starts, positions[:, 0, 0].to(torch.int64), self.code_pos0)
        else:
            _scatter_tokens(self.code_pos, positions, self.code_len, count)
        self.code_len += count
        self._host_code_len = [c + n for c, n in zip(self._host_code_len, count.tolist())]

    def _attend_over_held(self, query, key, value, real, scaling, held_back=None):
        """Attention of ``q`` new tokens (keys/values ``[B, H, q, D]``, ``real`` ``[B, q]``) over the codes, the exact
        segment, a chunk held back for its re-reading (``(keys, values, real)``, or None) and, causally, themselves.

        Returns ``(out [B, Hq, q, D], keys [B, H, E, D], mask [B, q, E])``: the output and the exact keys and mask
        it used (codes excluded).
        """
        q_len = key.shape[2]
        ek, ev, valid = self._exact_segment()
        own = torch.ones(q_len, q_len, dtype=torch.bool, device=self.device).tril()[None] & real[:, None, :]
        own = own | torch.eye(q_len, dtype=torch.bool, device=self.device)[None]
        ks, vs, seen = [ek], [ev], [valid[:, None, :].expand(-1, q_len, -1)]
        if held_back is not None:
            hk, hv, hreal = held_back
            ks, vs, seen = ks + [hk], vs + [hv], seen + [hreal[:, None, :].expand(-1, q_len, -1)]
        keys, values, mask = torch.cat(ks + [key], 2), torch.cat(vs + [value], 2), torch.cat(seen + [own], -1)
        n = max(self._host_code_len)  # slots past every sequence's end need no decoding
        out = ops.dequant_attention(query, self.k_codes[:, :, :n], self.k_scales[:, :, :n], self.v_codes[:, :, :n],
                                    self.v_scales[:, :, :n], self._code_positions()[:, :, :n], self.code_len, keys,
                                    values, mask, *self._codec_args(), scaling)
        return out, keys, mask

    def _chunk(self, query, key, value, real, positions, scaling) -> torch.Tensor:
        out = self._attend_over_held(query, key, value, real, scaling)[0]
        if self.evicting and self.preset.scorer == "reconstruction" \
                and int(real.sum(1).max()) >= self.preset.min_evict_tokens:
            # Held exactly until NexusCache.reconstruct() has re-read the chunk; the relax trial needs only
            # the last observation_window queries.
            tail = query[:, :, -self.preset.observation_window:] if self.relaxable else None
            self._deferred = (tail, key, value, real, positions, scaling)
            self._recon_scores = None
            return out
        self._compress(query, key, value, real, positions, scaling)
        self.chunks += 1
        return out

    def _reread(self, query, key, value, real, scaling) -> torch.Tensor:
        """Attention of a piece of the re-reading (``[B, H, r, D]`` keys/values of the deferred chunk's tokens
        read again) over everything the layer holds, its deferred chunk and the piece itself; nothing is
        stored. With a deferred chunk, keeps per candidate (window, then chunk: :meth:`_split`'s order) the
        largest attention probability (softmax over everything the layer holds and the piece) that any real
        query of the piece pays it (:func:`~nqcompile.policy.reconstruction.reconstruction_scores`)."""
        held_back = self._deferred[1:4] if self._deferred is not None else None
        out, keys, mask = self._attend_over_held(query, key, value, real, scaling, held_back)
        if held_back is not None:
            # The softmax of the scores runs over everything the layer holds, codes of earlier turns included.
            n = max(self._host_code_len)
            if self.kind == "exact":
                ck = self.k_codes[:, :, :n]
            else:
                pos = self._code_positions()[:, :, :n].expand(-1, self.heads, -1)
                ck = ops.dequant_kv(self.k_codes[:, :, :n], self.k_scales[:, :, :n], self.v_codes[:, :, :n],
                                    self.v_scales[:, :, :n], pos, *self._codec_args())[0]
            r, end = key.shape[2], n + keys.shape[2] - key.shape[2]  # end of the deferred chunk
            coded = _first(self.code_len, n)[:, None, :].expand(-1, r, -1)
            target = slice(end - held_back[0].shape[2] - self.win_k.shape[2], end)  # window, then the chunk
            scores = reconstruction_scores(query, torch.cat([ck.to(keys.dtype), keys], 2),
                                           torch.cat([coded, mask], -1) & real[:, :, None], scaling=scaling,
                                           target=target)
            self._recon_scores = scores if self._recon_scores is None else torch.maximum(self._recon_scores, scores)
        return out

    def reconstruction_candidates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction scores of the deferred chunk's eviction candidates, ``[B, H, R + L]`` float (``-inf``
        for sinks, window and padding), and their nominal keep budget ``[B]`` int64.

        Raises:
            RuntimeError: no chunk is deferred, or it has not been re-read yet.
        """
        scores = self._rescored_chunk_scores()
        _, key, value, real, positions, _ = self._deferred
        sp = self._split(key, value, real, positions)
        return scores.masked_fill(~sp.middle[:, None], float("-inf")), sp.budget

    def finish_deferred(self, budget: torch.Tensor) -> None:
        """Compress the deferred chunk keeping ``budget[b]`` (``[B]`` int64) tokens per head of sequence ``b``,
        ranked by their reconstruction scores (:meth:`_compress` keeps only candidates).

        Raises:
            RuntimeError: no chunk is deferred, or it has not been re-read yet.
        """
        scores = self._rescored_chunk_scores()
        tail, key, value, real, positions, scaling = self._deferred
        self._deferred = self._recon_scores = None
        self._compress(tail, key, value, real, positions, scaling, scores=scores, budget=budget)
        self.chunks += 1

    def _rescored_chunk_scores(self) -> torch.Tensor:
        if self._deferred is None or self._recon_scores is None:
            raise RuntimeError("no deferred chunk with reconstruction scores in this layer")
        return self._recon_scores

    def _split(self, key, value, real, positions) -> "_Split":
        """The window plus a chunk, split into the first chunk's sinks, the new window and the middle, with the
        middle's nominal keep budget per sequence (``eviction_ratio``; all of it in a short chunk)."""
        s_cap, r_cap = self.sink_k.shape[2], self.win_k.shape[2]
        pk, pv = torch.cat([self.win_k, key], 2), torch.cat([self.win_v, value], 2)
        ppos = torch.cat([self.win_pos, positions.to(torch.int64)], 1)
        preal = torch.cat([_first(self.win_len, r_cap), real], 1)
        rank = preal.cumsum(1) - 1
        n_real = preal.sum(1)
        n_sink = n_real.clamp(max=s_cap) if self.chunks == 0 else torch.zeros_like(n_real)
        n_win = (n_real - n_sink).clamp(max=r_cap)
        is_sink = preal & (rank < n_sink[:, None])
        is_win = preal & (rank >= (n_real - n_win)[:, None])
        middle = preal & ~is_sink & ~is_win
        budget = (n_real.double() * (1.0 - self.eviction_ratio)).round().long() - n_sink - n_win
        budget = torch.where(real.sum(1) < self.preset.min_evict_tokens, middle.sum(1), budget)  # short chunk: keep all
        return _Split(pk, pv, ppos, preal, is_sink, is_win, middle, n_sink, n_win, budget.clamp(min=0))

    def _compress(self, query, key, value, real, positions, scaling, *, scores=None, budget=None) -> None:
        """Split window + chunk into sinks (first chunk), kept-and-quantized middle and the new window.

        ``query`` holds the chunk's last ``query.shape[2]`` queries (or None); ``scores`` ``[B, H, R + L]`` and
        ``budget`` ``[B]`` replace the scorer's and the nominal budget (reconstruction scoring).
        """
        sp = self._split(key, value, real, positions)
        pk, pv, ppos, preal, middle = sp.pk, sp.pv, sp.ppos, sp.preal, sp.middle
        width = pk.shape[2]
        time = torch.arange(width, device=self.device)
        key_time = time[None].expand_as(preal)
        qtime = None
        if query is not None:
            q_real = real[:, real.shape[1] - query.shape[2]:]
            qtime = torch.where(q_real, time[width - query.shape[2]:][None],
                                torch.full_like(q_real, -1, dtype=torch.int64))
        if self.chunks == 0:
            self._set_norm(pk, pv, ppos, preal & ~sp.is_sink)
            if self.relaxable:
                self._relax_key_bits(query, pk, ppos, middle, qtime, key_time, preal, scaling)
            self._take(sp.is_sink, pk, pv, None, "sink")
            self.sink_len = sp.n_sink
        if self.evicting:
            if scores is None and self.scorer is None:  # reconstruction, chunk too short to evict: keeps all
                scores = torch.zeros(pk.shape[:3], device=self.device)
            elif scores is None:
                scores = self.scorer.score(query=query, key=pk, query_time=qtime, key_time=key_time, key_valid=preal,
                                           scaling=scaling)
            index, count = select_kept(scores, middle, sp.budget if budget is None else budget,
                                       pooling_kernel=self.preset.pooling_kernel)
        else:
            count = middle.sum(1)
            index = _ordered_index(middle, int(count.max()))[:, None].expand(-1, self.heads, -1)
            self._check_contiguous(ppos, index, count)
        kept_pos = ppos[:, None, :].expand(-1, self.heads, -1).gather(2, index)
        kept_k, kept_v = ops.gather_tokens(pk, index), ops.gather_tokens(pv, index)
        # The kept tokens join the warm tier behind its old tokens; what overflows goes to codes, oldest first:
        # old warm tokens (coded again from their warm codes), then the chunk's own (coded directly).
        old_warm = torch.tensor(self._host_warm_len, device=self.device)
        overflow = (old_warm + count - self.warm_cap).clamp(min=0)
        from_warm = torch.minimum(overflow, old_warm)
        direct = overflow - from_warm
        self._ensure_capacity(max(c + n for c, n in zip(self._host_code_len, overflow.tolist())))
        if self.warm_cap and index.shape[2]:
            j = (torch.arange(self.warm_cap, device=self.device)[None] + direct[:, None]).clamp(max=index.shape[2] - 1)
            j = j[:, None, :].expand(-1, self.heads, -1)
            tier, tier_pos = self._warm_flow(ops.gather_tokens(kept_k, j), ops.gather_tokens(kept_v, j),
                                             kept_pos.gather(2, j), count - direct, [[n] for n in from_warm.tolist()])
            n = int(from_warm.max())
            if n:
                wk, wv = self._warm_floats(tuple(t[:, :, :n] for t in tier), tier_pos[:, :, :n])
                self._write(wk, wv, tier_pos[:, :, :n], from_warm)
        m = int(direct.max())
        self._write(kept_k[:, :, :m], kept_v[:, :, :m], kept_pos[:, :, :m], direct)
        self._take(sp.is_win, pk, pv, ppos, "win")
        self.win_len = sp.n_win
        self._host_win_len = sp.n_win.tolist()

    def _relax_key_bits(self, query, pk, ppos, coded, qtime, key_time, key_valid, scaling) -> None:
        """Store keys at ``key_bits - 1`` if that moves the observation queries' attention by less than
        ``relax_key_kl`` (:func:`~nqcompile.policy.key_bits.trial_key_kl`; ``coded``: the tokens that become codes)
        in every sequence that codes at least ``MIN_TRIAL_TOKENS`` tokens; with none, the layer keeps its bits.

        The width is one per layer, so a sequence batched with others may keep wider keys than it would alone.
        """
        measured = coded.sum(1) >= MIN_TRIAL_TOKENS
        if not bool(measured.any()):
            return
        r = self.rotary
        trial = KVTransform(self.kind, self.key_bits - 1, self.value_bits, float(r.attention_scaling),
                            int(r.rotary_dim), r.layout)
        kl = trial_key_kl(query, pk, ppos, coded, transform=trial, hadamard=self.hadamard, inv_freq=self.inv_freq,
                          norm_mean=self.norm_mean[0], norm_scale=self.norm_scale[0], query_time=qtime,
                          key_time=key_time, key_valid=key_valid, window=self.preset.observation_window,
                          scaling=scaling)
        self.key_kl = float(kl[measured].max())
        if self.key_kl < self.preset.relax_key_kl:
            self.key_bits -= 1
            self._allocate_codes(0)  # nothing is coded or warm before the first chunk ends
            self._allocate_warm()

    def _take(self, select: torch.Tensor, pk, pv, ppos, prefix: str) -> None:
        """Copy the selected tokens (``select`` ``[B, L]``, in order) into the sink or window buffers."""
        buf_k = getattr(self, f"{prefix}_k")
        cap = buf_k.shape[2]
        index = _ordered_index(select, cap)
        keep = _first(select.sum(1), cap)
        hidx = index[:, None, :, None].expand(-1, self.heads, -1, self.head_dim)
        k = torch.where(keep[:, None, :, None], pk.gather(2, hidx), torch.zeros((), dtype=pk.dtype))
        v = torch.where(keep[:, None, :, None], pv.gather(2, hidx), torch.zeros((), dtype=pv.dtype))
        setattr(self, f"{prefix}_k", k.contiguous())
        setattr(self, f"{prefix}_v", v.contiguous())
        if ppos is not None:
            setattr(self, f"{prefix}_pos", torch.where(keep, ppos.gather(1, index), 0))

    def _set_norm(self, pk, pv, ppos, select) -> None:
        """Normalization statistics (:func:`~nqcompile.codec.kv.channel_statistics`) of the first chunk's real
        tokens other than the sinks (``select``; window and evicted tokens included); keys before RoPE."""
        if self.kind == "exact":
            return
        r = self.rotary
        pre = apply_rotary(pk.to(torch.promote_types(pk.dtype, torch.float32)), ppos[:, None, :], self.inv_freq,
                           attention_scaling=r.attention_scaling, rotary_dim=r.rotary_dim, layout=r.layout,
                           inverse=True)
        for i, (x, mode) in enumerate(((pre, self.preset.key_norm), (pv, self.preset.value_norm))):
            self.norm_mean[i], self.norm_scale[i] = channel_statistics(x, select, mode, rotary_dim=r.rotary_dim,
                                                                       layout=r.layout)

    def _check_contiguous(self, ppos, index, count) -> None:
        """Without eviction, code positions are implicit (``code_pos0 + slot``): check that the chunk's tokens
        continue the compressed past (codes, then the warm tier) position by position."""
        if int(count.max()) == 0:
            return
        got = ppos.gather(1, index[:, 0])
        after = self.code_pos0 + self.code_len  # the position that continues the compressed past
        if self.warm_cap:
            last_warm = self.warm_pos[:, 0].gather(1, (self.warm_len - 1).clamp(min=0)[:, None])[:, 0]
            after = torch.where(self.warm_len > 0, last_warm.long() + 1, after)
        first = torch.where(self.code_len + self.warm_len == 0, got[:, 0], after)
        expected = first[:, None] + torch.arange(index.shape[2], device=self.device)
        ok = (got == expected) | (torch.arange(index.shape[2], device=self.device)[None] >= count[:, None])
        if not bool(ok.all()):
            raise ValueError("without eviction NexusCache stores positions implicitly and needs consecutive "
                             "position_ids per sequence; got non-consecutive ones (use eviction_ratio > 0)")

    # ------------------------------------------------------------------ accounting
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor this layer holds, by attribute name."""
        if not self.is_initialized:
            return {}
        held = {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        if self._deferred is not None:  # a chunk waiting for its re-reading is held exactly
            names = ("deferred_query", "deferred_k", "deferred_v", "deferred_real", "deferred_pos")
            held.update({k: v for k, v in zip(names, self._deferred) if isinstance(v, torch.Tensor)})
        return held

    def unused_bytes(self) -> int:
        """Bytes preallocated for code, sink and window slots not holding a token yet."""
        per_slot = sum(t[:, :, :1].nbytes for t in (self.k_codes, self.v_codes, self.k_scales, self.v_scales)
                       if t.shape[2]) // max(self.batch, 1)
        if self.evicting:
            per_slot += self.code_pos[:, :, :1].nbytes // max(self.batch, 1)
        free_codes = sum(self.capacity - c for c in self._host_code_len)
        exact_slot = 2 * self.heads * self.head_dim * self.sink_k.element_size()
        free_exact = sum(self.win_k.shape[2] - w for w in self._host_win_len)
        free_exact += int((self.sink_k.shape[2] - self.sink_len).sum())
        warm_slot = sum(t[:, :, :1].nbytes for t in (*self._warm_tensors(), self.warm_pos) if t.shape[2]) // max(self.batch, 1)
        free_warm = sum(self.warm_cap - w for w in self._host_warm_len)
        return free_codes * per_slot + free_exact * exact_slot + free_warm * warm_slot

    def physical_tokens(self) -> int:
        deferred = int(self._deferred[3].sum()) if self._deferred is not None else 0
        return (int(self.sink_len.sum()) + sum(self._host_code_len) + sum(self._host_warm_len)
                + sum(self._host_win_len) + deferred)


class _Split(NamedTuple):
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


def _scatter_tokens(buf: torch.Tensor, values: torch.Tensor, dest: torch.Tensor, count: torch.Tensor) -> None:
    """``buf[b, :, dest[b] + j] = values[b, :, j]`` for ``j < count[b]`` (``buf`` ``[B, H, C, ...]``, ``values``
    ``[B, H, n, ...]``, ``dest`` and ``count`` ``[B]`` int64), cast to ``buf``'s dtype."""
    j = torch.arange(values.shape[2], device=values.device)
    b_idx, j_idx = (j[None] < count[:, None]).nonzero(as_tuple=True)
    buf[b_idx, :, dest[b_idx] + j_idx] = values[b_idx, :, j_idx].to(buf.dtype)


def _first(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """``[B, width]`` bool: slot ``j`` of row ``b`` is one of the first ``lengths[b]`` (``[B]`` int64)."""
    return torch.arange(width, device=lengths.device)[None] < lengths[:, None]


def _ordered_index(select: torch.Tensor, width: int) -> torch.Tensor:
    """Indices ``[B, width]`` of the True entries of ``select`` ``[B, L]`` in order (0 past the last)."""
    if width == 0:
        return select.new_zeros(select.shape[0], 0, dtype=torch.int64)
    order = torch.where(select, torch.arange(select.shape[1], device=select.device)[None], select.shape[1])
    index = order.sort(dim=1).values[:, :width]
    if index.shape[1] < width:
        index = torch.cat([index, index.new_full((index.shape[0], width - index.shape[1]), select.shape[1])], 1)
    return torch.where(index < select.shape[1], index, 0)
