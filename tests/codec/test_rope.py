"""RotarySpec against transformers' own rotary modules, plus inverse / error / config-reading properties."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from nqcompile.codec.rope import apply_rotary
from nqcompile.models.rope_spec import INTERLEAVED_MODEL_TYPES, RotarySpec

from transformers.models.llama import modeling_llama
from transformers.models.phi3 import modeling_phi3
from transformers.models.qwen2 import modeling_qwen2
from transformers.models.gemma3 import modeling_gemma3
from transformers.models.cohere import modeling_cohere
from transformers.models.glm import modeling_glm
from transformers.models.gptj import modeling_gptj

ATOL = 1e-5
B, H, N = 2, 3, 7


def _llama(head_dim: int = 64, max_position_embeddings: int = 256, rope_parameters: dict | None = None,
           **kwargs) -> transformers.LlamaConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.LlamaConfig(
            hidden_size=head_dim * 2, num_attention_heads=2, num_key_value_heads=2, head_dim=head_dim,
            num_hidden_layers=2, intermediate_size=32, vocab_size=32, max_position_embeddings=max_position_embeddings,
            rope_parameters=rope_parameters, **kwargs)


def _positions(limit: int, seed: int = 0, shape: tuple[int, ...] = (B, N)) -> torch.Tensor:
    """Random positions in [0, limit), sorted along the token axis, always containing limit - 1."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, limit, shape, generator=g)
    pos[..., -1] = limit - 1
    return pos.sort(dim=-1).values


def _keys(head_dim: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, N, head_dim, generator=g, dtype=torch.float64).to(dtype)


def _hf_rotate(modeling, rotary_cls: str, config, k: torch.Tensor, pos: torch.Tensor, **fwd) -> torch.Tensor:
    """Post-RoPE keys exactly as the model's attention layer computes them."""
    rotary = getattr(modeling, rotary_cls)(config)
    cos, sin = rotary(k, pos, **fwd)
    _, k_embed = modeling.apply_rotary_pos_emb(k, k, cos, sin)
    return k_embed


# ---------------------------------------------------------------------------------------------------------
# Agreement with transformers, per rope type
# ---------------------------------------------------------------------------------------------------------

