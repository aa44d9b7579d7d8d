"""NexusCache with quantization and eviction on: batching, multi-turn, byte accounting."""

import pytest
import torch
import transformers

import nqcompile
from transformers import DynamicCache

from nqcompile.codec.rope import apply_rotary
from nqcompile import ops
from nqcompile.cache import NexusLayer
from tiny_models import prefill_and_decode, tiny_model

SMALL = dict(sink_tokens=4, recent_window=16, observation_window=8, min_evict_tokens=0, warm_tokens=0, relax_key_kl=0.0,
             scorer="key_diff", keep_mass=0.0, keep_line_breaks=False, pooling_kernel=7)
WARM = dict(SMALL, warm_tokens=32)  # a warm tier of 32 tokens at 4 bits
RECON = dict(SMALL, scorer="reconstruction", pooling_kernel=1)  # KVzip scores, one budget for all layers
RECON_MASS = dict(RECON, keep_mass=0.6)  # ... which the model raises (a random model's attention is spread)


@pytest.mark.parametrize("preset,opts", [("balanced", SMALL), ("max", SMALL), ("balanced", WARM), ("balanced", RECON),
                                         ("balanced", RECON_MASS)],
                         ids=["balanced", "max", "warm", "reconstruction", "keep_mass"])
def test_left_padded_batch_matches_each_prompt_alone(preset, opts):
    model = tiny_model("llama", dtype=torch.float64)
    nqcompile.optimize(model, preset, **opts)
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
        batch_cache = nqcompile.NexusCache(model.config, preset, max_cache_len=width + steps + 1, **opts)
        batched = prefill_and_decode(model, ids, batch_cache, steps, mask=mask)
        for row, p in enumerate(prompts):
            cache = nqcompile.NexusCache(model.config, preset, max_cache_len=len(p) + steps + 1, **opts)
            alone = prefill_and_decode(model, p[None], cache, steps)
            torch.testing.assert_close(batched[row], alone[0], atol=1e-4, rtol=0,
                                       msg=f"{preset}: row {row} (length {len(p)}) differs from its solo run")
    # Eviction really happened, per sequence: the kept counts follow each prompt's own length (with
    # reconstruction scores, summed over the layers).
    layers = batch_cache.layers if opts["scorer"] == "reconstruction" else batch_cache.layers[:1]
    ratio = nqcompile.PRESETS[preset].eviction_ratio
    for row, n in enumerate(lengths):
        kept = max(0, round(n * (1 - ratio)) - SMALL["sink_tokens"] - SMALL["recent_window"]) * len(layers)
        flushed = 16 * ((SMALL["recent_window"] + steps) // 16) * len(layers)  # decode tokens flushed from the window
        warm = min(opts.get("warm_tokens", 0), kept + flushed)  # the newest compressed tokens, at 4 bits
        held = [(layer.storage.code_len.tolist()[row], layer.storage.warm_len.tolist()[row]) for layer in layers]
        if opts is RECON_MASS:  # more than the eviction ratio leaves, fewer than all
            middle = (n - SMALL["sink_tokens"] - SMALL["recent_window"]) * len(layers)
            assert kept + flushed < sum(map(sum, held)) < middle + flushed
        else:
            assert tuple(map(sum, zip(*held))) == (kept + flushed - warm, warm)
    if opts is RECON:
        assert len({layer.storage.code_len.tolist()[1] for layer in layers}) > 1, "one budget shared unevenly among layers"


@pytest.mark.parametrize("opts", [SMALL, WARM, RECON], ids=["no_warm", "warm", "reconstruction"])
def test_second_turn_leaves_first_turn_codes_bit_identical(opts):
    model = tiny_model("qwen2")
    nqcompile.optimize(model, "balanced", **opts)
    gen = torch.Generator().manual_seed(5)
    turn1, turn2 = torch.randint(1, 256, (1, 120), generator=gen), torch.randint(1, 256, (1, 80), generator=gen)
    cache = nqcompile.NexusCache(model.config, "balanced", **opts)
    with torch.no_grad():
        model(turn1, past_key_values=cache)
        for _ in range(18):  # decode steps: one block flush from the window
            model(torch.randint(1, 256, (1, 1), generator=gen), past_key_values=cache)
        layers = [l for l in cache.layers if isinstance(l, NexusLayer)]
        before = [{name: getattr(l.storage, name)[:, :, : l.storage.code_len.tolist()[0]].clone()
                   for name in ("k_codes", "v_codes", "k_scales", "v_scales", "code_pos")} for l in layers]
        sinks = [l.storage.sink_k.clone() for l in layers]
        out = model(turn2, past_key_values=cache)
        assert torch.isfinite(out.logits).all()
    added = [layer.storage.code_len.tolist()[0] - saved["k_codes"].shape[2] for layer, saved in zip(layers, before)]
    # Reconstruction shares the turn's budget among layers: some may take none of its tokens.
    assert (sum(added) > 0) if opts is RECON else min(added) > 0, f"the second turn added codes: {added}"
    for i, (layer, saved) in enumerate(zip(layers, before)):
        for name, old in saved.items():
            assert torch.equal(getattr(layer.storage, name)[:, :, : old.shape[2]], old), f"layer {i}: {name} changed"
        assert torch.equal(layer.storage.sink_k, sinks[i])
    assert cache.get_seq_length() == 120 + 18 + 80


@pytest.mark.parametrize("preset,opts", [("quant_only", SMALL), ("balanced", SMALL), ("quant_only", WARM),
                                         ("balanced", RECON)])
def test_bytes_match_the_preset_formula_and_no_float_copy_survives(preset, opts):
    model = tiny_model("llama")
    nqcompile.optimize(model, preset, **opts)
    ids = torch.randint(1, 256, (2, 150), generator=torch.Generator().manual_seed(7))
    cache = nqcompile.NexusCache(model.config, preset, max_cache_len=150 + 10, **opts)
    with torch.no_grad():
        model(ids, past_key_values=cache)
        for _ in range(10):
            model(ids[:, :1], past_key_values=cache)
    p = cache.preset
    expected = 0
    for layer in cache.layers:
        expected += p.layer_bytes(batch=2, kv_heads=layer.storage.heads, head_dim=layer.storage.head_dim, capacity=layer.storage.capacity,
                                  itemsize=4, rotary_dim=layer.rotary.rotary_dim, position_bytes=2)
        compressed = layer.storage.code_len.tolist()
        assert min(compressed) > p.sink_tokens + p.recent_window  # more than any exact buffer could hold
        for name, t in layer.tensors().items():
            if t.is_floating_point():
                if t.dim() == 4:  # [B, H, tokens, D] (sinks, window) or [2, B, H, D] (statistics)
                    assert t.shape[2] < min(compressed), f"float tensor {name} {tuple(t.shape)} holds compressed tokens"
                else:
                    assert name == "inv_freq", f"unexpected float tensor {name} {tuple(t.shape)}"
    report = cache.memory_report()
    assert report.allocated_bytes == expected
    assert report.shared_bytes == 64 * 64 * 4  # the Hadamard matrix, shared with every cache, apart
    assert report.logical_tokens == 160
    assert report.bf16_bytes == 3 * 4 * 2 * 1 * 64 * 160


@pytest.mark.parametrize("kind,opts", [("llama", SMALL), ("phi3", SMALL), ("llama", WARM)])
def test_replay_as_decode_equals_token_by_token_decode(kind, opts):
    # The window in the model's float32: in bf16, the float rounding between a batched and a single-token forward
    # would flip the window's last bits (test_window_dtype.py covers the bf16 window).
    opts = dict(opts, window_dtype="model")
    model = tiny_model(kind)
    nqcompile.optimize(model, "balanced", **opts)
    gen = torch.Generator().manual_seed(11)
    prompt, continuation = torch.randint(1, 256, (2, 70), generator=gen), torch.randint(1, 256, (2, 37), generator=gen)
    with torch.no_grad():
        step_cache = nqcompile.NexusCache(model.config, "balanced", **opts)
        model(prompt, past_key_values=step_cache)
        stepwise = torch.cat([model(continuation[:, t:t + 1], past_key_values=step_cache).logits
                              for t in range(continuation.shape[1])], 1)
        replay_cache = nqcompile.NexusCache(model.config, "balanced", **opts)
        model(prompt, past_key_values=replay_cache)
        with replay_cache.replay_as_decode():
            replayed = model(continuation, past_key_values=replay_cache).logits
    torch.testing.assert_close(replayed, stepwise, atol=2e-5, rtol=1e-4)
    for a, b in zip(step_cache.layers, replay_cache.layers):
        assert (a.storage.code_len.tolist(), a.storage.warm_len.tolist(), a.storage.win_len.tolist()) == (
            b.storage.code_len.tolist(), b.storage.warm_len.tolist(), b.storage.win_len.tolist())
        n = a.storage.code_len.tolist()[0]
        assert torch.equal(a.storage.k_codes[:, :, :n], b.storage.k_codes[:, :, :n])
        w = a.storage.warm_len.tolist()[0]
        assert torch.equal(a.storage.warm_v_codes[:, :, :w], b.storage.warm_v_codes[:, :, :w])
        w = a.storage.win_len.tolist()[0]
        torch.testing.assert_close(a.storage.win_k[:, :, :w], b.storage.win_k[:, :, :w], atol=1e-5, rtol=1e-5)


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
        torch.testing.assert_close(layer.storage.codec.norm_mean[0, row].double(), k.mean(1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.storage.codec.norm_mean[1, row].double(), v.mean(1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.storage.codec.norm_scale[1, row].double(), v_std, rtol=1e-5, atol=1e-6)
        expected = torch.ones_like(k_std) if key_norm == "mean" else k_std
        torch.testing.assert_close(layer.storage.codec.norm_scale[0, row].double(), expected, rtol=1e-5, atol=1e-6)


def test_chunk_shorter_than_min_evict_tokens_is_quantized_not_evicted():
    model = tiny_model("llama")
    overrides = dict(SMALL, min_evict_tokens=64)
    nqcompile.optimize(model, "balanced", **overrides)
    gen = torch.Generator().manual_seed(13)
    cache = nqcompile.NexusCache(model.config, "balanced", max_cache_len=256, **overrides)
    with torch.no_grad():
        model(torch.randint(1, 256, (1, 200), generator=gen), past_key_values=cache)
        first = cache.layers[0].storage.code_len.tolist()[0]
        model(torch.randint(1, 256, (1, 40), generator=gen), past_key_values=cache)
    assert first == round(200 * (1 - nqcompile.PRESETS["balanced"].eviction_ratio)) - 4 - 16  # the long chunk evicted
    assert cache.layers[0].storage.code_len.tolist()[0] == first + 40  # the short one only pushed 40 tokens into codes
    assert cache.get_seq_length() == 240


def test_warm_tier_holds_the_newest_tokens_at_warm_bits_and_hands_them_on_once():
    """Prefill: the newest compressed tokens sit in the warm tier at 4 bits (closer to the model's keys/values than
    the 2-bit past); a second chunk codes the old tier once more at the preset's bits, from its warm decode."""
    model = tiny_model("llama", dtype=torch.float64)
    nqcompile.optimize(model, "quant_only", **WARM)
    gen = torch.Generator().manual_seed(13)
    ids, more = torch.randint(1, 256, (1, 100), generator=gen), torch.randint(1, 256, (1, 40), generator=gen)
    ref, cache = DynamicCache(), nqcompile.NexusCache(model.config, "quant_only", **WARM)
    with torch.no_grad():
        model(ids, past_key_values=ref)
        model(ids, past_key_values=cache)
    layer = cache.layers[1]
    # 100 tokens: 4 sinks, 16 in the window, 80 compressed: 48 coded at K4V2, the newest 32 in the tier.
    assert (layer.storage.code_len.tolist(), layer.storage.warm_len.tolist(), layer.storage.win_len.tolist()) == ([48], [32], [16])
    assert torch.equal(layer.storage.warm_pos[0, 0].long(), torch.arange(52, 84))
    warm_k, warm_v = layer.storage.decode_warm(layer.storage.warm_tensors(), layer.storage.warm_pos)
    past_k, past_v = ops.dequant_kv(layer.storage.k_codes[:, :, :48], layer.storage.k_scales[:, :, :48], layer.storage.v_codes[:, :, :48],
                                    layer.storage.v_scales[:, :, :48], torch.arange(4, 52).expand(1, 1, 48),
                                    *layer.storage.codec.as_op_args())

    def rel(x, y):
        return float((x - y).pow(2).mean() / y.pow(2).mean())

    keys, values = ref.layers[1].keys, ref.layers[1].values
    assert rel(warm_k, keys[:, :, 52:84]) < 0.03 and rel(warm_v, values[:, :, 52:84]) < 0.03
    assert rel(past_v, values[:, :, 4:52]) > 5 * rel(warm_v, values[:, :, 52:84])  # 2-bit past vs 4-bit tier
    expected = (torch.zeros(1, layer.storage.heads, 32, 32, dtype=torch.uint8), torch.zeros(1, layer.storage.heads, 32, dtype=torch.uint8),
                torch.zeros(1, layer.storage.heads, 32, 16, dtype=torch.uint8), torch.zeros(1, layer.storage.heads, 32, dtype=torch.uint8))
    ops.write_kv(*expected, warm_k, warm_v, layer.storage.warm_pos.long(), torch.tensor([0]), torch.tensor([32]),
                 *layer.storage.codec.as_op_args())
    with torch.no_grad():
        model(more, past_key_values=cache)
    for name, want in zip(("k_codes", "k_scales", "v_codes", "v_scales"), expected):
        assert torch.equal(getattr(layer.storage, name)[:, :, 48:80], want), name
    assert layer.storage.code_len.tolist() == [80 + 40 - 32] and layer.storage.warm_len.tolist() == [32]


def test_layers_whose_attention_kl_is_below_relax_key_kl_store_keys_one_bit_lower():
    model = tiny_model("llama")
    nqcompile.optimize(model, "quant_only", **SMALL)
    ids = torch.randint(1, 256, (2, 150), generator=torch.Generator().manual_seed(17))

    def run(threshold):
        cache = nqcompile.NexusCache(model.config, "quant_only", max_cache_len=160, **dict(SMALL, relax_key_kl=threshold))
        with torch.no_grad():
            model(ids, past_key_values=cache)
            for _ in range(10):
                model(ids[:, :1], past_key_values=cache)
        return cache

    kls = [layer.key_kl for layer in run(1e9).layers]  # every layer measured (and relaxed)
    assert all(kl > 0 for kl in kls)
    threshold = sorted(kls)[1] * 1.0001  # between the second and third smallest KL
    cache = run(threshold)
    assert [layer.key_kl for layer in cache.layers] == kls  # deterministic, measured before any code is written
    for layer in cache.layers:
        assert layer.key_bits == (3 if layer.key_kl < threshold else 4)
        assert layer.storage.k_codes.shape[-1] == layer.key_bits * layer.storage.head_dim // 8
    assert sorted(layer.key_bits for layer in cache.layers)[:3] == [3, 3, 4]
    expected = sum(
        cache.preset.layer_bytes(batch=2, kv_heads=layer.storage.heads, head_dim=layer.storage.head_dim, capacity=layer.storage.capacity,
                                 itemsize=4, rotary_dim=layer.rotary.rotary_dim, position_bytes=2,
                                 bits=(layer.key_bits, layer.value_bits)) for layer in cache.layers)
    report = cache.memory_report()
    assert report.allocated_bytes == expected
    assert report.layer_key_bits == tuple(layer.key_bits for layer in cache.layers)
    assert "3 bits: 2" in str(report)


@pytest.mark.parametrize("opts", [SMALL, RECON], ids=["quant_only", "reconstruction"])
def test_the_key_trial_measures_the_last_trial_queries_queries(opts, monkeypatch):
    """The trial's KL is taken over the chunk's last ``trial_queries`` queries (all of them when the chunk is
    shorter), also when a reconstruction preset holds the chunk back until its re-reading."""
    from nqcompile.cache import compress

    seen = []
    measure = compress.trial_key_kl
    monkeypatch.setattr(compress, "trial_key_kl", lambda query, *a, window, **kw: seen.append(
        (query.shape[2], window)) or measure(query, *a, window=window, **kw))
    model = tiny_model("llama")
    preset = "balanced" if opts is RECON else "quant_only"
    nqcompile.optimize(model, preset, **opts)
    ids = torch.randint(1, 256, (1, 150), generator=torch.Generator().manual_seed(19))

    def kls(n):
        cache = nqcompile.NexusCache(model.config, preset, **dict(opts, relax_key_kl=1e9, trial_queries=n))
        with torch.no_grad():
            model(ids, past_key_values=cache)
        return [layer.key_kl for layer in cache.layers]

    every = kls(150)
    assert kls(1000) == every  # past the chunk's length: every query either way
    fewer = kls(8)
    assert all(a != b for a, b in zip(fewer, every))
    assert {w for _, w in seen} == {150, 1000, 8} and all(q >= min(w, 150) for q, w in seen)


def test_a_short_turn_keeps_the_warm_tier_full():
    """A 5-token turn adds 5 tokens to the tier and pushes its 5 oldest into codes; the tier keeps the newest 32."""
    model = tiny_model("llama")
    nqcompile.optimize(model, "quant_only", **WARM)
    gen = torch.Generator().manual_seed(19)
    cache = nqcompile.NexusCache(model.config, "quant_only", **WARM)
    with torch.no_grad():
        model(torch.randint(1, 256, (1, 100), generator=gen), past_key_values=cache)
        layer = cache.layers[0]
        tier_before = layer.storage.warm_pos[0, 0].clone()
        model(torch.randint(1, 256, (1, 5), generator=gen), past_key_values=cache)
    assert (layer.storage.code_len.tolist(), layer.storage.warm_len.tolist(), layer.storage.win_len.tolist()) == ([53], [32], [16])
    # Time order: codes 4..56, the tier 57..88, the window 89..104.
    assert torch.equal(layer.storage.warm_pos[0, 0].long(), torch.cat([tier_before[5:].long(), torch.arange(84, 89)]))
    assert torch.equal(layer.storage.warm_pos[0, 0].long(), torch.arange(57, 89))


def test_reset_then_reuse_gives_what_a_fresh_cache_gives():
    model = tiny_model("llama")
    opts = dict(SMALL, warm_tokens=32, relax_key_kl=1e9)  # every layer relaxed: reset must restore the widths
    nqcompile.optimize(model, "quant_only", **opts)
    ids = torch.randint(1, 256, (1, 120), generator=torch.Generator().manual_seed(23))
    used = nqcompile.NexusCache(model.config, "quant_only", **opts)
    with torch.no_grad():
        prefill_and_decode(model, ids, used, 5)
        used.reset()
        assert all(layer.key_bits == 4 and layer.key_kl is None for layer in used.layers)
        again = prefill_and_decode(model, ids, used, 5)
        fresh = prefill_and_decode(model, ids, nqcompile.NexusCache(model.config, "quant_only", **opts), 5)
    torch.testing.assert_close(again, fresh, atol=0, rtol=0)


def test_relax_key_kl_needs_64_coded_tokens_and_takes_the_widest_need_of_a_batch():
    model = tiny_model("llama")
    nqcompile.optimize(model, "quant_only", **SMALL)
    gen = torch.Generator().manual_seed(29)
    short, long_a, long_b = (torch.randint(1, 256, (1, n), generator=gen) for n in (60, 150, 150))

    def layer_kls(ids, threshold=1e9, mask=None):
        cache = nqcompile.NexusCache(model.config, "quant_only", **dict(SMALL, relax_key_kl=threshold))
        with torch.no_grad():
            model(ids, attention_mask=mask, past_key_values=cache)
        return cache, [layer.key_kl for layer in cache.layers]

    cache, kls = layer_kls(short)  # 60 - 4 sinks - 16 window = 40 coded tokens: no evidence, no change
    assert kls == [None] * len(kls) and all(layer.key_bits == 4 for layer in cache.layers)
    _, kl_a = layer_kls(long_a)
    _, kl_b = layer_kls(long_b)
    cache, kl_ab = layer_kls(torch.cat([long_a, long_b]), threshold=(kl_a[0] + kl_b[0]) / 2)
    for got, a, b in zip(kl_ab, kl_a, kl_b):
        assert abs(got - max(a, b)) < 1e-6
    assert cache.layers[0].key_bits == 4  # one of the two sequences needs 4-bit keys in layer 0


def test_reserve_past_int16_widens_stored_positions():
    model = tiny_model("llama")
    nqcompile.optimize(model, "balanced", **WARM)
    ids = torch.randint(1, 256, (1, 150), generator=torch.Generator().manual_seed(31))
    cache = nqcompile.NexusCache(model.config, "balanced", max_cache_len=160, **WARM)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    layer = cache.layers[0]
    assert layer.storage.code_pos.dtype == layer.storage.warm_pos.dtype == torch.int16
    before = layer.storage.warm_pos.clone()
    cache.reserve(40_000)  # a long next turn: positions past 32,767 must fit
    assert layer.storage.code_pos.dtype == layer.storage.warm_pos.dtype == torch.int32
    assert torch.equal(layer.storage.warm_pos.long(), before.long())
    expected = sum(
        cache.preset.layer_bytes(batch=1, kv_heads=lay.storage.heads, head_dim=lay.storage.head_dim, capacity=lay.storage.capacity, itemsize=4,
                                 rotary_dim=lay.rotary.rotary_dim, position_bytes=4) for lay in cache.layers)
    assert cache.memory_report().allocated_bytes == expected


def test_a_layer_relaxed_below_warm_bits_gets_its_warm_tier():
    """K4V4 needs no 4-bit tier; relaxed to K3V4 it does, and the bytes follow the layer's own bits."""
    model = tiny_model("llama")
    opts = dict(SMALL, value_bits=4, warm_tokens=32, relax_key_kl=1e9)
    nqcompile.optimize(model, "quant_only", **opts)
    cache = nqcompile.NexusCache(model.config, "quant_only", max_cache_len=160, **opts)
    with torch.no_grad():
        prefill_and_decode(model, torch.randint(1, 256, (1, 150), generator=torch.Generator().manual_seed(37)), cache, 9)
    for layer in cache.layers:
        assert (layer.key_bits, layer.storage.warm_cap, layer.storage.warm_len.tolist()) == (3, 32, [32])
    expected = sum(
        cache.preset.layer_bytes(batch=1, kv_heads=lay.storage.heads, head_dim=lay.storage.head_dim, capacity=lay.storage.capacity, itemsize=4,
                                 rotary_dim=lay.rotary.rotary_dim, position_bytes=2, bits=(lay.key_bits, lay.value_bits))
        for lay in cache.layers)
    assert cache.memory_report().allocated_bytes == expected


def test_reconstruction_scores_are_the_attention_of_a_rereading_through_a_dynamic_cache():
    """The scores the layers keep equal the largest eager attention probability that the chunk, read a second
    time right after itself, pays each of its tokens (float64, DynamicCache, output_attentions)."""
    model = tiny_model("qwen2", dtype=torch.float64)
    nqcompile.optimize(model, "balanced", **RECON)
    model._nqcompile_reconstruct_hook.remove()  # re-read by hand, to read the scores before they are used
    reference = tiny_model("qwen2", dtype=torch.float64)
    reference.set_attn_implementation("eager")
    ids = torch.randint(1, 256, (2, 90), generator=torch.Generator().manual_seed(17))
    cache = nqcompile.NexusCache(model.config, "balanced", **RECON)
    with torch.no_grad():
        model(ids, past_key_values=cache)
        assert cache.awaiting_reconstruction
        layers = cache._reread(model, ids, None)
        dyn = DynamicCache()
        reference(ids, past_key_values=dyn)
        again = reference(ids, past_key_values=dyn, position_ids=torch.arange(90, 180)[None].expand(2, -1),
                          output_attentions=True)
    r_cap = RECON["recent_window"]
    for layer, attn in zip(layers, again.attentions):  # attn [B, Hq, 90, 180]
        want = attn[..., :90].unflatten(1, (layer.storage.heads, -1)).amax(dim=(2, 3))
        # transformers' eager attention takes its softmax in float32 even for float64 models
        torch.testing.assert_close(layer._recon_scores[..., r_cap:], want, rtol=0, atol=1e-6)


def test_a_deferred_chunk_must_be_reconstructed_before_decoding():
    model = tiny_model("llama")
    nqcompile.optimize(model, "balanced", **RECON)
    model._nqcompile_reconstruct_hook.remove()
    cache = nqcompile.NexusCache(model.config, "balanced", **RECON)
    ids = torch.randint(1, 256, (1, 80), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(ids, past_key_values=cache)
        report = cache.memory_report()  # the chunk waiting for its re-reading is held, and counted, exactly
        assert report.physical_tokens == 80 * len(cache.layers) and report.allocated_bytes > 2 * 80 * 64 * 4 * len(cache.layers)
        with pytest.raises(RuntimeError, match="awaits its reconstruction pass"):
            model(ids[:, :1], past_key_values=cache)
        with pytest.raises(ValueError, match="1 x 80 tokens"):
            cache.reconstruct(model, ids[:, :40])
        with pytest.raises(ValueError, match="attention_mask must cover every token seen"):
            cache.reconstruct(model, ids, torch.ones(1, 40, dtype=torch.long))
        cache.reconstruct(model, ids)
        assert not cache.awaiting_reconstruction
        model(ids[:, :1], past_key_values=cache)


def test_rereading_leaves_the_sliding_window_layers_of_a_hybrid_model_as_they_were():
    config = transformers.Qwen2Config(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, use_sliding_window=True, sliding_window=24,
        layer_types=["sliding_attention", "full_attention", "full_attention"])
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    opts = dict(RECON, compress_layers="global_only")
    nqcompile.optimize(model, "balanced", **opts)
    ids = torch.randint(1, 256, (1, 80), generator=torch.Generator().manual_seed(4))
    cache = nqcompile.NexusCache(model.config, "balanced", **opts)
    dyn = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache)
        model(ids, past_key_values=dyn)
    assert not cache.awaiting_reconstruction and isinstance(cache.layers[1], NexusLayer)
    assert cache.layers[0].get_seq_length() == 80
    torch.testing.assert_close(cache.layers[0].keys, dyn.layers[0].keys, rtol=0, atol=0)


def test_the_sliding_window_layers_of_a_hybrid_model_hold_only_their_window():
    """After a prefill, transformers' sliding layer would keep a view into the whole prompt's keys and values
    (counted by memory_report, allocated until the next step); the NexusCache's copy holds the window alone, with
    the strides it has after a decode step (one compiled graph for both)."""
    model = nqcompile.optimize(tiny_model("gemma3"), "asym", compress_layers="global_only")
    ids = torch.randint(1, 256, (1, 200), generator=torch.Generator().manual_seed(5))
    cache, dyn = nqcompile.NexusCache(model.config, "asym", compress_layers="global_only"), \
        DynamicCache(config=model.config)
    window = model.config.sliding_window - 1
    with torch.no_grad():
        model(ids, past_key_values=cache)
        model(ids, past_key_values=dyn)
        layer = cache.layers[0]
        torch.testing.assert_close(layer.keys, dyn.layers[0].keys, rtol=0, atol=0)
        assert layer.keys.untyped_storage().nbytes() == layer.keys.nbytes == window * 2 * 64 * 4
        after_prefill = layer.keys.stride()
        model(ids[:, :1], past_key_values=cache)
        assert layer.keys.stride() == after_prefill and layer.values.is_contiguous()


def test_rereading_in_pieces_keeps_a_padded_row_equal_to_its_solo_run(monkeypatch):
    """Pieces are cut per row: with 40-token pieces the rows of 97 and 150 tokens are read in 3 and 4 pieces."""
    monkeypatch.setattr(nqcompile.cache.nexus_cache, "REREAD_TOKENS", 40)
    test_left_padded_batch_matches_each_prompt_alone("balanced", RECON)


def test_second_turn_scores_take_their_softmax_over_the_codes_of_the_first_turn_too():
    """Exact storage: layer 0's scores of a second turn equal the eager attention of a re-reading over what
    the layer holds (sinks, the kept tokens of turn 1, window) and the turn, through a DynamicCache."""
    opts = dict(RECON, key_bits=None, value_bits=None)
    model = tiny_model("qwen2", dtype=torch.float64)
    nqcompile.optimize(model, "balanced", **opts)
    reference = tiny_model("qwen2", dtype=torch.float64)
    reference.set_attn_implementation("eager")
    gen = torch.Generator().manual_seed(23)
    turn1, turn2 = torch.randint(1, 256, (1, 120), generator=gen), torch.randint(1, 256, (1, 70), generator=gen)
    cache = nqcompile.NexusCache(model.config, "balanced", **opts)
    with torch.no_grad():
        model(turn1, past_key_values=cache)
        model._nqcompile_reconstruct_hook.remove()
        model(turn2, past_key_values=cache)
        layer = cache._reread(model, turn2, None)[0]
        assert layer.storage.code_len.tolist()[0] > 0
        n, w = layer.storage.code_len.tolist()[0], int(layer.storage.win_len[0])
        held = [(layer.storage.sink_k[:, :, :4], layer.storage.sink_v[:, :, :4]), (layer.storage.k_codes[:, :, :n], layer.storage.v_codes[:, :, :n]),
                (layer.storage.win_k[:, :, :w], layer.storage.win_v[:, :, :w]), (layer.deferred.key, layer.deferred.value)]
        keys, values = torch.cat([k for k, _ in held], 2), torch.cat([v for _, v in held], 2)
        dyn = DynamicCache()
        for i in range(len(cache.layers)):  # every layer holds layer 0's tokens: only layer 0 is compared
            dyn.update(keys, values, i)
        start = 120 + 70
        again = reference(turn2, past_key_values=dyn, position_ids=torch.arange(start, start + 70)[None],
                          output_attentions=True)
    attn = again.attentions[0]  # [1, Hq, 70, held + 70 + 70]
    want = attn[..., 4 + n:keys.shape[2]].unflatten(1, (layer.storage.heads, -1)).amax(dim=(2, 3))  # window, then turn 2
    got = torch.cat([layer._recon_scores[..., :w], layer._recon_scores[..., RECON["recent_window"]:]], -1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("preset,opts", [("balanced", RECON), ("quant_only", WARM)])
def test_code_capacity_follows_what_the_chunks_keep(preset, opts):
    """A prompt fed in chunks into a cache sized for all of it: after each chunk the code buffers hold what is
    kept plus room for the tokens still to come (which may all be decoded), never a slot per logical token; after
    the last chunk only the decode room is unused, and decoding fills it without growing the buffers."""
    model = nqcompile.optimize(tiny_model("llama"), preset, **opts)
    ids = torch.randint(1, 256, (1, 400), generator=torch.Generator().manual_seed(11))
    steps = 24
    cache = nqcompile.NexusCache(model.config, preset, max_cache_len=400 + steps, **opts)
    layers = [layer for layer in cache.layers if isinstance(layer, NexusLayer)]
    with torch.no_grad():
        for start in range(0, 400, 100):
            model(ids[:, start:start + 100], past_key_values=cache)
            spare = 400 + steps - (start + 100)
            for layer in layers:  # codes + the blocks that spare tokens can flush out of the window, + one block
                st, block = layer.storage, ops.BLOCK_TOKENS
                flushed = -(-max(0, int(st.win_len.max()) + spare - st.win_k.shape[2]) // block) * block
                want = int(st.code_len.max()) + max(flushed + block, -(-spare // block) * block)
                assert st.capacity == -(-want // block) * block, (start, st.capacity, want)
        capacity = [layer.storage.capacity for layer in layers]
        for _ in range(steps):
            model(ids[:, :1], past_key_values=cache)
    assert [layer.storage.capacity for layer in layers] == capacity  # planned: no growth while decoding
    if cache.preset.eviction_ratio:  # evicted tokens take no slot: far fewer than the logical tokens
        assert max(int(layer.storage.code_len.max()) for layer in layers) < 0.6 * 400
    for layer in layers:  # what stays unused is the block every step writes at the codes' end, and rounding
        st = layer.storage
        assert st.capacity - int(st.code_len.max()) <= 2 * ops.BLOCK_TOKENS


def test_the_hadamard_matrix_is_one_per_process_and_reported_apart():
    """Two caches of head_dim 64 read the very same Hadamard matrix (``hadamard_matrix``'s cached copy): it is not in
    either cache's ``allocated_bytes`` (freeing a cache does not free it) but in ``shared_bytes``, 64 x 64 float32,
    once per cache however many layers read it; its entries are ``±1/8``."""
    model = tiny_model("llama")
    nqcompile.optimize(model, "quant_only")
    ids = torch.randint(1, 256, (1, 80), generator=torch.Generator().manual_seed(3))
    caches = [nqcompile.NexusCache(model.config, "quant_only", max_cache_len=80) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            model(ids, past_key_values=cache)
    matrices = [layer.storage.shared_tensors()["hadamard"] for cache in caches for layer in cache.layers]
    assert len(matrices) == 2 * len(caches[0].layers) and all(m is matrices[0] for m in matrices)
    assert set(matrices[0].abs().unique().tolist()) == {0.125}
    for cache in caches:
        report = cache.memory_report()
        owned = {t.untyped_storage().data_ptr() for layer in cache.layers for t in layer.tensors().values()}
        assert matrices[0].untyped_storage().data_ptr() not in owned
        assert report.shared_bytes == 64 * 64 * 4
        assert "codec constants shared by caches" in str(report) and report.to_dict()["shared_bytes"] == 16384
