"""CPU implementations of ``nqcompile::dequant_attention`` and ``nqcompile::dequant_attention_lse``: a chunk of
queries (a prefill chunk, the reconstruction re-read) runs :func:`nqcompile.ops.chunk_attention.chunk_attention`
(the codes decoded piece by piece by the reference ``dequant_kv``, then torch's CPU flash-attention kernel) where
:func:`~nqcompile.ops.chunk_attention.unsupported_reason` finds nothing against it; every other call (a decode step,
per-query code lengths, exact storage, a float64 query, an exact segment whose mask would pass
:data:`~nqcompile.ops.chunk_attention.CPU_MASK_BYTES`) runs the torch reference (:mod:`nqcompile.ops.reference`).

The reference attends in score tiles with matmuls and an online softmax; torch's fused CPU kernel does the same
work several times faster on a prefill chunk (``benchmarks/README.md``, "Prefill on the CPU"). The choice reads
shapes, dtypes and static arguments only.
"""

from __future__ import annotations

import torch

from .chunk_attention import chunk_attention, unsupported_reason
from .reference import _attention, dequant_attention, dequant_attention_lse

__all__ = ["dequant_attention_cpu", "dequant_attention_lse_cpu"]


def _attention_cpu(query, k_codes, k_scales, v_codes, v_scales, code_pos, code_len, exact_k, exact_v, exact_mask,
                   hadamard, inv_freq, norm_mean, norm_scale, kind, key_bits, value_bits, attention_scaling,
                   rotary_dim, layout, scaling) -> tuple[torch.Tensor, torch.Tensor]:
    """The output and log-sum-exp by the chunk path, else the torch reference."""
    args = (query, k_codes, k_scales, v_codes, v_scales, code_pos, code_len, exact_k, exact_v, exact_mask, hadamard,
            inv_freq, norm_mean, norm_scale, kind, key_bits, value_bits, attention_scaling, rotary_dim, layout,
            scaling)
    if unsupported_reason(query, code_len, kind, exact_k.shape[2]) is None:
        return chunk_attention(*args)
    return _attention(*args)


def dequant_attention_cpu(query, k_codes, k_scales, v_codes, v_scales, code_pos, code_len, exact_k, exact_v,
                          exact_mask, hadamard, inv_freq, norm_mean, norm_scale, kind, key_bits, value_bits,
                          attention_scaling, rotary_dim, layout, scaling) -> torch.Tensor:
    """``nqcompile::dequant_attention`` on the CPU (arguments and result as
    :func:`~nqcompile.ops.reference.dequant_attention`): the chunk path, else the torch reference."""
    return _attention_cpu(query, k_codes, k_scales, v_codes, v_scales, code_pos, code_len, exact_k, exact_v,
                          exact_mask, hadamard, inv_freq, norm_mean, norm_scale, kind, key_bits, value_bits,
                          attention_scaling, rotary_dim, layout, scaling)[0]


def dequant_attention_lse_cpu(query, k_codes, k_scales, v_codes, v_scales, code_pos, code_len, exact_k, exact_v,
                              exact_mask, hadamard, inv_freq, norm_mean, norm_scale, kind, key_bits, value_bits,
                              attention_scaling, rotary_dim, layout, scaling) -> tuple[torch.Tensor, torch.Tensor]:
    """``nqcompile::dequant_attention_lse`` on the CPU (arguments and result as
    :func:`~nqcompile.ops.reference.dequant_attention_lse`): the chunk path, else the torch reference."""
    return _attention_cpu(query, k_codes, k_scales, v_codes, v_scales, code_pos, code_len, exact_k, exact_v,
                          exact_mask, hadamard, inv_freq, norm_mean, norm_scale, kind, key_bits, value_bits,
                          attention_scaling, rotary_dim, layout, scaling)


dequant_attention.register_kernel("cpu")(dequant_attention_cpu)
dequant_attention_lse.register_kernel("cpu")(dequant_attention_lse_cpu)
