"""What one compressed layer holds: :class:`LayerStorage` (every buffer and length) and :class:`CodecParams`.

Per sequence of the batch a layer holds, in time order:

* ``sink_tokens`` attention sinks, uncompressed in ``window_dtype`` (``sink_k``, ``sink_v``, ``sink_len``);
* the compressed past: packed codes, one-byte scales and (when the layer evicts) positions, in buffers of
  static capacity laid out as :mod:`nqcompile.ops.layout` documents (``k_codes`` ... ``code_len``);
* optionally a warm tier of the ``warm_cap`` newest compressed tokens, coded at ``warm_bits``
  (``warm_k_codes`` ... ``warm_pos``, ``warm_len``);
* a recent window of ``recent_window`` uncompressed tokens in ``window_dtype`` (``win_k``, ``win_v``) with their
  positions.

``window_dtype`` is :meth:`Preset.window_dtype_for <nqcompile.presets.Preset.window_dtype_for>`: bfloat16 in a
quantized layer of a float32 model (by default), else the model's dtype.

The tiers and the window flush (:mod:`.tiers`), the chunk-end compression (:mod:`.compress`) and the
re-reading of deferred chunks (:mod:`.reread`) are functions over this object; the transformers face of the
layer is :class:`~nqcompile.cache.layer.NexusLayer`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .. import ops
from ..codec.hadamard import hadamard_matrix
from ..codec.kv import KVTransform, decode_keys, encode_keys
from ..codec.registry import CODECS
from ..models.rope_spec import RotarySpec
from ..ops.layout import BLOCK_TOKENS, round_up_to_block
from ..ops.reference import write_slots
from ..presets import Preset

__all__ = ["CodecParams", "LayerStorage", "first_slots", "ordered_index", "take_slots"]


@dataclass(frozen=True, eq=False)
class CodecParams:
    """The codec arguments every storage op takes after its data tensors: the tensors of one layer's codec and its
    static :class:`~nqcompile.codec.kv.KVTransform`.

    Attributes:
        hadamard: ``[D, D]`` float32 orthonormal Hadamard matrix: :func:`~nqcompile.codec.hadamard.hadamard_matrix`'s
            cached copy for ``(D, device)``, one per process, shared by every layer of every cache (so not part of a
            cache's own bytes: :meth:`LayerStorage.shared_tensors`).
        inv_freq: ``[rotary_dim / 2]`` float32 RoPE inverse frequencies.
        norm_mean, norm_scale: ``[2, B, H, D]`` float32 per-channel normalization (``[0]`` pre-RoPE keys,
            ``[1]`` values), filled in place at the first chunk.
        transform: codec name and bits (``key_bits``/``value_bits`` 0 for ``"exact"``) and the layer's RoPE.
    """

    hadamard: torch.Tensor
    inv_freq: torch.Tensor
    norm_mean: torch.Tensor
    norm_scale: torch.Tensor
    transform: KVTransform

    def __getattr__(self, name: str):  # kind, key_bits, value_bits, attention_scaling, rotary_dim, layout
        if name in _TRANSFORM_FIELDS:
            return getattr(self.transform, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def as_op_args(self) -> tuple:
        """The positional codec arguments of :func:`nqcompile.ops.write_kv` and the other storage ops."""
        return (self.hadamard, self.inv_freq, self.norm_mean, self.norm_scale,
                *(getattr(self.transform, name) for name in _TRANSFORM_FIELDS))

    def with_bits(self, key_bits: int, value_bits: int) -> "CodecParams":
        """The same parameters (same tensors) at other bit widths."""
        return dataclasses.replace(self, transform=dataclasses.replace(self.transform, key_bits=key_bits,
                                                                       value_bits=value_bits))


_TRANSFORM_FIELDS = tuple(f.name for f in dataclasses.fields(KVTransform))
#: CodecParams tensors shared by every layer of every cache in the process (not a cache's own bytes).
_SHARED = ("hadamard",)


class LayerStorage:
    """Every buffer and length of one compressed layer (module docstring), allocated for one batch.

    Args:
        preset: the cache's preset (sink, window and warm-tier sizes).
        bits: ``(key_bits, value_bits)``, or ``None`` for exact storage in the model's dtype.
        store_positions: keep each coded token's position (a layer that evicts; otherwise positions are
            implicit, ``code_pos0 + slot``).
        rotary: the layer's RoPE.
        batch, heads, head_dim: ``B``, KV heads ``H``, ``D``. dtype, device: the model's (the sinks and window are
            held in ``window_dtype``, :meth:`~nqcompile.presets.Preset.window_dtype_for`).
        position_dtype: ``torch.int16`` or ``torch.int32`` for stored positions.

    Every length is a device tensor; nothing here keeps a host copy, so a decode step never synchronizes.
    """

    def __init__(self, *, preset: Preset, bits: tuple[int, int] | None, store_positions: bool, rotary: RotarySpec,
                 batch: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 position_dtype: torch.dtype):
        self.preset, self.store_positions, self.position_dtype = preset, store_positions, position_dtype
        self.batch, self.heads, self.head_dim, self.dtype, self.device = batch, heads, head_dim, dtype, device
        self.window_dtype = preset.window_dtype_for(dtype, bits if bits is not None else (None, None))
        kw = dict(dtype=self.window_dtype, device=device)
        i64 = dict(dtype=torch.int64, device=device)
        s, r = preset.sink_tokens, preset.recent_window
        self.sink_k, self.sink_v = torch.zeros(batch, heads, s, head_dim, **kw), torch.zeros(batch, heads, s, head_dim, **kw)
        self.sink_len = torch.zeros(batch, **i64)
        self.win_k, self.win_v = torch.zeros(batch, heads, r, head_dim, **kw), torch.zeros(batch, heads, r, head_dim, **kw)
        self.win_pos = torch.zeros(batch, r, **i64)
        self.win_len = torch.zeros(batch, **i64)
        self.code_len = torch.zeros(batch, **i64)
        self.code_pos0 = torch.zeros(batch, **i64)
        f32 = dict(dtype=torch.float32, device=device)
        key_bits, value_bits = bits if bits is not None else (0, 0)
        transform = KVTransform("exact" if bits is None else preset.codec, key_bits, value_bits,
                                float(rotary.attention_scaling), int(rotary.rotary_dim), rotary.layout)
        self.codec = CodecParams(hadamard=hadamard_matrix(head_dim, device=device), inv_freq=rotary.inv_freq.to(device),
                                 norm_mean=torch.zeros(2, batch, heads, head_dim, **f32),
                                 norm_scale=torch.ones(2, batch, heads, head_dim, **f32), transform=transform)
        self._allocate_codes(0)
        self._allocate_warm()

    # ------------------------------------------------------------------ shape and allocation
    @property
    def kind(self) -> str:
        return self.codec.kind

    @property
    def warm_codec(self) -> CodecParams:
        """Codec parameters of the warm tier (``warm_bits`` for keys and values)."""
        return self.codec.with_bits(self.preset.warm_bits, self.preset.warm_bits)

    def set_key_bits(self, key_bits: int) -> None:
        """Store keys at ``key_bits`` from now on; only before anything is coded (the buffers are reallocated)."""
        if int(self.code_len.sum()) or int(self.warm_len.sum()):
            raise RuntimeError("key bits can only change before any token is coded")
        self.codec = self.codec.with_bits(key_bits, self.codec.value_bits)
        self._allocate_codes(0)
        self._allocate_warm()

    def round_trip_keys(self, key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor,
                        key_bits: int) -> torch.Tensor:
        """``key`` coded with this layer's codec at ``key_bits`` and decoded, without touching the layer's buffers:
        float32 ``[B, H, L, D]`` post-RoPE keys (``key``, ``value`` ``[B, H, L, D]``; ``positions`` ``[B, L]``).

        On CUDA through :func:`nqcompile.ops.write_kv` and :func:`nqcompile.ops.dequant_kv` into temporary buffers,
        which run their Triton kernels there (the values are coded beside the keys and dropped: about 1% of an
        8,192-token write on an H200, against about 0.4 s per layer for the reference encoder); elsewhere the keys
        alone through the reference codec (:mod:`nqcompile.codec.kv`), which the ops would also run for the values.
        """
        c = self.codec.with_bits(key_bits, self.codec.value_bits)
        pos = positions[:, None, :].expand(-1, self.heads, -1).to(torch.int64)
        if key.device.type != "cuda":
            mean, scale = c.norm_mean[0], c.norm_scale[0]
            codes, scales = encode_keys(key, pos, c.hadamard, c.inv_freq, mean, scale, c.transform)
            return decode_keys(codes, scales, pos, c.hadamard, c.inv_freq, mean, scale, c.transform)
        return _round_trip_through_ops(key, value, pos, c)

    def _code_row_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...], torch.dtype]:
        d, c = self.head_dim, self.codec
        if c.kind == "exact":
            return (d,), (d,), self.dtype
        code = CODECS[c.kind]
        return (code.bytes_per_vector(c.key_bits, d),), (code.bytes_per_vector(c.value_bits, d),), torch.uint8

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
        if self.store_positions:
            new["code_pos"] = torch.zeros(b, h, capacity, dtype=self.position_dtype, device=self.device)
        for name, tensor in new.items():
            old = getattr(self, name, None)
            if old is not None and old.shape[2] > 0:
                keep = min(old.shape[2], capacity)  # slots past every sequence's end may be dropped
                tensor[:, :, :keep] = old[:, :, :keep]
            setattr(self, name, tensor)
        self.capacity = capacity

    def _allocate_warm(self) -> None:
        """(Re)allocate an empty warm tier of ``warm_cap`` slots for the layer's bits (``Preset.warm_tokens_for``)."""
        c = self.codec
        self.warm_cap = self.preset.warm_tokens_for((c.key_bits, c.value_bits)) if c.kind != "exact" else 0
        b, h, w = self.batch, self.heads, self.warm_cap
        row = CODECS[c.kind].bytes_per_vector(self.preset.warm_bits, self.head_dim) if w else 0
        u8 = dict(dtype=torch.uint8, device=self.device)
        self.warm_k_codes, self.warm_v_codes = torch.zeros(b, h, w, row, **u8), torch.zeros(b, h, w, row, **u8)
        self.warm_k_scales, self.warm_v_scales = torch.zeros(b, h, w, **u8), torch.zeros(b, h, w, **u8)
        self.warm_pos = torch.zeros(b, h, w, dtype=self.position_dtype, device=self.device)
        self.warm_len = torch.zeros(b, dtype=torch.int64, device=self.device)

    def widen_positions(self, dtype: torch.dtype) -> None:
        """Store positions as ``dtype`` from now on (int32 once the logical capacity no longer fits int16)."""
        self.position_dtype = dtype
        for name in ("code_pos", "warm_pos"):
            if name in self.__dict__ and getattr(self, name).dtype != dtype:
                setattr(self, name, getattr(self, name).to(dtype))

    def ensure_capacity(self, needed: int) -> None:
        """Grow the code buffers (by half at least) so that ``needed`` token slots per sequence exist."""
        if needed > self.capacity:
            self._allocate_codes(round_up_to_block(max(needed, int(self.capacity * 1.5))))

    def reserve_for_decode(self, spare: int | None) -> None:
        """Size the code buffers for ``spare`` more tokens of static decode steps (a plan step, at a chunk end).

        Decode steps flush whole blocks of the window (through the warm tier, which only passes on what enters it),
        so ``spare`` tokens add at most ``F = round_up(max(0, win_len + spare - recent_window))`` codes; every step
        also writes one block at the codes' end (a static shape, unchanged where nothing is flushed), and a chunk
        replayed as ``q <= spare`` decode steps writes ``round_up(q)`` slots there. The capacity becomes
        ``max(code_len) + max(F + BLOCK_TOKENS, round_up(spare))``, rounded up to a block: the buffers shrink as
        well as grow, so what a cache allocates follows what it keeps. ``spare=None`` (no known logical capacity)
        only grows, by half at least; the decode step then checks the room on the host.
        """
        code = int(self.code_len.max())
        if spare is None:
            self.ensure_capacity(code + BLOCK_TOKENS)
            return
        flushed = round_up_to_block(max(0, int(self.win_len.max()) + spare - self.win_k.shape[2]))
        target = round_up_to_block(code + max(flushed + BLOCK_TOKENS, round_up_to_block(spare)))
        if target != self.capacity:
            self._allocate_codes(target)

    def mark_static(self) -> None:
        """Mark every buffer as a static address for ``torch.compile`` (CUDA graphs replay over them in place)."""
        for t in (*self.tensors().values(), *self.shared_tensors().values()):
            torch._dynamo.mark_static_address(t)

    # ------------------------------------------------------------------ reading and writing
    def code_positions(self) -> torch.Tensor:
        """Positions of the code slots, ``[B, H or 1, C]`` (stored, or implicit ``code_pos0 + slot``)."""
        if self.store_positions:
            return self.code_pos
        slots = torch.arange(self.capacity, device=self.device)
        return (self.code_pos0[:, None] + slots[None, :])[:, None, :]

    def write(self, key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor, count: torch.Tensor) -> None:
        """Quantize and append ``count[b]`` (``[B]`` int64) of the tokens ``[B, H, n, D]`` (post-RoPE keys, values;
        ``positions`` ``[B, H, n]``) at each sequence's physical end, in place; the capacity must hold
        ``code_len[b] + n`` slots for every ``b`` (:func:`nqcompile.ops.write_kv`)."""
        if key.shape[2] == 0:
            return
        ops.write_kv(self.k_codes, self.k_scales, self.v_codes, self.v_scales, key, value,
                     positions.to(torch.int64), self.code_len, count, *self.codec.as_op_args())
        if not self.store_positions:
            starts = (self.code_len == 0) & (count > 0)
            self.code_pos0.copy_(torch.where(starts, positions[:, 0, 0].to(torch.int64), self.code_pos0))
        else:
            write_slots(self.code_pos, positions, self.code_len, count)
        self.code_len.add_(count)

    def take(self, select: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor, ppos: torch.Tensor | None,
             prefix: str) -> None:
        """Replace the ``"sink"`` or ``"win"`` buffers by the selected tokens (``select`` ``[B, L]``, in order) of
        ``pk``/``pv`` ``[B, H, L, D]`` (positions ``ppos`` ``[B, L]``, the window's)."""
        buf_k = getattr(self, f"{prefix}_k")
        cap = buf_k.shape[2]
        index = ordered_index(select, cap)
        keep = first_slots(select.sum(1), cap)
        hidx = index[:, None, :, None].expand(-1, self.heads, -1, self.head_dim)
        k = torch.where(keep[:, None, :, None], pk.gather(2, hidx), torch.zeros((), dtype=pk.dtype))
        v = torch.where(keep[:, None, :, None], pv.gather(2, hidx), torch.zeros((), dtype=pv.dtype))
        setattr(self, f"{prefix}_k", k.to(self.window_dtype).contiguous())
        setattr(self, f"{prefix}_v", v.to(self.window_dtype).contiguous())
        if ppos is not None:
            setattr(self, f"{prefix}_pos", torch.where(keep, ppos.gather(1, index), 0))

    def warm_tensors(self) -> tuple[torch.Tensor, ...]:
        """The warm tier's ``(k_codes, k_scales, v_codes, v_scales)``."""
        return self.warm_k_codes, self.warm_k_scales, self.warm_v_codes, self.warm_v_scales

    def decode_warm(self, tensors: tuple[torch.Tensor, ...], positions: torch.Tensor):
        """Decode warm-tier codes (``k_codes, k_scales, v_codes, v_scales``) at ``positions`` ``[B, H, n]``:
        float32 keys (RoPE re-applied) and values ``[B, H, n, D]``."""
        return ops.dequant_kv(*tensors, positions, *self.warm_codec.as_op_args())

    def exact_segment(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sinks, warm tier (decoded) and window: keys/values ``[B, H, S + W + R, D]``, validity ``[B, S + W + R]``."""
        ks, vs, valid = [self.sink_k], [self.sink_v], [first_slots(self.sink_len, self.sink_k.shape[2])]
        if self.warm_cap:
            wk, wv = self.decode_warm(self.warm_tensors(), self.warm_pos)
            ks, vs, valid = ks + [wk], vs + [wv], valid + [first_slots(self.warm_len, self.warm_cap)]
        ks, vs, valid = ks + [self.win_k], vs + [self.win_v], valid + [first_slots(self.win_len, self.win_k.shape[2])]
        return torch.cat(ks, 2), torch.cat(vs, 2), torch.cat(valid, 1)

    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
               scaling: float, code_len: torch.Tensor | None = None, *, full: bool = False, with_lse: bool = False):
        """Attention of ``query`` ``[B, Hq, q, D]`` over the codes and the exact ``keys``/``values`` ``[B, H, E, D]``
        (``mask`` ``[B, q, E]``) through :func:`nqcompile.ops.dequant_attention`; ``code_len`` ``[B]`` or ``[B, q]``
        limits the codes each query sees (default: all held). ``full`` passes every slot of the capacity (static
        shapes, a decode step); otherwise only the slots up to the longest sequence's end, read on the host.

        Returns:
            ``[B, Hq, q, D]`` in the query's dtype; with ``with_lse``, also each query's log-sum-exp ``[B, Hq, q]``
            (:func:`nqcompile.ops.dequant_attention_lse`).
        """
        n = self.capacity if full else int(self.code_len.max())
        op = ops.dequant_attention_lse if with_lse else ops.dequant_attention
        return op(query, self.k_codes[:, :, :n], self.k_scales[:, :, :n], self.v_codes[:, :, :n],
                  self.v_scales[:, :, :n], self.code_positions()[:, :, :n], self.code_len if code_len is None else code_len,
                  keys, values, mask, *self.codec.as_op_args(), scaling)

    def attend_chunk(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, real: torch.Tensor,
                     scaling: float, held_back: tuple[torch.Tensor, ...] | None = None, *, with_lse: bool = False):
        """Attention of ``q`` new tokens (keys/values ``[B, H, q, D]``, ``real`` ``[B, q]``) over the codes, the exact
        segment, a chunk held back for its re-reading (``(keys, values, real)``, or None) and, causally, themselves.

        Returns ``(out [B, Hq, q, D], lse [B, Hq, q] or None, keys [B, H, E, D], mask [B, q, E])``: the output, each
        query's log-sum-exp (``with_lse``), and the exact keys and mask it used (codes excluded).
        """
        q_len = key.shape[2]
        ek, ev, valid = self.exact_segment()
        own = torch.ones(q_len, q_len, dtype=torch.bool, device=self.device).tril()[None] & real[:, None, :]
        own = own | torch.eye(q_len, dtype=torch.bool, device=self.device)[None]
        ks, vs, seen = [ek], [ev], [valid[:, None, :].expand(-1, q_len, -1)]
        if held_back is not None:
            hk, hv, hreal = held_back
            ks, vs, seen = ks + [hk], vs + [hv], seen + [hreal[:, None, :].expand(-1, q_len, -1)]
        keys, values, mask = torch.cat(ks + [key], 2), torch.cat(vs + [value], 2), torch.cat(seen + [own], -1)
        result = self.attend(query, keys, values, mask, scaling, with_lse=with_lse)
        out, lse = result if with_lse else (result, None)
        return out, lse, keys, mask

    # ------------------------------------------------------------------ accounting
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor this layer owns, by name: buffers, lengths and the codec's per-layer tensors (normalization
        statistics, RoPE frequencies); not the :meth:`shared_tensors`."""
        held = {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        held.update({f.name: getattr(self.codec, f.name) for f in dataclasses.fields(self.codec)
                     if isinstance(getattr(self.codec, f.name), torch.Tensor) and f.name not in _SHARED})
        return held

    def shared_tensors(self) -> dict[str, torch.Tensor]:
        """Codec constants the layer reads but does not own, by name: the ``[D, D]`` float32 Hadamard matrix, built
        once per process and device by :func:`~nqcompile.codec.hadamard.hadamard_matrix` and shared by every layer of
        every cache (freeing a cache does not free it)."""
        return {name: getattr(self.codec, name) for name in _SHARED}

    def unused_bytes(self) -> int:
        """Bytes preallocated for code, warm, sink and window slots not holding a token yet."""
        b = max(self.batch, 1)
        per_slot = sum(t[:, :, :1].nbytes for t in (self.k_codes, self.v_codes, self.k_scales, self.v_scales)
                       if t.shape[2]) // b
        if self.store_positions:
            per_slot += self.code_pos[:, :, :1].nbytes // b
        free_codes = int((self.capacity - self.code_len).sum())
        exact_slot = 2 * self.heads * self.head_dim * self.sink_k.element_size()
        free_exact = int((self.win_k.shape[2] - self.win_len).sum())
        free_exact += int((self.sink_k.shape[2] - self.sink_len).sum())
        warm_slot = sum(t[:, :, :1].nbytes for t in (*self.warm_tensors(), self.warm_pos) if t.shape[2]) // b
        free_warm = int((self.warm_cap - self.warm_len).sum())
        return free_codes * per_slot + free_exact * exact_slot + free_warm * warm_slot

    def physical_tokens(self) -> int:
        """Tokens held, summed over the batch: sinks, codes, warm tier and window."""
        return int((self.sink_len + self.code_len + self.warm_len + self.win_len).sum())


def take_slots(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``out[b, h, k, ...] = x[b, h, index[b, h, k], ...]`` for ``x`` ``[B, H, L, ...]`` (codes or scales) and ``index``
    ``[B, H, K]`` int64."""
    shaped = index.view(*index.shape, *([1] * (x.dim() - 3)))
    return x.gather(2, shaped.expand(*index.shape, *x.shape[3:]))


def first_slots(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """``[B, width]`` bool: slot ``j`` of row ``b`` is one of the first ``lengths[b]`` (``[B]`` int64)."""
    return torch.arange(width, device=lengths.device)[None] < lengths[:, None]


def ordered_index(select: torch.Tensor, width: int) -> torch.Tensor:
    """Indices ``[B, width]`` of the True entries of ``select`` ``[B, L]`` in order (0 past the last)."""
    if width == 0:
        return select.new_zeros(select.shape[0], 0, dtype=torch.int64)
    order = torch.where(select, torch.arange(select.shape[1], device=select.device)[None], select.shape[1])
    index = order.sort(dim=1).values[:, :width]
    if index.shape[1] < width:
        index = torch.cat([index, index.new_full((index.shape[0], width - index.shape[1]), select.shape[1])], 1)
    return torch.where(index < select.shape[1], index, 0)


def _round_trip_through_ops(key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor,
                            codec: CodecParams) -> torch.Tensor:
    """:meth:`LayerStorage.round_trip_keys` through the storage ops: ``key``/``value`` ``[B, H, L, D]`` written by
    :func:`nqcompile.ops.write_kv` into buffers of ``L`` slots and decoded by :func:`nqcompile.ops.dequant_kv`
    (``positions`` int64 ``[B, H, L]``); returns the float32 keys ``[B, H, L, D]``."""
    b, h, n, d = key.shape
    code = CODECS[codec.kind]
    k_codes = torch.empty(b, h, n, code.bytes_per_vector(codec.key_bits, d), dtype=torch.uint8, device=key.device)
    v_codes = torch.empty(b, h, n, code.bytes_per_vector(codec.value_bits, d), dtype=torch.uint8, device=key.device)
    k_scales = torch.empty(b, h, n, dtype=torch.uint8, device=key.device)
    v_scales = torch.empty(b, h, n, dtype=torch.uint8, device=key.device)
    dest = torch.zeros(b, dtype=torch.int64, device=key.device)
    ops.write_kv(k_codes, k_scales, v_codes, v_scales, key, value, positions, dest, dest + n, *codec.as_op_args())
    return ops.dequant_kv(k_codes, k_scales, v_codes, v_scales, positions, *codec.as_op_args())[0]
