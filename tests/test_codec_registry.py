"""Contract of every codec in nqcompile.codec.registry.CODECS, at every bit width it offers.

A codec added to the registry is tested here without any other change: its codes round-trip Gaussian data
within the distortion bounds of its rate, take exactly ``bytes_per_vector`` bytes, a preset naming it
validates only at its widths, and a cache built with it allocates exactly what ``Preset.layer_bytes`` says.
"""

import math

import pytest
import torch

import nqcompile
from nqcompile.codec.registry import CODECS, code_for
from nqcompile.codec.scalar import FixedRateCode
from tiny_models import tiny_model

WIDTHS = [(name, bits) for name, entry in CODECS.items() for bits in entry.bits]
IDS = [f"{name}-{bits}" for name, bits in WIDTHS]


@pytest.mark.parametrize("name,bits", WIDTHS, ids=IDS)
def test_round_trip_distortion_tightens_with_bits(name, bits):
    """Unit Gaussian coordinates: SNR between 5 dB per bit - 2 dB (every registered code clears it by more than
    1 dB) and 6.02 dB per bit, the rate-distortion bound ``D(R) = 4**-R`` that no code of this rate can beat."""
    code = code_for(name, bits)
    assert isinstance(code, FixedRateCode) and code.bits == bits
    assert code_for(name, bits) is code  # cached
    x = torch.randn(4096, 64, generator=torch.Generator().manual_seed(bits))
    y = code.decode(code.encode(x), 64)
    assert y.dtype == torch.float32 and y.shape == x.shape
    snr_db = -10 * math.log10(float((y - x).square().mean()))
    assert 5 * bits - 2 < snr_db < 20 * math.log10(2) * bits, snr_db


@pytest.mark.parametrize("name,bits", WIDTHS, ids=IDS)
@pytest.mark.parametrize("dim", [8, 64, 96])
def test_codes_take_bytes_per_vector(name, bits, dim):
    entry = CODECS[name]
    x = torch.randn(3, 5, dim, generator=torch.Generator().manual_seed(dim))
    codes = code_for(name, bits).encode(x)
    assert codes.dtype == torch.uint8
    assert codes.shape == (3, 5, entry.bytes_per_vector(bits, dim))
    assert code_for(name, bits).decode(codes, dim).shape == x.shape


@pytest.mark.parametrize("name", CODECS)
def test_preset_accepts_exactly_the_offered_widths(name):
    offered = CODECS[name].bits
    top = max(offered)
    for bits in offered:
        preset = nqcompile.Preset(codec=name, key_bits=bits, value_bits=bits, boundary_bits=bits, sliding_bits=bits,
                                  warm_bits=top)
        assert preset.bytes_per_token(64) == 2 * CODECS[name].bytes_per_vector(bits, 64) + 2
        if bits - 1 in offered:
            assert preset.replace(relax_key_kl=0.01).relax_key_kl == 0.01
        else:
            with pytest.raises(ValueError, match=f"one bit below key_bits={bits}, which codec={name!r}"):
                preset.replace(relax_key_kl=0.01)
    for bits in (min(offered) - 1, top + 1):
        for field in ("key_bits", "value_bits", "boundary_bits", "sliding_bits", "warm_bits"):
            kw = {"codec": name, "key_bits": top, "value_bits": top, "warm_bits": top, field: bits}
            with pytest.raises(ValueError, match=f"{field}={bits} is not offered by codec={name!r}"):
                nqcompile.Preset(**kw)
    with pytest.raises(ValueError, match=f"codec {name!r} offers bits"):
        code_for(name, top + 1)


@pytest.mark.parametrize("name,bits", WIDTHS, ids=IDS)
def test_cache_allocates_what_the_preset_formula_says(name, bits):
    """Evicting (positions stored) with a warm tier at the codec's top width where ``bits`` is below it."""
    preset = nqcompile.Preset(codec=name, key_bits=bits, value_bits=bits, warm_bits=max(CODECS[name].bits),
                              warm_tokens=16, eviction_ratio=0.5, scorer="key_diff", min_evict_tokens=0, sink_tokens=4,
                              recent_window=16, relax_key_kl=0.0)
    model = nqcompile.optimize(tiny_model("llama"), preset)
    ids = torch.randint(1, 256, (2, 100), generator=torch.Generator().manual_seed(0))
    cache = nqcompile.NexusCache(model.config, preset, max_cache_len=104)
    with torch.no_grad():
        model(ids, past_key_values=cache)
        for _ in range(4):
            out = model(ids[:, :1], past_key_values=cache)
    assert torch.isfinite(out.logits).all()
    expected = sum(
        preset.layer_bytes(batch=2, kv_heads=layer.storage.heads, head_dim=layer.storage.head_dim,
                           capacity=layer.storage.capacity, itemsize=4,
                           rotary_dim=layer.rotary.rotary_dim, position_bytes=2) for layer in cache.layers)
    report = cache.memory_report()
    assert report.allocated_bytes == expected and report.shared_bytes == 64 * 64 * 4  # the Hadamard matrix, apart
    assert report.logical_tokens == 104
    # half the prompt evicted, decode tokens kept; summed over the 2 sequences and every layer
    assert report.physical_tokens == len(cache.layers) * 2 * (50 + 4)
