"""``torch.library`` custom ops (torch reference and fake implementations): the boundaries between the cache, the compiler passes and the kernels.

Every step that touches compressed storage goes through one of these ops, each with a torch reference
implementation (below) and a fake (meta) implementation, so the ``nexusquant`` backend can match them
in a graph and the Triton kernels can replace the reference on CUDA without the cache changing.

The storage layout the ops read and write is in :mod:`nqcompile.ops.layout`.

Ops:
    ``nqcompile::write_kv``               quantize new keys/values and write them at per-sequence offsets (mutating).
    ``nqcompile::gather_tokens``          evict/compact: keep the selected tokens of a chunk, in order.
    ``nqcompile::dequant_kv``             decode stored tokens back to float keys (RoPE re-applied) and values.
    ``nqcompile::dequant_attention``      attention of queries over codes (decoded blockwise) plus an exact segment.
    ``nqcompile::dequant_attention_lse``  the same, also returning each query's log-sum-exp.
"""

from __future__ import annotations

import torch

from ..codec.kv import KVTransform, decode_keys, decode_values, encode_keys, encode_values, fold_values, value_rows
from .blockwise import attention_blocks, compute_dtype, tile_sizes

__all__ = ["write_kv", "gather_tokens", "dequant_kv", "dequant_attention", "dequant_attention_lse", "write_slots"]


# The reference encoder sizes its E8 codebook search by the data (which blocks overflow the codebook), so it cannot
# run inside a CUDA-graph capture: tagged cudagraph_unsafe, Inductor runs it between CUDA-graph partitions.
@torch.library.custom_op("nqcompile::write_kv", mutates_args=("k_codes", "k_scales", "v_codes", "v_scales"),
                         tags=(torch.Tag.cudagraph_unsafe,))
def write_kv(
    k_codes: torch.Tensor, k_scales: torch.Tensor, v_codes: torch.Tensor, v_scales: torch.Tensor,
    key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor, dest: torch.Tensor, count: torch.Tensor,
    hadamard: torch.Tensor, inv_freq: torch.Tensor, norm_mean: torch.Tensor, norm_scale: torch.Tensor,
    kind: str, key_bits: int, value_bits: int, attention_scaling: float, rotary_dim: int, layout: str,
) -> None:
    """Quantize ``count[b]`` new tokens of each sequence and write them at slots ``dest[b], dest[b] + 1, ...``.

    Args:
        k_codes, k_scales, v_codes, v_scales: the layer's storage (see the module docstring), mutated.
        key: ``[B, H, n, D]`` post-RoPE keys, model dtype. value: ``[B, H, n, D]``.
        positions: ``[B, H, n]`` int64 positions of the keys (for RoPE removal).
        dest: ``[B]`` int64 first slot written per sequence. count: ``[B]`` int64 tokens written (<= n);
            token ``j`` of sequence ``b`` is written only when ``j < count[b]``. Shapes are static: slots
            ``dest[b] .. dest[b] + n - 1`` are read (and those past ``count[b]`` written back unchanged), so they
            must all lie inside the capacity ``C``.
        hadamard: ``[D, D]`` float32. inv_freq: ``[rotary_dim / 2]`` float32.
        norm_mean, norm_scale: ``[2, B, H, D]`` float32 per-channel normalization, ``[0]`` of the pre-RoPE keys,
            ``[1]`` of the values (``x = (k - mean) / scale`` is what gets coded).
        kind, key_bits, value_bits, attention_scaling, rotary_dim, layout: see :class:`~nqcompile.codec.kv.KVTransform`.
    """
    _write(k_codes, k_scales, v_codes, v_scales, key, value, positions, dest, count, hadamard, inv_freq, norm_mean,
           norm_scale, kind, key_bits, value_bits, attention_scaling, rotary_dim, layout)


def _write(k_codes, k_scales, v_codes, v_scales, key, value, positions, dest, count, hadamard, inv_freq, norm_mean,
           norm_scale, kind, key_bits, value_bits, attention_scaling, rotary_dim, layout) -> None:
    """The torch reference of :func:`write_kv` (its CUDA implementation falls back to it)."""
    # Nothing to write (a static decode step with no flush). On CUDA this reads ``count`` back to the host: the
    # encoder below synchronizes anyway (its codebook search is sized by the data), and skipping it saves the
    # thousands of small launches it costs on each of the steps that flush nothing (about 50 ms per layer and
    # step on an H200 for a Llama-3.1-8B-shaped layer).
    if key.shape[2] == 0 or not bool(count.any()):
        return
    if kind == "exact":
        kc, vc, ks, vs = key, value, None, None
    else:
        t = KVTransform(kind, key_bits, value_bits, attention_scaling, rotary_dim, layout)
        kc, ks = encode_keys(key, positions, hadamard, inv_freq, norm_mean[0], norm_scale[0], t)
        vc, vs = encode_values(value, hadamard, norm_mean[1], norm_scale[1], t)
    write_slots(k_codes, kc, dest, count)
    write_slots(v_codes, vc, dest, count)
    if ks is not None:
        write_slots(k_scales, ks, dest, count)
        write_slots(v_scales, vs, dest, count)


