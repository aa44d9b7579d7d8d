"""The audit of ``docs/models.md``, one test per row: every attention feature of a model config is honoured (an
optimized model with an exact ``NexusCache`` gives the logits of a ``DynamicCache``, to 1e-5, over a prefill longer
than any window and 20 decode steps) or refused (the error names the field)."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
import transformers
from transformers import DynamicCache

import nqcompile
from nqcompile.attention import CACHE_KWARG, nexus_attention_forward
from nqcompile.cache import NexusLayer
from tiny_models import prefill_and_decode

#: Exact storage: a NexusCache that must reproduce a DynamicCache.
EXACT = dict(key_bits=None, value_bits=None, eviction_ratio=0.0, relax_key_kl=0.0, warm_tokens=0)
SMALL = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024)
#: Windows of the windowed cases: the prefill is longer, so the window excludes tokens from its first step.
WINDOW = 16
PREFILL, STEPS = 40, 20
#: A window that holds the whole generation (prefill + decode steps): compressed layers honour it.
WIDE = PREFILL + STEPS + 4
TWO = ["sliding_attention", "full_attention"]


@dataclass
class Honoured:
    """A config whose feature an exact NexusCache must honour. ``compressed``: NexusLayers the cache must hold."""

    make: Callable[[], transformers.PretrainedConfig]
    compressed: int
    options: dict = field(default_factory=dict)
    attention: str = "sdpa"


HONOURED = {
    "Grouped-query and multi-query attention": [
        Honoured(lambda: transformers.LlamaConfig(**{**SMALL, "num_key_value_heads": 1}), 2)],
    "Head size not hidden_size / heads": [
        Honoured(lambda: transformers.LlamaConfig(**SMALL, head_dim=96), 2)],
    "Projection biases": [
        Honoured(lambda: transformers.LlamaConfig(**SMALL, attention_bias=True), 2),
        Honoured(lambda: transformers.Qwen2Config(**SMALL), 2)],
    "Rope scaling types": [
        Honoured(lambda: transformers.LlamaConfig(**SMALL, rope_parameters=params), 2) for params in (
            {"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0},
            {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0},
            {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 256},
            {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 256})] + [
        Honoured(lambda: transformers.Phi3Config(
            **{**SMALL, "num_key_value_heads": 4}, original_max_position_embeddings=512, pad_token_id=0,
            rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.5] * 16,
                             "long_factor": [4.0] * 16}), 2)],
    "Partial rotary": [
        Honoured(lambda: transformers.PhiConfig(**{**SMALL, "num_key_value_heads": 4}, partial_rotary_factor=0.25), 2),
        Honoured(lambda: transformers.Phi3Config(**{**SMALL, "num_key_value_heads": 4}, partial_rotary_factor=0.5,
                                                 pad_token_id=0), 2)],
    "QK-norm": [
        Honoured(lambda: transformers.Qwen3Config(**SMALL, head_dim=64), 2),
        Honoured(lambda: transformers.Olmo2Config(**SMALL), 2),
        Honoured(lambda: transformers.PhiConfig(**{**SMALL, "num_key_value_heads": 4}, qk_layernorm=True), 2)],
    "Attention scaling override": [
        Honoured(lambda: transformers.Gemma3TextConfig(**SMALL, head_dim=32, query_pre_attn_scalar=100,
                                                       sliding_window=WIDE, layer_types=TWO, pad_token_id=0), 2),
        Honoured(lambda: transformers.GraniteConfig(**SMALL, attention_multiplier=0.05), 2)],
    "Per-layer rope": [
        Honoured(lambda: transformers.Gemma3TextConfig(**SMALL, head_dim=32, sliding_window=WINDOW, layer_types=TWO,
                                                       pad_token_id=0), 2)],
    "Layers without rope": [
        Honoured(lambda: transformers.SmolLM3Config(**SMALL, no_rope_layers=[1, 0], pad_token_id=0), 2),
        Honoured(lambda: transformers.Cohere2Config(**SMALL, sliding_window=WINDOW, layer_types=TWO, pad_token_id=0),
                 2)],
    "Sliding window in every layer": [
        Honoured(lambda: transformers.MistralConfig(**SMALL, head_dim=32, sliding_window=WINDOW), 2),
        Honoured(lambda: transformers.MistralConfig(**SMALL, head_dim=32, sliding_window=WINDOW), 0,
                 dict(compress_layers="global_only")),
        Honoured(lambda: transformers.MistralConfig(**SMALL, head_dim=32, sliding_window=WIDE), 2)],
    "Sliding-window layers of hybrid models": [
        Honoured(lambda: transformers.Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=WINDOW,
                                                  max_window_layers=1), 2),
        Honoured(lambda: transformers.Gemma3TextConfig(**SMALL, head_dim=32, sliding_window=WINDOW, layer_types=TWO,
                                                       pad_token_id=0), 2, attention="eager"),
        Honoured(lambda: transformers.Exaone4Config(**SMALL, sliding_window=WINDOW, layer_types=TWO), 2),
        Honoured(lambda: transformers.Exaone4Config(**SMALL, sliding_window=WINDOW, layer_types=TWO), 1,
                 dict(compress_layers="global_only")),
        Honoured(lambda: transformers.Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=WIDE,
                                                  max_window_layers=1), 2)],
    "Chunked attention": [
        Honoured(lambda: transformers.Llama4TextConfig(
            **SMALL, head_dim=32, attention_chunk_size=WINDOW, num_local_experts=2, intermediate_size_mlp=256,
            no_rope_layers=[1, 0], layer_types=["chunked_attention", "full_attention"]), 1,
            dict(compress_layers="global_only")),
        Honoured(lambda: transformers.Llama4TextConfig(
            **SMALL, head_dim=32, attention_chunk_size=WIDE, num_local_experts=2, intermediate_size_mlp=256,
            no_rope_layers=[1, 0], layer_types=["chunked_attention", "full_attention"]), 2)],
    "Head size per layer type": [
        Honoured(lambda: transformers.Gemma4TextConfig(**SMALL, head_dim=32, global_head_dim=64, sliding_window=WINDOW,
                                                       layer_types=TWO, pad_token_id=0), 2)],
}


def _model(config: transformers.PretrainedConfig, attention: str = "sdpa"):
    torch.manual_seed(0)
    config._attn_implementation = attention
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # sharper attention than random weights give, so a wrong mask shows in the logits
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "qkv_proj.weight")):
                p.mul_(4.0)
    return model.eval()


@pytest.mark.parametrize("row,case", [(row, case) for row, cases in HONOURED.items() for case in cases],
                         ids=[f"{row}-{i}" for row, cases in HONOURED.items() for i in range(len(cases))])
def test_honoured_feature_matches_a_dynamic_cache(row, case):
    model = _model(case.make(), case.attention)
    ids = torch.randint(1, 256, (1, PREFILL), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = prefill_and_decode(model, ids, DynamicCache(config=model.config), STEPS)
        nqcompile.optimize(model, "balanced", **EXACT, **case.options)
        cache = nqcompile.NexusCache(model.config, "balanced", max_cache_len=PREFILL + STEPS, **EXACT, **case.options)
        got = prefill_and_decode(model, ids, cache, STEPS)
    assert sum(isinstance(layer, NexusLayer) for layer in cache.layers) == case.compressed
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0, msg=f"{row}: the exact NexusCache differs")


@dataclass
class Refused:
    """A config whose feature must be refused with an error matching ``match`` (the field), by ``NexusCache(...)``
    (``max_cache_len``) and, where ``optimize`` is true, by ``nqcompile.optimize`` on a model built from it."""

    make: Callable[[], transformers.PretrainedConfig]
    match: str
    options: dict = field(default_factory=dict)
    max_cache_len: int | None = PREFILL + STEPS
    cache: bool = True
    optimize: bool = True


def _vl_text_config():
    config = transformers.Qwen2VLConfig(text_config=dict(**SMALL, rope_parameters={
        "rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 6, 6]}))
    return config


REFUSED = {
    "Rope scaling types": [
        Refused(lambda: transformers.LlamaConfig(**{**SMALL, "max_position_embeddings": 32}, rope_parameters={
            "rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}), r"max_position_embeddings=32", optimize=False),
        Refused(lambda: transformers.Phi3Config(
            **{**SMALL, "num_key_value_heads": 4}, original_max_position_embeddings=32, pad_token_id=0,
            rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.5] * 16,
                             "long_factor": [4.0] * 16}), r"original_max_position_embeddings=32", optimize=False)],
    "Chunked attention": [
        Refused(lambda: transformers.Llama4TextConfig(
            **SMALL, head_dim=32, attention_chunk_size=WINDOW, num_local_experts=2, intermediate_size_mlp=256,
            layer_types=["chunked_attention", "full_attention"]), r"attention_chunk_size=16", optimize=False)],
    "Logit soft-capping": [
        Refused(lambda: transformers.Gemma2Config(**SMALL, head_dim=32, sliding_window=WINDOW, layer_types=TWO),
                r"attn_logit_softcapping=50", dict(compress_layers="global_only"))],
    "Attention sinks": [
        Refused(lambda: transformers.GptOssConfig(**SMALL, head_dim=32, sliding_window=WINDOW, layer_types=TWO,
                                                  num_local_experts=2, num_experts_per_tok=1),
                r"sinks", dict(compress_layers="global_only"), cache=False)],
    "ALiBi": [
        Refused(lambda: transformers.FalconConfig(vocab_size=256, hidden_size=128, num_hidden_layers=2,
                                                  num_attention_heads=4, alibi=True), r"ALiBi"),
        Refused(lambda: transformers.MptConfig(vocab_size=256, d_model=128, n_layers=2, n_heads=4,
                                               attn_config={"alibi": True}), r"ALiBi"),
        Refused(lambda: transformers.BloomConfig(vocab_size=256, hidden_size=128, n_layer=2, n_head=4), r"ALiBi")],
    "No rotary embedding": [
        Refused(lambda: transformers.GPT2Config(vocab_size=256, n_embd=128, n_layer=2, n_head=4), r"no rotary"),
        Refused(lambda: transformers.OPTConfig(vocab_size=256, hidden_size=128, num_hidden_layers=2,
                                               num_attention_heads=4, ffn_dim=256), r"no rotary")],
    "Multi-head latent attention": [
        Refused(lambda: transformers.DeepseekV3Config(
            **SMALL, kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32,
            n_routed_experts=2, num_experts_per_tok=1, first_k_dense_replace=2, moe_intermediate_size=64),
            r"kv_lora_rank=32")],
    "Multimodal rope": [Refused(_vl_text_config, r"mrope_section", optimize=False)],
    "Cross-layer KV sharing": [
        Refused(lambda: transformers.Gemma3nTextConfig(
            **{**SMALL, "num_hidden_layers": 4}, head_dim=32, num_kv_shared_layers=2, sliding_window=WINDOW,
            layer_types=TWO * 2, laurel_rank=8, hidden_size_per_layer_input=8, vocab_size_per_layer_input=256,
            altup_num_inputs=2, activation_sparsity_pattern=[0.0] * 4), r"num_kv_shared_layers=2",
            dict(compress_layers="global_only")),
        Refused(lambda: transformers.Gemma4TextConfig(**{**SMALL, "num_hidden_layers": 4}, head_dim=32,
                                                      global_head_dim=64, sliding_window=WINDOW, layer_types=TWO * 2,
                                                      num_kv_shared_layers=2, pad_token_id=0),
                r"num_kv_shared_layers=2", dict(compress_layers="global_only"))],
    "Bidirectional attention": [
        Refused(lambda: transformers.Gemma3TextConfig(**SMALL, head_dim=32, sliding_window=WINDOW, layer_types=TWO,
                                                      use_bidirectional_attention=True, pad_token_id=0),
                r"use_bidirectional_attention=True", dict(compress_layers="global_only"))],
    "Layers without per-token keys and values": [
        Refused(lambda: transformers.Qwen3NextConfig(**{**SMALL, "num_hidden_layers": 4}, head_dim=32,
                                                     num_experts=2, num_experts_per_tok=1),
                r"layer_types \['linear_attention'\]"),
        Refused(lambda: transformers.JambaConfig(**{**SMALL, "num_hidden_layers": 2}, num_experts=2,
                                                 attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2),
                r"layer_types \['linear_attention'\]", optimize=False)],
    "Encoder-decoder models": [
        Refused(lambda: transformers.T5Config(vocab_size=256, d_model=64, num_layers=1, num_heads=2),
                r"encoder-decoder", optimize=False)],
}


@pytest.mark.parametrize("row,case", [(row, case) for row, cases in REFUSED.items() for case in cases],
                         ids=[f"{row}-{i}" for row, cases in REFUSED.items() for i in range(len(cases))])
def test_refused_feature_raises_naming_it(row, case):
    config = case.make()
    opts = dict(EXACT, **case.options)
    if case.cache:
        with pytest.raises(ValueError, match=case.match):
            nqcompile.NexusCache(config, "balanced", max_cache_len=case.max_cache_len, **opts)
    if case.optimize:
        model = _model(config, "eager")
        with pytest.raises(ValueError, match=case.match):
            nqcompile.optimize(model, "balanced", **opts)


def _attend_with(**kwargs):
    """One call of the nexusquant attention on layer 0 of an optimized tiny Llama, with extra ``kwargs``."""
    model = nqcompile.optimize(_model(transformers.LlamaConfig(**SMALL)), "balanced", **EXACT)
    cache = nqcompile.NexusCache(model.config, "balanced", max_cache_len=PREFILL, **EXACT)
    q, kv = torch.randn(1, 4, 8, 32), torch.randn(1, 2, 8, 32)
    nexus_attention_forward(model.model.layers[0].self_attn, q, kv, kv, None, **{CACHE_KWARG: cache}, **kwargs)


def _sinks_on_a_dynamic_cache():
    """gpt-oss-like sink logits reach the attention while the model runs with a plain DynamicCache: transformers'
    SDPA function, which the nexusquant attention uses for such layers, would drop them."""
    model = nqcompile.optimize(_model(transformers.LlamaConfig(**SMALL)), "balanced", **EXACT)
    q, kv = torch.randn(1, 4, 8, 32), torch.randn(1, 2, 8, 32)
    nexus_attention_forward(model.model.layers[0].self_attn, q, kv, kv, None, s_aux=torch.zeros(4),
                            **{CACHE_KWARG: None})


def _non_causal_mask():
    """A prefill whose 4D mask lets every token see every other (a bidirectional block, as image tokens get)."""
    model = nqcompile.optimize(_model(transformers.LlamaConfig(**SMALL)), "balanced", **EXACT)
    cache = nqcompile.NexusCache(model.config, "balanced", max_cache_len=PREFILL, **EXACT)
    mask = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    with torch.no_grad():
        model(torch.ones(1, 8, dtype=torch.long), attention_mask=mask, past_key_values=cache)


def _window_unknown_to_the_cache():
    """A Mistral with a 16-token window, and a cache built from a config without one."""
    model = nqcompile.optimize(_model(transformers.MistralConfig(**SMALL, head_dim=32, sliding_window=WINDOW)),
                               "balanced", **EXACT)
    config = transformers.MistralConfig(**SMALL, head_dim=32, sliding_window=None)
    with torch.no_grad():
        model(torch.ones(1, 8, dtype=torch.long),
              past_key_values=nqcompile.NexusCache(config, "balanced", max_cache_len=PREFILL, **EXACT))


def _layers_that_drop_keyword_arguments():
    """StableLM's decoder layers call their attention without the model's keyword arguments."""
    model = nqcompile.optimize(_model(transformers.StableLmConfig(**{**SMALL, "num_key_value_heads": 4})),
                               "balanced", **EXACT)
    with torch.no_grad():
        model(torch.ones(1, 8, dtype=torch.long),
              past_key_values=nqcompile.NexusCache(model.config, "balanced", max_cache_len=PREFILL, **EXACT))


#: Refusals that only the attention call can make (the feature is not a config field), each before any output:
#: row -> [(what runs, the message's pattern)].
AT_RUN_TIME = {
    "Attention sinks": [(lambda: _attend_with(s_aux=torch.zeros(4)), r"sinks"), (_sinks_on_a_dynamic_cache, r"sinks")],
    "Logit soft-capping": [(lambda: _attend_with(softcap=50.0), r"attn_logit_softcapping")],
    "Sliding window in every layer": [(_window_unknown_to_the_cache, r"sliding_window=16")],
    "Mask that is not causal": [(_non_causal_mask, r"mask of this forward")],
    "Decoder layers that drop keyword arguments": [(_layers_that_drop_keyword_arguments,
                                                    r"do not pass keyword arguments")],
    "Attention dropout": [(lambda: _attend_with(dropout=0.1), r"inference-only")],
}


@pytest.mark.parametrize("row,run,match", [(row, *case) for row, cases in AT_RUN_TIME.items() for case in cases],
                         ids=[f"{row}-{i}" for row, cases in AT_RUN_TIME.items() for i in range(len(cases))])
def test_refused_at_the_attention_call(row, run, match):
    with pytest.raises((NotImplementedError, RuntimeError), match=match):
        run()


def test_the_audit_table_lists_every_tested_feature():
    """docs/models.md's table has one row per feature tested here (first column, bold), and no untested row."""
    text = (Path(__file__).resolve().parent.parent / "docs/models.md").read_text()
    rows = set(re.findall(r"^\| \*\*(.+?)\*\* \|", text, flags=re.M))
    assert rows == set(HONOURED) | set(REFUSED) | set(AT_RUN_TIME)
