"""Triton device functions shared by the kernels: E8 codewords from packed labels, one-byte scales, RoPE pairs
and angles.

Each is a ``triton.jit`` function called from inside a kernel (never launched on its own), except
:func:`centroid_table`, the codebooks' centroids the kernels take as an input. The E8 decode is that of
:mod:`nqcompile.codec.lattice` (Conway and Sloane 1983, "A fast encoding method for lattice codes and quantizers",
IEEE Trans. Inf. Theory 29(6); the nearest-point search of Conway and Sloane 1982, section III, with the tie rules
of :mod:`nqcompile.codec.e8`), bit for bit; the scales those of :mod:`nqcompile.codec.scales`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..codec.constants import on_device
from ..codec.hadamard import is_hadamard_order
from ..codec.lattice import E8_BITS
from ..codec.registry import code_for
from ..codec.rope import LAYOUTS

__all__ = ["pow2", "d8_nearest", "e8_codewords", "decode_scales", "cos_sin", "rope_pairs", "rotated_keys", "centroid_table",
           "codec_reason"]


def pow2(n: int) -> int:
    """The smallest power of two >= max(n, 16) (``tl.arange`` sizes; 16: the smallest ``tl.dot`` dimension)."""
    return max(16, triton.next_power_of_2(n))


@triton.jit
def d8_nearest(x, j):
    """Nearest D8 point of each 8-dim block of ``x`` ``[N, NB, 8]`` (``j``: the coordinate index ``[1, 1, 8]``).

    :func:`nqcompile.codec.e8._d8`'s rules: round halves up; if the coordinate sum is odd, re-round the first
    coordinate of largest rounding error the other way (a zero error rounds up). Exact for the dyadic inputs here.
    """
    f = tl.floor(x + 0.5)
    err = x - f
    total = tl.sum(f, axis=2)
    odd = (total - 2.0 * tl.floor(total * 0.5)) != 0.0
    worst = tl.argmax(tl.abs(err), axis=2, tie_break_left=True)
    at = j == worst[:, :, None]
    err_at = tl.sum(tl.where(at, err, 0.0), axis=2)
    step = tl.where(odd, tl.where(err_at >= 0.0, 1.0, -1.0), 0.0)
    return f + tl.where(at, step[:, :, None], 0.0)


@triton.jit
def e8_codewords(row_ptr, byte_stride, live, BITS: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """Codebook representatives (lattice units) of ``BLOCK_N`` packed code rows: float32 ``[BLOCK_N, BLOCK_D]``.

    ``row_ptr`` ``[BLOCK_N]``: pointers to each row's first byte; ``live`` ``[BLOCK_N]`` bool (dead rows and the
    columns past ``D`` read label 0, whose representative is 0). Per 8-dim block: the ``BITS`` bytes as one
    little-endian word, labels ``k_j = (word >> j BITS) mod q``, ``y = k G`` (written out as in
    :func:`nqcompile.codec.lattice._representatives_t`), ``c = y - q e8_nearest(y / q)``.
    """
    NB: tl.constexpr = BLOCK_D // 8
    Q: tl.constexpr = 1 << BITS
    blk = tl.arange(0, NB)[None, :, None]
    j = tl.arange(0, 8)[None, None, :]
    ok = live[:, None, None] & (blk < D // 8)
    first = row_ptr[:, None, None] + blk * (BITS * byte_stride)
    word = tl.zeros([BLOCK_N, NB, 1], dtype=tl.int32)
    for b in tl.static_range(BITS):
        word = word | (tl.load(first + b * byte_stride, mask=ok, other=0).to(tl.int32) << (8 * b))
    k = (word >> (j * BITS)) & (Q - 1)
    k_next = (word >> (tl.minimum(j + 1, 7) * BITS)) & (Q - 1)
    k7 = ((word >> (7 * BITS)) & (Q - 1)).to(tl.float32)
    # y_0 = 2 k_0 - k_1 + k_7 / 2; y_j = k_j - k_{j+1} + k_7 / 2 (j = 1..5); y_6 = k_6 + k_7 / 2; y_7 = k_7 / 2.
    lin = tl.where(j == 0, 2 * k, k) - tl.where(j < 6, k_next, 0)
    y = tl.where(j == 7, 0, lin).to(tl.float32) + 0.5 * k7
    x = y * (1.0 / Q)
    y0 = d8_nearest(x, j)
    y1 = d8_nearest(x - 0.5, j) + 0.5
    d0 = tl.sum((x - y0) * (x - y0), axis=2)
    d1 = tl.sum((x - y1) * (x - y1), axis=2)
    first0 = tl.sum(tl.where(j == 0, y0, 0.0), axis=2)
    first1 = tl.sum(tl.where(j == 0, y1, 0.0), axis=2)
    take0 = (d0 < d1) | ((d0 == d1) & (first0 < first1))
    c = y - Q * tl.where(take0[:, :, None], y0, y1)
    return tl.reshape(c, [BLOCK_N, BLOCK_D])


@triton.jit
def decode_scales(ptr, live):
    """Decoded one-byte log2 scales (:mod:`nqcompile.codec.scales`): 0 for code 0, else ``2 ** ((code - 128) / 16)``."""
    code = tl.load(ptr, mask=live, other=0).to(tl.float32)
    return tl.where(code == 0.0, 0.0, tl.exp2((code - 128.0) * 0.0625))


@triton.jit
def cos_sin(angle, TWO_PI: tl.constexpr):
    """cos and sin of float32 ``angle`` (any magnitude): reduced to [-pi, pi] in float64 first, so the float32
    functions (fast approximations on some GPUs) only ever see their accurate range."""
    a = angle.to(tl.float64)
    r = (a - TWO_PI * tl.floor(a * (1.0 / TWO_PI) + 0.5)).to(tl.float32)
    return tl.cos(r), tl.sin(r)


@triton.jit
def rope_pairs(freq_ptr, attention_scaling, D: tl.constexpr, ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr,
               BLOCK_P: tl.constexpr):
    """The ``D / 2`` RoPE pairs of a head, as ``(pair, ca, cb, freq, amp)`` ``[BLOCK_P]``: pair ``i`` (valid where
    ``pair``) rotates dim ``ca[i]`` (first) with ``cb[i]`` (second) at inverse frequency ``freq[i]`` (loaded from
    ``freq_ptr``) and amplitude ``amp[i]``. ``"half"`` pairs ``i`` with ``i + ROTARY / 2``, ``INTERLEAVED`` ``2i`` with
    ``2i + 1``; the ``D - ROTARY`` dims past the rotary ones pair among themselves with angle 0 and amplitude 1."""
    P: tl.constexpr = D // 2
    R2: tl.constexpr = ROTARY // 2
    T2: tl.constexpr = (D - ROTARY) // 2
    i = tl.arange(0, BLOCK_P)
    pair = i < P
    rot = i < R2
    if INTERLEAVED:
        ca = tl.where(rot, 2 * i, ROTARY + (i - R2))
        cb = tl.where(rot, 2 * i + 1, ROTARY + T2 + (i - R2))
    else:
        ca = tl.where(rot, i, ROTARY + (i - R2))
        cb = tl.where(rot, i + R2, ROTARY + T2 + (i - R2))
    freq = tl.load(freq_ptr + i, mask=rot, other=0.0)
    return pair, tl.where(pair, ca, 0), tl.where(pair, cb, 0), freq, tl.where(rot, attention_scaling, 1.0)


@triton.jit
def rotated_keys(ck, unit, pos, ha, hb, mu_a, mu_b, scale_a, scale_b, mean_a, mean_b, freq, amp, TWO_PI: tl.constexpr):
    """Post-RoPE keys of ``N`` slots in the halves ``A``, ``B`` of the RoPE pairs (:func:`rope_pairs`), float32
    ``[N, P]`` each, from their codewords ``ck`` (float16 ``[N, D]``, exact), ``unit`` ``[N]`` (decoded scale times
    ``gain / sqrt(D)``) and positions ``pos`` ``[N]``: ``x H = unit * (ck @ sqrt(D) H - centroid @ sqrt(D) H)`` taken
    on the pairs' columns (``ha``, ``hb``: ``sqrt(D) H`` float16 ``[D, P]``; ``mu_a``, ``mu_b``: the centroid's
    product), de-normalized by the pre-RoPE per-channel ``scale``/``mean`` of those columns, then rotated."""
    pre_a = (tl.dot(ck, ha) - mu_a[None, :]) * unit[:, None] * scale_a[None, :] + mean_a[None, :]
    pre_b = (tl.dot(ck, hb) - mu_b[None, :]) * unit[:, None] * scale_b[None, :] + mean_b[None, :]
    cos, sin = cos_sin(pos[:, None] * freq[None, :], TWO_PI)
    cos = cos * amp[None, :]
    sin = sin * amp[None, :]
    return pre_a * cos - pre_b * sin, pre_b * cos + pre_a * sin


_CENTROIDS = torch.stack([code_for("e8", bits).shift for bits in E8_BITS]).float()


def centroid_table(device: torch.device | str) -> torch.Tensor:
    """The E8 codebooks' centroids (:class:`~nqcompile.codec.lattice.E8LatticeCode` ``shift``), one row per bit
    width of :data:`~nqcompile.codec.lattice.E8_BITS` (2, 3, 4): float32 ``[3, 8]`` on ``device``, built once per
    device (an input of the kernels' ops, so the ops themselves create no constant)."""
    return on_device(_CENTROIDS, device)


def codec_reason(kind: str, bits: tuple[int, ...], dim: int, rotary_dim: int, layout: str, inv_freq: torch.Tensor,
                 max_head_dim: int) -> str | None:
    """Why a kernel over E8 codes cannot take this codec, or None when it can: E8 codes at the bit widths
    :data:`~nqcompile.codec.lattice.E8_BITS` offers, a head dimension that is a multiple of 8 up to ``max_head_dim``
    with a ``±1`` Hadamard matrix, and a RoPE the kernels apply (a layout of
    :data:`~nqcompile.codec.rope.LAYOUTS`, an even ``rotary_dim <= dim`` with ``rotary_dim / 2`` inverse
    frequencies). Reads static arguments and shapes only."""
    if kind != "e8":
        return f"the kernel decodes E8 codes, got kind {kind!r}"
    if any(b not in E8_BITS for b in bits):
        return f"E8 bit widths {bits} outside {E8_BITS}"
    if dim % 8 or dim > max_head_dim or not is_hadamard_order(dim):
        return f"head_dim {dim}: the kernel needs a multiple of 8 up to {max_head_dim} with a ±1 Hadamard matrix"
    if layout not in LAYOUTS or rotary_dim % 2 or not 0 <= rotary_dim <= dim or inv_freq.numel() != rotary_dim // 2:
        return f"RoPE layout {layout!r} / rotary_dim {rotary_dim} / {inv_freq.numel()} inverse frequencies"
    return None
