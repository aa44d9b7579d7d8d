"""Orthonormal Hadamard(-type) rotations for any head dimension that is a multiple of 8.

A random-sign-free Hadamard rotation spreads outlier coordinates of keys/values over all coordinates
and makes them close to Gaussian, which is what the fixed-rate codes are designed for (QuIP#, Tseng et
al. 2024; QuaRot, Ashkboos et al. 2024). The matrix ``H`` returned by :func:`hadamard_matrix` satisfies
``H @ H.T = I``; the rotation of a row vector ``x`` is ``x @ H.T`` and its inverse ``y @ H``.

Constructions of a ±1 Hadamard matrix of order ``n`` (tried in this order; see J. Seberry and M. Yamada,
"Hadamard matrices, sequences, and block designs", 1992, and R. E. A. C. Paley, "On orthogonal
matrices", J. Math. Phys. 12, 1933):

1. Sylvester (J. J. Sylvester 1867) when ``n`` is a power of two: ``H_2n = [[H, H], [H, -H]]``;
2. ``n = m * 2**j`` with the largest such ``j`` whose ``m`` is a Paley order: Paley I (``m = p + 1``,
   ``p`` prime, ``p ≡ 3 mod 4``) or Paley II (``m = 2 (p + 1)``, ``p`` prime, ``p ≡ 1 mod 4``), combined by a
   Kronecker product ``H_m ⊗ H_{2**j}`` (e.g. 80 = 20 * 4, 96 = 12 * 8, 320 = 20 * 16);
3. a Kronecker product of two constructible orders (e.g. 144 = 12 * 12);

Orders that none of these reach get an orthonormal but not ±1 matrix (fallback): ``C_r ⊗ H_h`` where
``H_h`` is the largest constructible Hadamard matrix with ``h | n`` and ``C_r`` is the orthonormal DCT-II
matrix of order ``r = n / h``. It mixes all ``n`` coordinates (every entry is non-zero unless a DCT
entry is), but its entries are not ``±1/sqrt(n)``. Among the multiples of 8 up to 512 this happens for
n = 184, 232, 344, 376 and 472 (all with h = 8, i.e. DCT of order 23, 29, 43, 47, 59 ⊗ H_8);
:func:`hadamard_construction` names the construction of any ``n`` and the tests check this list. (Paley
constructions over prime-power fields and Williamson-type matrices would cover some of them; they are not
implemented.) Every head dimension in use (64, 80, 96, 128, 256, also 112, 160, 192) gets a true
Hadamard matrix.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

__all__ = ["hadamard_matrix", "hadamard_rotate", "hadamard_construction", "is_hadamard_order"]


def _is_prime(p: int) -> bool:
    if p < 2:
        return False
    if p % 2 == 0:
        return p == 2
    return all(p % d for d in range(3, math.isqrt(p) + 1, 2))


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _jacobsthal(p: int) -> Tensor:
    """Q[i, j] = chi(j - i) for the quadratic character chi of GF(p), p an odd prime; float64 [p, p]."""
    chi = -torch.ones(p, dtype=torch.float64)
    chi[0] = 0.0
    chi[(torch.arange(1, p) ** 2) % p] = 1.0
    idx = (torch.arange(p).unsqueeze(0) - torch.arange(p).unsqueeze(1)) % p
    return chi[idx]


def _paley1(p: int) -> Tensor:
    """Paley construction I: order p + 1 for a prime p ≡ 3 mod 4 (H = I + S, S skew)."""
    n = p + 1
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = _jacobsthal(p)
    return s + torch.eye(n, dtype=torch.float64)


def _paley2(p: int) -> Tensor:
    """Paley construction II: order 2 (p + 1) for a prime p ≡ 1 mod 4 (S symmetric conference matrix)."""
    m = p + 1
    st = torch.zeros(m, m, dtype=torch.float64)
    st[0, 1:] = 1.0
    st[1:, 0] = 1.0
    st[1:, 1:] = _jacobsthal(p)
    zero_block = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    one_block = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(st, one_block) + torch.kron((st == 0).double(), zero_block)


def _sylvester(n: int) -> Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    base = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.kron(base, h)
    return h


def _paley_kind(m: int) -> str | None:
    if m >= 4 and _is_prime(m - 1) and (m - 1) % 4 == 3:
        return "paley1"
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return "paley2"
    return None


@functools.lru_cache(maxsize=None)
def _plan(n: int) -> tuple | None:
    """Construction plan of a ±1 Hadamard matrix of order n, or None if none is known here."""
    if _is_pow2(n):
        return ("sylvester", n)
    if n % 4:
        return None
    j = (n & -n).bit_length() - 1  # largest power of two dividing n
    for jj in range(j, -1, -1):
        m = n >> jj
        kind = _paley_kind(m)
        if kind is not None:
            return ("kron", (kind, m), ("sylvester", 1 << jj)) if jj else (kind, m)
    for a in range(4, math.isqrt(n) + 1, 4):
        if n % a == 0 and _plan(a) is not None and _plan(n // a) is not None:
            return ("kron", _plan(a), _plan(n // a))
    return None


def _build(plan: tuple) -> Tensor:
    kind = plan[0]
    if kind == "sylvester":
        return _sylvester(plan[1])
    if kind == "paley1":
        return _paley1(plan[1] - 1)
    if kind == "paley2":
        return _paley2(plan[1] // 2 - 1)
    return torch.kron(_build(plan[1]), _build(plan[2]))


def _describe(plan: tuple) -> str:
    if plan[0] == "kron":
        return f"{_describe(plan[1])} ⊗ {_describe(plan[2])}"
    return f"{plan[0]}({plan[1]})"


def is_hadamard_order(n: int) -> bool:
    """True if this module builds a ±1 Hadamard matrix of order ``n`` (no fallback)."""
    return n >= 1 and _plan(n) is not None


def _fallback_factor(n: int) -> int:
    return max(h for h in range(1, n + 1) if n % h == 0 and _plan(h) is not None)


def hadamard_construction(n: int) -> str:
    """Human-readable construction used for order ``n``, e.g. ``"paley1(20) ⊗ sylvester(4)"``.

    Fallback orders read ``"dct(r) ⊗ <construction of h>"``.

    Raises:
        ValueError: if ``n`` is not a positive multiple of 8.
    """
    _check_n(n)
    plan = _plan(n)
    if plan is not None:
        return _describe(plan)
    h = _fallback_factor(n)
    return f"dct({n // h}) ⊗ {_describe(_plan(h))}"


def _dct2(r: int) -> Tensor:
    """Orthonormal DCT-II matrix [r, r], float64."""
    k = torch.arange(r, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(r, dtype=torch.float64).unsqueeze(0)
    c = torch.cos(math.pi * (2 * i + 1) * k / (2 * r)) * math.sqrt(2.0 / r)
    c[0] /= math.sqrt(2.0)
    return c


def _check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0 or n % 8:
        raise ValueError(
            f"hadamard: the dimension must be a positive multiple of 8, got {n!r}; pad the head "
            "dimension to a multiple of 8"
        )


@functools.lru_cache(maxsize=None)
def _unnormalized(n: int) -> Tensor:
    plan = _plan(n)
    if plan is not None:
        h = _build(plan)
        gram = h @ h.T
        if not torch.equal(gram, n * torch.eye(n, dtype=torch.float64)):
            raise RuntimeError(f"hadamard: construction {_describe(plan)} is not Hadamard (bug)")
        return h
    h = _fallback_factor(n)
    return torch.kron(_dct2(n // h) * math.sqrt(n // h), _unnormalized_pm1(h))


def _unnormalized_pm1(h: int) -> Tensor:
    return _build(_plan(h))


@functools.lru_cache(maxsize=None)
def _cached(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    h = _unnormalized(n) / math.sqrt(n)
    return h.to(dtype=dtype, device=device)


def hadamard_matrix(n: int, *, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """Orthonormal Hadamard-type matrix of order ``n`` (``H @ H.T = I``).

    Args:
        n: order, a positive multiple of 8 (any such n; see the module docstring for which orders get
            a true ``±1/sqrt(n)`` Hadamard matrix and which an orthonormal DCT ⊗ Hadamard fallback).
        dtype: floating dtype of the result (built exactly in float64, then cast).
        device: device of the result (default: CPU).

    Returns:
        Tensor ``[n, n]``, cached per ``(n, dtype, device)``: do not modify it in place.

    Raises:
        ValueError: if ``n`` is not a positive multiple of 8 or ``dtype`` is not floating point.
    """
    _check_n(n)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"hadamard_matrix: dtype must be a floating dtype, got {dtype!r}")
    dev = torch.device("cpu") if device is None else torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return _cached(n, dtype, dev)


def hadamard_rotate(x: Tensor, inverse: bool = False) -> Tensor:
    """Rotate the last dimension of ``x`` by the orthonormal Hadamard matrix of its size.

    Forward: ``x @ H.T`` (each row vector ``v`` becomes ``H v``); inverse: ``x @ H``. Inverse of
    forward is the identity up to rounding.

    Args:
        x: float tensor ``[..., n]``, n a positive multiple of 8. float32/float64 are computed in their
            own dtype; float16/bfloat16 in float32 and cast back.
        inverse: apply ``H.T`` (the inverse) instead of ``H``.

    Returns:
        Tensor ``[..., n]``, same dtype and device as ``x``.

    Raises:
        ValueError: if ``x`` is not floating point or its last dimension is not a positive multiple of 8.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(
            "hadamard_rotate: x must be a floating-point tensor, got "
            f"{getattr(x, 'dtype', type(x).__name__)}"
        )
    if x.dim() == 0:
        raise ValueError("hadamard_rotate: x must have shape [..., n], got a scalar")
    n = x.shape[-1]
    _check_n(n)
    work = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    h = hadamard_matrix(n, dtype=work, device=x.device)
    y = x.to(work) @ (h if inverse else h.T)
    return y.to(x.dtype)
