"""Per-vector scaled quantization: one-byte RMS scale + a fixed-rate code on the normalized vector.

For every vector ``x`` (last dimension ``D``, a multiple of 8):

1. ``rms = sqrt(mean(x**2))`` (float32);
2. ``scale_code = encode_scale(rms)`` (one byte, log2 grid, rounded up: :mod:`nqcompile.codec.scales`);
3. ``codes = code.encode(x / decode_scale(scale_code))``: the vector is divided by the DECODED scale, so
   the encoder sees exactly what the decoder will multiply back;
4. reconstruction: ``code.decode(codes, D) * decode_scale(scale_code)``.

All-zero vectors get scale code 0 and decode to exact zeros. Storage per vector:
``code.bytes_per_vector(D) + 1`` bytes. Typically applied after a Hadamard rotation
(:mod:`nqcompile.codec.hadamard`), which makes coordinates close to Gaussian (QuIP#, Tseng et al. 2024;
QuaRot, Ashkboos et al. 2024). The codes themselves are documented in :mod:`nqcompile.codec.lattice` and
:mod:`nqcompile.codec.scalar`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nqcompile.codec.scalar import FixedRateCode, check_dim, check_float_vectors
from nqcompile.codec.scales import decode_scale, encode_scale

__all__ = ["quantize_vectors", "dequantize_vectors", "vector_rms"]


def vector_rms(x: Tensor) -> Tensor:
    """Root-mean-square over the last dimension, float32 ``[...]`` from float ``[..., D]``."""
    xf = x.to(torch.float32)
    return xf.square().mean(dim=-1).sqrt()


def quantize_vectors(x: Tensor, code: FixedRateCode, *, scale_rounding: str = "ceil") -> tuple[Tensor, Tensor]:
    """Quantize vectors with a one-byte per-vector RMS scale and a fixed-rate code.

    Args:
        x: float tensor ``[..., D]`` (float16, bfloat16, float32 or float64; computed in float32),
            D a multiple of 8, finite values.
        code: a :class:`~nqcompile.codec.scalar.FixedRateCode` (e.g. ``code_for("e8", 2)``).
        scale_rounding: ``"ceil"`` (default; decoded scale >= RMS) or ``"nearest"``, passed to
            :func:`~nqcompile.codec.scales.encode_scale` (the benchmark compares the two).

    Returns:
        ``(codes, scale_codes)``: uint8 ``[..., code.bytes_per_vector(D)]`` and uint8 ``[...]``.

    Raises:
        ValueError: if ``x`` is not floating point, D is not a multiple of 8, or ``x`` holds inf/NaN.
    """
    xf = check_float_vectors(x, "quantize_vectors")
    scale_codes = encode_scale(vector_rms(xf), rounding=scale_rounding)
    s = decode_scale(scale_codes).unsqueeze(-1)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    xn = torch.where(s > 0, xf / safe, torch.zeros_like(xf))
    return code.encode(xn), scale_codes


def dequantize_vectors(codes: Tensor, scale_codes: Tensor, code: FixedRateCode, dim: int) -> Tensor:
    """Inverse of :func:`quantize_vectors`.

    Args:
        codes: uint8 ``[..., code.bytes_per_vector(dim)]``.
        scale_codes: uint8 ``[...]`` (same leading shape as ``codes``).
        code: the code used to encode.
        dim: vector dimension D (a multiple of 8).

    Returns:
        float32 tensor ``[..., dim]``.

    Raises:
        ValueError: on wrong dtypes, mismatched leading shapes or dim not a multiple of 8.
    """
    check_dim(dim, "dequantize_vectors")
    if not isinstance(scale_codes, Tensor) or scale_codes.dtype != torch.uint8:
        raise ValueError(
            "dequantize_vectors: scale_codes must be uint8, got "
            f"{getattr(scale_codes, 'dtype', type(scale_codes).__name__)}"
        )
    if not isinstance(codes, Tensor) or codes.shape[:-1] != scale_codes.shape:
        raise ValueError(
            "dequantize_vectors: codes [..., nbytes] and scale_codes [...] must share leading dimensions, "
            f"got {tuple(getattr(codes, 'shape', ()))} and {tuple(scale_codes.shape)}"
        )
    return code.decode(codes, dim) * decode_scale(scale_codes).unsqueeze(-1)
