"""CUDA implementations of ``nqcompile::dequant_attention``, ``nqcompile::dequant_attention_lse``,
``nqcompile::cache_attention``, ``nqcompile::dequant_kv`` and ``nqcompile::write_kv``: the Triton kernels where they
apply, the torch reference everywhere else.

A call runs :func:`nqcompile.kernels.decode_attention.e8_decode_attention` when :func:`decode_kernel_reason` finds
nothing against it: one query per sequence (a decode step), E8 codes at bit widths the codec offers, a head
dimension with a ``±1`` Hadamard matrix up to the kernel's maximum, a float16/bfloat16/float32 query, and Triton
installed. A chunk of queries (a prefill chunk, the reconstruction re-read) over E8 codes runs
:func:`nqcompile.ops.chunk_attention.chunk_attention` (the dequant kernel, then torch's fused attention kernels) where
:func:`chunk_reason` finds nothing against it. Every other call (per-query code lengths, scalar codecs, exact storage,
float32 or float64 queries...) runs the same torch reference as the CPU. The choice reads shapes, dtypes and static
arguments only (and whether a CUDA graph is being captured), so it never changes between two calls of the same shapes.

``dequant_kv`` (the warm tier decoded to float, eager decode steps and flushes) runs
:func:`nqcompile.kernels.dequant_kv.e8_dequant_kv` for E8 codes with a ``±1`` Hadamard matrix
(:func:`dequant_kernel_reason`); ``write_kv`` runs :func:`nqcompile.kernels.quantize_kv.e8_quantize_kv` for the same
codecs (:func:`write_kernel_reason`). The op keeps its ``cudagraph_unsafe`` tag, as the reference it falls back to
reads ``count`` back to the host.

These are registered for ``"cuda"`` only; the CPU's are in :mod:`nqcompile.ops.cpu`.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from typing import Optional

import torch

from . import chunk_attention as _chunk
from .fused import cache_attention, cache_attention_reference
from .reference import _attention, _decode, _write, dequant_attention, dequant_attention_lse, dequant_kv, write_kv

__all__ = ["decode_kernel_reason", "dequant_kernel_reason", "write_kernel_reason", "chunk_reason",
           "dequant_attention_cuda", "dequant_attention_lse_cuda", "cache_attention_cuda", "dequant_kv_cuda",
           "write_kv_cuda"]


@functools.lru_cache(maxsize=None)
def _kernel_module(name: str):
    """The kernel module ``nqcompile.kernels.<name>`` (imported on first use: it imports Triton), or None without
    Triton."""
    if importlib.util.find_spec("triton") is None:
        return None
    return importlib.import_module(f"..kernels.{name}", __package__)


def _kernel():
    """The decode-attention kernel module, or None without Triton."""
    return _kernel_module("decode_attention")


def _dequant_kernel():
    """The dequant kernel module, or None without Triton."""
    return _kernel_module("dequant_kv")


def dequant_kernel_reason(k_codes: torch.Tensor, kind: str, bits: tuple[int, int], dim: int, rotary_dim: int,
                          layout: str, inv_freq: torch.Tensor) -> Optional[str]:
    """Why a ``dequant_kv`` call runs the torch reference rather than the Triton dequant kernel, or None if it runs
    the kernel (:func:`nqcompile.kernels.dequant_kv.unsupported_reason`, or Triton missing)."""
    kernel = _dequant_kernel()
    if kernel is None:
        return "Triton is not installed"
    return kernel.unsupported_reason(k_codes, kind, bits, dim, rotary_dim, layout, inv_freq)


def dequant_kv_cuda(k_codes, k_scales, v_codes, v_scales, positions, hadamard, inv_freq, norm_mean, norm_scale, kind,
                    key_bits, value_bits, attention_scaling, rotary_dim, layout) -> tuple[torch.Tensor, torch.Tensor]:
    """``nqcompile::dequant_kv`` on CUDA (arguments and result as :func:`~nqcompile.ops.reference.dequant_kv`): the
    dequant kernel, else the torch reference."""
    if dequant_kernel_reason(k_codes, kind, (key_bits, value_bits), hadamard.shape[0], rotary_dim, layout,
                             inv_freq) is None:
        from ..kernels.lattice import centroid_table

        return _dequant_kernel().e8_dequant_kv(k_codes, k_scales, v_codes, v_scales, positions, hadamard, inv_freq,
                                               norm_mean, norm_scale, centroid_table(k_codes.device), key_bits,
                                               value_bits, attention_scaling, rotary_dim, layout)
    return _decode(k_codes, k_scales, v_codes, v_scales, positions, hadamard, inv_freq, norm_mean, norm_scale, kind,
                   key_bits, value_bits, attention_scaling, rotary_dim, layout)


def _quantize_kernel():
    """The quantize-on-write kernel module, or None without Triton."""
    return _kernel_module("quantize_kv")


def write_kernel_reason(k_codes: torch.Tensor, k_scales: torch.Tensor, key: torch.Tensor, kind: str,
                        bits: tuple[int, int], dim: int, rotary_dim: int, layout: str,
                        inv_freq: torch.Tensor) -> Optional[str]:
    """Why a ``write_kv`` call runs the torch reference rather than the Triton quantize kernel, or None if it runs
    the kernel (:func:`nqcompile.kernels.quantize_kv.unsupported_reason`: the exact kind, scalar codecs, head
    dimensions without a ``±1`` Hadamard matrix...; or Triton missing). Reads shapes, dtypes and static arguments
    only."""
    kernel = _quantize_kernel()
    if kernel is None:
        return "Triton is not installed"
    return kernel.unsupported_reason(k_codes, k_scales, key, kind, bits, dim, rotary_dim, layout, inv_freq)


def write_kv_cuda(k_codes, k_scales, v_codes, v_scales, key, value, positions, dest, count, hadamard, inv_freq,
                  norm_mean, norm_scale, kind, key_bits, value_bits, attention_scaling, rotary_dim, layout) -> None:
    """``nqcompile::write_kv`` on CUDA (arguments as :func:`~nqcompile.ops.reference.write_kv`): the quantize
    kernel, which reads nothing back to the host, else the torch reference (which does)."""
    if write_kernel_reason(k_codes, k_scales, key, kind, (key_bits, value_bits), hadamard.shape[0], rotary_dim,
                           layout, inv_freq) is None:
        from ..kernels.lattice import centroid_table

        kernel = _quantize_kernel()
        kernel.e8_quantize_kv(k_codes, k_scales, v_codes, v_scales, key, value, positions, dest, count, hadamard,
                              inv_freq, norm_mean, norm_scale, centroid_table(key.device),
                              kernel.encoder_table(key.device), key_bits, value_bits, attention_scaling, rotary_dim,
                              layout)
        return
    _write(k_codes, k_scales, v_codes, v_scales, key, value, positions, dest, count, hadamard, inv_freq, norm_mean,
           norm_scale, kind, key_bits, value_bits, attention_scaling, rotary_dim, layout)


def decode_kernel_reason(query: torch.Tensor, kv_heads: int, code_len: torch.Tensor, exact_mask: torch.Tensor,
                         kind: str, bits: tuple[int, ...], rotary_dim: int, layout: str, inv_freq: torch.Tensor,
                         warm_mask: Optional[torch.Tensor] = None) -> Optional[str]:
    """Why an attention call runs the torch reference rather than the Triton decode kernel, or None if it runs the
    kernel.

    Args:
        query: ``[B, Hq, q, D]``. kv_heads: ``H``. code_len: ``[B]`` or ``[B, q]``. exact_mask: ``[B, q, E]``.
        kind: the codec name. bits: every bit width the call reads (keys, values and, with a warm tier, warm).
        rotary_dim, layout, inv_freq: the codec's RoPE. warm_mask: ``[B, q, W]``, or None without a warm tier.

    Returns:
        None, or a sentence naming what the kernel does not cover
        (:func:`~nqcompile.kernels.decode_attention.unsupported_reason`, or Triton missing).
    """
    kernel = _kernel()
    if kernel is None:
        return "Triton is not installed"
    return kernel.unsupported_reason(query, kv_heads, code_len, exact_mask, kind, bits, rotary_dim, layout, inv_freq,
                                     warm_mask)


def chunk_reason(query: torch.Tensor, k_codes: torch.Tensor, code_len: torch.Tensor, kind: str,
                 bits: tuple[int, int], dim: int, rotary_dim: int, layout: str, inv_freq: torch.Tensor,
                 exact_len: int) -> Optional[str]:
    """Why an attention call does not run :func:`~nqcompile.ops.chunk_attention.chunk_attention`, or None if it does
    (:func:`nqcompile.ops.chunk_attention.unsupported_reason`, then :func:`dequant_kernel_reason`)."""
    return (_chunk.unsupported_reason(query, code_len, kind, exact_len)
            or dequant_kernel_reason(k_codes, kind, bits, dim, rotary_dim, layout, inv_freq))


def _attention_cuda(query, k_codes, k_scales, v_codes, v_scales, code_pos, code_len, exact_k, exact_v, exact_mask,
                    hadamard, inv_freq, norm_mean, norm_scale, kind, key_bits, value_bits, attention_scaling,
                    rotary_dim, layout, scaling, with_lse: bool):
    """The output (and log-sum-exp) by the decode kernel, the chunk path or the torch reference, in that order."""
    args = (query, k_codes, k_scales, v_codes, v_scales, code_pos, code_len, exact_k, exact_v, exact_mask, hadamard,
            inv_freq, norm_mean, norm_scale, kind, key_bits, value_bits, attention_scaling, rotary_dim, layout,
            scaling)
    if not with_lse and decode_kernel_reason(query, k_codes.shape[1], code_len, exact_mask, kind,
                                             (key_bits, value_bits), rotary_dim, layout, inv_freq) is None:
        kernel = _kernel()
        return kernel.e8_decode_attention(query, k_codes, k_scales, v_codes, v_scales, code_pos, code_len, None, None,
                                          None, None, None, None, 0, exact_k, exact_v, exact_mask, hadamard, inv_freq,
                                          norm_mean, norm_scale, kernel.centroid_table(query.device), key_bits,
                                          value_bits, attention_scaling, rotary_dim, layout, scaling)
    if chunk_reason(query, k_codes, code_len, kind, (key_bits, value_bits), hadamard.shape[0], rotary_dim, layout,
                    inv_freq, exact_k.shape[2]) is None:
        out, lse = _chunk.chunk_attention(*args)
    else:
        out, lse = _attention(*args)
    return (out, lse) if with_lse else out


def dequant_attention_cuda(query, k_codes, k_scales, v_codes, v_scales, code_pos, code_len, exact_k, exact_v,
                           exact_mask, hadamard, inv_freq, norm_mean, norm_scale, kind, key_bits, value_bits,
                           attention_scaling, rotary_dim, layout, scaling) -> torch.Tensor:
    """``nqcompile::dequant_attention`` on CUDA (arguments and result as
    :func:`~nqcompile.ops.reference.dequant_attention`): the decode kernel, the chunk path, else the torch
    reference."""
    return _attention_cuda(query, k_codes, k_scales, v_codes, v_scales, code_pos, code_len, exact_k, exact_v,
                           exact_mask, hadamard, inv_freq, norm_mean, norm_scale, kind, key_bits, value_bits,
                           attention_scaling, rotary_dim, layout, scaling, with_lse=False)


def dequant_attention_lse_cuda(query, k_codes, k_scales, v_codes, v_scales, code_pos, code_len, exact_k, exact_v,
                               exact_mask, hadamard, inv_freq, norm_mean, norm_scale, kind, key_bits, value_bits,
                               attention_scaling, rotary_dim, layout, scaling) -> tuple[torch.Tensor, torch.Tensor]:
    """``nqcompile::dequant_attention_lse`` on CUDA (arguments and result as
    :func:`~nqcompile.ops.reference.dequant_attention_lse`): the chunk path, else the torch reference."""
    return _attention_cuda(query, k_codes, k_scales, v_codes, v_scales, code_pos, code_len, exact_k, exact_v,
                           exact_mask, hadamard, inv_freq, norm_mean, norm_scale, kind, key_bits, value_bits,
                           attention_scaling, rotary_dim, layout, scaling, with_lse=True)


def cache_attention_cuda(query, k_codes, k_scales, v_codes, v_scales, code_pos, code_len, warm_k_codes, warm_k_scales,
                         warm_v_codes, warm_v_scales, warm_pos, warm_mask, warm_offset, warm_bits, exact_k, exact_v,
                         exact_mask, new_k, new_v, new_pos, new_dest, new_count, hadamard, inv_freq, norm_mean,
                         norm_scale, kind, key_bits, value_bits, attention_scaling, rotary_dim, layout,
                         scaling) -> torch.Tensor:
    """``nqcompile::cache_attention`` on CUDA (arguments and result as :func:`~nqcompile.ops.fused.cache_attention`):
    the write by ``nqcompile::write_kv``, then the decode kernel over the codes, the warm tier and the exact segment;
    else the torch reference."""
    bits = (key_bits, value_bits) + ((warm_bits,) if warm_k_codes is not None else ())
    if decode_kernel_reason(query, k_codes.shape[1], code_len, exact_mask, kind, bits, rotary_dim, layout, inv_freq,
                            warm_mask) is not None:
        return cache_attention_reference(query, k_codes, k_scales, v_codes, v_scales, code_pos, code_len, warm_k_codes,
                                         warm_k_scales, warm_v_codes, warm_v_scales, warm_pos, warm_mask, warm_offset,
                                         warm_bits, exact_k, exact_v, exact_mask, new_k, new_v, new_pos, new_dest,
                                         new_count, hadamard, inv_freq, norm_mean, norm_scale, kind, key_bits,
                                         value_bits, attention_scaling, rotary_dim, layout, scaling)
    if new_k is not None:
        write_kv(k_codes, k_scales, v_codes, v_scales, new_k, new_v, new_pos, new_dest, new_count, hadamard, inv_freq,
                 norm_mean, norm_scale, kind, key_bits, value_bits, attention_scaling, rotary_dim, layout)
    kernel = _kernel()
    return kernel.e8_decode_attention(query, k_codes, k_scales, v_codes, v_scales, code_pos, code_len, warm_k_codes,
                                      warm_k_scales, warm_v_codes, warm_v_scales, warm_pos, warm_mask, warm_bits,
                                      exact_k, exact_v, exact_mask, hadamard, inv_freq, norm_mean, norm_scale,
                                      kernel.centroid_table(query.device), key_bits, value_bits, attention_scaling,
                                      rotary_dim, layout, scaling)


dequant_attention.register_kernel("cuda")(dequant_attention_cuda)
dequant_attention_lse.register_kernel("cuda")(dequant_attention_lse_cuda)
cache_attention.register_kernel("cuda")(cache_attention_cuda)
dequant_kv.register_kernel("cuda")(dequant_kv_cuda)
write_kv.register_kernel("cuda")(write_kv_cuda)
