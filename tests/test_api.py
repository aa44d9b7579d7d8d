"""compress_kv_cache and optimize(): the user entry points."""

import copy
import inspect

import pytest
import torch
from transformers import DynamicCache

import nqcompile
from tiny_models import byte_level_tokenizer, tiny_model


def _decode(model, cache, tokens):
    return torch.cat([model(tokens[:, t:t + 1], past_key_values=cache).logits for t in range(tokens.shape[1])], 1)


def test_compress_kv_cache_exact_continues_like_the_dynamic_cache():
    model = nqcompile.optimize(tiny_model("llama"), "balanced", tokenizer=byte_level_tokenizer())
    gen = torch.Generator().manual_seed(0)
    prompt, more = torch.randint(1, 256, (2, 50), generator=gen), torch.randint(1, 256, (2, 20), generator=gen)
    with torch.no_grad():
        ref_cache = DynamicCache()
        model(prompt, past_key_values=ref_cache)
        ref = _decode(model, ref_cache, more)
        src = DynamicCache()
        model(prompt, past_key_values=src)
        cache = nqcompile.compress_kv_cache(src, "balanced", config=model.config, key_bits=None, value_bits=None,
                                            relax_key_kl=0, eviction_ratio=0.0, recent_window=16)
        assert cache.get_seq_length() == 50
        got = _decode(model, cache, more)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("scorer", ["key_norm", "key_diff"])
