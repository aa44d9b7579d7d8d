"""The fast (coordinate-major, branch-free) E8 codec paths equal a straightforward reference, bit for bit.

The reference below is the original row-major implementation (``_d8`` / ``_e8`` over a last dimension
of 8, ``label @ generator`` decoding, the shrink loop and the local search with a dense score matrix,
generic bit packing), kept here only for comparison.
"""

import itertools
import math

import pytest
import torch

from nqcompile.codec import e8 as e8mod
from nqcompile.codec import lattice
from nqcompile.codec.e8 import _e8, _e8_t, _rowsum, e8_nearest
from nqcompile.codec.lattice import (
    _CHUNK,
    E8_GENERATOR,
    E8LatticeCode,
    _GINV,
    _labels,
    _minimal_vectors,
    _representatives,
)
from nqcompile.codec.packing import pack_bits, unpack_bits


# -- reference implementation (row-major, as originally written) -------------------------------------

_REV8 = 7 - torch.arange(8, dtype=torch.int32)


def ref_d8(x):
    f = torch.floor(x + 0.5)
    err = x - f
    odd = torch.remainder(f.sum(dim=-1, keepdim=True), 2.0) != 0
    key = (err.abs().view(torch.int32) & -8) | _REV8
    k = (7 - (key.amax(dim=-1, keepdim=True) & 7)).long()
    err_k = torch.gather(err, -1, k)
    step = torch.where(err_k >= 0, 1.0, -1.0).to(x.dtype)
    step = torch.where(odd, step, torch.zeros_like(step))
    return f.scatter_add(-1, k, step)


def ref_e8(x):
    y0 = ref_d8(x)
    y1 = ref_d8(x - 0.5) + 0.5
    d0 = (x - y0).square().sum(dim=-1, keepdim=True)
    d1 = (x - y1).square().sum(dim=-1, keepdim=True)
    take0 = (d0 < d1) | ((d0 == d1) & (y0[..., :1] < y1[..., :1]))
    return torch.where(take0, y0, y1)


def ref_labels(y, q):
    return torch.remainder(torch.round(y @ _GINV), q).long()


def ref_representatives(k, q):
    y = k.to(torch.float32) @ E8_GENERATOR
    return y - q * ref_e8(y / q)


