"""The CPU decode kernel (Inductor's code for ``decode_blocks``) equals the reference E8 decoder bit for bit, and
``cpu_kernel`` builds kernels without touching Dynamo."""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

from nqcompile.codec import cpu_kernel as kernel_module
from nqcompile.codec.cpu_kernel import cpu_kernel
from nqcompile.codec.e8 import _d8
from nqcompile.codec.lattice import E8_GENERATOR, E8LatticeCode, decode_blocks, decode_words, word_view
from nqcompile.codec.packing import pack_groups, unpack_groups


def reference_decode(code: E8LatticeCode, codes: torch.Tensor, dim: int) -> torch.Tensor:
    """The coordinate-major reference decoder (``_decode_t``), which the kernel replaces on the CPU."""
    k = unpack_groups(codes.reshape(-1, code.bits), code.bits)
    return code._decode_t(k).T.reshape(*codes.shape[:-1], dim)


def packed(labels: torch.Tensor, bits: int) -> torch.Tensor:
    """Labels int ``[N, 8]`` -> packed bytes uint8 ``[N, bits]``."""
    return pack_groups(labels.T, bits)


@settings(max_examples=25, deadline=None)
@given(bits=st.sampled_from([3, 4]), blocks=st.integers(2, 3000), seed=st.integers(0, 2**31 - 1))
def test_kernel_equals_reference_decoder_on_random_labels(bits, blocks, seed):
    code = E8LatticeCode(bits)
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (blocks, bits), dtype=torch.uint8, generator=g)
    assert code._cpu_kernel(codes) is not None  # the kernel path is the one under test
    assert torch.equal(code.decode(codes, 8), reference_decode(code, codes, 8))


