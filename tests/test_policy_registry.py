"""Contract of every scorer in nqcompile.policy.registry.SCORERS.

A scorer added to the registry is tested here without any other change: its scores have the documented shape
and dtype and do not depend on other sequences' padding, a cache evicting half of a prompt with it keeps the
expected number of tokens, and the entry points accept it exactly where its needs (queries, the model) are met.
"""

import dataclasses
import re

import pytest
import torch
from transformers import DynamicCache

import nqcompile
from nqcompile.policy.registry import SCORERS, make_scorer
from tiny_models import tiny_model

PRESET_FIELDS = {f.name for f in dataclasses.fields(nqcompile.Preset)}
#: Half of a 100-token prompt evicted: 50 tokens kept per layer (4 sinks, 16 in the window, 30 codes).
EVICTING = dict(eviction_ratio=0.5, min_evict_tokens=0, sink_tokens=4, recent_window=16, observation_window=8,
                warm_tokens=0, relax_key_kl=0.0, pooling_kernel=1)
PROMPT, KEPT = 100, 50


def _evicting(name: str) -> nqcompile.Preset:
    return nqcompile.get_preset("asym", scorer=name, **EVICTING)


@pytest.mark.parametrize("name", SCORERS)
def test_make_scorer_takes_its_options_from_preset_fields(name):
    entry = SCORERS[name]
    preset = _evicting(name)
    scorer = make_scorer(name, **preset.to_dict())
    if entry.scorer is None:
        assert scorer is None and entry.needs_model
        return
    assert type(scorer) is entry.scorer and not entry.needs_model
    options = {f.name: getattr(scorer, f.name) for f in dataclasses.fields(scorer)}
    assert set(options) <= PRESET_FIELDS, "a scorer's fields are named after the preset fields that set them"
    assert options == {k: getattr(preset, k) for k in options}


@pytest.mark.parametrize("name", [n for n, e in SCORERS.items() if e.scorer is not None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scores_shape_dtype_and_padding_independence(name, dtype):
    """``[B, Hkv, Lk]`` in float32 (float64 for float64 inputs), finite on real keys, and a left-padded row
    scores its keys exactly as it would alone (TokenScorer.score)."""
    scorer = make_scorer(name, **_evicting(name).to_dict())
    g = torch.Generator().manual_seed(0)
    batch, n_q, n_kv, length, dim, pad = 2, 4, 2, 24, 16, 5
    query = torch.randn(batch, n_q, length, dim, generator=g, dtype=dtype)
    key = torch.randn(batch, n_kv, length, dim, generator=g, dtype=dtype)
    real = torch.ones(batch, length, dtype=torch.bool)
    real[1, :pad] = False
    time = real.long().cumsum(-1) - 1
    kw = dict(scaling=dim ** -0.5)
    scores = scorer.score(query=query, key=key, query_time=time.masked_fill(~real, -1), key_time=time,
                          key_valid=real, **kw)
    assert scores.shape == (batch, n_kv, length) and scores.dtype == dtype
    assert torch.isfinite(scores[real[:, None, :].expand_as(scores)]).all()
    alone = scorer.score(query=query[1:, :, pad:], key=key[1:, :, pad:], query_time=time[1:, pad:],
                         key_time=time[1:, pad:], key_valid=real[1:, pad:], **kw)
    torch.testing.assert_close(scores[1:, :, pad:], alone)


@pytest.mark.parametrize("name", SCORERS)
def test_only_model_scored_entries_wait_for_the_rereading(name):
    """Without optimize's hook, a chunk to evict from stays deferred exactly for a scorer that needs the model;
    NexusCache.reconstruct then compresses it."""
    model = nqcompile.optimize(tiny_model("llama"), _evicting(name))
    model._nqcompile_reconstruct_hook.remove()
    cache = nqcompile.NexusCache(model.config, _evicting(name))
    ids = torch.randint(1, 256, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids, past_key_values=cache)
        assert cache.awaiting_reconstruction == SCORERS[name].needs_model
        if SCORERS[name].needs_model:
            cache.reconstruct(model, ids)
    assert not cache.awaiting_reconstruction
    assert sum(layer.physical_tokens() for layer in cache.layers) == KEPT * len(cache.layers)


@pytest.mark.parametrize("name", SCORERS)
def test_cache_evicting_half_keeps_half(name):
    """Every layer keeps half of each prompt; a scorer that needs the model shares the budget of all layers."""
    model = nqcompile.optimize(tiny_model("llama"), _evicting(name))
    cache = nqcompile.NexusCache(model.config, model.nqcompile_preset)
    ids = torch.randint(1, 256, (2, PROMPT), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(ids, past_key_values=cache)
    kept = [layer.physical_tokens() for layer in cache.layers]  # summed over the 2 sequences
    assert sum(kept) == 2 * KEPT * len(kept)
    if not SCORERS[name].needs_model:
        assert kept == [2 * KEPT] * len(kept)


@pytest.mark.parametrize("name", SCORERS)
def test_compress_kv_cache_accepts_exactly_the_scorers_that_need_neither_queries_nor_model(name):
    entry = SCORERS[name]
    model = nqcompile.optimize(tiny_model("llama"), "asym")
    src = DynamicCache()
    with torch.no_grad():
        model(torch.randint(1, 256, (1, PROMPT), generator=torch.Generator().manual_seed(3)), past_key_values=src)
    if entry.needs_queries or entry.needs_model:
        with pytest.raises(ValueError, match=re.escape(f"scorer={name!r}")):
            nqcompile.compress_kv_cache(src, "asym", config=model.config, scorer=name, **EVICTING)
    else:
        cache = nqcompile.compress_kv_cache(src, "asym", config=model.config, scorer=name, **EVICTING)
        assert [layer.physical_tokens() for layer in cache.layers] == [KEPT] * len(cache.layers)


@pytest.mark.parametrize("name", SCORERS)
def test_model_scored_entries_refuse_inputs_embeds_and_a_layer_pyramid(name):
    needs_model = SCORERS[name].needs_model
    model = nqcompile.optimize(tiny_model("llama"), _evicting(name))
    embeds = model.get_input_embeddings()(torch.randint(1, 256, (1, 20), generator=torch.Generator().manual_seed(4)))
    if needs_model:
        with pytest.raises(ValueError, match=re.escape(f"scorer={name!r} re-reads the prompt's token ids")):
            model.generate(inputs_embeds=embeds, max_new_tokens=2, do_sample=False)
        with pytest.raises(ValueError, match=re.escape(f"scorer={name!r} shares one budget among the layers")):
            _evicting(name).replace(layer_budget="pyramid")
    else:
        assert model.generate(inputs_embeds=embeds, max_new_tokens=2, do_sample=False).shape == (1, 2)
        assert _evicting(name).replace(layer_budget="pyramid").layer_budget == "pyramid"