def ref_pack(values, bits):
    lead, n = values.shape[:-1], values.shape[-1]
    bit_idx = torch.arange(bits, dtype=torch.int32)
    b = ((values.to(torch.int32).unsqueeze(-1) >> bit_idx) & 1).reshape(*lead, n * bits // 8, 8)
    return (b << torch.arange(8, dtype=torch.int32)).sum(dim=-1).to(torch.uint8)


def ref_unpack(packed, bits, n):
    lead = packed.shape[:-1]
    b = ((packed.to(torch.int32).unsqueeze(-1) >> torch.arange(8, dtype=torch.int32)) & 1)
    b = b.reshape(*lead, n, bits)
    return (b << torch.arange(bits, dtype=torch.int32)).sum(dim=-1).to(torch.uint8)


def ref_local_search(u, best_c, q, steps):
    vecs = _minimal_vectors()
    active = torch.arange(u.shape[0])
    for _ in range(steps):
        c = best_c[active]
        dots = (u[active] - c) @ vecs.T
        keep = dots.amax(dim=-1) > 1.0
        active, c, dots = active[keep], c[keep], dots[keep]
        if active.numel() == 0:
            return
        ri, vi = (dots > 1.0).nonzero(as_tuple=True)
        member = (ref_e8((c[ri] + vecs[vi]) / q) == 0).all(dim=-1)
        score = torch.full_like(dots, -math.inf)
        score[ri[member], vi[member]] = dots[ri[member], vi[member]]
        best, j = score.max(dim=-1)
        moved = best > -math.inf
        best_c[active[moved]] = c[moved] + vecs[j[moved]]
        active = active[moved]


def ref_encode_blocks(code, xb):
    q = code.q
    u = xb / code.gain + code.shift
    y = ref_e8(u)
    z = ref_e8(y / q)
    over = (z != 0).any(dim=-1).nonzero().squeeze(-1)
    if over.numel():
        uo, best_c = u[over], y[over] - q * z[over]
        best_d = (best_c - uo).square().sum(dim=-1)
        open_ = torch.arange(uo.shape[0])
        for a in code.shrink_grid:
            if open_.numel() == 0:
                break
            u_open = uo[open_]
            ya = ref_e8(a * u_open)
            za = ref_e8(ya / q)
            ca = ya - q * za
            da = (ca - u_open).square().sum(dim=-1)
            better = da < best_d[open_]
            best_d[open_[better]] = da[better]
            best_c[open_[better]] = ca[better]
            if code.shrink_early_stop:
                open_ = open_[(za != 0).any(dim=-1)]
        ref_local_search(uo, best_c, q, code.search_steps)
        y[over] = best_c
    return ref_labels(y, q)


def ref_encode(code, x):
    lead, dim = x.shape[:-1], x.shape[-1]
    blocks = x.float().reshape(-1, 8)
    labels = torch.empty(blocks.shape, dtype=torch.int64)
    for start in range(0, blocks.shape[0], _CHUNK):
        sl = slice(start, start + _CHUNK)
        labels[sl] = ref_encode_blocks(code, blocks[sl])
    return ref_pack(labels.reshape(*lead, dim), code.bits)


def ref_decode(code, codes, dim):
    k = ref_unpack(codes, code.bits, dim)
    c = ref_representatives(k.reshape(-1, 8), code.q)
    return ((c - code.shift) * code.gain).reshape(*k.shape[:-1], dim)


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


# -- inputs ------------------------------------------------------------------------------------------


def _rms_normalize(x):
    rms = x.square().mean(dim=-1, keepdim=True).sqrt()
    return torch.where(rms > 0, x / rms.clamp_min(1e-30), torch.zeros_like(x))


def make_inputs(bits, n=1200, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = 1 << bits
    gain = E8LatticeCode(bits).gain
    shift = E8LatticeCode(bits).shift
    student = torch.distributions.StudentT(torch.tensor(3.0)).sample((n, 64))
    outlier = torch.randn(n, 64, generator=g) * torch.where(torch.rand(n, 64, generator=g) < 0.03, 25.0, 1.0)
    # Exactly on the (shifted, scaled) lattice and on the half-integer / quarter grids: many ties.
    grid = torch.randint(-2 * q, 2 * q, (n, 8, 8), generator=g).float() / 4
    on_lattice = _representatives(torch.randint(0, q, (n, 8, 8), generator=g), q)
    return {
        "gaussian": _rms_normalize(torch.randn(n, 64, generator=g)),
        "student_t3": _rms_normalize(student),
        "outliers": _rms_normalize(outlier),
        "big": torch.randn(n, 64, generator=g) * 5,
        "grid_ties": ((grid - shift) * gain).reshape(n, 64),
        "grid_unshifted": (grid * gain).reshape(n, 64),
        "on_lattice": ((on_lattice - shift) * gain).reshape(n, 64),
        "zeros_and_negzero": torch.where(torch.rand(n, 64, generator=g) < 0.5, -0.0, 0.0),
    }


# -- tests -------------------------------------------------------------------------------------------


def test_rowsum_is_the_order_of_sum_over_8():
    g = torch.Generator().manual_seed(0)
    for n in (1, 5, 17, 1000, 4099):
        a = torch.randn(n, 8, generator=g) * torch.exp(3 * torch.randn(n, 8, generator=g))
        assert same_bits(_rowsum(a.T.contiguous()), a.sum(dim=-1))


@pytest.mark.parametrize("n", [1, 7, 64, 1000, (1 << 14) + 37, 3 * (1 << 14) - 5])
@pytest.mark.parametrize("scale", [1e-7, 0.3, 3.0, 1e5, 3e6])
def test_e8_fast_equals_reference(n, scale):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 8, generator=g) * scale
    assert same_bits(_e8_t(x.T.contiguous()).T, ref_e8(x))
    assert same_bits(_e8(x), ref_e8(x))
    assert same_bits(e8_nearest(x), ref_e8(x))


@pytest.mark.parametrize("denominator", [1, 2, 4, 8, 32])
def test_e8_fast_equals_reference_on_ties(denominator):
    g = torch.Generator().manual_seed(denominator)
    n = 3 * (1 << 14) + 11  # several slices and a ragged tail
    x = torch.randint(-20, 20, (n, 8), generator=g).float() / denominator
    x = torch.where(torch.rand(n, 8, generator=g) < 0.1, -0.0, x)
    assert same_bits(_e8_t(x.T.contiguous()).T, ref_e8(x))
    # strided input (a column slice of a wider coordinate-major array)
    wide = torch.zeros(8, n + 100)
    wide[:, 50 : 50 + n] = x.T
    assert same_bits(_e8_t(wide[:, 50 : 50 + n]).T, ref_e8(x))


def test_e8_slices_do_not_matter(monkeypatch):
    x = torch.randn(5000, 8, generator=torch.Generator().manual_seed(3)) * 2
    want = ref_e8(x)
    for size in (1, 3, 256, 4096):
        monkeypatch.setattr(e8mod, "_SLICE", size)
        assert same_bits(_e8_t(x.T.contiguous()).T, want)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_pack_unpack_equal_reference(bits):
    g = torch.Generator().manual_seed(bits)
    for n in (8, 16, 64, 128):
        v = torch.randint(0, 1 << bits, (3, 5, n), generator=g, dtype=torch.int64)
        packed = pack_bits(v, bits)
        assert torch.equal(packed, ref_pack(v, bits))
        assert torch.equal(unpack_bits(packed, bits, n), ref_unpack(packed, bits, n))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_labels_and_representatives_equal_reference(bits):
    q = 1 << bits
    g = torch.Generator().manual_seed(bits)
    k = torch.randint(0, q, (20_000, 8), generator=g)
    c = _representatives(k, q)
    assert same_bits(c, ref_representatives(k, q))
    assert torch.equal(_labels(c, q), ref_labels(c, q))
    assert torch.equal(_labels(c, q), k)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_encode_decode_equal_reference(bits):
    for name, x in make_inputs(bits).items():
        for code in (E8LatticeCode(bits), E8LatticeCode(bits, centroid_shift=False, shrink_early_stop=False)):
            codes = code.encode(x)
            assert torch.equal(codes, ref_encode(code, x)), (name, code)
            assert same_bits(code.decode(codes, 64), ref_decode(code, codes, 64)), (name, code)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_decode_all_codes_equal_reference(bits):
    code = E8LatticeCode(bits)
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 256, (4000, 3, 8 * bits), generator=g, dtype=torch.uint8)
    got = code.decode(codes, 64)
    assert got.shape == (4000, 3, 64)
    assert same_bits(got, ref_decode(code, codes, 64))
    assert torch.equal(code.codewords(codes, 64), ref_representatives(ref_unpack(codes, bits, 64).reshape(4000, 3, 8, 8), 1 << bits))


