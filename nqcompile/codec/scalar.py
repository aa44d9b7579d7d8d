"""Scalar fixed-rate baselines for unit-RMS vectors: a mid-rise uniform grid and Lloyd-Max.

Both quantize every coordinate independently to one of ``2**bits`` levels and bit-pack the level
indices (``nqcompile.codec.packing``, little-endian), so a ``D``-dim vector takes exactly
``D * bits / 8`` bytes, the same budget as the E8 lattice code at the same rate. Both are designed for
inputs that were already divided by a per-vector scale (RMS about 1 per coordinate) and, typically,
Hadamard-rotated, so that coordinates are close to a unit Gaussian. They are the strongest scalar
baselines, not straw men (``docs/design.md``, "Codec requirements"):

* :class:`UniformScalarCode`: a mid-rise grid ``(i + 1/2 - 2**(bits-1)) * step`` using all ``2**bits``
  levels (not the ``2**bits - 1`` levels of a symmetric integer grid), with the step minimizing the
  mean squared error for a unit Gaussian (J. Max, "Quantizing for minimum distortion", IRE Trans. Inf.
  Theory 6(1), 1960, table of optimal uniform quantizers).
* :class:`LloydMaxCode`: the MSE-optimal scalar codebook for a unit Gaussian, computed once by the Lloyd
  algorithm on the density (S. P. Lloyd, "Least squares quantization in PCM", 1957/1982; Max 1960):
  thresholds are midpoints of levels, levels are conditional means of their cells (closed form for the
  Gaussian). Cached per ``bits``.

Also defines :class:`FixedRateCode`, the interface every code in ``nqcompile.codec`` shares (the codes a
preset may name are listed in :mod:`nqcompile.codec.registry`).
"""

from __future__ import annotations

import functools
import math
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from nqcompile.codec.packing import pack_bits, unpack_bits
from nqcompile.codec.constants import on_device

__all__ = [
    "FixedRateCode",
    "SCALAR_BITS",
    "UniformScalarCode",
    "LloydMaxCode",
    "gaussian_uniform_step",
    "gaussian_lloyd_max",
]


@runtime_checkable
class FixedRateCode(Protocol):
    """Interface shared by all fixed-rate vector codes of ``nqcompile.codec``.

    Attributes / methods:
        bits: bits per coordinate (int).
        encode(x): float32 ``[..., D]`` unit-RMS vectors -> uint8 ``[..., bytes_per_vector(D)]``.
        decode(codes, dim): uint8 ``[..., bytes_per_vector(dim)]`` -> float32 ``[..., dim]``.
        bytes_per_vector(dim): packed bytes of one ``dim``-element vector (``dim * bits // 8`` for every code
            here); the cache sizes its code buffers with it (``CodecEntry.bytes_per_vector``).
    """

    bits: int

    def encode(self, x: Tensor) -> Tensor: ...

    def decode(self, codes: Tensor, dim: int) -> Tensor: ...

    def bytes_per_vector(self, dim: int) -> int: ...


def check_dim(dim: int, owner: str) -> None:
    """Raise ValueError unless ``dim`` is a positive multiple of 8."""
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0 or dim % 8:
        raise ValueError(
            f"{owner}: the vector dimension must be a positive multiple of 8, got {dim!r}; pad the "
            "head dimension to a multiple of 8"
        )


