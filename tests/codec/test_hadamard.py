"""Hadamard(-type) rotations: orthonormality for every multiple of 8, true Hadamard entries where promised."""

import math

import pytest
import torch

from nqcompile.codec.hadamard import hadamard_construction, hadamard_matrix, hadamard_rotate, is_hadamard_order

ALL_N = list(range(8, 513, 8))
FALLBACK_UP_TO_512 = {184, 232, 344, 376, 472}  # documented in the module docstring


@pytest.mark.parametrize("n", ALL_N)
def test_orthonormal(n):
    h = hadamard_matrix(n, dtype=torch.float64)
    assert h.shape == (n, n)
    assert (h @ h.T - torch.eye(n, dtype=torch.float64)).abs().max().item() < 1e-6
    h32 = hadamard_matrix(n)
    assert h32.dtype == torch.float32
    assert (h32.double() @ h32.double().T - torch.eye(n, dtype=torch.float64)).abs().max().item() < 1e-6


@pytest.mark.parametrize("n", [64, 80, 96, 128, 256, 112, 160, 192, 8, 24, 40])
def test_true_hadamard_entries(n):
    h = hadamard_matrix(n, dtype=torch.float64)
    assert is_hadamard_order(n)
    assert torch.allclose(h.abs(), torch.full_like(h, 1 / math.sqrt(n)), rtol=0, atol=1e-12), hadamard_construction(n)


def test_fallback_list_is_as_documented():
    assert {n for n in ALL_N if not is_hadamard_order(n)} == FALLBACK_UP_TO_512
    for n in FALLBACK_UP_TO_512:
        assert hadamard_construction(n).startswith("dct(")
        h = hadamard_matrix(n, dtype=torch.float64)
        # mixes across 8-dim blocks: every output depends on inputs outside its own block
        assert (h[:8, 8:].abs().sum() > 0).item()


def test_constructions_named():
    assert hadamard_construction(64) == "sylvester(64)"
    assert hadamard_construction(80) == "paley1(20) ⊗ sylvester(4)"
    assert hadamard_construction(96) == "paley1(12) ⊗ sylvester(8)"


def test_cached_per_key():
    assert hadamard_matrix(96) is hadamard_matrix(96)
    assert hadamard_matrix(96) is not hadamard_matrix(96, dtype=torch.float64)
    assert hadamard_matrix(96, device="cpu") is hadamard_matrix(96)


@pytest.mark.parametrize("n", [64, 80, 96, 184])
def test_rotate_roundtrip_and_norm(n):
    x = torch.randn(3, 5, n, dtype=torch.float64)
    y = hadamard_rotate(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1))
    assert torch.allclose(hadamard_rotate(y, inverse=True), x)
    assert torch.allclose(y, x @ hadamard_matrix(n, dtype=torch.float64).T)
    assert hadamard_rotate(x.to(torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("n", [0, 4, 12, 65, -8])
def test_bad_n(n):
    with pytest.raises(ValueError):
        hadamard_matrix(n)


def test_bad_inputs():
    with pytest.raises(ValueError):
        hadamard_matrix(64, dtype=torch.int32)
    with pytest.raises(ValueError):
        hadamard_rotate(torch.zeros(4, 12))
    with pytest.raises(ValueError):
        hadamard_rotate(torch.zeros(4, 64, dtype=torch.int64))
