"""NexusCache with quantization and eviction on: batching, multi-turn, byte accounting."""

import pytest
import torch

import nqcompile
from transformers import DynamicCache

from nqcompile.codec.rope import apply_rotary
from nqcompile.cache import NexusLayer
from tiny_models import prefill_and_decode, tiny_model

SMALL = dict(sink_tokens=4, recent_window=16, observation_window=8, min_evict_tokens=0)


@pytest.mark.parametrize("preset", ["balanced", "max"])
def test_left_padded_batch_matches_each_prompt_alone(preset):
    model = tiny_model("llama", dtype=torch.float64)
    nqcompile.optimize(model, preset, **SMALL)
    gen = torch.Generator().manual_seed(3)
    lengths = (97, 150)
    prompts = [torch.randint(1, 256, (n,), generator=gen) for n in lengths]
    width, steps = max(lengths), 20
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = p
        mask[row, width - len(p):] = 1
    with torch.no_grad():
        batch_cache = nqcompile.NexusCache(model.config, preset, max_cache_len=width + steps + 1, **SMALL)
        batched = prefill_and_decode(model, ids, batch_cache, steps, mask=mask)
        for row, p in enumerate(prompts):
            cache = nqcompile.NexusCache(model.config, preset, max_cache_len=len(p) + steps + 1, **SMALL)
            alone = prefill_and_decode(model, p[None], cache, steps)
            torch.testing.assert_close(batched[row], alone[0], atol=1e-4, rtol=0,
                                       msg=f"{preset}: row {row} (length {len(p)}) differs from its solo run")
    # Eviction really happened, per sequence: the kept counts follow each prompt's own length.
    layer = batch_cache.layers[0]
    ratio = nqcompile.PRESETS[preset].eviction_ratio
    for row, n in enumerate(lengths):
        kept = max(0, round(n * (1 - ratio)) - SMALL["sink_tokens"] - SMALL["recent_window"])
        flushed = 16 * ((SMALL["recent_window"] + steps) // 16)  # decode tokens flushed from the window
        assert layer._host_code_len[row] == kept + flushed


def test_second_turn_leaves_first_turn_codes_bit_identical():
    model = tiny_model("qwen2")
    nqcompile.optimize(model, "balanced", **SMALL)
    gen = torch.Generator().manual_seed(5)
    turn1, turn2 = torch.randint(1, 256, (1, 120), generator=gen), torch.randint(1, 256, (1, 40), generator=gen)
    cache = nqcompile.NexusCache(model.config, "balanced", **SMALL)
    with torch.no_grad():
        model(turn1, past_key_values=cache)
        for _ in range(18):  # decode steps: one block flush from the window
            model(torch.randint(1, 256, (1, 1), generator=gen), past_key_values=cache)
        layers = [l for l in cache.layers if isinstance(l, NexusLayer)]
        before = [{name: getattr(l, name)[:, :, : l._host_code_len[0]].clone()
                   for name in ("k_codes", "v_codes", "k_scales", "v_scales", "code_pos")} for l in layers]
        sinks = [l.sink_k.clone() for l in layers]
        out = model(turn2, past_key_values=cache)
        assert torch.isfinite(out.logits).all()
    for i, (layer, saved) in enumerate(zip(layers, before)):
        assert layer._host_code_len[0] > saved["k_codes"].shape[2], "the second turn added codes"
        for name, old in saved.items():
            assert torch.equal(getattr(layer, name)[:, :, : old.shape[2]], old), f"layer {i}: {name} changed"
        assert torch.equal(layer.sink_k, sinks[i])
    assert cache.get_seq_length() == 120 + 18 + 40


@pytest.mark.parametrize("preset", ["quant_only", "balanced"])
def test_bytes_match_the_preset_formula_and_no_float_copy_survives(preset):
    model = tiny_model("llama")
    nqcompile.optimize(model, preset, **SMALL)
    ids = torch.randint(1, 256, (2, 150), generator=torch.Generator().manual_seed(7))
    cache = nqcompile.NexusCache(model.config, preset, max_cache_len=150 + 10, **SMALL)
    with torch.no_grad():
        model(ids, past_key_values=cache)
        for _ in range(10):
            model(ids[:, :1], past_key_values=cache)
    p = cache.preset
    expected = 0
    for layer in cache.layers:
        expected += p.layer_bytes(batch=2, kv_heads=layer.heads, head_dim=layer.head_dim, capacity=layer.capacity,
                                  itemsize=4, rotary_dim=layer.rotary.rotary_dim, position_bytes=2)
        compressed = layer._host_code_len
        assert min(compressed) > 50
        for name, t in layer.tensors().items():
            if t.is_floating_point():
                if t.dim() == 4:  # [B, H, tokens, D] (sinks, window) or [2, B, H, D] (statistics)
                    assert t.shape[2] < min(compressed), f"float tensor {name} {tuple(t.shape)} holds compressed tokens"
                else:
                    assert name in ("hadamard", "inv_freq"), f"unexpected float tensor {name} {tuple(t.shape)}"
    expected += 64 * 64 * 4  # the shared Hadamard matrix
    report = cache.memory_report()
    assert report.allocated_bytes == expected
    assert report.logical_tokens == 160
    assert report.bf16_bytes == 3 * 4 * 2 * 1 * 64 * 160


@pytest.mark.parametrize("kind", ["llama", "phi3"])
def test_replay_as_decode_equals_token_by_token_decode(kind):
    model = tiny_model(kind)
    nqcompile.optimize(model, "balanced", **SMALL)
    gen = torch.Generator().manual_seed(11)
    prompt, continuation = torch.randint(1, 256, (2, 70), generator=gen), torch.randint(1, 256, (2, 37), generator=gen)
    with torch.no_grad():
        step_cache = nqcompile.NexusCache(model.config, "balanced", **SMALL)
        model(prompt, past_key_values=step_cache)
        stepwise = torch.cat([model(continuation[:, t:t + 1], past_key_values=step_cache).logits
                              for t in range(continuation.shape[1])], 1)
        replay_cache = nqcompile.NexusCache(model.config, "balanced", **SMALL)
        model(prompt, past_key_values=replay_cache)
        with replay_cache.replay_as_decode():
            replayed = model(continuation, past_key_values=replay_cache).logits
    torch.testing.assert_close(replayed, stepwise, atol=2e-5, rtol=1e-4)
    for a, b in zip(step_cache.layers, replay_cache.layers):
        assert a._host_code_len == b._host_code_len and a._host_win_len == b._host_win_len
        n = a._host_code_len[0]
        assert torch.equal(a.k_codes[:, :, :n], b.k_codes[:, :, :n])
        w = a._host_win_len[0]
        torch.testing.assert_close(a.win_k[:, :, :w], b.win_k[:, :, :w], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("key_norm", ["per_pair", "per_channel", "mean"])
def test_normalization_statistics_match_a_float64_reference(key_norm):
    """The per-channel statistics are those of the first chunk's non-sink tokens (keys before RoPE), per sequence."""
    model = tiny_model("llama", dtype=torch.float64)
    overrides = dict(SMALL, key_norm=key_norm, value_norm="per_channel")
    nqcompile.optimize(model, "quant_only", **overrides)
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(1, 256, (2, 120), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :13] = 0  # left padding: sequence 1 has 107 real tokens
    ref = DynamicCache()
    cache = nqcompile.NexusCache(model.config, "quant_only", max_cache_len=128, **overrides)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=positions, past_key_values=ref)
        model(ids, attention_mask=mask, position_ids=positions, past_key_values=cache)
    layer, rotary = cache.layers[1], cache.layers[1].rotary
    half = rotary.rotary_dim // 2
    for row, first_real in enumerate((0, 13)):
        keep = slice(first_real + SMALL["sink_tokens"], None)  # real tokens after the sinks
        pos = positions[row, keep]
        k = apply_rotary(ref.layers[1].keys[row, :, keep], pos[None], rotary.inv_freq.double(), inverse=True,
                         attention_scaling=rotary.attention_scaling, rotary_dim=rotary.rotary_dim, layout=rotary.layout)
        v = ref.layers[1].values[row, :, keep]
        k_std, v_std = k.std(1, unbiased=False), v.std(1, unbiased=False)
        if key_norm == "per_pair":
            pair = ((k_std[:, :half] ** 2 + k_std[:, half:] ** 2) / 2).sqrt()
            k_std = torch.cat([pair, pair], -1)
        torch.testing.assert_close(layer.norm_mean[0, row].double(), k.mean(1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.norm_mean[1, row].double(), v.mean(1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.norm_scale[1, row].double(), v_std, rtol=1e-5, atol=1e-6)
        expected = torch.ones_like(k_std) if key_norm == "mean" else k_std
        torch.testing.assert_close(layer.norm_scale[0, row].double(), expected, rtol=1e-5, atol=1e-6)


def test_chunk_shorter_than_min_evict_tokens_is_quantized_not_evicted():
    model = tiny_model("llama")
    overrides = dict(SMALL, min_evict_tokens=64)
    nqcompile.optimize(model, "balanced", **overrides)
    gen = torch.Generator().manual_seed(13)
    cache = nqcompile.NexusCache(model.config, "balanced", max_cache_len=256, **overrides)
    with torch.no_grad():
        model(torch.randint(1, 256, (1, 200), generator=gen), past_key_values=cache)
        first = cache.layers[0]._host_code_len[0]
        model(torch.randint(1, 256, (1, 40), generator=gen), past_key_values=cache)
    assert first == round(200 * (1 - nqcompile.PRESETS["balanced"].eviction_ratio)) - 4 - 16  # the long chunk evicted
    assert cache.layers[0]._host_code_len[0] == first + 40  # the short one only pushed 40 tokens into codes
    assert cache.get_seq_length() == 240