def check_float_vectors(x: Tensor, where: str) -> Tensor:
    """Validate a finite float ``[..., D]`` input (D a positive multiple of 8) and return it as float32.

    ``where`` names the caller in the error messages (e.g. ``"quantize_vectors"``, ``"LloydMaxCode.encode"``).

    Raises:
        ValueError: not a floating tensor, a scalar, D not a positive multiple of 8, or inf/NaN values.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(
            f"{where}: x must be a floating-point tensor [..., D], got "
            f"{getattr(x, 'dtype', type(x).__name__)}"
        )
    if x.dim() == 0:
        raise ValueError(f"{where}: x must have shape [..., D], got a scalar")
    check_dim(x.shape[-1], where)
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{where}: x holds inf/NaN values; clean the input first")
    return x.to(torch.float32)


def check_decode_input(codes: Tensor, dim: int, nbytes: int, owner: str) -> None:
    """Validate uint8 codes ``[..., nbytes]`` for vectors of ``dim`` coordinates."""
    check_dim(dim, f"{owner}.decode")
    if not isinstance(codes, Tensor) or codes.dtype != torch.uint8:
        raise ValueError(
            f"{owner}.decode: codes must be a uint8 tensor, got "
            f"{getattr(codes, 'dtype', type(codes).__name__)}"
        )
    if codes.dim() == 0 or codes.shape[-1] != nbytes:
        raise ValueError(
            f"{owner}.decode: expected codes of shape [..., {nbytes}] for dim={dim}, got "
            f"{tuple(codes.shape)}; pass the dim the codes were encoded with"
        )


#: Bits per coordinate the scalar codes offer (``2**bits`` levels, bit-packed).
SCALAR_BITS = tuple(range(1, 9))


def _check_bits(bits: int, owner: str) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SCALAR_BITS:
        raise ValueError(f"{owner}: bits must be an int in 1..8, got {bits!r}")


# ---------------------------------------------------------------------------------------------
# Gaussian design (float64, closed-form cell moments)

_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _phi(t: Tensor) -> Tensor:
    return torch.exp(-0.5 * t * t) * _INV_SQRT_2PI  # 0 at +-inf


def _cdf(t: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.erf(t / _SQRT2))


def _cell_mse(lo: Tensor, hi: Tensor, level: Tensor) -> Tensor:
    """E[(X - level)^2 ; lo < X < hi] for X ~ N(0, 1), elementwise (lo/hi may be +-inf)."""
    m0 = _cdf(hi) - _cdf(lo)
    m1 = _phi(lo) - _phi(hi)
    # int x^2 phi = m0 - [x phi(x)]_lo^hi, with x phi(x) -> 0 at +-inf.
    hp = torch.where(torch.isinf(hi), torch.zeros_like(hi), hi * _phi(hi))
    lp = torch.where(torch.isinf(lo), torch.zeros_like(lo), lo * _phi(lo))
    m2 = m0 - (hp - lp)
    return m2 - 2.0 * level * m1 + level * level * m0


def _uniform_mse(step: float, levels: int) -> float:
    i = torch.arange(levels, dtype=torch.float64)
    lv = (i + 0.5 - levels / 2) * step
    edges = (torch.arange(1, levels, dtype=torch.float64) - levels / 2) * step
    inf = torch.tensor([math.inf], dtype=torch.float64)
    lo = torch.cat([-inf, edges])
    hi = torch.cat([edges, inf])
    return float(_cell_mse(lo, hi, lv).sum())


@functools.lru_cache(maxsize=None)
def gaussian_uniform_step(bits: int) -> float:
    """MSE-optimal step of the ``2**bits``-level mid-rise uniform quantizer for N(0, 1).

    Found by golden-section search on the exact (closed-form) distortion; e.g. 1.5958 at 1 bit,
    0.9957 at 2 bits, 0.5860 at 3 bits (Max 1960). Cached per ``bits``.

    Raises:
        ValueError: if ``bits`` is not in 1..8.
    """
    _check_bits(bits, "gaussian_uniform_step")
    levels = 1 << bits
    lo, hi = 1e-3, 4.0
    g = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = _uniform_mse(a, levels), _uniform_mse(b, levels)
    for _ in range(200):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = _uniform_mse(a, levels)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = _uniform_mse(b, levels)
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


@functools.lru_cache(maxsize=None)
def gaussian_lloyd_max(bits: int) -> tuple[Tensor, Tensor]:
    """Lloyd-Max (MSE-optimal scalar) codebook for N(0, 1) with ``2**bits`` levels.

    Lloyd's algorithm on the density (Lloyd 1957; Max 1960), float64, iterated until the levels move
    less than 1e-11 (milliseconds up to 5 bits, about a second at 7 bits and a few at 8). Cached per
    ``bits``; e.g. levels +-0.4528, +-1.5104 at 2 bits (MSE 0.1175).

    Returns:
        ``(levels, thresholds)``: float64 tensors ``[2**bits]`` (ascending) and ``[2**bits - 1]``
        (decision boundaries, midpoints of adjacent levels). Do not modify them in place (cached).

    Raises:
        ValueError: if ``bits`` is not in 1..8.
    """
    _check_bits(bits, "gaussian_lloyd_max")
    levels_n = 1 << bits
    # Start from the high-rate optimum (Panter and Dite 1951: level density ∝ pdf**(1/3), i.e. the
    # quantiles of N(0, 3)), which cuts the number of Lloyd iterations by orders of magnitude.
    p = (torch.arange(levels_n, dtype=torch.float64) + 0.5) / levels_n
    lv = math.sqrt(3.0) * _SQRT2 * torch.erfinv(2.0 * p - 1.0)
    inf = torch.tensor([math.inf], dtype=torch.float64)
    for _ in range(100_000):
        th = 0.5 * (lv[1:] + lv[:-1])
        lo = torch.cat([-inf, th])
        hi = torch.cat([th, inf])
        new = (_phi(lo) - _phi(hi)) / (_cdf(hi) - _cdf(lo))
        if float((new - lv).abs().max()) < 1e-11:
            lv = new
            break
        lv = new
    th = 0.5 * (lv[1:] + lv[:-1])
    return lv, th


# ---------------------------------------------------------------------------------------------
# Codes


class _ScalarCode:
    """Shared encode/decode plumbing: index per coordinate, bit-packed at ``bits`` per index."""

    bits: int
    name: str = "scalar"

    def _index(self, x: Tensor) -> Tensor:  # float32 [..., D] -> int64 [..., D]
        raise NotImplementedError

    def _levels32(self) -> Tensor:  # float32 [2**bits]
        raise NotImplementedError

    def bytes_per_vector(self, dim: int) -> int:
        """Bytes of one encoded ``dim``-dim vector: ``dim * bits // 8`` (dim a multiple of 8)."""
        check_dim(dim, type(self).__name__)
        return dim * self.bits // 8

    def encode(self, x: Tensor) -> Tensor:
        """Quantize unit-RMS vectors.

        Args:
            x: float tensor ``[..., D]`` (any float dtype, computed in float32), D a multiple of 8,
                already divided by its per-vector scale.

        Returns:
            uint8 tensor ``[..., D * bits // 8]``: level indices, bit-packed little-endian.
        """
        x = check_float_vectors(x, f"{type(self).__name__}.encode")
        return pack_bits(self._index(x), self.bits)

    def decode(self, codes: Tensor, dim: int) -> Tensor:
        """Reconstruct unit-RMS vectors.

        Args:
            codes: uint8 tensor ``[..., dim * bits // 8]`` from :meth:`encode`.
            dim: vector dimension D (a multiple of 8).

        Returns:
            float32 tensor ``[..., dim]``.
        """
        check_decode_input(codes, dim, self.bytes_per_vector(dim), type(self).__name__)
        idx = unpack_bits(codes, self.bits, dim).long()
        return on_device(self._levels32(), codes.device)[idx]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(bits={self.bits})"