def test_compress_kv_cache_quantizes_and_evicts_without_queries(scorer):
    model = nqcompile.optimize(tiny_model("qwen2"), "balanced", tokenizer=byte_level_tokenizer())
    prompt = torch.randint(1, 256, (1, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        src = DynamicCache()
        model(prompt, past_key_values=src)
        with pytest.raises(ValueError, match="no queries"):
            nqcompile.compress_kv_cache(src, "balanced", config=model.config, scorer="observation", keep_mass=0,
                                        keep_line_breaks=False)
        with pytest.raises(ValueError, match=r"scorer='reconstruction'.*scorer='key_diff' "
                                             r"\(with keep_mass=0 and keep_line_breaks=False"):
            nqcompile.compress_kv_cache(src, "balanced", config=model.config)
        with pytest.raises(ValueError, match="relax_key_kl=0"):
            nqcompile.compress_kv_cache(src, "quant_only", config=model.config, relax_key_kl=0.01)
        assert nqcompile.compress_kv_cache(src, config=model.config).preset.name == "asym"  # the default works
        cache = nqcompile.compress_kv_cache(src, "balanced", config=model.config, scorer=scorer, keep_mass=0,
                                            keep_line_breaks=False,
                                            relax_key_kl=0, recent_window=16, min_evict_tokens=0,
                                            warm_tokens=0)  # every kept token past the window in the codes
        kept = round(200 * (1 - nqcompile.PRESETS["balanced"].eviction_ratio)) - 4
        assert cache.layers[0].storage.code_len.tolist()[0] == kept - 16
        out = model(prompt[:, :1], past_key_values=cache)  # the full window flushes one block first
    assert torch.isfinite(out.logits).all()
    assert cache.layers[0].storage.code_len.tolist()[0] == kept
    report = cache.memory_report()  # no max_cache_len: the code buffers grew, the slack is reported
    assert report.unused_capacity_bytes > 0
    assert report.bf16_bytes / (report.allocated_bytes - report.unused_capacity_bytes) > 3


def test_optimize_generate_sizes_the_cache_and_continues_a_conversation():
    model = nqcompile.optimize(tiny_model("llama"), "asym", recent_window=16)
    gen = torch.Generator().manual_seed(2)
    turn1 = torch.randint(1, 256, (1, 60), generator=gen)
    out = model.generate(turn1, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values
    assert isinstance(cache, nqcompile.NexusCache) and cache.max_cache_len == 60 + 8 - 1  # as a static cache: the
    # last new token is never fed
    turn2 = torch.cat([out.sequences, torch.randint(1, 256, (1, 12), generator=gen)], 1)
    out2 = model.generate(turn2, max_new_tokens=8, do_sample=False, past_key_values=cache,
                          return_dict_in_generate=True)
    assert out2.past_key_values is cache
    assert out2.sequences.shape[1] == turn2.shape[1] + 8
    assert cache.get_seq_length() == turn2.shape[1] + 7


def test_generate_rereads_each_long_turn_and_matches_reconstructing_by_hand():
    """Through generate (left-padded batch, two turns) the hook re-reads every chunk long enough to evict from,
    and the result equals calling NexusCache.reconstruct after a plain forward."""
    # warm_tokens=0: every kept token past the window lands in the codes this test compares
    # keep_line_breaks=False: reconstruct() by hand is given no line breaks to keep
    opts = dict(recent_window=16, min_evict_tokens=64, relax_key_kl=0, warm_tokens=0, keep_line_breaks=False)
    model = nqcompile.optimize(tiny_model("llama"), "balanced", **opts)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 256, (2, 150), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :30] = 0
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values
    assert not cache.awaiting_reconstruction
    kept = [layer.storage.code_len.tolist() for layer in cache.layers]
    turn2 = torch.cat([out.sequences, torch.randint(1, 256, (2, 100), generator=gen)], 1)
    mask2 = torch.cat([mask, torch.ones(2, turn2.shape[1] - mask.shape[1], dtype=torch.long)], 1)
    model.generate(turn2, attention_mask=mask2, max_new_tokens=4, do_sample=False, past_key_values=cache)
    assert not cache.awaiting_reconstruction and cache.get_seq_length() == turn2.shape[1] + 3
    assert sum(sum(layer.storage.code_len.tolist()) for layer in cache.layers) > sum(map(sum, kept))  # the turn kept tokens
    # By hand: the same prefill without the hook, then reconstruct().
    model._nqcompile_reconstruct_hook.remove()
    by_hand = nqcompile.NexusCache(model.config, model.nqcompile_preset, max_cache_len=156)
    with torch.no_grad():
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        model(ids, attention_mask=mask, position_ids=positions, past_key_values=by_hand)
        by_hand.reconstruct(model, ids, mask)
    first = nqcompile.NexusCache(model.config, model.nqcompile_preset, max_cache_len=156)
    nqcompile.optimize(model, "balanced", **opts)  # the hook again
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=positions, past_key_values=first)
    for a, b in zip(by_hand.layers, first.layers):
        assert a.storage.code_len.tolist() == b.storage.code_len.tolist() and torch.equal(a.storage.k_codes, b.storage.k_codes)
    # The hook reads the mask and the cache from positional arguments as well.
    positional = nqcompile.NexusCache(model.config, model.nqcompile_preset, max_cache_len=156)
    with torch.no_grad():
        model(ids, mask, positions, positional)
    for a, b in zip(positional.layers, first.layers):
        assert a.storage.code_len.tolist() == b.storage.code_len.tolist() and torch.equal(a.storage.k_codes, b.storage.k_codes)


@pytest.mark.parametrize("preset", ["asym", "quant_only"])
def test_continuing_a_generation_token_by_token_equals_generating_at_once(preset):
    """A continuation whose new input is the one token generate left unread goes straight to decode steps:
    reserve() must plan their code room (no chunk end comes to do it)."""
    model = nqcompile.optimize(tiny_model("llama"), preset, recent_window=16, warm_tokens=32, relax_key_kl=0)
    ids = torch.randint(1, 256, (1, 60), generator=torch.Generator().manual_seed(4))
    once = model.generate(ids, max_new_tokens=48, do_sample=False)
    out = model.generate(ids, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    more = model.generate(out.sequences, max_new_tokens=40, do_sample=False, past_key_values=out.past_key_values)
    assert torch.equal(more, once)


def test_generate_re_reads_for_a_model_whose_config_has_layer_types():
    """Qwen2 configs list layer_types, so generate hands a compileable cache's masks over as a dict per layer type;
    the re-reading hook reads the full-attention one."""
    # keep_mass=0: a random model's attention is spread, so 97% of its mass would keep nearly every token
    # (warm_tokens=0: every kept token past the window lands in the codes)
    model = nqcompile.optimize(tiny_model("qwen2"), "balanced", min_evict_tokens=32, recent_window=16, keep_mass=0,
                               warm_tokens=0, tokenizer=byte_level_tokenizer())
    ids = torch.randint(1, 256, (2, 90), generator=torch.Generator().manual_seed(6))
    out = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values
    assert not cache.awaiting_reconstruction
    assert 0 < int(cache.layers[0].storage.code_len.max()) < 90 - 16  # the prompt was scored and evicted from


def test_a_deep_copy_of_an_optimized_model_runs_its_own_weights():
    """optimize's generate and forward are bound to the model: a deep copy rebinds them to the copy."""
    model = nqcompile.optimize(tiny_model("llama"), "asym", recent_window=16)
    copy_ = copy.deepcopy(model)
    with torch.no_grad():
        for p in copy_.parameters():
            p.mul_(0.5)
        ids = torch.randint(1, 256, (1, 40), generator=torch.Generator().manual_seed(8))
        cache = nqcompile.NexusCache(copy_.config, "asym", max_cache_len=40, recent_window=16)
        got = copy_(ids, past_key_values=cache).logits
        want = nqcompile.optimize(copy.deepcopy(copy_), "asym", recent_window=16)(
            ids, past_key_values=nqcompile.NexusCache(copy_.config, "asym", max_cache_len=40, recent_window=16)).logits
        assert not torch.allclose(got, model(ids).logits)
    torch.testing.assert_close(got, want)
    assert copy_.generate.__self__ is copy_ and copy_.forward.__self__ is copy_
    assert copy_._prepare_cache_for_generation.__self__ is copy_
    assert "input_ids" in inspect.signature(copy_.forward).parameters
