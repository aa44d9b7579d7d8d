"""Dense bit packing of small unsigned integers into uint8 bytes (pure torch, vectorized).

Bit order (little-endian, LSB first), the same for every ``bits``:

* value ``i`` of a row occupies the global bit positions ``i*bits .. i*bits + bits - 1`` of that row,
  with its least significant bit at the lowest position;
* global bit position ``p`` lives in byte ``p // 8`` of the row, at bit ``p % 8`` of that byte
  (``(byte >> (p % 8)) & 1``).

So for ``bits = 2`` byte 0 holds ``v0 | v1 << 2 | v2 << 4 | v3 << 6``; for ``bits = 3`` value 2 straddles
bytes 0 and 1 (its two low bits are bits 6-7 of byte 0, its high bit is bit 0 of byte 1). This is the
natural order for a kernel that reads a little-endian 32-bit word and shifts right.

Shapes: a row is the last dimension; leading dimensions are batch dimensions and are preserved.
No headers, no padding: ``n * bits`` must be a multiple of 8, and a packed row has exactly
``n * bits // 8`` bytes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .constants import on_device

__all__ = ["pack_bits", "unpack_bits", "packed_nbytes"]

#: _BYTE_LUT[bits][b, j] = value j of byte b for bits in {1, 2, 4} (whole values per byte).
_BYTE_LUT = {
    b: ((torch.arange(256, dtype=torch.int32).unsqueeze(-1) >> (torch.arange(8 // b) * b)) & ((1 << b) - 1))
    .to(torch.uint8)
    for b in (1, 2, 4)
}


def _check_bits(bits: int, fn: str) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"{fn}: bits must be an int in 1..8, got {bits!r}")


def _nbytes(n: int, bits: int, fn: str) -> int:
    _check_bits(bits, fn)
    if n < 0 or (n * bits) % 8:
        raise ValueError(
            f"{fn}: n * bits must be a non-negative multiple of 8, got n={n}, bits={bits}; "
            "pad the row to a multiple of 8 values"
        )
    return n * bits // 8


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes of one packed row of ``n`` values of ``bits`` bits each (``n * bits // 8``).

    Raises:
        ValueError: if ``bits`` is not in 1..8 or ``n * bits`` is not a multiple of 8.
    """
    return _nbytes(n, bits, "packed_nbytes")


