"""The key-bit trial's round trip (``LayerStorage.round_trip_keys``): through the storage ops (the CUDA path, whose
ops run the Triton kernels) it gives the keys the reference codec gives (the CPU path)."""

import pytest
import torch

from nqcompile import ops
from nqcompile.cache.storage import CodecParams, _round_trip_through_ops
from nqcompile.codec.hadamard import hadamard_matrix
from nqcompile.codec.kv import KVTransform, decode_keys, encode_keys


def _case(key_bits=3, value_bits=2, dim=64, heads=2, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    codec = CodecParams(hadamard=hadamard_matrix(dim), inv_freq=inv_freq,
                        norm_mean=torch.randn(2, 1, heads, dim, generator=g) * 0.5,
                        norm_scale=torch.rand(2, 1, heads, dim, generator=g) + 0.5,
                        transform=KVTransform("e8", key_bits, value_bits, 1.0, dim, "half"))
    key = torch.randn(1, heads, n, dim, generator=g) * 2 + torch.randn(dim, generator=g)
    value = torch.randn(1, heads, n, dim, generator=g)
    positions = (torch.arange(n) * 3 + 7)[None, None].expand(1, heads, n)
    return key, value, positions, codec


def _reference(key, positions, codec):
    mean, scale = codec.norm_mean[0], codec.norm_scale[0]
    codes, scales = encode_keys(key, positions, codec.hadamard, codec.inv_freq, mean, scale, codec.transform)
    return decode_keys(codes, scales, positions, codec.hadamard, codec.inv_freq, mean, scale, codec.transform)


@pytest.mark.parametrize("key_bits", [2, 3])
def test_round_trip_through_the_ops_equals_the_reference_codec(key_bits):
    key, value, positions, codec = _case(key_bits=key_bits, seed=key_bits)
    got = _round_trip_through_ops(key, value, positions, codec)
    want = _reference(key, positions, codec)
    assert got.shape == key.shape and got.dtype == torch.float32
    assert torch.equal(got, want)  # on the CPU the ops run the same reference codec
    assert 0 < (got - key).norm() < 0.5 * key.norm()  # coded: changed, but close


def test_round_trip_through_the_kernels_matches_the_reference_codec(monkeypatch):
    """The CUDA implementations of the two ops (Triton's interpreter on the CPU here) in place of the reference."""
    pytest.importorskip("triton")
    from nqcompile.ops import cuda

    key, value, positions, codec = _case(key_bits=3, heads=1, n=16, seed=5)
    for reason in (cuda.write_kernel_reason(torch.empty(1, 1, 1, 24, dtype=torch.uint8), torch.empty(1, 1, 1,
                                            dtype=torch.uint8), key, "e8", (3, 2), 64, 64, "half", codec.inv_freq),
                   cuda.dequant_kernel_reason(torch.empty(1, 1, 1, 24, dtype=torch.uint8), "e8", (3, 2), 64, 64,
                                              "half", codec.inv_freq)):
        assert reason is None, reason  # the kernels, not the reference they fall back to
    monkeypatch.setattr(ops, "write_kv", cuda.write_kv_cuda)
    monkeypatch.setattr(ops, "dequant_kv", cuda.dequant_kv_cuda)
    got = _round_trip_through_ops(key, value, positions, codec)
    want = _reference(key, positions, codec)
    # Same codewords but for float32 rounding at search boundaries (tests/test_kernel_quantize_kv.py).
    assert (got - want).norm() <= 1e-3 * want.norm()