def write_slots(buf: torch.Tensor, new: torch.Tensor, dest: torch.Tensor, count: torch.Tensor) -> None:
    """``buf[b, :, dest[b] + j] = new[b, :, j]`` for ``j < count[b]``, in place with static shapes (slots ``j >=
    count[b]`` are read and written back unchanged). ``buf`` ``[B, H, C, ...]``, ``new`` ``[B, H, n, ...]``."""
    n = new.shape[2]
    slot = dest[:, None] + torch.arange(n, device=buf.device)[None]  # [B, n]
    index = slot.view(slot.shape[0], 1, n, *([1] * (buf.dim() - 3))).expand(*new.shape)
    keep = (torch.arange(n, device=buf.device)[None] < count[:, None]).view(index.shape[0], 1, n,
                                                                          *([1] * (buf.dim() - 3)))
    buf.scatter_(2, index, torch.where(keep, new.to(buf.dtype), buf.gather(2, index)))


@write_kv.register_fake
def _(k_codes, k_scales, v_codes, v_scales, key, value, positions, dest, count, hadamard, inv_freq, norm_mean,
      norm_scale, kind, key_bits, value_bits, attention_scaling, rotary_dim, layout) -> None:
    return None


@torch.library.custom_op("nqcompile::gather_tokens", mutates_args=())
def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Evict/compact: ``out[b, h, k] = x[b, h, index[b, h, k]]``.

    Args:
        x: ``[B, H, L, D]`` any dtype. index: ``[B, H, K]`` int64 token indices (kept tokens, ascending).

    Returns:
        ``[B, H, K, D]`` in ``x``'s dtype.
    """
    return x.gather(2, index[..., None].expand(*index.shape, x.shape[-1]))  # a new tensor: no clone needed


@gather_tokens.register_fake
def _(x, index):
    return x.new_empty(*index.shape, x.shape[-1])


def _decode(k_codes, k_scales, v_codes, v_scales, positions, hadamard, inv_freq, norm_mean, norm_scale, kind,
            key_bits, value_bits, attention_scaling, rotary_dim, layout) -> tuple[torch.Tensor, torch.Tensor]:
    t = KVTransform(kind, key_bits, value_bits, attention_scaling, rotary_dim, layout)
    return (decode_keys(k_codes, k_scales, positions, hadamard, inv_freq, norm_mean[0], norm_scale[0], t),
            decode_values(v_codes, v_scales, hadamard, norm_mean[1], norm_scale[1], t))


@torch.library.custom_op("nqcompile::dequant_kv", mutates_args=())
def dequant_kv(
    k_codes: torch.Tensor, k_scales: torch.Tensor, v_codes: torch.Tensor, v_scales: torch.Tensor,
    positions: torch.Tensor, hadamard: torch.Tensor, inv_freq: torch.Tensor, norm_mean: torch.Tensor,
    norm_scale: torch.Tensor, kind: str, key_bits: int, value_bits: int, attention_scaling: float, rotary_dim: int,
    layout: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode ``n`` stored tokens: the inverse of :func:`write_kv` up to quantization error.

    Args:
        k_codes, k_scales, v_codes, v_scales: uint8 codes ``[B, H, n, bits * D / 8]`` and scale codes ``[B, H, n]``.
        positions: ``[B, H or 1, n]`` integer positions at which RoPE is re-applied to the keys.
        hadamard, inv_freq, norm_mean, norm_scale, kind, key_bits, value_bits, attention_scaling, rotary_dim,
            layout: codec parameters, as for :func:`write_kv` (``kind`` not ``"exact"``).

    Returns:
        ``(keys, values)``: float32 ``[B, H, n, D]`` post-RoPE keys and values.
    """
    return _decode(k_codes, k_scales, v_codes, v_scales, positions, hadamard, inv_freq, norm_mean, norm_scale, kind,
                   key_bits, value_bits, attention_scaling, rotary_dim, layout)


@dequant_kv.register_fake
def _(k_codes, k_scales, v_codes, v_scales, positions, hadamard, inv_freq, norm_mean, norm_scale, kind, key_bits,
      value_bits, attention_scaling, rotary_dim, layout):
    shape = (*k_codes.shape[:3], hadamard.shape[0])
    return k_codes.new_empty(shape, dtype=torch.float32), k_codes.new_empty(shape, dtype=torch.float32)