@pytest.mark.parametrize("bits", [3, 4])
def test_kernel_equals_reference_on_boundary_labels(bits):
    """Labels built from 0, 1, q/2 - 1, q/2 and q - 1 in every coordinate: symmetric points that sit on the
    Voronoi cell's boundary, where the tie rules decide (the test checks that ties occur among them)."""
    q = 1 << bits
    values = torch.tensor([0, 1, q // 2 - 1, q // 2, q - 1])
    labels = torch.cartesian_prod(*[values] * 8)  # [5**8, 8]
    x = labels.to(torch.float32) @ E8_GENERATOR / q  # the point whose nearest E8 point the decoder looks for
    d0 = (x - _d8(x)).square().sum(-1)
    d1 = (x - (_d8(x - 0.5) + 0.5)).square().sum(-1)
    assert int((d0 == d1).sum()) > 100  # ties between the D8 and the D8 + 1/2 candidate are exercised
    code = E8LatticeCode(bits)
    codes = packed(labels, bits)
    assert torch.equal(code.decode(codes, 8), reference_decode(code, codes, 8))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_decode_blocks_eager_equals_reference(bits):
    """The traced function itself, run eagerly: every 2-bit word, and random 3- and 4-bit ones."""
    code = E8LatticeCode(bits)
    if bits == 2:
        words = torch.arange(1 << 16)
        codes = torch.stack([words & 255, words >> 8], -1).to(torch.uint8)
    else:
        codes = torch.randint(0, 256, (20000, bits), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    out = decode_blocks(codes.T.contiguous(), code.shift, bits=bits, gain=code.gain)
    assert torch.equal(out, reference_decode(code, codes, 8))


def test_kernel_follows_gain_and_shift():
    """A code with another gain and no centroid shift gets its own kernel (the gain is baked in by name)."""
    code = E8LatticeCode(4, gain=0.25, centroid_shift=False)
    codes = torch.randint(0, 256, (500, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(code.decode(codes.reshape(500, 16), 32), reference_decode(code, codes.reshape(500, 16), 32))


def test_cpu_kernel_adds_no_dynamo_graph_and_survives_reset():
    before = dict(counters["stats"])
    square_add = cpu_kernel("test_square_add", lambda a, b: a * a + b, torch.zeros(3, 4), torch.zeros(4))
    a, b = torch.randn(5, 7), torch.randn(7)
    assert torch.allclose(square_add(a, b), a * a + b, rtol=0, atol=1e-6)  # any shapes of the traced ranks
    assert dict(counters["stats"]) == before
    torch.compiler.reset()
    assert torch.allclose(square_add(a, b), a * a + b, rtol=0, atol=1e-6)


def test_cpu_kernel_failure_warns_and_returns_none(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr("torch._inductor.compile", broken)
    monkeypatch.setattr(kernel_module, "_KERNELS", {})
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        assert cpu_kernel("test_broken", lambda a: a + 1, torch.zeros(2)) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_kernel("test_broken", lambda a: a + 1, torch.zeros(2)) is None  # warned once
    code = E8LatticeCode(3)  # the decoder then runs the reference
    codes = torch.randint(0, 256, (64, 3), dtype=torch.uint8)
    with pytest.warns(RuntimeWarning):
        out = code.decode(codes, 8)
    assert torch.equal(out, reference_decode(code, codes, 8))


def _wrong_when_cached(monkeypatch, wrong_uncached: bool) -> list[bool]:
    """Make ``_compile`` return a kernel off by one from the cache (as a stale or mis-keyed FX graph cache entry
    would), and also when compiled afresh if ``wrong_uncached``; returns the list of its ``cached`` arguments."""
    real, calls = kernel_module._compile, []

    def compile_(name, graph, fakes, *, cached):
        calls.append(cached)
        kernel = real(name, graph, fakes, cached=cached)
        return (lambda *a: kernel(*a) + 1) if cached or wrong_uncached else kernel

    monkeypatch.setattr(kernel_module, "_compile", compile_)
    monkeypatch.setattr(kernel_module, "_KERNELS", {})
    return calls


def test_a_kernel_that_disagrees_with_its_function_is_rebuilt_without_the_cache(monkeypatch):
    calls = _wrong_when_cached(monkeypatch, wrong_uncached=False)
    fn = lambda a, b: a * b + a.sin()  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kernel = cpu_kernel("test_rebuilt", fn, torch.zeros(3, 5), torch.zeros(3, 5))
    assert not [w for w in caught if "could not build" in str(w.message)]
    assert calls == [True, False]
    x, y = torch.randn(4, 6), torch.randn(4, 6)
    torch.testing.assert_close(kernel(x, y), fn(x, y))  # the rebuilt kernel (the cached one is off by one)


def test_a_kernel_that_still_disagrees_warns_and_the_reference_runs(monkeypatch):
    calls = _wrong_when_cached(monkeypatch, wrong_uncached=True)
    with pytest.warns(RuntimeWarning, match="differs from the function"):
        assert cpu_kernel("test_still_wrong", lambda a: a * 3, torch.zeros(3, 5)) is None
    assert calls == [True, False]


def test_labels_roundtrip_through_kernel():
    """decode(encode(x)) through the kernel equals the reference decode of the same codes (encoder unchanged)."""
    for bits in (3, 4):
        code = E8LatticeCode(bits)
        x = torch.randn(400, 64, generator=torch.Generator().manual_seed(bits))
        codes = code.encode(x)
        out = code.decode(codes, 64)
        assert out.shape == (400, 64) and torch.equal(out, reference_decode(code, codes, 64))


@settings(max_examples=20, deadline=None)
@given(bits=st.sampled_from([3, 4]), vectors=st.integers(2, 700), dim=st.sampled_from([64, 96]),
       seed=st.integers(0, 2**31 - 1))
def test_words_kernel_equals_reference_decoder(bits, vectors, dim, seed):
    """Codes read in place as int32 words (decode_words, no transposed copy) decode bit for bit as the reference,
    eagerly and through its kernel, for random codes of [2, vectors, bytes] (a slice of a larger buffer too)."""
    code = E8LatticeCode(bits)
    g = torch.Generator().manual_seed(seed)
    buffer = torch.randint(0, 256, (2, vectors + 3, dim * bits // 8), dtype=torch.uint8, generator=g)
    codes = buffer[:, 1:vectors + 1]  # not contiguous: rows of a larger buffer
    words = word_view(codes, bits)
    assert words is not None and code._words_kernel(codes) is not None  # the kernel path is the one under test
    expected = reference_decode(code, codes.contiguous(), dim)
    assert torch.equal(decode_words(words, code.shift, bits=bits, gain=code.gain), expected)
    assert torch.equal(code.decode(codes, dim), expected)


def test_word_view_refuses_what_it_cannot_read():
    assert word_view(torch.zeros(5, 16, dtype=torch.uint8), 2) is None  # 2 bits: the table decodes them
    assert word_view(torch.zeros(5, 3, dtype=torch.uint8), 3) is None  # 3 bits, head dim 8: blocks straddle words
    assert word_view(torch.zeros(5, 33, dtype=torch.uint8)[:, 1:], 4) is None  # rows not 4-byte aligned
    assert word_view(torch.zeros(5, 32, dtype=torch.uint8), 4).shape == (5, 8)


def test_two_bit_words_look_up_the_table():
    """2-bit codes read in place as 16-bit words (on the CPU) decode as the reference, rows of a buffer included."""
    code = E8LatticeCode(2)
    buffer = torch.randint(0, 256, (2, 3, 50, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    for codes in (buffer, buffer[:, :, 3:40], buffer[..., 1:9]):  # the last: odd offsets, the copying path
        assert torch.equal(code.decode(codes, codes.shape[-1] * 4), reference_decode(code, codes.contiguous(),
                                                                                     codes.shape[-1] * 4))
