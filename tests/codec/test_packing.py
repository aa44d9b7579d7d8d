"""Bit packing: bijection, little-endian layout, errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nqcompile.codec.packing import pack_bits, packed_nbytes, unpack_bits

SETTINGS = settings(max_examples=100, deadline=None, derandomize=True)


@SETTINGS
@given(bits=st.integers(1, 8), groups=st.integers(1, 6), rows=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_roundtrip_values(bits, groups, rows, seed):
    n = 8 * groups
    g = torch.Generator().manual_seed(seed)
    v = torch.randint(0, 1 << bits, (rows, 2, n), generator=g)
    p = pack_bits(v, bits)
    assert p.dtype == torch.uint8 and p.shape == (rows, 2, n * bits // 8) == (rows, 2, packed_nbytes(n, bits))
    u = unpack_bits(p, bits, n)
    assert u.dtype == torch.uint8 and torch.equal(u.long(), v)


@SETTINGS
@given(bits=st.integers(1, 8), seed=st.integers(0, 2**31 - 1))
def test_roundtrip_bytes(bits, seed):
    # Every byte string of the right length is the packing of exactly one value row: pack(unpack(b)) == b.
    g = torch.Generator().manual_seed(seed)
    b = torch.randint(0, 256, (16, bits), generator=g).to(torch.uint8)
    assert torch.equal(pack_bits(unpack_bits(b, bits, 8), bits), b)


def test_little_endian_layout():
    assert pack_bits(torch.tensor([1, 2, 3, 0]), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    # bits=3: v0=5 in bits 0-2, v1=6 in bits 3-5, v2=7 straddles: bits 6-7 of byte 0, bit 0 of byte 1.
    p = pack_bits(torch.tensor([5, 6, 7, 0, 0, 0, 0, 1]), 3)
    assert p.tolist() == [5 | 6 << 3 | (7 & 3) << 6, 7 >> 2, 1 << 5]
    assert pack_bits(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1]), 1).tolist() == [0b10000001]
    assert pack_bits(torch.tensor([0x3, 0xA]), 4).tolist() == [0xA3]


def test_uint8_input_and_empty_rows():
    v = torch.randint(0, 16, (0, 8)).to(torch.uint8)
    assert pack_bits(v, 4).shape == (0, 4)


@pytest.mark.parametrize(
    "call",
    [
        lambda: pack_bits(torch.tensor([4, 0, 0, 0]), 2),  # out of range
        lambda: pack_bits(torch.tensor([-1, 0, 0, 0]), 2),
        lambda: pack_bits(torch.zeros(3, dtype=torch.int64), 2),  # 6 bits
        lambda: pack_bits(torch.zeros(8), 2),  # float
        lambda: pack_bits(torch.zeros(8, dtype=torch.int64), 9),
        lambda: pack_bits(torch.zeros(8, dtype=torch.int64), 0),
        lambda: unpack_bits(torch.zeros(3, dtype=torch.uint8), 3, 16),  # wrong length
        lambda: unpack_bits(torch.zeros(2, dtype=torch.int64), 2, 8),  # not uint8
    ],
)
def test_errors(call):
    with pytest.raises(ValueError):
        call()
