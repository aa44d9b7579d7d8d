"""One-byte logarithmic per-vector scale code.

Code ``c`` (uint8) stands for the scale

* ``c = 0``: exactly 0 (reserved for all-zero vectors, whose RMS is exactly 0);
* ``c = 1 .. 255``: ``2 ** ((c - 128) / 16)``, i.e. a log2 grid with a step of 1/16 octave
  (a factor of ``2**(1/16)`` ≈ 1.0443, +4.4 %) covering ``2**(-127/16)`` ≈ 0.00411 ..
  ``2**(127/16)`` ≈ 243.5 (nominally the range 2^-8 .. 2^8, minus the reserved code).

Rounding is UPWARDS in the log domain (``c = ceil(16 * log2(rms)) + 128``), so the decoded scale is
never smaller than the RMS (inside the range): the normalized vector ``x / scale`` then has RMS in
``(2**(-1/16), 1]`` and never overloads the fixed-rate code because of the scale rounding. The choice
was measured against nearest rounding in ``benchmarks/codec_distortion.py --scale-rounding`` (see
``benchmarks/README.md``).

Out-of-range inputs are clamped: an RMS below ``2**(-127/16)`` (but > 0) gets code 1 (the scale is
then larger than the RMS, costing relative precision on such tiny vectors); an RMS above
``2**(127/16)`` gets code 255 (the scale is then smaller than the RMS and the normalized vector is
larger than unit RMS: a caller storing such activations should pre-scale them). Scales are
dimensionless multipliers in the units of the vectors they scale.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "encode_scale",
    "decode_scale",
    "SCALE_STEPS_PER_OCTAVE",
    "SCALE_ZERO_POINT",
    "SCALE_MIN",
    "SCALE_MAX",
]

#: Codes per octave (factor of two) of the scale grid.
SCALE_STEPS_PER_OCTAVE = 16
#: The code of scale 1.0.
SCALE_ZERO_POINT = 128
#: Smallest non-zero representable scale, ``2**(-127/16)`` (code 1).
SCALE_MIN = 2.0 ** ((1 - SCALE_ZERO_POINT) / SCALE_STEPS_PER_OCTAVE)
#: Largest representable scale, ``2**(127/16)`` (code 255).
SCALE_MAX = 2.0 ** ((255 - SCALE_ZERO_POINT) / SCALE_STEPS_PER_OCTAVE)


def encode_scale(rms: Tensor, *, rounding: str = "ceil") -> Tensor:
    """Encode non-negative scales (typically per-vector RMS values) into one byte each.

    Args:
        rms: floating tensor ``[...]`` of non-negative, finite values (any float dtype; computed in
            float64 so the ceil is exact at grid points).
        rounding: ``"ceil"`` (default: decoded scale >= rms inside the range) or ``"nearest"``
            (nearest grid point in the log2 domain), kept for the benchmark that compares them.

    Returns:
        uint8 tensor ``[...]``: 0 where ``rms == 0``, otherwise ``clamp(ceil(16*log2(rms)) + 128, 1, 255)``.

    Raises:
        ValueError: if ``rms`` is not floating point, holds negative / NaN / infinite values, or
            ``rounding`` is unknown.
    """
    if not isinstance(rms, Tensor) or not rms.is_floating_point():
        raise ValueError(
            "encode_scale: rms must be a floating-point tensor, got "
            f"{getattr(rms, 'dtype', type(rms).__name__)}"
        )
    if rounding not in ("ceil", "nearest"):
        raise ValueError(f"encode_scale: rounding must be 'ceil' or 'nearest', got {rounding!r}")
    r = rms.double()
    if r.numel() and (not bool(torch.isfinite(r).all()) or bool((r < 0).any())):
        raise ValueError(
            "encode_scale: rms must be finite and >= 0; check the input vectors for inf/NaN"
        )
    positive = r > 0
    lg = torch.log2(torch.where(positive, r, torch.ones_like(r))) * SCALE_STEPS_PER_OCTAVE
    # Guard against log2 rounding just above an exact grid point (e.g. log2(2**k) = k + 1e-16).
    lg = torch.where((lg - torch.round(lg)).abs() < 1e-9, torch.round(lg), lg)
    q = torch.ceil(lg) if rounding == "ceil" else torch.round(lg)
    c = (q + SCALE_ZERO_POINT).clamp(1, 255)
    c = torch.where(positive, c, torch.zeros_like(c))
    return c.to(torch.uint8)


def decode_scale(codes: Tensor) -> Tensor:
    """Decode one-byte scale codes.

    Args:
        codes: uint8 tensor ``[...]``.

    Returns:
        float32 tensor ``[...]``: 0.0 for code 0, otherwise ``2 ** ((code - 128) / 16)``.

    Raises:
        ValueError: if ``codes`` is not uint8.
    """
    if not isinstance(codes, Tensor) or codes.dtype != torch.uint8:
        raise ValueError(
            "decode_scale: codes must be a uint8 tensor, got "
            f"{getattr(codes, 'dtype', type(codes).__name__)}"
        )
    c = codes.to(torch.float32)
    s = torch.exp2((c - SCALE_ZERO_POINT) / SCALE_STEPS_PER_OCTAVE)
    return torch.where(codes == 0, torch.zeros_like(s), s)
