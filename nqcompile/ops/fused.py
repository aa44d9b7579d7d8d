"""``nqcompile::cache_attention``: the fused op the ``nexusquant`` backend's passes rewrite a decode step into.

Eagerly, a decode step of a compressed layer runs three ops in turn: ``write_kv`` (the window's oldest block is
quantized into the code buffers), ``dequant_kv`` (the warm tier is decoded to float) and ``dequant_attention``
(attention over the codes plus an exact segment into which the decoded warm tier was concatenated). The passes of
:mod:`nqcompile.compile.passes` fold them into this one op, so that one kernel can do the whole step: quantize the
flushed block on write, decode the codes and the warm tier in registers, and attend, without the warm tier ever
existing in float in memory. Its torch reference (below) runs the three reference ops in the same order and gives
the same result bit for bit.
"""

from __future__ import annotations

from typing import Optional

import torch

from .reference import _attention, _decode, write_kv

__all__ = ["cache_attention", "cache_attention_reference"]


# Not tagged cudagraph_unsafe, so that the attention stays inside a CUDA graph: only a write folded into it
# (new_k given) cannot be captured with the torch reference, and for CUDA graphs the passes fold one only where
# both halves run Triton kernels (nqcompile.compile.passes.fuse_flush_attention).
@torch.library.custom_op("nqcompile::cache_attention", mutates_args=("k_codes", "k_scales", "v_codes", "v_scales"))
def cache_attention(
    query: torch.Tensor, k_codes: torch.Tensor, k_scales: torch.Tensor, v_codes: torch.Tensor, v_scales: torch.Tensor,
    code_pos: torch.Tensor, code_len: torch.Tensor,
    warm_k_codes: Optional[torch.Tensor], warm_k_scales: Optional[torch.Tensor], warm_v_codes: Optional[torch.Tensor],
    warm_v_scales: Optional[torch.Tensor], warm_pos: Optional[torch.Tensor], warm_mask: Optional[torch.Tensor],
    warm_offset: int, warm_bits: int,
    exact_k: torch.Tensor, exact_v: torch.Tensor, exact_mask: torch.Tensor,
    new_k: Optional[torch.Tensor], new_v: Optional[torch.Tensor], new_pos: Optional[torch.Tensor],
    new_dest: Optional[torch.Tensor], new_count: Optional[torch.Tensor],
    hadamard: torch.Tensor, inv_freq: torch.Tensor, norm_mean: torch.Tensor, norm_scale: torch.Tensor,
    kind: str, key_bits: int, value_bits: int, attention_scaling: float, rotary_dim: int, layout: str,
    scaling: float,
) -> torch.Tensor:
    """Write a block into the codes, then attend over the codes, the warm tier (read from its codes) and an exact
    segment: ``write_kv`` + ``dequant_kv`` + ``dequant_attention`` in one op.

    Args:
        query: ``[B, Hq, q, D]`` post-RoPE queries (``Hq`` a multiple of the KV heads ``H``).
        k_codes, k_scales, v_codes, v_scales: the layer's code buffers, capacity ``C``
            (:mod:`nqcompile.ops.layout`); mutated when ``new_k`` is given.
        code_pos: ``[B, H or 1, C]`` integer positions of the code slots. code_len: ``[B]`` or ``[B, q]`` int64,
            the code slots each query sees (after the write).
        warm_k_codes, warm_k_scales, warm_v_codes, warm_v_scales: the warm tier's codes ``[B, H, W, ...]`` at
            ``warm_bits`` (or all None: no warm segment). warm_pos: ``[B, H, W]`` integer positions.
            warm_mask: ``[B, q, W]`` bool, the warm slots each query sees.
        warm_offset: the warm tokens sit after the first ``warm_offset`` exact tokens (the order the eager step
            concatenates them in; the result is the same for any order up to float rounding).
        warm_bits: bits per element of the warm codes (keys and values).
        exact_k, exact_v: ``[B, H, E, D]`` exact keys/values (sinks, window, new tokens); exact_mask ``[B, q, E]``.
        new_k, new_v: ``[B, H, n, D]`` post-RoPE keys/values to quantize into the codes first (or all five
            ``new_*`` None: no write); new_pos ``[B, H, n]`` int64 positions; new_dest ``[B]`` int64 first slot
            written; new_count ``[B]`` int64 tokens written (see :func:`~nqcompile.ops.reference.write_kv`).
        hadamard, inv_freq, norm_mean, norm_scale, kind, key_bits, value_bits, attention_scaling, rotary_dim,
            layout: the codec parameters of the code buffers (as for ``write_kv``).
        scaling: softmax scale.

    Returns:
        ``[B, Hq, q, D]`` attention output in ``query``'s dtype.
    """
    return cache_attention_reference(query, k_codes, k_scales, v_codes, v_scales, code_pos, code_len, warm_k_codes,
                                     warm_k_scales, warm_v_codes, warm_v_scales, warm_pos, warm_mask, warm_offset,
                                     warm_bits, exact_k, exact_v, exact_mask, new_k, new_v, new_pos, new_dest,
                                     new_count, hadamard, inv_freq, norm_mean, norm_scale, kind, key_bits, value_bits,
                                     attention_scaling, rotary_dim, layout, scaling)


def cache_attention_reference(query, k_codes, k_scales, v_codes, v_scales, code_pos, code_len, warm_k_codes,
                              warm_k_scales, warm_v_codes, warm_v_scales, warm_pos, warm_mask, warm_offset, warm_bits,
                              exact_k, exact_v, exact_mask, new_k, new_v, new_pos, new_dest, new_count, hadamard,
                              inv_freq, norm_mean, norm_scale, kind, key_bits, value_bits, attention_scaling,
                              rotary_dim, layout, scaling) -> torch.Tensor:
    """The torch reference of :func:`cache_attention` (same arguments and result): its CPU implementation, and its
    CUDA one for the calls the Triton kernel does not cover (:mod:`nqcompile.ops.cuda`)."""
    codec = (hadamard, inv_freq, norm_mean, norm_scale, kind, key_bits, value_bits, attention_scaling, rotary_dim,
             layout)
    if new_k is not None:
        write_kv(k_codes, k_scales, v_codes, v_scales, new_k, new_v, new_pos, new_dest, new_count, *codec)
    if warm_k_codes is not None:
        wk, wv = _decode(warm_k_codes, warm_k_scales, warm_v_codes, warm_v_scales, warm_pos, hadamard, inv_freq,
                         norm_mean, norm_scale, kind, warm_bits, warm_bits, attention_scaling, rotary_dim, layout)
        at = warm_offset
        exact_k = torch.cat([exact_k[:, :, :at], wk, exact_k[:, :, at:]], 2)
        exact_v = torch.cat([exact_v[:, :, :at], wv, exact_v[:, :, at:]], 2)
        exact_mask = torch.cat([exact_mask[:, :, :at], warm_mask, exact_mask[:, :, at:]], 2)
    return _attention(query, k_codes, k_scales, v_codes, v_scales, code_pos, code_len, exact_k, exact_v, exact_mask,
                      *codec, scaling)[0]


@cache_attention.register_fake
def _(query, *args, **kwargs):
    return query.new_empty(query.shape)  # contiguous, as the implementation returns it
