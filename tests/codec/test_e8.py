"""E8 / D8 nearest point: optimality against brute force, membership, idempotence, equivariance."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nqcompile.codec.e8 import d8_nearest, e8_nearest, is_in_e8

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True)
OFFSETS = torch.tensor(list(itertools.product((-1.0, 0.0, 1.0), repeat=8)), dtype=torch.float64)  # [6561, 8]


def brute_force(x: torch.Tensor, *, with_half: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest point by enumeration of every D8 (and D8 + 1/2) point within +-1 of the rounded x.

    The nearest D8 point differs from round(x) by at most 1 in one coordinate, so the box contains it;
    same for D8 + 1/2 after the shift. Returns (best point [n, 8], best squared distance [n]).
    """
    cands = []
    for shift in (0.0, 0.5) if with_half else (0.0,):
        base = torch.round(x - shift) + shift  # [n, 8]
        c = base.unsqueeze(1) + OFFSETS  # [n, 6561, 8]
        even = torch.remainder((c - shift).sum(-1), 2.0) == 0
        d = (c - x.unsqueeze(1)).square().sum(-1)
        d = torch.where(even, d, torch.full_like(d, float("inf")))
        cands.append((c, d))
    c = torch.cat([a for a, _ in cands], dim=1)
    d = torch.cat([b for _, b in cands], dim=1)
    best = d.argmin(dim=1)
    return c[torch.arange(x.shape[0]), best], d.min(dim=1).values


def inputs(seed: int, n: int = 96) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cont = torch.randn(n, 8, generator=g, dtype=torch.float64) * 3.0
    # Tie-heavy inputs: multiples of 1/4 (many points equidistant from several lattice points).
    dyadic = torch.randint(-24, 25, (n, 8), generator=g).double() / 4.0
    return torch.cat([cont, dyadic])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_e8_nearest_matches_brute_force(seed):
    x = inputs(seed)
    y = e8_nearest(x)
    _, dbest = brute_force(x, with_half=True)
    dy = (x - y).square().sum(-1)
    assert is_in_e8(y).all()
    assert torch.all(dy <= dbest + 1e-12), f"max excess {(dy - dbest).max().item()}"


@pytest.mark.parametrize("seed", [0, 1])
def test_d8_nearest_matches_brute_force(seed):
    x = inputs(seed)
    y = d8_nearest(x)
    _, dbest = brute_force(x, with_half=False)
    assert torch.equal(y, torch.round(y)) and torch.all(torch.remainder(y.sum(-1), 2) == 0)
    assert torch.all((x - y).square().sum(-1) <= dbest + 1e-12)


def test_float32_close_to_float64_optimum():
    x = inputs(3)
    y = e8_nearest(x.float()).double()
    _, dbest = brute_force(x, with_half=True)
    assert is_in_e8(y).all()
    assert torch.all((x - y).square().sum(-1) <= dbest + 1e-4)


def test_parity_fix_uses_largest_error():
    # sum(round(x)) = 1 is odd; the largest rounding error is on coordinate 2 (0.4), so it goes 0 -> 1.
    x = torch.tensor([[1.1, 0.0, 0.4, 0.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    assert torch.equal(d8_nearest(x), torch.tensor([[1.0, 0, 1, 0, 0, 0, 0, 0]], dtype=torch.float64))


def test_translation_equivariance_on_ties():
    g = torch.Generator().manual_seed(5)
    x = torch.randint(-40, 41, (20000, 8), generator=g).float() / 8.0
    z = e8_nearest(torch.randn(20000, 8, generator=g) * 6.0)
    assert torch.equal(e8_nearest(x + z), e8_nearest(x) + z)


def test_shapes_and_dtypes():
    x = torch.randn(2, 3, 5, 8)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        y = e8_nearest(x.to(dtype))
        assert y.shape == x.shape and y.dtype == dtype
        assert is_in_e8(y.double()).all()


@pytest.mark.parametrize("bad", [torch.zeros(4, 7), torch.zeros(4, 8, dtype=torch.int64), torch.tensor(1.0)])
def test_bad_input_raises(bad):
    with pytest.raises(ValueError):
        e8_nearest(bad)
    with pytest.raises(ValueError):
        d8_nearest(bad)


coord = st.floats(min_value=-100.0, max_value=100.0, allow_nan=False, allow_infinity=False, width=64)


@SETTINGS
@given(st.lists(coord, min_size=8, max_size=8))
def test_hypothesis_in_e8_and_idempotent(values):
    x = torch.tensor([values], dtype=torch.float64)
    y = e8_nearest(x)
    assert is_in_e8(y).all()
    assert torch.equal(e8_nearest(y), y)
    # Never farther than the D8 candidate, and within the E8 covering radius (1).
    assert (x - y).square().sum() <= (x - d8_nearest(x)).square().sum() + 1e-12
    assert (x - y).square().sum() <= 1.0 + 1e-9