LLAMA_CASES = {
    "default": (64, 256, {"rope_type": "default", "rope_theta": 10000.0}),
    "default_hd96": (96, 256, {"rope_type": "default", "rope_theta": 500000.0}),
    "linear": (64, 1024, {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    "dynamic": (64, 256, {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}),
    "llama3": (64, 2048, {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 256}),
    "yarn": (64, 1024, {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                        "original_max_position_embeddings": 256}),
    "yarn_mscale": (96, 1024, {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 0.707,
                               "mscale_all_dim": 1.0, "beta_fast": 16, "original_max_position_embeddings": 256}),
    "longrope": (64, 1024, {"rope_type": "longrope", "rope_theta": 10000.0,
                            "short_factor": [1.0 + 0.05 * i for i in range(32)],
                            "long_factor": [2.0 + 0.5 * i for i in range(32)],
                            "original_max_position_embeddings": 256}),
}


@pytest.mark.parametrize("case", sorted(LLAMA_CASES))
def test_llama_rope_types_match_transformers(case):
    head_dim, max_pos, params = LLAMA_CASES[case]
    config = _llama(head_dim, max_pos, dict(params))
    spec = RotarySpec.from_config(config)
    assert spec.rope_type == params["rope_type"]
    assert (spec.head_dim, spec.rotary_dim, spec.layout) == (head_dim, head_dim, "half")

    # Stay below the length at which dynamic / longrope swap frequencies; everything else goes to max_pos.
    limit = spec.max_exact_length or max_pos
    pos = _positions(limit)
    k = _keys(head_dim)
    expected = _hf_rotate(modeling_llama, "LlamaRotaryEmbedding", config, k, pos)
    got = spec.apply(k, pos)
    assert got.dtype == k.dtype and got.shape == k.shape
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)

    # The spec's frequencies / scaling are transformers' own (what the module holds after init).
    rotary = modeling_llama.LlamaRotaryEmbedding(config)
    torch.testing.assert_close(spec.inv_freq, rotary.inv_freq, atol=0, rtol=0)
    assert spec.attention_scaling == pytest.approx(rotary.attention_scaling, abs=0)
    cos, sin = spec.cos_sin(pos)
    hf_cos, hf_sin = rotary(k, pos)
    torch.testing.assert_close(cos, hf_cos, atol=0, rtol=0)
    torch.testing.assert_close(sin, hf_sin, atol=0, rtol=0)

    # remove() recovers the pre-RoPE keys from the model's post-RoPE keys.
    torch.testing.assert_close(spec.remove(expected, pos), k, atol=1e-5, rtol=0)


def test_scaled_types_have_expected_attention_scaling():
    yarn = RotarySpec.from_config(_llama(64, 1024, dict(LLAMA_CASES["yarn"][2])))
    assert yarn.attention_scaling == pytest.approx(0.1 * math.log(4.0) + 1.0)
    longrope = RotarySpec.from_config(_llama(64, 1024, dict(LLAMA_CASES["longrope"][2])))
    assert longrope.attention_scaling == pytest.approx(math.sqrt(1 + math.log(4.0) / math.log(256)))
    assert longrope.max_exact_length == 256
    dynamic = RotarySpec.from_config(_llama(64, 256, dict(LLAMA_CASES["dynamic"][2])))
    assert dynamic.max_exact_length == 256
    assert RotarySpec.from_config(_llama(64, 256)).max_exact_length is None


def test_longrope_uses_short_factor_below_threshold():
    params = dict(LLAMA_CASES["longrope"][2])
    spec = RotarySpec.from_config(_llama(64, 1024, params))
    base = 1.0 / (10000.0 ** (torch.arange(0, 64, 2).float() / 64))
    short = torch.tensor(params["short_factor"], dtype=torch.float32)
    torch.testing.assert_close(spec.inv_freq, base / short, rtol=1e-6, atol=0)


def test_proportional_rope_leaves_zero_frequency_pairs_alone():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = SimpleNamespace(hidden_size=256, num_attention_heads=2, head_dim=128, max_position_embeddings=512,
                             rope_parameters={"rope_type": "proportional", "rope_theta": 1e6,
                                              "partial_rotary_factor": 0.25})
    spec = RotarySpec.from_config(config)
    assert (spec.rotary_dim, spec.head_dim) == (128, 128)  # transformers pads with zero frequencies
    assert int((spec.inv_freq == 0).sum()) == 48
    assert "proportional" in ROPE_INIT_FUNCTIONS
    k = _keys(128)
    out = spec.apply(k, _positions(512))
    for lo, hi in ((16, 64), (80, 128)):  # the NoPE pairs of each half
        assert torch.equal(out[..., lo:hi], k[..., lo:hi])


@pytest.mark.parametrize("case", ["dynamic", "longrope"])
def test_length_dependent_types_refuse_beyond_threshold(case):
    head_dim, max_pos, params = LLAMA_CASES[case]
    config = _llama(head_dim, max_pos, dict(params))
    spec = RotarySpec.from_config(config)
    limit = spec.max_exact_length
    spec.check_length(limit)  # exactly at the threshold is still exact
    key = "max_position_embeddings" if case == "dynamic" else "original_max_position_embeddings"
    with pytest.raises(NotImplementedError, match=rf"{case} rope beyond {key}={limit}.*cannot re-rotate"):
        spec.check_length(limit + 1)
    pos = _positions(limit + 5)
    k = _keys(head_dim)
    with pytest.raises(NotImplementedError):
        spec.apply(k, pos)
    with pytest.raises(NotImplementedError):
        spec.remove(k, pos)
    with pytest.raises(NotImplementedError):
        spec.cos_sin(pos)
    # ...and transformers really does use other frequencies there, so refusing is necessary.
    hf = _hf_rotate(modeling_llama, "LlamaRotaryEmbedding", config, k, pos)
    ours = apply_rotary(k, pos, spec.inv_freq, attention_scaling=spec.attention_scaling)
    assert (hf - ours).abs().max() > 1e-3


def test_phi3_partial_rotary_matches_transformers():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.Phi3Config(hidden_size=128, num_attention_heads=2, num_key_value_heads=2,
                                         num_hidden_layers=1, intermediate_size=32, vocab_size=32,
                                         max_position_embeddings=512, partial_rotary_factor=0.5)
    spec = RotarySpec.from_config(config)
    assert (spec.head_dim, spec.rotary_dim) == (64, 32)
    pos = _positions(512)
    k = _keys(64)
    expected = _hf_rotate(modeling_phi3, "Phi3RotaryEmbedding", config, k, pos)
    got = spec.apply(k, pos)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert torch.equal(got[..., 32:], k[..., 32:])  # non-rotary tail untouched
    torch.testing.assert_close(spec.remove(expected, pos), k, atol=1e-5, rtol=0)


def test_phi3_longrope_partial_rotary_matches_transformers():
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
            "short_factor": [1.0 + 0.1 * i for i in range(24)], "long_factor": [3.0] * 24}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.Phi3Config(hidden_size=128, num_attention_heads=2, num_key_value_heads=2,
                                         num_hidden_layers=1, intermediate_size=32, vocab_size=32,
                                         max_position_embeddings=1024, original_max_position_embeddings=128,
                                         rope_parameters=rope)
    spec = RotarySpec.from_config(config)
    assert (spec.rotary_dim, spec.max_exact_length) == (48, 128)
    pos = _positions(128)
    k = _keys(64)
    expected = _hf_rotate(modeling_phi3, "Phi3RotaryEmbedding", config, k, pos)
    torch.testing.assert_close(spec.apply(k, pos), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("rope", [None, {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                         "original_max_position_embeddings": 128}])
def test_qwen2_matches_transformers(rope):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.Qwen2Config(hidden_size=192, num_attention_heads=2, num_key_value_heads=1,
                                          num_hidden_layers=2, intermediate_size=32, vocab_size=32,
                                          max_position_embeddings=512, rope_parameters=rope)
    spec = RotarySpec.from_config(config, layer_idx=1)
    assert spec.head_dim == 96
    pos = _positions(512)
    k = _keys(96)
    expected = _hf_rotate(modeling_qwen2, "Qwen2RotaryEmbedding", config, k, pos)
    torch.testing.assert_close(spec.apply(k, pos), expected, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# Interleaved layout
# ---------------------------------------------------------------------------------------------------------


def test_cohere_interleaved_matches_transformers():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.CohereConfig(hidden_size=128, num_attention_heads=2, num_key_value_heads=2,
                                           num_hidden_layers=1, intermediate_size=32, vocab_size=32,
                                           max_position_embeddings=256)
    spec = RotarySpec.from_config(config)
    assert spec.layout == "interleaved" and "cohere" in INTERLEAVED_MODEL_TYPES
    pos = _positions(256)
    k = _keys(64)
    expected = _hf_rotate(modeling_cohere, "CohereRotaryEmbedding", config, k, pos)
    torch.testing.assert_close(spec.apply(k, pos), expected, atol=ATOL, rtol=0)
    # the half layout would be wrong for this model
    half = RotarySpec.from_config(config, layout="half")
    assert (half.apply(k, pos) - expected).abs().max() > 1e-2


def test_glm_partial_interleaved_matches_transformers():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.GlmConfig(hidden_size=128, num_attention_heads=2, num_key_value_heads=2, head_dim=64,
                                        num_hidden_layers=1, intermediate_size=32, vocab_size=32,
                                        max_position_embeddings=256)
    spec = RotarySpec.from_config(config)
    assert (spec.layout, spec.rotary_dim) == ("interleaved", 32)
    pos = _positions(256)
    k = _keys(64)
    expected = _hf_rotate(modeling_glm, "GlmRotaryEmbedding", config, k, pos)
    torch.testing.assert_close(spec.apply(k, pos), expected, atol=ATOL, rtol=0)


def test_gptj_matches_transformers():
    config = transformers.GPTJConfig(n_embd=128, n_head=2, rotary_dim=16, n_layer=1, vocab_size=32, n_positions=256)
    spec = RotarySpec.from_config(config)
    assert (spec.layout, spec.rotary_dim, spec.head_dim) == ("interleaved", 16, 64)
    pos = _positions(256)
    k = _keys(64).transpose(1, 2)  # GPT-J rotates [B, n, H, D] before transposing to the cache layout
    # the table both transformers 5.17 (inside GPTJAttention) and 5.24 (GPTJRotaryEmbedding) index by position
    sincos = modeling_gptj.create_sinusoidal_positions(config.max_position_embeddings, 16)[pos]
    sin, cos = torch.split(sincos, 8, dim=-1)
    expected = torch.cat([modeling_gptj.apply_rotary_pos_emb(k[..., :16], sin, cos), k[..., 16:]], dim=-1)
    got = spec.apply(k.transpose(1, 2), pos).transpose(1, 2)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_llama4_complex_form_matches_transformers():
    from transformers.models.llama4 import modeling_llama4

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.Llama4Config(text_config=dict(
            hidden_size=128, num_attention_heads=2, num_key_value_heads=2, head_dim=64, num_hidden_layers=4,
            intermediate_size=32, intermediate_size_mlp=32, vocab_size=32, max_position_embeddings=512))
    spec = RotarySpec.from_config(config, layer_idx=0)  # composite config -> its text config
    assert (spec.layout, spec.head_dim) == ("interleaved", 64)
    text = config.get_text_config(decoder=True)
    pos = _positions(512)
    k = _keys(64).transpose(1, 2)  # Llama-4 rotates [B, n, H, D]
    freqs_cis = modeling_llama4.Llama4TextRotaryEmbedding(text)(k, pos)
    _, expected = modeling_llama4.apply_rotary_emb(k, k, freqs_cis)
    torch.testing.assert_close(spec.apply(k.transpose(1, 2), pos).transpose(1, 2), expected, atol=ATOL, rtol=0)
    nope = [i for i, use_rope in enumerate(text.no_rope_layers) if not use_rope]
    assert nope, "default Llama-4 config has NoPE layers"
    assert RotarySpec.from_config(config, layer_idx=nope[0]) == RotarySpec.identity(64, layout="interleaved")


def test_layout_defaults_to_half_and_override():
    config = _llama()
    assert RotarySpec.from_config(config).layout == "half"
    assert RotarySpec.from_config(config, layout="interleaved").layout == "interleaved"
    with pytest.raises(ValueError, match="layout"):
        RotarySpec.from_config(config, layout="zigzag")


# ---------------------------------------------------------------------------------------------------------
# Per-layer-type rope parameters
# ---------------------------------------------------------------------------------------------------------


def test_gemma3_per_layer_type_theta():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.Gemma3TextConfig(hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                                               head_dim=64, num_hidden_layers=6, intermediate_size=32, vocab_size=32,
                                               max_position_embeddings=512, sliding_window_pattern=3)
    thetas = {lt: config.rope_parameters[lt]["rope_theta"] for lt in config.rope_parameters}
    assert len(set(thetas.values())) == 2
    rotary = modeling_gemma3.Gemma3RotaryEmbedding(config)
    pos = _positions(512)
    k = _keys(64)
    for layer_idx, layer_type in enumerate(config.layer_types):
        spec = RotarySpec.from_config(config, layer_idx=layer_idx)
        assert spec.rope_theta == thetas[layer_type]
        cos, sin = rotary(k, pos, layer_type=layer_type)
        _, expected = modeling_gemma3.apply_rotary_pos_emb(k, k, cos, sin)
        torch.testing.assert_close(spec.apply(k, pos), expected, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="layer_idx"):
        RotarySpec.from_config(config)


def test_hand_built_per_layer_type_config():
    config = SimpleNamespace(
        model_type="toy", hidden_size=64, num_attention_heads=2, head_dim=32, max_position_embeddings=1024,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "nope"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                         "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
                         "nope": None})
    s0, s1, s2 = (RotarySpec.from_config(config, layer_idx=i) for i in range(3))
    assert s0 == s2 and s0 != s1 and hash(s0) == hash(s2)
    assert (s0.rope_theta, s0.rope_type) == (10_000.0, "default")
    assert (s1.rope_theta, s1.rope_type) == (1e6, "linear")
    torch.testing.assert_close(s1.inv_freq, 1.0 / (1e6 ** (torch.arange(0, 32, 2).float() / 32)) / 8.0)
    assert RotarySpec.from_config(config, layer_idx=3).rope_type == "none"  # rope_parameters None: NoPE
    with pytest.raises(ValueError, match="out of range"):
        RotarySpec.from_config(config, layer_idx=4)


def test_heterogeneous_per_layer_config():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = transformers.LlamaConfig(hidden_size=128, num_attention_heads=2, num_key_value_heads=2,
                                              head_dim=64, num_hidden_layers=3, per_layer_config={1: {"head_dim": 32}})
    except (TypeError, ValueError) as exc:  # pragma: no cover - depends on the transformers version
        pytest.skip(f"per_layer_config unsupported here: {exc}")
    assert [RotarySpec.from_config(config, layer_idx=i).head_dim for i in range(3)] == [64, 32, 64]
    with pytest.raises(ValueError, match="pass layer_idx"):
        RotarySpec.from_config(config)


def test_layers_without_rope_get_the_identity():
    """NoPE layers (SmolLM3's no_rope_layers; Cohere 2's full-attention layers, by code) rotate nothing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.SmolLM3Config(hidden_size=128, num_attention_heads=2, num_key_value_heads=2,
                                            num_hidden_layers=4, intermediate_size=32, vocab_size=32,
                                            no_rope_layers=[1, 1, 1, 0])
        cohere2 = transformers.Cohere2Config(hidden_size=128, num_attention_heads=2, num_key_value_heads=2,
                                             num_hidden_layers=4, intermediate_size=32, vocab_size=32,
                                             layer_types=["sliding_attention", "full_attention"] * 2)
    assert RotarySpec.from_config(config, layer_idx=0).rope_type == "default"
    nope = RotarySpec.from_config(config, layer_idx=3)
    assert nope == RotarySpec.identity(64) and nope.rope_type == "none"
    keys = _keys(64)
    assert torch.equal(nope.apply(keys, _positions(keys.shape[2])), keys)
    assert torch.equal(nope.remove(keys, _positions(keys.shape[2])), keys)
    assert [RotarySpec.from_config(cohere2, layer_idx=i).rope_type for i in range(4)] == ["default", "none"] * 2
    assert RotarySpec.from_config(cohere2, layer_idx=1).layout == "interleaved"


# ---------------------------------------------------------------------------------------------------------
# Old-style `rope_theta` / `rope_scaling` attributes
# ---------------------------------------------------------------------------------------------------------


def test_legacy_attributes_namespace_config():
    # transformers-4 style config (as in old config.json files / remote code): no rope_parameters.
    legacy = SimpleNamespace(model_type="llama", hidden_size=128, num_attention_heads=2, head_dim=64,
                             max_position_embeddings=2048, rope_theta=500000.0,
                             rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 256})
    spec = RotarySpec.from_config(legacy)
    # transformers 5 normalizes the same kwargs into rope_parameters at construction
    config = _llama(64, 2048, rope_theta=500000.0, rope_scaling=dict(legacy.rope_scaling))
    assert config.rope_parameters["rope_type"] == "llama3" and config.rope_parameters["rope_theta"] == 500000.0
    assert spec == RotarySpec.from_config(config)
    pos = _positions(2048)
    k = _keys(64)
    expected = _hf_rotate(modeling_llama, "LlamaRotaryEmbedding", config, k, pos)
    torch.testing.assert_close(spec.apply(k, pos), expected, atol=ATOL, rtol=0)


def test_legacy_theta_only_and_partial():
    legacy = SimpleNamespace(hidden_size=256, num_attention_heads=4, max_position_embeddings=512, rope_theta=1e4,
                             rope_scaling=None, partial_rotary_factor=0.25)
    spec = RotarySpec.from_config(legacy)
    assert (spec.rope_type, spec.head_dim, spec.rotary_dim, spec.rope_theta) == ("default", 64, 16, 1e4)
    neox4 = SimpleNamespace(hidden_size=256, num_attention_heads=4, max_position_embeddings=512,
                            rotary_emb_base=1e4, rotary_pct=0.25)  # GPT-NeoX transformers-4 names
    assert RotarySpec.from_config(neox4) == spec


def test_setting_rope_theta_after_construction_is_ignored_like_transformers():
    config = _llama(64, 256)
    config.rope_theta = 123.0  # transformers 5 reads rope_parameters["rope_theta"] (10000) and ignores this
    spec = RotarySpec.from_config(config)
    rotary = modeling_llama.LlamaRotaryEmbedding(config)
    assert spec.rope_theta == 10000.0
    torch.testing.assert_close(spec.inv_freq, rotary.inv_freq, atol=0, rtol=0)


def test_from_config_does_not_mutate_config():
    config = _llama(64, 1024, dict(LLAMA_CASES["yarn"][2]))
    before = {k: (dict(v) if isinstance(v, dict) else v) for k, v in config.rope_parameters.items()}
    RotarySpec.from_config(config)
    assert config.rope_parameters == before


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------


def _quiet(factory, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return factory(**kwargs)


@pytest.mark.parametrize("make, match", [
    (lambda: _quiet(transformers.BloomConfig), "no rotary position embedding settings"),
    (lambda: _quiet(transformers.MptConfig), "ALiBi"),
    (lambda: _quiet(transformers.FalconConfig, alibi=True), "ALiBi"),
    (lambda: _quiet(transformers.GPT2Config), "no rotary position embedding settings"),
    (lambda: SimpleNamespace(model_type="bert", position_embedding_type="absolute", hidden_size=64,
                             num_attention_heads=2, rope_theta=1e4), "position_embedding_type='absolute'"),
    (lambda: _quiet(transformers.T5Config), "encoder-decoder"),
    (lambda: _quiet(transformers.BartConfig), "encoder-decoder"),
    (lambda: _quiet(transformers.DeepseekV3Config), "multi-head latent attention"),
    (lambda: SimpleNamespace(hidden_size=64, num_attention_heads=1, max_position_embeddings=64,
                             rope_parameters={"rope_type": "warp_drive", "rope_theta": 1e4}),
     "unknown rope type 'warp_drive'"),
    (lambda: SimpleNamespace(hidden_size=63, num_attention_heads=1, max_position_embeddings=64, rope_theta=1e4),
     "rotary part of the head is odd"),
    (lambda: SimpleNamespace(hidden_size=100, num_attention_heads=2, max_position_embeddings=64, rope_theta=1e4,
                             partial_rotary_factor=0.5), "rotary part of the head is odd"),
    (lambda: SimpleNamespace(hidden_size=64, num_attention_heads=1, max_position_embeddings=64,
                             rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [8, 12, 12]}),
     "mrope_section"),
    (lambda: _quiet(transformers.Qwen2VLConfig, text_config={"rope_scaling": {"type": "mrope",
                                                                              "mrope_section": [16, 24, 24]}}),
     "mrope_section"),
])
def test_from_config_errors(make, match):
    with pytest.raises(ValueError, match=match):
        RotarySpec.from_config(make())


def test_input_errors():
    spec = RotarySpec.from_config(_llama(64, 256))
    k = _keys(64)
    with pytest.raises(ValueError, match="head_dim=64"):
        spec.apply(k[..., :32], _positions(256))
    with pytest.raises(TypeError, match="integer"):
        spec.apply(k, _positions(256).float())
    with pytest.raises(ValueError, match="n=7"):
        spec.apply(k, torch.arange(5))
    with pytest.raises(ValueError, match="rotary_dim"):
        RotarySpec(inv_freq=torch.ones(4), attention_scaling=1.0, rotary_dim=8, head_dim=6)
    with pytest.raises(ValueError, match="inv_freq"):
        RotarySpec(inv_freq=torch.ones(3), attention_scaling=1.0, rotary_dim=8, head_dim=8)


# ---------------------------------------------------------------------------------------------------------
# Shapes, dtypes, broadcasting, inverse
# ---------------------------------------------------------------------------------------------------------


def test_position_broadcasting_and_dtypes():
    spec = RotarySpec.from_config(_llama(64, 1024, dict(LLAMA_CASES["yarn"][2])))
    k = _keys(64)
    pos_bn = _positions(1024)
    pos_bhn = pos_bn[:, None, :].expand(B, H, N)
    ref = spec.apply(k, pos_bhn)
    torch.testing.assert_close(spec.apply(k, pos_bn), ref, atol=0, rtol=0)
    torch.testing.assert_close(spec.apply(k[:1], pos_bn[0]), ref[:1], atol=0, rtol=0)
    k16 = k.to(torch.bfloat16)
    out16 = spec.apply(k16, pos_bn)
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), spec.apply(k16.float(), pos_bn).to(torch.bfloat16).float(), atol=0, rtol=0)
    assert spec.apply(k.double(), pos_bn).dtype == torch.float64
    cos, sin = spec.cos_sin(pos_bn)
    assert cos.shape == (B, N, 64) and cos.dtype == torch.float32
    assert spec.cos_sin(pos_bn, dtype=torch.float64)[0].dtype == torch.float64


def test_matches_functional_apply_rotary():
    spec = RotarySpec.from_config(_llama(64, 1024, dict(LLAMA_CASES["longrope"][2])))
    k = _keys(64)
    pos = _positions(256)
    kw = dict(attention_scaling=spec.attention_scaling, rotary_dim=spec.rotary_dim, layout=spec.layout)
    torch.testing.assert_close(spec.apply(k, pos), apply_rotary(k, pos, spec.inv_freq, **kw), atol=0, rtol=0)
    torch.testing.assert_close(spec.remove(k, pos), apply_rotary(k, pos, spec.inv_freq, inverse=True, **kw),
                               atol=0, rtol=0)


@settings(max_examples=60, deadline=None)
@given(
    half_pairs=st.integers(1, 48),
    extra_tail=st.integers(0, 9),
    layout=st.sampled_from(["half", "interleaved"]),
    theta=st.floats(100.0, 1e7),
    scaling=st.floats(0.5, 2.0),
    n=st.integers(1, 6),
    max_pos=st.integers(1, 2_000_000),
    seed=st.integers(0, 2**31 - 1),
)
def test_remove_inverts_apply_float64(half_pairs, extra_tail, layout, theta, scaling, n, max_pos, seed):
    rotary_dim = 2 * half_pairs
    head_dim = rotary_dim + extra_tail
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    spec = RotarySpec(inv_freq=inv_freq, attention_scaling=scaling, rotary_dim=rotary_dim, head_dim=head_dim,
                      layout=layout)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 2, n, head_dim, generator=g, dtype=torch.float64)
    pos = torch.randint(0, max_pos, (2, n), generator=g)
    y = spec.apply(x, pos)
    assert y.dtype == torch.float64 and y.shape == x.shape
    torch.testing.assert_close(spec.remove(y, pos), x, atol=1e-10, rtol=0)
    torch.testing.assert_close(spec.apply(spec.remove(x, pos), pos), x, atol=1e-10, rtol=0)
    assert torch.equal(y[..., rotary_dim:], x[..., rotary_dim:])
    # RoPE is a scaled rotation: per-pair norms scale by attention_scaling
    torch.testing.assert_close(y[..., :rotary_dim].norm(dim=-1), scaling * x[..., :rotary_dim].norm(dim=-1),
                               atol=1e-9, rtol=1e-9)