def _code_block(k_codes, k_scales, v_codes, v_scales, code_pos, limit, start, stop, codec):
    """Code slots ``start:stop`` as ``(keys, values, visible)`` for the ``exact`` kind (the float codes themselves),
    else ``(keys, x, visible, s)``: float32 keys ``[B, H, n, D]``, the values' unit-RMS code vectors ``x`` and scales
    ``s`` ``[B, H, n]`` (:func:`~nqcompile.codec.kv.value_rows`; the attention maps their weighted sum once, by
    :func:`~nqcompile.codec.kv.fold_values`), and ``visible = slot < limit`` ``[B, 1 or q, n]``."""
    sl = slice(start, stop)
    hadamard, inv_freq, norm_mean, norm_scale, kind = codec[:5]
    visible = torch.arange(start, start + k_codes[:, :, sl].shape[2], device=k_codes.device) < limit
    if kind == "exact":
        return k_codes[:, :, sl], v_codes[:, :, sl], visible
    t = KVTransform(*codec[4:])
    k = decode_keys(k_codes[:, :, sl], k_scales[:, :, sl], code_pos[:, :, sl], hadamard, inv_freq, norm_mean[0],
                    norm_scale[0], t)
    x, s = value_rows(v_codes[:, :, sl], v_scales[:, :, sl], hadamard.shape[0], t)
    return k, x, visible, s


def _held_blocks(k_codes, k_scales, v_codes, v_scales, code_pos, code_len, exact_k, exact_v, exact_mask, codec,
                 key_block):
    """``(keys, values, visible)`` blocks of ``key_block`` tokens: the ``C`` code slots (decoded one block at a time,
    masked by ``code_len``), then the ``E`` exact tokens (masked by ``exact_mask``). Holds no block between
    yields."""
    limit = (code_len[:, None] if code_len.dim() == 1 else code_len)[:, :, None]  # [B, 1 or q, 1]
    for start in range(0, k_codes.shape[2], key_block):
        yield _code_block(k_codes, k_scales, v_codes, v_scales, code_pos, limit, start, start + key_block, codec)
    for start in range(0, exact_k.shape[2], key_block):
        sl = slice(start, start + key_block)
        yield exact_k[:, :, sl], exact_v[:, :, sl], exact_mask[:, :, sl]