def pack_bits(values: Tensor, bits: int) -> Tensor:
    """Pack integers in ``[0, 2**bits)`` into bytes, little-endian bit order (see module docstring).

    Args:
        values: integer tensor ``[..., n]`` (any integer dtype, including uint8), every entry in
            ``[0, 2**bits)``; ``n * bits`` must be a multiple of 8.
        bits: bits per value, 1..8.

    Returns:
        uint8 tensor ``[..., n * bits // 8]`` on the same device.

    Raises:
        ValueError: on a non-integer dtype, ``bits`` outside 1..8, ``n * bits`` not a multiple of 8,
            or values out of range.
    """
    _check_bits(bits, "pack_bits")
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise ValueError(
            f"pack_bits: values must be an integer tensor, got {values.dtype}; round and cast with "
            ".to(torch.int64) first"
        )
    if values.dim() == 0:
        raise ValueError("pack_bits: values must have at least one dimension [..., n]")
    n = values.shape[-1]
    nbytes = _nbytes(n, bits, "pack_bits")
    if values.numel():
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi >= (1 << bits):
            raise ValueError(
                f"pack_bits: values must lie in [0, {1 << bits}) for bits={bits}, got range [{lo}, {hi}]"
            )
    lead = values.shape[:-1]
    if n % 8 == 0 and bits > 1:
        # Groups of 8 values fill exactly `bits` bytes: one little-endian word per group.
        rows = values.reshape(-1, n // 8, 8).to(torch.int64).permute(2, 0, 1)  # [8, rows, groups]
        return pack_groups(rows, bits).reshape(*lead, nbytes)
    v = values.to(torch.int32)
    if 8 % bits == 0:
        # Whole values per byte: byte = sum_j v[j] << (j * bits).
        per = 8 // bits
        shifts = torch.arange(per, device=v.device, dtype=torch.int32) * bits
        out = (v.reshape(*lead, nbytes, per) << shifts).sum(dim=-1)
        return out.to(torch.uint8)
    # General case: expand to single bits (LSB first), regroup by 8, weight by 2**j.
    bit_idx = torch.arange(bits, device=v.device, dtype=torch.int32)
    b = ((v.unsqueeze(-1) >> bit_idx) & 1).reshape(*lead, nbytes, 8)
    weights = torch.arange(8, device=v.device, dtype=torch.int32)
    return (b << weights).sum(dim=-1).to(torch.uint8)


def unpack_bits(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_bits`.

    Args:
        packed: uint8 tensor ``[..., n * bits // 8]``.
        bits: bits per value, 1..8.
        n: number of values per row.

    Returns:
        uint8 tensor ``[..., n]`` with entries in ``[0, 2**bits)`` (cast with ``.long()`` to index).

    Raises:
        ValueError: if ``packed`` is not uint8, ``bits`` is outside 1..8, ``n * bits`` is not a
            multiple of 8, or the last dimension is not ``n * bits // 8``.
    """
    _check_bits(bits, "unpack_bits")
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_bits: packed must be uint8, got {packed.dtype}")
    nbytes = _nbytes(n, bits, "unpack_bits")
    if packed.dim() == 0 or packed.shape[-1] != nbytes:
        raise ValueError(
            f"unpack_bits: expected last dimension {nbytes} (= n * bits // 8 with n={n}, bits={bits}), "
            f"got shape {tuple(packed.shape)}"
        )
    lead = packed.shape[:-1]
    if bits in _BYTE_LUT:
        lut = on_device(_BYTE_LUT[bits], packed.device)
        return lut[packed.long()].reshape(*lead, n)
    if n % 8 == 0:
        groups = unpack_groups(packed.reshape(-1, bits), bits)  # [8, rows * groups]
        return groups.T.to(torch.uint8).reshape(*lead, n)
    p = packed.to(torch.int32)
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(per, device=p.device, dtype=torch.int32) * bits
        out = (p.unsqueeze(-1) >> shifts) & mask
        return out.reshape(*lead, n).to(torch.uint8)
    weights = torch.arange(8, device=p.device, dtype=torch.int32)
    b = ((p.unsqueeze(-1) >> weights) & 1).reshape(*lead, n, bits)
    bit_idx = torch.arange(bits, device=p.device, dtype=torch.int32)
    return (b << bit_idx).sum(dim=-1).to(torch.uint8)


def pack_groups(values: Tensor, bits: int) -> Tensor:
    """Pack groups of 8 values given value-major: ``values [8, ...]`` (integer, in ``[0, 2**bits)``,
    unchecked) -> uint8 ``[..., bits]``, the same bytes as ``pack_bits`` on ``values.movedim(0, -1)``.

    Value ``j`` of a group takes bits ``j*bits ..`` of one little-endian ``8 * bits``-bit word, whose
    bytes are the group's ``bits`` bytes (the bit order of the module docstring).
    """
    v = values.to(torch.int64)
    word = v[0].clone()
    for j in range(1, 8):
        word |= v[j] << (j * bits)
    return torch.stack([(word >> (8 * t)) & 255 for t in range(bits)], dim=-1).to(torch.uint8)


def unpack_groups(packed: Tensor, bits: int) -> Tensor:
    """Inverse of :func:`pack_groups`: uint8 ``[..., bits]`` -> int32 ``[8, ...]`` (unchecked)."""
    p = packed.to(torch.int64)
    word = p[..., 0].clone()
    for t in range(1, bits):
        word |= p[..., t] << (8 * t)
    mask = (1 << bits) - 1
    return torch.stack([((word >> (j * bits)) & mask) for j in range(8)]).to(torch.int32)
