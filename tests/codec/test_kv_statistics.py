"""channel_statistics against float64 references: RoPE pairs for both layouts and partial rotary, few tokens."""

import pytest
import torch

from nqcompile.codec.kv import MIN_DEVIATION_TOKENS, channel_statistics


def _pairs(dim: int, rotary_dim: int, layout: str) -> list[tuple[int, ...]]:
    if layout == "half":
        groups = [(c, c + rotary_dim // 2) for c in range(rotary_dim // 2)]
    else:
        groups = [(c, c + 1) for c in range(0, rotary_dim, 2)]
    return groups + [(c,) for c in range(rotary_dim, dim)]


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("rotary_dim", [16, 8])
def test_per_pair_deviation_is_the_rms_of_each_rope_pair(layout, rotary_dim):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 100, 16, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3.0, 16, dtype=torch.float64)
    select = torch.rand(2, 100, generator=g) < 0.9
    mean, scale = channel_statistics(x, select, "per_pair", rotary_dim=rotary_dim, layout=layout)
    for b in range(2):
        xs = x[b][:, select[b]]  # [H, n, D]
        torch.testing.assert_close(mean[b].double(), xs.mean(1), rtol=1e-6, atol=1e-6)
        var = xs.var(1, unbiased=False)
        for group in _pairs(16, rotary_dim, layout):
            want = var[:, list(group)].mean(-1).sqrt()
            for c in group:
                torch.testing.assert_close(scale[b, :, c].double(), want, rtol=1e-5, atol=1e-6)


def test_too_few_tokens_keep_the_mean_but_not_a_deviation():
    x = torch.randn(1, 2, MIN_DEVIATION_TOKENS + 10, 8, dtype=torch.float64) * 5 + 2
    select = torch.zeros(1, x.shape[2], dtype=torch.bool)
    select[0, : MIN_DEVIATION_TOKENS - 1] = True
    mean, scale = channel_statistics(x, select, "per_channel", rotary_dim=8, layout="half")
    torch.testing.assert_close(mean[0].double(), x[0, :, : MIN_DEVIATION_TOKENS - 1].mean(1), rtol=1e-6, atol=1e-6)
    assert torch.equal(scale, torch.ones_like(scale))
    select[0, MIN_DEVIATION_TOKENS - 1] = True
    _, scale = channel_statistics(x, select, "per_channel", rotary_dim=8, layout="half")
    torch.testing.assert_close(scale[0].double(), x[0, :, :MIN_DEVIATION_TOKENS].std(1, unbiased=False), rtol=1e-5, atol=1e-6)


def test_unknown_mode_or_layout_is_refused():
    x, select = torch.randn(1, 1, 4, 8), torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="normalization"):
        channel_statistics(x, select, "per_token", rotary_dim=8, layout="half")
    with pytest.raises(ValueError, match="layout"):
        channel_statistics(x, select, "mean", rotary_dim=8, layout="neox")