class UniformScalarCode(_ScalarCode):
    """Mid-rise uniform scalar code with all ``2**bits`` levels, step tuned for N(0, 1).

    Levels ``(i + 1/2 - 2**(bits-1)) * step`` for ``i = 0 .. 2**bits - 1``, step from
    :func:`gaussian_uniform_step` (Max 1960); the outermost cells extend to +-infinity (clamping).
    Interface: see :class:`FixedRateCode`. Inputs: float ``[..., D]`` with RMS about 1.

    Args:
        bits: bits per coordinate, 1..8.

    Raises:
        ValueError: if ``bits`` is not in 1..8.
    """

    name = "uniform"

    def __init__(self, bits: int) -> None:
        _check_bits(bits, "UniformScalarCode")
        self.bits = bits
        self.step = gaussian_uniform_step(bits)
        n = 1 << bits
        self._lv = ((torch.arange(n, dtype=torch.float64) + 0.5 - n / 2) * self.step).float()

    def _levels32(self) -> Tensor:
        return self._lv

    def _index(self, x: Tensor) -> Tensor:
        n = 1 << self.bits
        return torch.floor(x / self.step + n / 2).clamp_(0, n - 1).long()


class LloydMaxCode(_ScalarCode):
    """Gaussian-optimal (Lloyd-Max) scalar code with ``2**bits`` levels.

    Codebook from :func:`gaussian_lloyd_max` (Lloyd 1957, Max 1960), computed once per ``bits`` and
    cached; encoding is a bucketize against the decision thresholds. Interface: see
    :class:`FixedRateCode`. Inputs: float ``[..., D]`` with RMS about 1.

    Args:
        bits: bits per coordinate, 1..8.

    Raises:
        ValueError: if ``bits`` is not in 1..8.
    """

    name = "lloyd_max"

    def __init__(self, bits: int) -> None:
        _check_bits(bits, "LloydMaxCode")
        self.bits = bits
        lv, th = gaussian_lloyd_max(bits)
        self._lv = lv.float()
        self._th = th.float()

    def _levels32(self) -> Tensor:
        return self._lv

    def _index(self, x: Tensor) -> Tensor:
        return torch.bucketize(x, on_device(self._th, x.device))
