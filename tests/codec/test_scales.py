"""One-byte log2 scale code."""

import math

import pytest
import torch

from nqcompile.codec.scales import SCALE_MAX, SCALE_MIN, decode_scale, encode_scale

STEP = 2.0 ** (1.0 / 16.0)


def log_uniform(n: int, lo: float, hi: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.exp2(torch.rand(n, generator=g, dtype=torch.float64) * (hi - lo) + lo)


def test_roundtrip_within_one_step_ceil():
    rms = log_uniform(100_000, -7.9, 7.9)
    dec = decode_scale(encode_scale(rms)).double()
    ratio = dec / rms
    assert torch.all(ratio >= 1 - 1e-6), ratio.min()  # never below the RMS (float32 decode rounding aside)
    assert torch.all(ratio < STEP * (1 + 1e-6)), ratio.max()


def test_roundtrip_nearest_within_half_step():
    rms = log_uniform(100_000, -7.9, 7.9, seed=1)
    dec = decode_scale(encode_scale(rms, rounding="nearest")).double()
    assert torch.all((torch.log2(dec / rms) * 16).abs() <= 0.5 + 1e-5)


def test_grid_points_are_fixed_points():
    k = torch.arange(1, 256)
    exact = torch.exp2((k.double() - 128) / 16)
    codes = encode_scale(exact)
    assert torch.equal(codes.long(), k)
    assert torch.allclose(decode_scale(codes).double(), exact, rtol=1e-6)
    assert decode_scale(torch.tensor([128], dtype=torch.uint8)).item() == 1.0


def test_zero_and_clamping():
    rms = torch.tensor([0.0, 1e-30, SCALE_MIN / 2, 1e30, SCALE_MAX * 2, float(SCALE_MAX)])
    codes = encode_scale(rms)
    assert codes.tolist() == [0, 1, 1, 255, 255, 255]
    assert decode_scale(codes)[0].item() == 0.0
    assert math.isclose(decode_scale(codes)[1].item(), SCALE_MIN, rel_tol=1e-6)
    assert math.isclose(decode_scale(codes)[3].item(), SCALE_MAX, rel_tol=1e-6)


def test_shapes_and_dtypes():
    rms = torch.rand(2, 3, 5, dtype=torch.bfloat16) + 0.1
    codes = encode_scale(rms)
    assert codes.shape == rms.shape and codes.dtype == torch.uint8
    assert decode_scale(codes).dtype == torch.float32


@pytest.mark.parametrize(
    "call",
    [
        lambda: encode_scale(torch.tensor([-1.0])),
        lambda: encode_scale(torch.tensor([float("nan")])),
        lambda: encode_scale(torch.tensor([float("inf")])),
        lambda: encode_scale(torch.tensor([1, 2])),
        lambda: encode_scale(torch.tensor([1.0]), rounding="floor"),
        lambda: decode_scale(torch.tensor([1, 2])),
    ],
)
def test_errors(call):
    with pytest.raises(ValueError):
        call()
