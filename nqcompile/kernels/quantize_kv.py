"""``nqcompile::e8_quantize_kv``: quantize new keys and values to E8 codes and write them in place, one launch each.

What :func:`nqcompile.ops.write_kv` computes with torch ops for kind ``"e8"`` (:func:`nqcompile.codec.kv.encode_keys`,
:func:`~nqcompile.codec.kv.encode_values`, :func:`~nqcompile.codec.vector.quantize_vectors`,
:meth:`nqcompile.codec.lattice.E8LatticeCode.encode`), fused: one program per (sequence, KV head, block of
``BLOCK_N`` tokens) reads the new rows and writes the packed labels and scale codes of the tokens ``j < count[b]`` at
slots ``dest[b] + j``. Per token:

* keys: RoPE removed at the token's position (angles ``float32(position) * inv_freq`` as the reference, their cos and
  sin computed in float64 and rounded to float32), then ``(k - mean) / scale``; values: ``(v - mean) / scale``;
* the Hadamard rotation ``x H^T``: ``H = unit * S`` with ``S`` a ``±1`` matrix, and ``x`` split exactly into three
  bfloat16 parts, so the three tensor-core products with ``S`` (float32 accumulation) give ``x S^T`` to float32
  rounding; times ``unit``;
* the one-byte scale: the RMS, its code found by binary search in the thresholds at which the reference's
  :func:`~nqcompile.codec.scales.encode_scale` steps up (computed once by bisection on that very function), the
  vector divided by the decoded scale (the reference's :func:`~nqcompile.codec.scales.decode_scale` values);
* per 8-dim block, in lattice units ``u = x / gain + centroid``: the nearest E8 point ``y`` (Conway and Sloane 1982,
  section III, with the tie rules of :mod:`nqcompile.codec.e8`), the codebook check ``e8_nearest(y / q) == 0``
  (Conway and Sloane 1983), and for the overloaded blocks the encoder of :mod:`nqcompile.codec.lattice`: the shrink
  grid (the representative of ``e8_nearest(a u)`` closest to ``u``, stopping at the first ``a`` inside the
  codebook) and the greedy local search over the 240 neighbours ``c + v`` inside the codebook; then the labels
  ``(y G^-1) mod q``, bit-packed little-endian.

Each block is held as its 8 coordinates in 8 tensors (coordinate-major, as :func:`nqcompile.codec.e8._e8_t`), so
the nearest-point search is elementwise and its sums of 8 squares run in the reference's sequential order. The
overloaded blocks of a program (about 30 % of them at 2 bits, 12 % at 3 bits, 4 % at 4 bits on Gaussian data) are
listed in a scratch buffer and searched one at a time, the program's threads spread over the grid's 8 factors and
then the 240 neighbours. Launched with ``enable_fp_fusion=False``: no multiply-add is contracted, so each float32
operation rounds as the reference's.

Agreement with the reference: every step after the Hadamard product is the reference's arithmetic, operation for
operation (the local search's neighbour products are exact, so their order only matters for rounding of their
sum, taken sequentially as the reference's matrix product does); the Hadamard product, the RMS and the RoPE cos/sin
are rounded differently (float32 sums in another order, cos/sin correctly rounded), which moves a coordinate by an
ulp or so: a block whose point sits that close to a Voronoi boundary, or a vector whose RMS sits that close to a
scale step, can get other codes (measured on an H200 against the reference on the same GPU, 8192 bfloat16 tokens of
a Llama-3.1-8B layer: 44 and 38 of 2097152 blocks at K4V2 and K3V2, ``benchmarks/quantize_kv.py``; none in the
interpreter tests of ``tests/test_kernel_quantize_kv.py``).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..codec.constants import on_device
from ..codec.hadamard import hadamard_matrix
from ..codec.lattice import E8_BITS, _minimal_vectors
from ..codec.registry import code_for
from ..codec.scales import decode_scale, encode_scale
from .lattice import codec_reason, pow2

__all__ = ["e8_quantize_kv", "encoder_table", "unsupported_reason", "MAX_HEAD_DIM", "BLOCK_N"]

#: Largest head dimension the kernel takes.
MAX_HEAD_DIM = 256
#: Tokens per program (the smallest ``tl.dot`` dimension).
BLOCK_N = 16
_KC = 32  # columns of the input per step of the Hadamard product
# Rows of the encoder table (encoder_table; the kernel reads them at these fixed offsets, 256 entries per row): scale
# thresholds, decoded scales, the 240 minimal vectors of E8 (one row per coordinate), the shrink factors of each bit
# width (1.0 first: the plain nearest point).
_BOUNDS, _SCALES, _VECTORS, _GRID = 0, 1, 2, 10


@triton.jit
def d8_columns(x0, x1, x2, x3, x4, x5, x6, x7):
    """Nearest D8 points of blocks given coordinate by coordinate (8 float32 tensors of one shape): the rules of
    :func:`nqcompile.codec.e8._d8` (halves round up; with an odd coordinate sum, the first coordinate of largest
    rounding error, compared with 3 mantissa bits cleared, re-rounds the other way; a zero error re-rounds up).

    Written out coordinate by coordinate, without helper calls (each costs milliseconds under the interpreter).
    ``k_j`` orders ``|err_j|`` with 3 mantissa bits cleared, ties to the first coordinate (the keys of
    :func:`nqcompile.codec.e8._e8_t_slice`).
    """
    f0, f1, f2, f3 = tl.floor(x0 + 0.5), tl.floor(x1 + 0.5), tl.floor(x2 + 0.5), tl.floor(x3 + 0.5)
    f4, f5, f6, f7 = tl.floor(x4 + 0.5), tl.floor(x5 + 0.5), tl.floor(x6 + 0.5), tl.floor(x7 + 0.5)
    e0, e1, e2, e3, e4, e5, e6, e7 = x0 - f0, x1 - f1, x2 - f2, x3 - f3, x4 - f4, x5 - f5, x6 - f6, x7 - f7
    k0 = (e0.to(tl.int32, bitcast=True) & 0x7FFFFFF8) | 7
    k1 = (e1.to(tl.int32, bitcast=True) & 0x7FFFFFF8) | 6
    k2 = (e2.to(tl.int32, bitcast=True) & 0x7FFFFFF8) | 5
    k3 = (e3.to(tl.int32, bitcast=True) & 0x7FFFFFF8) | 4
    k4 = (e4.to(tl.int32, bitcast=True) & 0x7FFFFFF8) | 3
    k5 = (e5.to(tl.int32, bitcast=True) & 0x7FFFFFF8) | 2
    k6 = (e6.to(tl.int32, bitcast=True) & 0x7FFFFFF8) | 1
    k7 = e7.to(tl.int32, bitcast=True) & 0x7FFFFFF8
    kmax = tl.maximum(tl.maximum(tl.maximum(k0, k1), tl.maximum(k2, k3)),
                      tl.maximum(tl.maximum(k4, k5), tl.maximum(k6, k7)))
    total = f0 + f1 + f2 + f3 + f4 + f5 + f6 + f7
    odd = (total - 2.0 * tl.floor(total * 0.5)) != 0.0
    f0 += tl.where(odd & (k0 == kmax), tl.where(e0 >= 0.0, 1.0, -1.0), 0.0)
    f1 += tl.where(odd & (k1 == kmax), tl.where(e1 >= 0.0, 1.0, -1.0), 0.0)
    f2 += tl.where(odd & (k2 == kmax), tl.where(e2 >= 0.0, 1.0, -1.0), 0.0)
    f3 += tl.where(odd & (k3 == kmax), tl.where(e3 >= 0.0, 1.0, -1.0), 0.0)
    f4 += tl.where(odd & (k4 == kmax), tl.where(e4 >= 0.0, 1.0, -1.0), 0.0)
    f5 += tl.where(odd & (k5 == kmax), tl.where(e5 >= 0.0, 1.0, -1.0), 0.0)
    f6 += tl.where(odd & (k6 == kmax), tl.where(e6 >= 0.0, 1.0, -1.0), 0.0)
    f7 += tl.where(odd & (k7 == kmax), tl.where(e7 >= 0.0, 1.0, -1.0), 0.0)
    return f0, f1, f2, f3, f4, f5, f6, f7


@triton.jit
def _e8_choice(x0, x1, x2, x3, x4, x5, x6, x7):
    """Both E8 candidates of each block (D8 and D8 + 1/2, 8 coordinates each) and ``take0``, where the D8 one wins
    (closer, in the sequential sum of :func:`nqcompile.codec.e8._rowsum`; a tie to the smaller first coordinate)."""
    a0, a1, a2, a3, a4, a5, a6, a7 = d8_columns(x0, x1, x2, x3, x4, x5, x6, x7)
    b0, b1, b2, b3, b4, b5, b6, b7 = d8_columns(x0 - 0.5, x1 - 0.5, x2 - 0.5, x3 - 0.5, x4 - 0.5, x5 - 0.5,
                                                x6 - 0.5, x7 - 0.5)
    b0, b1, b2, b3, b4, b5, b6, b7 = b0 + 0.5, b1 + 0.5, b2 + 0.5, b3 + 0.5, b4 + 0.5, b5 + 0.5, b6 + 0.5, b7 + 0.5
    d0 = (x0 - a0) * (x0 - a0) + (x1 - a1) * (x1 - a1) + (x2 - a2) * (x2 - a2) + (x3 - a3) * (x3 - a3)
    d0 = d0 + (x4 - a4) * (x4 - a4) + (x5 - a5) * (x5 - a5) + (x6 - a6) * (x6 - a6) + (x7 - a7) * (x7 - a7)
    d1 = (x0 - b0) * (x0 - b0) + (x1 - b1) * (x1 - b1) + (x2 - b2) * (x2 - b2) + (x3 - b3) * (x3 - b3)
    d1 = d1 + (x4 - b4) * (x4 - b4) + (x5 - b5) * (x5 - b5) + (x6 - b6) * (x6 - b6) + (x7 - b7) * (x7 - b7)
    take0 = (d0 < d1) | ((d0 == d1) & (a0 < b0))
    return take0, a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7


@triton.jit
def e8_columns(x0, x1, x2, x3, x4, x5, x6, x7):
    """Nearest E8 points (Conway and Sloane 1982, section III) of blocks given coordinate by coordinate: the rules
    and float32 operations of :func:`nqcompile.codec.e8._e8_t`, so the same points for the same inputs."""
    t, a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7 = _e8_choice(x0, x1, x2, x3, x4, x5, x6, x7)
    return (tl.where(t, a0, b0), tl.where(t, a1, b1), tl.where(t, a2, b2), tl.where(t, a3, b3), tl.where(t, a4, b4),
            tl.where(t, a5, b5), tl.where(t, a6, b6), tl.where(t, a7, b7))


@triton.jit
def e8_is_zero(x0, x1, x2, x3, x4, x5, x6, x7):
    """``e8_nearest(x) == 0`` per block (:func:`nqcompile.codec.e8._e8_t_is_zero`: the D8 candidate taken, and 0)."""
    t, a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7 = _e8_choice(x0, x1, x2, x3, x4, x5, x6, x7)
    return t & (a0 == 0.0) & (a1 == 0.0) & (a2 == 0.0) & (a3 == 0.0) & (a4 == 0.0) & (a5 == 0.0) & (a6 == 0.0) & (
        a7 == 0.0)


@triton.jit
def label_word(y0, y1, y2, y3, y4, y5, y6, y7, BITS: tl.constexpr):
    """The packed labels of E8 points ``y`` (lattice units): ``k = (y G^-1) mod q`` (the inverse of
    :func:`nqcompile.codec.lattice._representatives_t`'s ``y = k G``, exact), ``k_j`` at bits ``j BITS`` of an int32
    word (little-endian, :mod:`nqcompile.codec.packing`)."""
    Q: tl.constexpr = 1 << BITS
    k6 = y6 - y7
    k5 = y5 - y7 + k6
    k4 = y4 - y7 + k5
    k3 = y3 - y7 + k4
    k2 = y2 - y7 + k3
    k1 = y1 - y7 + k2
    k0 = (y0 - y7 + k1) * 0.5
    k7 = y7 * 2.0
    word = k0.to(tl.int32) & (Q - 1)
    word |= (k1.to(tl.int32) & (Q - 1)) << BITS
    word |= (k2.to(tl.int32) & (Q - 1)) << (2 * BITS)
    word |= (k3.to(tl.int32) & (Q - 1)) << (3 * BITS)
    word |= (k4.to(tl.int32) & (Q - 1)) << (4 * BITS)
    word |= (k5.to(tl.int32) & (Q - 1)) << (5 * BITS)
    word |= (k6.to(tl.int32) & (Q - 1)) << (6 * BITS)
    word |= (k7.to(tl.int32) & (Q - 1)) << (7 * BITS)
    return word


@triton.jit
def _store_word(ptr, word, mask, byte_stride, BITS: tl.constexpr):
    """The ``BITS`` bytes of ``word``, little-endian, at ``ptr``, ``ptr + byte_stride``, ..."""
    for t in tl.static_range(BITS):
        tl.store(ptr + t * byte_stride, ((word >> (8 * t)) & 255).to(tl.uint8), mask=mask)


@triton.jit
def _overloaded(table_ptr, u0, u1, u2, u3, u4, u5, u6, u7, v0, v1, v2, v3, v4, v5, v6, v7, v_ok, vi,
                BITS: tl.constexpr, GRID: tl.constexpr, STEPS: tl.constexpr, BLOCK_G: tl.constexpr):
    """Codeword (lattice units, in the codebook) of one overloaded block ``u`` (8 scalars):
    :meth:`nqcompile.codec.lattice.E8LatticeCode._overloaded` and :func:`~nqcompile.codec.lattice._local_search`.

    The ``GRID`` shrink factors (1.0, the plain wrapped nearest point, first) are tried at once, one per lane: the
    first of smallest squared distance among the factors up to the first whose point lies in the codebook (the
    reference's strict-improvement updates and early stop). Then at most ``STEPS`` moves to the best neighbour
    ``c + v`` (``v0..v7`` ``[256]``: the minimal vectors, valid where ``v_ok``; ``vi`` their index) with
    ``v.(u - c) > 1`` inside the codebook, ties to the first.
    """
    Q: tl.constexpr = 1 << BITS
    g = tl.arange(0, BLOCK_G)
    a = tl.load(table_ptr + (8 + BITS) * 256 + g, mask=g < GRID, other=1.0)  # encoder table rows 10..12
    y0, y1, y2, y3, y4, y5, y6, y7 = e8_columns(a * u0, a * u1, a * u2, a * u3, a * u4, a * u5, a * u6, a * u7)
    z0, z1, z2, z3, z4, z5, z6, z7 = e8_columns(y0 * (1.0 / Q), y1 * (1.0 / Q), y2 * (1.0 / Q), y3 * (1.0 / Q),
                                                y4 * (1.0 / Q), y5 * (1.0 / Q), y6 * (1.0 / Q), y7 * (1.0 / Q))
    c0, c1, c2, c3 = y0 - Q * z0, y1 - Q * z1, y2 - Q * z2, y3 - Q * z3
    c4, c5, c6, c7 = y4 - Q * z4, y5 - Q * z5, y6 - Q * z6, y7 - Q * z7
    d = (c0 - u0) * (c0 - u0) + (c1 - u1) * (c1 - u1) + (c2 - u2) * (c2 - u2) + (c3 - u3) * (c3 - u3)
    d = d + (c4 - u4) * (c4 - u4) + (c5 - u5) * (c5 - u5) + (c6 - u6) * (c6 - u6) + (c7 - u7) * (c7 - u7)
    inside = (z0 == 0.0) & (z1 == 0.0) & (z2 == 0.0) & (z3 == 0.0) & (z4 == 0.0) & (z5 == 0.0) & (z6 == 0.0) & (
        z7 == 0.0)
    first_inside = tl.min(tl.where(inside, g, BLOCK_G), axis=0)
    tried = (g < GRID) & (g <= first_inside)
    d = tl.where(tried, d, float("inf"))
    best = tl.min(d, axis=0)
    chosen = g == tl.min(tl.where(d == best, g, BLOCK_G), axis=0)
    c0 = tl.sum(tl.where(chosen, c0, 0.0), axis=0)
    c1 = tl.sum(tl.where(chosen, c1, 0.0), axis=0)
    c2 = tl.sum(tl.where(chosen, c2, 0.0), axis=0)
    c3 = tl.sum(tl.where(chosen, c3, 0.0), axis=0)
    c4 = tl.sum(tl.where(chosen, c4, 0.0), axis=0)
    c5 = tl.sum(tl.where(chosen, c5, 0.0), axis=0)
    c6 = tl.sum(tl.where(chosen, c6, 0.0), axis=0)
    c7 = tl.sum(tl.where(chosen, c7, 0.0), axis=0)
    moving = tl.sum(chosen.to(tl.int32), axis=0) > 0  # True
    for _ in tl.static_range(STEPS):
        if moving:
            # (u - c) . v, summed in order (exact products: v holds 0, +-1/2 and +-1).
            dots = (u0 - c0) * v0
            dots += (u1 - c1) * v1
            dots += (u2 - c2) * v2
            dots += (u3 - c3) * v3
            dots += (u4 - c4) * v4
            dots += (u5 - c5) * v5
            dots += (u6 - c6) * v6
            dots += (u7 - c7) * v7
            member = e8_is_zero((c0 + v0) * (1.0 / Q), (c1 + v1) * (1.0 / Q), (c2 + v2) * (1.0 / Q),
                                (c3 + v3) * (1.0 / Q), (c4 + v4) * (1.0 / Q), (c5 + v5) * (1.0 / Q),
                                (c6 + v6) * (1.0 / Q), (c7 + v7) * (1.0 / Q))
            candidate = v_ok & (dots > 1.0) & member
            top = tl.max(tl.where(candidate, dots, -float("inf")), axis=0)
            step = vi == tl.min(tl.where(candidate & (dots == top), vi, 256), axis=0)
            moving = tl.sum(step.to(tl.int32), axis=0) > 0
            c0 += tl.sum(tl.where(step, v0, 0.0), axis=0)
            c1 += tl.sum(tl.where(step, v1, 0.0), axis=0)
            c2 += tl.sum(tl.where(step, v2, 0.0), axis=0)
            c3 += tl.sum(tl.where(step, v3, 0.0), axis=0)
            c4 += tl.sum(tl.where(step, v4, 0.0), axis=0)
            c5 += tl.sum(tl.where(step, v5, 0.0), axis=0)
            c6 += tl.sum(tl.where(step, v6, 0.0), axis=0)
            c7 += tl.sum(tl.where(step, v7, 0.0), axis=0)
    return c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def _split8(x, BLOCK_N: tl.constexpr, NB: tl.constexpr):
    """``x`` ``[BLOCK_N, 8 NB]`` as its 8 coordinate columns ``[BLOCK_N, NB]`` (column ``j`` holds ``x[:, 8 i + j]``)."""
    x = tl.reshape(x, [BLOCK_N, NB, 2, 2, 2])
    c0, c1 = tl.split(x)
    c00, c01 = tl.split(c0)
    c10, c11 = tl.split(c1)
    x0, x4 = tl.split(c00)
    x2, x6 = tl.split(c01)
    x1, x5 = tl.split(c10)
    x3, x7 = tl.split(c11)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _quantize_kernel(
    x_ptr, pos_ptr, dest_ptr, count_ptr, hs_ptr, freq_ptr, mean_ptr, scale_ptr, table_ptr, cent_ptr,
    codes_ptr, scales_ptr, su_ptr, sid_ptr,
    sx_b, sx_h, sx_t, sx_d, sp_b, sp_h, sp_t, sn_b, sn_h, sn_d, sc_b, sc_h, sc_t, sc_c, ss_b, ss_h, ss_t,
    H, N, C, unit, gain, attention_scaling,
    D: tl.constexpr, ROPE: tl.constexpr, ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr, BITS: tl.constexpr,
    GRID: tl.constexpr, STEPS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
    KC: tl.constexpr,
):
    """One (sequence, KV head, block of ``BLOCK_N`` tokens): codes and scale codes of tokens ``t < count[b]`` (and
    ``t < N``) written at slots ``dest[b] + t`` (those inside the capacity ``C``)."""
    NB: tl.constexpr = BLOCK_D // 8
    Q: tl.constexpr = 1 << BITS
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    t = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    dest = tl.load(dest_ptr + b)
    slot = dest + t
    live = (t < tl.load(count_ptr + b)) & (t < N) & (slot >= 0) & (slot < C)
    rows = x_ptr + b * sx_b + h * sx_h + t * sx_t
    norm = b * sn_b + h * sn_h
    if ROPE:
        pos = tl.load(pos_ptr + b * sp_b + h * sp_h + t * sp_t, mask=live, other=0).to(tl.float32)

    # x S^T (S = H / unit, +-1), x taken KC columns at a time: RoPE removed, normalized, split into bfloat16 parts.
    cols = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for k0 in range(0, BLOCK_D, KC):
        k = k0 + tl.arange(0, KC)
        k_ok = k < D
        m2 = live[:, None] & k_ok[None, :]
        x = tl.load(rows[:, None] + k[None, :] * sx_d, mask=m2, other=0.0).to(tl.float32)
        if ROPE:
            R2: tl.constexpr = ROTARY // 2
            rot = k < ROTARY
            if INTERLEAVED:
                first = (k % 2) == 0
                partner = tl.where(first, k + 1, k - 1)
                pair = k // 2
            else:
                first = k < R2
                partner = tl.where(first, k + R2, k - R2)
                pair = tl.where(first, k, k - R2)
            partner = tl.where(rot, partner, k)
            xp = tl.load(rows[:, None] + partner[None, :] * sx_d, mask=m2, other=0.0).to(tl.float32)
            freq = tl.load(freq_ptr + pair, mask=rot, other=0.0)
            angle = (pos[:, None] * freq[None, :]).to(tl.float64)
            cos = tl.cos(angle).to(tl.float32)
            sin = tl.sin(angle).to(tl.float32)
            # The reference's rot * cos - rotate(rot) * sin, rotate(rot) = (-x_b, x_a), then / attention_scaling.
            turned = tl.where(first[None, :], -xp, xp)
            x = tl.where(rot[None, :], tl.math.div_rn(x * cos - turned * sin, attention_scaling), x)
        mean = tl.load(mean_ptr + norm + k * sn_d, mask=k_ok, other=0.0)
        scale = tl.load(scale_ptr + norm + k * sn_d, mask=k_ok, other=1.0)
        x = tl.math.div_rn(x - mean[None, :], scale[None, :])
        hi = x.to(tl.bfloat16).to(tl.float32)
        rest = x - hi
        mid = rest.to(tl.bfloat16).to(tl.float32)
        low = rest - mid  # x = hi + mid + low exactly, each part exact in bfloat16, hence in tf32
        s_t = tl.load(hs_ptr + k[:, None] * BLOCK_D + cols[None, :])  # S^T rows k, zero-padded to BLOCK_D
        acc = tl.dot(low, s_t, acc, input_precision="tf32")
        acc = tl.dot(mid, s_t, acc, input_precision="tf32")
        acc = tl.dot(hi, s_t, acc, input_precision="tf32")
    y = acc * unit

    # One-byte scale: code by binary search in the thresholds, vector divided by the decoded scale.
    rms = tl.math.sqrt_rn(tl.math.div_rn(tl.sum(y * y, axis=1), tl.full([BLOCK_N], D, tl.float32)))
    code = tl.zeros([BLOCK_N], dtype=tl.int32)
    for i in tl.static_range(8):  # encoder table row 0: the thresholds
        up = code + (128 >> i)
        code = tl.where(rms >= tl.load(table_ptr + up), up, code)
    s = tl.load(table_ptr + 256 + code)  # row 1: the decoded scales
    tl.store(scales_ptr + b * ss_b + h * ss_h + slot * ss_t, code.to(tl.uint8), mask=live)
    xn = tl.where(s[:, None] > 0.0, tl.math.div_rn(y, tl.where(s > 0.0, s, 1.0)[:, None]), 0.0)

    # Lattice units, nearest E8 point, codebook check; the blocks inside the codebook are done.
    x0, x1, x2, x3, x4, x5, x6, x7 = _split8(xn, BLOCK_N, NB)
    shift = cent_ptr + (BITS - 2) * 8
    u0 = tl.math.div_rn(x0, gain) + tl.load(shift + 0)
    u1 = tl.math.div_rn(x1, gain) + tl.load(shift + 1)
    u2 = tl.math.div_rn(x2, gain) + tl.load(shift + 2)
    u3 = tl.math.div_rn(x3, gain) + tl.load(shift + 3)
    u4 = tl.math.div_rn(x4, gain) + tl.load(shift + 4)
    u5 = tl.math.div_rn(x5, gain) + tl.load(shift + 5)
    u6 = tl.math.div_rn(x6, gain) + tl.load(shift + 6)
    u7 = tl.math.div_rn(x7, gain) + tl.load(shift + 7)
    y0, y1, y2, y3, y4, y5, y6, y7 = e8_columns(u0, u1, u2, u3, u4, u5, u6, u7)
    inside = e8_is_zero(y0 * (1.0 / Q), y1 * (1.0 / Q), y2 * (1.0 / Q), y3 * (1.0 / Q), y4 * (1.0 / Q),
                        y5 * (1.0 / Q), y6 * (1.0 / Q), y7 * (1.0 / Q))
    blk = tl.arange(0, NB)[None, :]
    block_live = live[:, None] & (blk < D // 8)
    out = codes_ptr + b * sc_b + h * sc_h
    first_byte = out + slot[:, None] * sc_t + blk * (BITS * sc_c)
    word = label_word(y0, y1, y2, y3, y4, y5, y6, y7, BITS)
    _store_word(first_byte, word, block_live & inside, sc_c, BITS)

    # Overloaded blocks: listed (u and the block's index) in this program's scratch rows, then searched one by one.
    over = (block_live & ~inside).to(tl.int32)
    n_over = tl.sum(tl.sum(over, axis=1), axis=0)
    at = tl.reshape(tl.cumsum(tl.reshape(over, [BLOCK_N * NB]), axis=0), [BLOCK_N, NB]) - 1
    prog = tl.program_id(0).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
    base = prog * (BLOCK_N * NB)
    listed = over != 0
    entry = su_ptr + (base + at) * 8
    tl.store(entry + 0, u0, mask=listed)
    tl.store(entry + 1, u1, mask=listed)
    tl.store(entry + 2, u2, mask=listed)
    tl.store(entry + 3, u3, mask=listed)
    tl.store(entry + 4, u4, mask=listed)
    tl.store(entry + 5, u5, mask=listed)
    tl.store(entry + 6, u6, mask=listed)
    tl.store(entry + 7, u7, mask=listed)
    tl.store(sid_ptr + base + at, tl.arange(0, BLOCK_N)[:, None] * NB + blk, mask=listed)
    tl.debug_barrier()
    vi = tl.arange(0, 256)
    v_ok = vi < 240
    vrow = table_ptr + 2 * 256 + vi  # rows 2..9: the minimal vectors
    v0, v1, v2, v3 = tl.load(vrow), tl.load(vrow + 256), tl.load(vrow + 2 * 256), tl.load(vrow + 3 * 256)
    v4, v5, v6, v7 = tl.load(vrow + 4 * 256), tl.load(vrow + 5 * 256), tl.load(vrow + 6 * 256), tl.load(vrow + 7 * 256)
    for i in range(0, n_over):
        listed_u = su_ptr + (base + i) * 8
        c0, c1, c2, c3, c4, c5, c6, c7 = _overloaded(
            table_ptr, tl.load(listed_u), tl.load(listed_u + 1), tl.load(listed_u + 2), tl.load(listed_u + 3),
            tl.load(listed_u + 4), tl.load(listed_u + 5), tl.load(listed_u + 6), tl.load(listed_u + 7),
            v0, v1, v2, v3, v4, v5, v6, v7, v_ok, vi, BITS, GRID, STEPS, BLOCK_G)
        ident = tl.load(sid_ptr + base + i)
        token_slot = dest + tl.program_id(1) * BLOCK_N + ident // NB
        block_word = label_word(c0, c1, c2, c3, c4, c5, c6, c7, BITS)
        _store_word(out + token_slot * sc_t + (ident % NB) * (BITS * sc_c), block_word, True, sc_c, BITS)


@functools.lru_cache(maxsize=None)
def _encoder_table_cpu() -> torch.Tensor:
    """:func:`encoder_table` on the CPU."""
    table = torch.zeros(_GRID + len(E8_BITS), 256, dtype=torch.float32)
    # Thresholds: the smallest float32 r > 0 whose scale code is >= c, by bisection on the float32 bit patterns
    # (encode_scale is non-decreasing in r); code 0 keeps threshold 0 (r = 0 is the only code-0 input).
    target = torch.arange(1, 256)
    lo = torch.zeros(255, dtype=torch.int32)  # encode_scale(float(lo)) < target (0.0 gives code 0)
    hi = torch.full((255,), 0x7F7FFFFF, dtype=torch.int32)  # the largest float32: code 255
    while bool((hi - lo > 1).any()):
        mid = lo + (hi - lo) // 2
        up = encode_scale(mid.view(torch.float32)).long() >= target
        hi, lo = torch.where(up, mid, hi), torch.where(up, lo, mid)
    table[_BOUNDS, 1:] = hi.view(torch.float32)
    table[_SCALES] = decode_scale(torch.arange(256, dtype=torch.uint8))
    table[_VECTORS:_VECTORS + 8, :240] = _minimal_vectors().T
    for row, bits in enumerate(E8_BITS):
        grid = (1.0,) + code_for("e8", bits).shrink_grid
        table[_GRID + row, :len(grid)] = torch.tensor(grid)
    return table


@functools.lru_cache(maxsize=None)
def encoder_table(device: torch.device | str) -> torch.Tensor:
    """The encoder's constants, float32 ``[13, 256]`` on ``device`` (built once on the CPU, copied once per device by
    :func:`~nqcompile.codec.constants.on_device`, so a call inside a CUDA-graph capture copies nothing):

    * row 0: ``[c]`` the smallest float32 RMS that :func:`~nqcompile.codec.scales.encode_scale` codes as ``c`` or
      more (``c >= 1``; 0 for ``c = 0``), found by bisection on ``encode_scale`` itself;
    * row 1: :func:`~nqcompile.codec.scales.decode_scale` of codes 0..255, as the CPU computes it;
    * rows 2..9: coordinate ``j`` of the 240 minimal vectors of E8 (:func:`nqcompile.codec.lattice._minimal_vectors`
      order; zeros past 240);
    * rows 10..12: 1.0 and the shrink grid of ``code_for("e8", bits)`` for bits 2, 3, 4 (zeros after).
    """
    return on_device(_encoder_table_cpu(), device)


def _program_shape(dim: int) -> tuple[int, int]:
    """``(BLOCK_D, warps)``: 4 warps up to head_dim 128, 8 above."""
    return pow2(dim), 4 if dim <= 128 else 8


def _launch(codes, scales, x, positions, dest, count, hs, inv_freq, mean, scale, table, centroids, su, sid, bits,
            unit, attention_scaling, rotary_dim, layout, rope):
    """One launch of :func:`_quantize_kernel` over keys (``rope``) or values."""
    batch, heads, n, dim = x.shape
    code = code_for("e8", bits)
    block_d, warps = _program_shape(dim)
    if rope:
        pos_strides = (positions.stride(0), positions.stride(1) if positions.shape[1] > 1 else 0, positions.stride(2))
    else:
        pos_strides = (0, 0, 0)
    wrap_triton(_quantize_kernel)[(batch * heads, triton.cdiv(n, BLOCK_N))](
        x, positions, dest, count, hs, inv_freq, mean, scale, table, centroids, codes, scales, su, sid,
        *x.stride(), *pos_strides, *mean.stride(), *codes.stride(), *scales.stride(),
        heads, n, codes.shape[2], unit, code.gain, attention_scaling,
        D=dim, ROPE=rope, ROTARY=rotary_dim, INTERLEAVED=layout == "interleaved", BITS=bits,
        GRID=len(code.shrink_grid) + 1, STEPS=code.search_steps, BLOCK_N=BLOCK_N, BLOCK_D=block_d,
        BLOCK_G=pow2(len(code.shrink_grid) + 1), KC=min(_KC, block_d), num_warps=warps, enable_fp_fusion=False,
    )


@triton_op("nqcompile::e8_quantize_kv", mutates_args=("k_codes", "k_scales", "v_codes", "v_scales"))
def e8_quantize_kv(
    k_codes: torch.Tensor, k_scales: torch.Tensor, v_codes: torch.Tensor, v_scales: torch.Tensor,
    key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor, dest: torch.Tensor, count: torch.Tensor,
    hadamard: torch.Tensor, inv_freq: torch.Tensor, norm_mean: torch.Tensor, norm_scale: torch.Tensor,
    centroids: torch.Tensor, table: torch.Tensor, key_bits: int, value_bits: int, attention_scaling: float,
    rotary_dim: int, layout: str,
) -> None:
    """Quantize ``count[b]`` new tokens per sequence to E8 codes at slots ``dest[b] + j``:
    :func:`nqcompile.ops.write_kv` for kind ``"e8"``, in two launches (keys, values), without reading anything back
    to the host (CUDA-graph capturable).

    Args:
        k_codes, v_codes: uint8 ``[B, H, C, bits * D / 8]`` packed labels at ``key_bits`` / ``value_bits``
            (:mod:`nqcompile.ops.layout`), written in place. k_scales, v_scales: uint8 ``[B, H, C]`` scale codes,
            written in place.
        key: ``[B, H, n, D]`` post-RoPE keys, value: ``[B, H, n, D]`` (float16, bfloat16, float32 or float64; computed
            in float32 as the reference). positions: integer ``[B, H or 1, n]`` positions of the keys.
        dest: int64 ``[B]`` first slot written. count: int64 ``[B]``, tokens ``j < count[b]`` (and ``j < n``) are
            written; slots outside ``0 .. C - 1`` are skipped (the reference raises there).
        hadamard: float32 ``[D, D]``, a ``±1 / sqrt(D)`` matrix (:func:`unsupported_reason` requires one).
        inv_freq: float32 ``[rotary_dim / 2]``. norm_mean, norm_scale: float32 ``[2, B, H, D]``, the keys' (``[0]``,
            pre-RoPE) and the values' (``[1]``) per-channel normalization.
        centroids: :func:`nqcompile.kernels.lattice.centroid_table` on the device. table: :func:`encoder_table` on
            the device.
        key_bits, value_bits: E8 bits per element (2, 3 or 4). attention_scaling, rotary_dim, layout: the RoPE.

    Non-finite inputs give unspecified codes (the reference raises; the kernel cannot without a host read-back).
    """
    batch, heads, n, dim = key.shape
    if n == 0:
        return
    block_d, _ = _program_shape(dim)
    programs = batch * heads * triton.cdiv(n, BLOCK_N)
    su = torch.empty(programs * BLOCK_N * (block_d // 8) * 8, dtype=torch.float32, device=key.device)
    sid = torch.empty(programs * BLOCK_N * (block_d // 8), dtype=torch.int32, device=key.device)
    signs = torch.zeros(block_d, block_d, dtype=torch.float32, device=key.device)
    unit = abs(float(hadamard_matrix(dim)[0, 0]))  # the CPU copy: no read-back from the device
    signs[:dim, :dim] = torch.sign(hadamard.T)
    freq = inv_freq.float().contiguous()
    mean, scale = norm_mean.contiguous(), norm_scale.contiguous()
    common = dict(dest=dest, count=count, hs=signs, inv_freq=freq, table=table, centroids=centroids, su=su, sid=sid,
                  unit=unit, attention_scaling=attention_scaling, rotary_dim=rotary_dim, layout=layout)
    _launch(k_codes, k_scales, key, positions, mean=mean[0], scale=scale[0], bits=key_bits, rope=True, **common)
    _launch(v_codes, v_scales, value, positions, mean=mean[1], scale=scale[1], bits=value_bits, rope=False, **common)


def unsupported_reason(k_codes: torch.Tensor, k_scales: torch.Tensor, key: torch.Tensor, kind: str,
                       bits: tuple[int, int], dim: int, rotary_dim: int, layout: str,
                       inv_freq: torch.Tensor) -> Optional[str]:
    """Why :func:`e8_quantize_kv` cannot write these tokens, or None when it can (shapes, dtypes and static arguments
    only, never tensor values).

    Args:
        k_codes: ``[B, H, C, ...]`` uint8 storage. k_scales: ``[B, H, C]`` uint8. key: ``[B, H, n, D]`` new keys.
        kind: the codec name. bits: key and value bits. dim: head_dim. rotary_dim, layout, inv_freq: the RoPE.

    Returns:
        None, or a sentence naming the first unsupported property (the caller then runs the torch reference).
    """
    if k_codes.dim() != 4 or k_codes.dtype != torch.uint8 or k_scales.dtype != torch.uint8:
        return f"codes of shape {tuple(k_codes.shape)} and dtype {k_codes.dtype} (uint8 [B, H, C, bytes] expected)"
    if not key.is_floating_point():
        return f"keys of dtype {key.dtype} (a float dtype expected)"
    return codec_reason(kind, bits, dim, rotary_dim, layout, inv_freq, MAX_HEAD_DIM)