def _attention(query, k_codes, k_scales, v_codes, v_scales, code_pos, code_len, exact_k, exact_v, exact_mask,
               hadamard, inv_freq, norm_mean, norm_scale, kind, key_bits, value_bits, attention_scaling, rotary_dim,
               layout, scaling) -> tuple[torch.Tensor, torch.Tensor]:
    batch, q_heads, q_len, head_dim = query.shape
    query_tile, key_block = tile_sizes(batch, q_heads, k_codes.shape[1], head_dim, q_len,
                                       k_codes.shape[2] + exact_k.shape[2], compute_dtype(query.dtype))
    codec = (hadamard, inv_freq, norm_mean, norm_scale, kind, key_bits, value_bits, attention_scaling, rotary_dim,
             layout)
    blocks = _held_blocks(k_codes, k_scales, v_codes, v_scales, code_pos, code_len, exact_k, exact_v, exact_mask, codec,
                          key_block)
    kv_heads = k_codes.shape[1]

    def value_map(weighted, weight):  # [B, Hq, q, D], [B, Hq, q] -> per KV head [B, H, G, q, D] and back
        grouped = weighted.view(batch, kv_heads, q_heads // kv_heads, q_len, head_dim)
        return fold_values(grouped, weight.view(grouped.shape[:-1]), hadamard, norm_mean[1],
                           norm_scale[1]).view(weighted.shape)

    out, lse = attention_blocks(query, blocks, scaling=scaling, query_tile=query_tile,
                                value_map=None if kind == "exact" else value_map)
    return out.to(query.dtype), lse


@torch.library.custom_op("nqcompile::dequant_attention", mutates_args=())
def dequant_attention(
    query: torch.Tensor, k_codes: torch.Tensor, k_scales: torch.Tensor, v_codes: torch.Tensor, v_scales: torch.Tensor,
    code_pos: torch.Tensor, code_len: torch.Tensor, exact_k: torch.Tensor, exact_v: torch.Tensor,
    exact_mask: torch.Tensor, hadamard: torch.Tensor, inv_freq: torch.Tensor, norm_mean: torch.Tensor,
    norm_scale: torch.Tensor, kind: str, key_bits: int, value_bits: int, attention_scaling: float, rotary_dim: int,
    layout: str, scaling: float,
) -> torch.Tensor:
    """Softmax attention of ``query`` over the compressed tokens and an exact segment.

    Blockwise (:mod:`nqcompile.ops.blockwise`: online softmax, Milakov & Gimelshein 2018, arXiv:1805.02867;
    Dao et al. 2022, arXiv:2205.14135): all ``C`` code slots are decoded one key block at a time (to float32,
    by the codec functions of :func:`dequant_kv`) and masked by ``code_len``, then the exact segment follows in
    blocks; neither the full scores nor the full decoded keys/values are materialized. Computed in float32
    (float64 for a float64 query). A query that sees no key at all (impossible in the cache, where each query
    sees itself) gets a zero output.

    Args:
        query: ``[B, Hq, q, D]`` post-RoPE queries; ``Hq`` a multiple of the KV heads ``H`` (GQA).
        k_codes, k_scales, v_codes, v_scales: storage, capacity ``C`` (module docstring).
        code_pos: ``[B, H or 1, C]`` integer positions of the stored tokens (RoPE is re-applied there).
        code_len: ``[B]`` int64, slots ``>= code_len[b]`` are ignored; or ``[B, q]``, a limit per query
            (a chunk replayed as decode steps sees the codes flushed before each of its tokens).
        exact_k, exact_v: ``[B, H, E, D]`` float (post-RoPE) keys/values held outside ``k_codes``: sinks, the
            warm tier (decoded by :func:`dequant_kv`), the recent window, new tokens.
        exact_mask: ``[B, q, E]`` bool, which exact tokens each query may attend to.
        hadamard, inv_freq, norm_mean, norm_scale, kind, key_bits, value_bits, attention_scaling, rotary_dim,
            layout: codec parameters, as for :func:`write_kv`.
        scaling: softmax scale (``head_dim ** -0.5`` for most models).

    Returns:
        ``[B, Hq, q, D]`` attention output in ``query``'s dtype.
    """
    return _attention(query, k_codes, k_scales, v_codes, v_scales, code_pos, code_len, exact_k, exact_v, exact_mask,
                      hadamard, inv_freq, norm_mean, norm_scale, kind, key_bits, value_bits, attention_scaling,
                      rotary_dim, layout, scaling)[0]


@dequant_attention.register_fake
def _(query, k_codes, k_scales, v_codes, v_scales, code_pos, code_len, exact_k, exact_v, exact_mask, hadamard,
      inv_freq, norm_mean, norm_scale, kind, key_bits, value_bits, attention_scaling, rotary_dim, layout, scaling):
    return query.new_empty(query.shape)  # contiguous, as the implementation returns it (not query's strides)


@torch.library.custom_op("nqcompile::dequant_attention_lse", mutates_args=())
def dequant_attention_lse(
    query: torch.Tensor, k_codes: torch.Tensor, k_scales: torch.Tensor, v_codes: torch.Tensor, v_scales: torch.Tensor,
    code_pos: torch.Tensor, code_len: torch.Tensor, exact_k: torch.Tensor, exact_v: torch.Tensor,
    exact_mask: torch.Tensor, hadamard: torch.Tensor, inv_freq: torch.Tensor, norm_mean: torch.Tensor,
    norm_scale: torch.Tensor, kind: str, key_bits: int, value_bits: int, attention_scaling: float, rotary_dim: int,
    layout: str, scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`dequant_attention` that also returns each query's log-sum-exp (the softmax normalizer).

    The normalizer is what :func:`~nqcompile.policy.reconstruction.max_attention_probability` needs to turn
    scores of a few target keys into probabilities of the softmax over everything held.

    Args:
        as :func:`dequant_attention`.

    Returns:
        ``(out, lse)``: ``out`` ``[B, Hq, q, D]`` in ``query``'s dtype, as :func:`dequant_attention`; ``lse``
        ``[B, Hq, q]`` float32 (float64 for a float64 query), ``log sum exp(scaling * q . k)`` over the keys the
        query sees, ``-inf`` for a query that sees none.
    """
    return _attention(query, k_codes, k_scales, v_codes, v_scales, code_pos, code_len, exact_k, exact_v, exact_mask,
                      hadamard, inv_freq, norm_mean, norm_scale, kind, key_bits, value_bits, attention_scaling,
                      rotary_dim, layout, scaling)


@dequant_attention_lse.register_fake
def _(query, k_codes, k_scales, v_codes, v_scales, code_pos, code_len, exact_k, exact_v, exact_mask, hadamard,
      inv_freq, norm_mean, norm_scale, kind, key_bits, value_bits, attention_scaling, rotary_dim, layout, scaling):
    return query.new_empty(query.shape), query.new_empty(query.shape[:3], dtype=compute_dtype(query.dtype))
