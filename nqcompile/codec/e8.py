"""Nearest-point decoders for the lattices D8 and E8 (pure torch, fully vectorized).

Lattices (Conway and Sloane, "Sphere Packings, Lattices and Groups", ch. 4 and ch. 20; and
J. H. Conway, N. J. A. Sloane, "Fast quantizing and decoding algorithms for lattice quantizers and
codes", IEEE Trans. Inf. Theory 28(2), 1982):

* ``D8 = {z in Z^8 : sum(z) is even}`` (the checkerboard lattice),
* ``E8 = D8 ∪ (D8 + 1/2)`` where ``1/2`` is the all-halves vector ``(1/2, ..., 1/2)``.

Algorithm (Conway and Sloane 1982, section III):

* D8: round every coordinate to the nearest integer. If the coordinate sum is odd, re-round the
  ONE coordinate with the LARGEST rounding error the other way (towards the second-nearest integer).
* D8 + 1/2: subtract 1/2, decode in D8, add 1/2 back.
* E8: keep whichever of the two candidates is closer to x (ties: see below).

Layout: the last dimension holds the 8 coordinates; all leading dimensions are batch dimensions.
Units: whatever the input's units are (lattice points have unit-spaced integer / half-integer
coordinates in those units).

Ties (points equidistant from two or more lattice points) are broken by rules that depend only on
the error vector ``x - y``, so the decoders are exactly translation-equivariant:
``d8_nearest(x + z) = d8_nearest(x) + z`` for ``z`` in D8 and ``e8_nearest(x + z) = e8_nearest(x) + z``
for ``z`` in E8 (for inputs whose arithmetic is exact, e.g. dyadic rationals). The Voronoi codes of
:mod:`nqcompile.codec.lattice` rely on this: with it, ``{x : e8_nearest(x / q) = 0}`` is a fundamental
domain of ``q E8`` and codebook membership is a single nearest-point call. The rules:

* halves round up (``floor(x + 1/2)``, not ``torch.round``'s half-to-even);
* the re-rounded coordinate is the FIRST one of largest rounding error (in float32, errors are compared
  with their 3 lowest mantissa bits cleared, which is exact for dyadic inputs and otherwise changes the
  squared distance by less than about 1e-6 relative); a zero error re-rounds up;
* a tie between the D8 and the D8 + 1/2 candidate goes to the candidate with the smaller first
  coordinate (the two candidates always differ by a half-odd integer in every coordinate).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .constants import on_device

__all__ = ["d8_nearest", "e8_nearest", "is_in_e8", "e8_nearest_columns"]

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _check(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(
            f"{name}: expected a floating-point tensor, got dtype {x.dtype}; "
            "convert with x.float() first"
        )
    if x.dim() == 0 or x.shape[-1] != 8:
        raise ValueError(
            f"{name}: the last dimension must have size 8 (one 8-dim block per row), got shape "
            f"{tuple(x.shape)}; reshape to [..., 8] first, e.g. x.reshape(*x.shape[:-1], -1, 8)"
        )


_REV8 = 7 - torch.arange(8, dtype=torch.int32)


def _d8(x: Tensor) -> Tensor:
    """Nearest D8 point, no checks; x float32/float64 [..., 8]."""
    f = torch.floor(x + 0.5)
    err = x - f
    odd = torch.remainder(f.sum(dim=-1, keepdim=True), 2.0) != 0  # [..., 1] bool
    # k: the (first) coordinate with the largest rounding error.
    if x.dtype == torch.float32:
        # Fast path (argmax over a last dimension of 8 is slow on CPU): the bit pattern of a
        # non-negative float32 orders like the float, so one integer amax over keys whose 3 low bits
        # hold (7 - index) finds the first maximum. The 3 cleared mantissa bits make errors within
        # 2**-20 relative of each other compare equal (exact for dyadic inputs such as lattice points).
        key = (err.abs().view(torch.int32) & -8) | on_device(_REV8, x.device)
        k = (7 - (key.amax(dim=-1, keepdim=True) & 7)).long()
    else:
        k = err.abs().argmax(dim=-1, keepdim=True)
    err_k = torch.gather(err, -1, k)
    step = torch.where(err_k >= 0, 1.0, -1.0).to(x.dtype)  # re-round "the other way"
    step = torch.where(odd, step, torch.zeros_like(step))
    return f.scatter_add(-1, k, step)


#: Blocks per slice of the coordinate-major kernel (keeps its temporaries in the CPU caches).
_SLICE = 1 << 14
_SIGNLESS = 0x7FFFFFF8  # |err| bits with the 3 low mantissa bits cleared (see _d8)
_SIGN_BIT = -(1 << 31)
_ONE_BITS = 0x3F800000  # float32 1.0
_INT32_MAX = (1 << 31) - 1
_REV8_COL = (7 - torch.arange(8, dtype=torch.int32)).reshape(1, 8, 1)


def _rowsum(t: Tensor) -> Tensor:
    """Sum over the 8 coordinate rows (dim -2) of t [..., 8, n], in sequential order.

    ``((t_0 + t_1) + t_2) + ... + t_7``: the order in which ``Tensor.sum(dim=-1)`` adds 8 contiguous
    float32 values on CPU (checked by the tests), so that squared distances round exactly as in the
    row-major code. (``sum(dim=-2)`` may use another order on some columns.)
    """
    acc = t[..., 0, :] + t[..., 1, :]
    for i in range(2, 8):
        acc += t[..., i, :]
    return acc


def _e8_t_slice(x: Tensor, out: Tensor, zero_only: bool = False) -> None:
    """:func:`_e8_t` on one slice: x float32 [8, n] (any strides), result written to out [8, n].

    Branch-free: torch.where and boolean tensors are slow on CPU for random masks, so the selections
    are integer bit operations on the float32 bit patterns (exact).
    """
    n = x.shape[1]
    xs = torch.empty((2, 8, n), dtype=torch.float32, device=x.device)
    # Coset 0: x (+ 0.0 turns -0.0 into +0.0, which changes no result: only err's sign bit, and
    # _d8 treats err = -0.0 like +0.0). Coset 1: x - 1/2, exactly as _e8 computes it.
    torch.add(x, 0.0, out=xs[0])
    torch.sub(x, 0.5, out=xs[1])
    f = torch.add(xs, 0.5).floor_()
    err = torch.sub(xs, f)
    ebits = err.view(torch.int32)
    # The re-rounded coordinate: the first one of largest |err| (the same keys as _d8's fast path).
    key = torch.bitwise_and(ebits, _SIGNLESS).bitwise_or_(on_device(_REV8_COL, x.device))
    kmax = key.amax(dim=1, keepdim=True)  # [2, 1, n], >= 7
    # thr = kmax - 1 for odd blocks, INT32_MAX for even ones, so that the sign bit of thr - key is set
    # exactly at the re-rounded coordinate of odd blocks (no overflow: keys are non-negative int32).
    # The coordinate sum is added in _d8's order (it only rounds for |x| beyond about 2**21).
    odd = _rowsum(f).unsqueeze(1).to(torch.int32).bitwise_and_(1)  # 1 where the sum is odd
    thr = (kmax - 1).bitwise_or_(odd.sub_(1).bitwise_and_(_INT32_MAX))
    fix = torch.sub(thr, key).bitwise_right_shift_(31)  # -1 at the re-rounded coordinate, else 0
    # step: +1.0 where err >= 0 (err is never -0.0 here), -1.0 where err < 0, as float32 bits;
    # kept only at the re-rounded coordinate (+0.0 elsewhere).
    step = torch.bitwise_and(ebits, _SIGN_BIT).bitwise_or_(_ONE_BITS).bitwise_and_(fix)
    y = f.add_(step.view(torch.float32))
    y[1] += 0.5
    d = _rowsum(torch.sub(xs[0], y).square_())  # [2, n]
    y0, y1 = y[0], y[1]
    take0 = (d[0] < d[1]) | ((d[0] == d[1]) & (y0[0] < y1[0]))  # [n]
    if zero_only:
        # e8 == 0 <=> the D8 candidate is taken and is 0 (the other is never 0; no -0.0 occurs).
        b0 = y0.view(torch.int32)
        acc = b0[0] | b0[1]
        for i in range(2, 8):
            acc |= b0[i]
        torch.logical_and(take0, acc == 0, out=out)
        return
    sel = take0.to(torch.int32).neg_()  # -1: candidate 0
    b0, b1 = y0.view(torch.int32), y1.view(torch.int32)
    torch.bitwise_xor(torch.bitwise_xor(b0, b1).bitwise_and_(sel), b1, out=out.view(torch.int32))


def _e8_t(x: Tensor) -> Tensor:
    """Nearest E8 point in the coordinate-major layout, no checks: x float32 [8, N] -> [8, N].

    Bit-identical to ``_e8(x.T).T`` (the same floating-point operations per element; sums over the
    8 coordinates run in the same sequential order as ``Tensor.sum(dim=-1)`` over 8 elements, which
    the tests check), but every reduction over the 8 coordinates becomes elementwise work on
    contiguous rows, processed in cache-sized slices.
    """
    n = x.shape[1]
    out = torch.empty((8, n), dtype=torch.float32, device=x.device)
    for start in range(0, n, _SLICE):
        sl = slice(start, start + _SLICE)
        _e8_t_slice(x[:, sl], out[:, sl])
    return out


def _e8_t_is_zero(x: Tensor) -> Tensor:
    """``(_e8_t(x) == 0).all(dim=0)`` for x float32 [8, N] (any strides): bool [N]."""
    n = x.shape[1]
    out = torch.empty((n,), dtype=torch.bool, device=x.device)
    for start in range(0, n, _SLICE):
        sl = slice(start, start + _SLICE)
        _e8_t_slice(x[:, sl], out[sl], zero_only=True)
    return out


def _d8_columns(x: list[Tensor]) -> list[Tensor]:
    """:func:`_d8` on the 8 coordinates given as separate tensors (see :func:`e8_nearest_columns`)."""
    f = [torch.floor(xi + 0.5) for xi in x]
    err = [xi - fi for xi, fi in zip(x, f)]
    size = [e.abs() for e in err]
    largest, at = size[0], torch.zeros_like(size[0])  # the first coordinate of largest |err|
    for j in range(1, 8):
        larger = size[j] > largest
        largest, at = torch.where(larger, size[j], largest), torch.where(larger, float(j), at)
    total = f[0]
    for j in range(1, 8):
        total = total + f[j]
    odd = total - 2.0 * torch.floor(total * 0.5) != 0
    return [fj + torch.where(odd & (at == j), torch.where(e >= 0, 1.0, -1.0), 0.0)
            for j, (fj, e) in enumerate(zip(f, err))]


def e8_nearest_columns(x: list[Tensor]) -> list[Tensor]:
    """Nearest E8 point of blocks given coordinate by coordinate, in elementwise torch ops only.

    The algorithm and tie rules of :func:`e8_nearest` (module docstring), written without reductions, indexing or
    data-dependent control flow, so that a compiler fuses it into one loop
    (:mod:`nqcompile.codec.cpu_kernel`). Its float32 results equal :func:`e8_nearest`'s bit for bit whenever
    the arithmetic is exact, as for the dyadic inputs of the lattice code's decoder
    (:meth:`nqcompile.codec.lattice.E8LatticeCode.decode`); for other inputs, coordinates whose rounding errors
    lie within ``2**-20`` relative of each other may be re-rounded differently (``e8_nearest`` compares them with 3
    mantissa bits cleared).

    Args:
        x: 8 float32 tensors of one shape ``[...]``, coordinate ``j`` of every block in ``x[j]``.

    Returns:
        8 float32 tensors ``[...]``: the nearest E8 point's coordinates.
    """
    y0 = _d8_columns(x)
    y1 = [y + 0.5 for y in _d8_columns([xj - 0.5 for xj in x])]
    d0, d1 = (x[0] - y0[0]).square(), (x[0] - y1[0]).square()
    for j in range(1, 8):  # the sequential order of _rowsum
        d0, d1 = d0 + (x[j] - y0[j]).square(), d1 + (x[j] - y1[j]).square()
    take0 = (d0 < d1) | ((d0 == d1) & (y0[0] < y1[0]))
    return [torch.where(take0, a, b) for a, b in zip(y0, y1)]


def _e8(x: Tensor) -> Tensor:
    """Nearest E8 point, no checks; x float32/float64 [..., 8]."""
    if x.dtype == torch.float32 and x.numel() >= 8 * 64:
        lead = x.shape[:-1]
        return _e8_t(x.reshape(-1, 8).T).T.reshape(*lead, 8)
    y0 = _d8(x)
    y1 = _d8(x - 0.5) + 0.5
    d0 = (x - y0).square().sum(dim=-1, keepdim=True)
    d1 = (x - y1).square().sum(dim=-1, keepdim=True)
    take0 = (d0 < d1) | ((d0 == d1) & (y0[..., :1] < y1[..., :1]))
    return torch.where(take0, y0, y1)


def _checked(fn, x: Tensor, name: str) -> Tensor:
    """Validate ``x`` and run the unchecked kernel ``fn``; half dtypes are computed in float32 and cast back."""
    _check(x, name)
    if x.dtype in _HALF_DTYPES:
        return fn(x.float()).to(x.dtype)
    return fn(x)


def d8_nearest(x: Tensor) -> Tensor:
    """Nearest point of the checkerboard lattice D8 = {z in Z^8 : sum(z) even}.

    Conway and Sloane 1982 ("Fast quantizing and decoding algorithms for lattice quantizers and
    codes"): round every coordinate; if the coordinate sum is odd, re-round the coordinate with the
    largest rounding error the other way. Ties: see the module docstring (translation-equivariant).

    Args:
        x: floating tensor ``[..., 8]`` (float16, bfloat16, float32 or float64; half types are
            computed in float32 internally).

    Returns:
        Tensor ``[..., 8]``, same dtype and device as ``x``: the nearest D8 point (integer
        coordinates, even sum). Exact as long as ``|x| < 2**22`` (float32) / ``2**50`` (float64).

    Raises:
        ValueError: if ``x`` is not floating point or its last dimension is not 8.
    """
    return _checked(_d8, x, "d8_nearest")


def e8_nearest(x: Tensor) -> Tensor:
    """Nearest point of the Gosset lattice E8 = D8 ∪ (D8 + 1/2).

    Conway and Sloane 1982 ("Fast quantizing and decoding algorithms for lattice quantizers and
    codes", section III): decode in D8 and in the coset D8 + 1/2 (shift by 1/2, decode in D8, shift
    back), keep the closer candidate. Ties: see the module docstring (translation-equivariant).

    Args:
        x: floating tensor ``[..., 8]`` (float16, bfloat16, float32 or float64; half types are
            computed in float32 internally and rounded back, so large half-precision inputs may not
            be exactly representable lattice points).

    Returns:
        Tensor ``[..., 8]``, same dtype and device as ``x``: the nearest E8 point (coordinates are all
        integers with even sum, or all half-odd-integers with even sum of ``y - 1/2``).

    Raises:
        ValueError: if ``x`` is not floating point or its last dimension is not 8.
    """
    return _checked(_e8, x, "e8_nearest")


def is_in_e8(y: Tensor) -> Tensor:
    """Membership test for E8.

    Args:
        y: floating tensor ``[..., 8]``.

    Returns:
        bool tensor ``[...]``: True where ``y`` is exactly a point of E8 (all coordinates integers with
        an even sum, or all coordinates in ``Z + 1/2`` with ``sum(y - 1/2)`` even).

    Raises:
        ValueError: if ``y`` is not floating point or its last dimension is not 8.
    """
    _check(y, "is_in_e8")
    y = y.double()
    z = 2.0 * y
    integral = (z == torch.round(z)).all(dim=-1)
    zi = torch.round(z)
    all_even = (torch.remainder(zi, 2.0) == 0).all(dim=-1)  # all integer coordinates
    all_odd = (torch.remainder(zi, 2.0) == 1).all(dim=-1)  # all half-odd coordinates
    shifted = torch.where(all_odd.unsqueeze(-1), y - 0.5, y)
    even_sum = torch.remainder(torch.round(shifted).sum(dim=-1), 2.0) == 0
    return integral & (all_even | all_odd) & even_sum