def test_decode_table_2bit_covers_every_codeword():
    code = E8LatticeCode(2, gain=0.7)
    words = torch.arange(1 << 16)
    codes = torch.stack([words & 255, words >> 8], dim=-1).to(torch.uint8)
    assert same_bits(code.decode(codes, 8), ref_decode(code, codes, 8))


def test_local_search_tie_goes_to_first_neighbour():
    # u - c along the sum of two minimal vectors: several neighbours improve equally.
    vecs = _minimal_vectors()
    for i, j in itertools.combinations(range(0, 240, 37), 2):
        code = E8LatticeCode(2)
        c = torch.zeros(1, 8)
        u = c + 0.5 * (vecs[i] + vecs[j])
        x = ((u - code.shift) * code.gain).reshape(1, 8)
        assert torch.equal(code.encode(x), ref_encode(code, x))


def test_product_of_8_or_more_rows_sums_sequentially():
    # _row_pieces relies on it: the dots of the local search do not depend on how rows are split.
    vecs = _minimal_vectors()
    g = torch.Generator().manual_seed(0)
    for m in (8, 9, 15, 16, 100, 2048, 2055, 5000):
        w = torch.randn(m, 8, generator=g) * torch.exp(2 * torch.randn(m, 8, generator=g))
        seq = w[:, :1] * vecs[:, 0]
        for i in range(1, 8):
            seq = seq + w[:, i : i + 1] * vecs[:, i]
        assert same_bits(w @ vecs.T, seq), m


@pytest.mark.parametrize("piece", [8, 13, 64])
def test_local_search_pieces_equal_reference(monkeypatch, piece):
    monkeypatch.setattr(lattice, "_PIECE", piece)
    for m in range(0, 60):
        ranges = lattice._row_pieces(m)
        assert [r for p in ranges for r in range(*p)] == list(range(m))
        assert m < 8 or all(b - a >= 8 for a, b in ranges)
    for bits in (2, 4):
        x = make_inputs(bits, n=300, seed=piece)
        for name in ("gaussian", "outliers", "grid_ties"):
            code = E8LatticeCode(bits)
            assert torch.equal(code.encode(x[name]), ref_encode(code, x[name])), (bits, name)
