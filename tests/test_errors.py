"""Bad input gets a clear error; dtypes are preserved."""

import pytest
import torch
import transformers

import nqcompile
from tiny_models import byte_level_tokenizer, tiny_model


def test_encoder_decoder_is_rejected():
    with pytest.raises(ValueError, match="encoder-decoder"):
        nqcompile.NexusCache(transformers.T5Config(), "balanced")


def test_model_without_rotary_attention_is_rejected():
    with pytest.raises(ValueError, match="(?i)rotary|rope"):
        nqcompile.NexusCache(transformers.GPT2Config(n_layer=2), "balanced")


def test_head_dim_not_multiple_of_8_is_rejected():
    config = transformers.LlamaConfig(hidden_size=40, num_attention_heads=2, head_dim=20, num_hidden_layers=2)
    with pytest.raises(ValueError, match="head_dim=20"):
        nqcompile.NexusCache(config, "balanced")
    nqcompile.NexusCache(config, "balanced", key_bits=None, value_bits=None, relax_key_kl=0)  # exact: no such limit


def test_unknown_preset_and_bits():
    with pytest.raises(ValueError, match="unknown preset 'fast'"):
        nqcompile.get_preset("fast")
    with pytest.raises(ValueError, match="key_bits=5"):
        nqcompile.get_preset("balanced", key_bits=5)
    with pytest.raises(TypeError, match="unknown preset field"):
        nqcompile.get_preset("balanced", keybits=3)
    with pytest.raises(ValueError, match="one bit below key_bits=2"):
        nqcompile.get_preset("max", relax_key_kl=0.01)
    with pytest.raises(ValueError, match="trial_queries=0 must be >= 1"):
        nqcompile.get_preset("quant_only", trial_queries=0)
    with pytest.raises(ValueError, match="layer_budget='pyramid' cannot apply"):
        nqcompile.get_preset("balanced", scorer="reconstruction", layer_budget="pyramid")
    with pytest.raises(ValueError, match="warm_bits=3 is below key_bits=4"):
        nqcompile.get_preset("quant_only", warm_tokens=64, warm_bits=3)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"keep_mass=.* must be in \[0, 1\]"):
            nqcompile.get_preset("balanced", keep_mass=bad)
    with pytest.raises(ValueError, match="keep_mass=0.9 needs scores that are attention probabilities"):
        nqcompile.get_preset("asym", eviction_ratio=0.5, scorer="key_diff", keep_mass=0.9)
    assert nqcompile.get_preset("balanced", keep_mass=1.0).keep_mass == 1.0


def test_cache_past_its_capacity():
    model = nqcompile.optimize(tiny_model("llama"), "balanced", tokenizer=byte_level_tokenizer())
    cache = nqcompile.NexusCache(model.config, "balanced", max_cache_len=40)
    with torch.no_grad(), pytest.raises(ValueError, match="max_cache_len=40"):
        model(torch.ones(1, 41, dtype=torch.long), past_key_values=cache)
    cache = nqcompile.NexusCache(model.config, "balanced", max_cache_len=41)
    with torch.no_grad():
        model(torch.ones(1, 40, dtype=torch.long), past_key_values=cache)
        model(torch.ones(1, 1, dtype=torch.long), past_key_values=cache)  # the last slot
        with pytest.raises(ValueError, match="max_cache_len=41"):  # a decode step past it, with a 2D mask
            model(torch.ones(1, 1, dtype=torch.long), attention_mask=torch.ones(1, 42, dtype=torch.long),
                  past_key_values=cache)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_generate_keeps_the_model_dtype(dtype):
    model = nqcompile.optimize(tiny_model("llama", dtype=dtype), "balanced", sink_tokens=4, recent_window=16,
                               tokenizer=byte_level_tokenizer())
    ids = torch.randint(1, 256, (1, 80), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, max_new_tokens=20, do_sample=False, return_dict_in_generate=True)
    assert model.dtype == dtype and all(p.dtype == dtype for p in model.parameters())
    assert out.sequences.shape == (1, 100)
    cache = out.past_key_values
    assert isinstance(cache, nqcompile.NexusCache)
    window = torch.bfloat16 if dtype == torch.float32 else dtype  # window_dtype="16bit": a float32 model's in bf16
    assert cache.layers[0].storage.win_k.dtype == window and cache.layers[0].storage.k_codes.dtype == torch.uint8


def test_reconstruction_needs_token_ids():
    model = nqcompile.optimize(tiny_model("llama"), "balanced", scorer="reconstruction", min_evict_tokens=0,
                               recent_window=16, tokenizer=byte_level_tokenizer())
    cache = nqcompile.NexusCache(model.config, model.nqcompile_preset)
    embeds = model.get_input_embeddings()(torch.randint(1, 256, (1, 60)))
    with torch.no_grad(), pytest.raises(ValueError, match="pass input_ids, not inputs_embeds"):
        model(inputs_embeds=embeds, past_key_values=cache)


def test_reconstruction_past_the_length_where_longrope_changes_frequencies():
    config = transformers.Phi3Config(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=1024, original_max_position_embeddings=256, pad_token_id=0,
        rope_scaling={"type": "longrope", "short_factor": [1.0] * 32, "long_factor": [4.0] * 32})
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    nqcompile.optimize(model, "balanced", min_evict_tokens=0, recent_window=16, relax_key_kl=0,
                       tokenizer=byte_level_tokenizer())
    cache = nqcompile.NexusCache(model.config, model.nqcompile_preset)
    with torch.no_grad(), pytest.raises(NotImplementedError, match="longrope rope beyond"):
        model(torch.randint(1, 256, (1, 200)), past_key_values=cache)  # re-read at positions 200-399
    with torch.no_grad():
        model(torch.randint(1, 256, (1, 120)), past_key_values=nqcompile.NexusCache(model.config,
                                                                                   model.nqcompile_preset))


def test_nexusquant_attention_without_optimize_refuses_instead_of_leaving_the_cache_unread():
    """Setting the attention implementation by hand skips optimize's forward, which hands the cache to the
    attention: the call fails with a message naming optimize instead of attending over the new tokens alone."""
    from nqcompile.attention import register_attention

    model = tiny_model("llama")
    model.set_attn_implementation(register_attention())
    cache = nqcompile.NexusCache(model.config, "quant_only", max_cache_len=64)
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"nqcompile.optimize\(model, preset\)"):
        model(torch.ones(1, 8, dtype=torch.long), past_key_values=cache)


def test_generate_refuses_a_batch_encoding_with_what_to_pass():
    """apply_chat_template(..., return_tensors="pt") returns a BatchEncoding in transformers 5.2x."""
    model = nqcompile.optimize(tiny_model("llama"), "quant_only")
    encoding = transformers.BatchEncoding({"input_ids": torch.ones(1, 8, dtype=torch.long)})
    with pytest.raises(TypeError, match=r"got BatchEncoding; .* pass encoding\['input_ids'\]"):
        model.generate(encoding, max_new_tokens=2)


def test_a_forward_with_gradients_enabled_names_no_grad():
    """The compressed cache is inference-only: with autograd on, the error says to use torch.no_grad() (it used to
    fail deep in the E8 encoder with an out= error)."""
    model = nqcompile.optimize(tiny_model("llama"), "quant_only")
    ids = torch.randint(1, 256, (1, 300), generator=torch.Generator().manual_seed(0))
    cache = nqcompile.NexusCache(model.config, model.nqcompile_preset, max_cache_len=400)
    with pytest.raises(RuntimeError, match=r"torch\.no_grad\(\)"):
        model(ids, past_key_values=cache)
    with torch.no_grad():
        assert model(ids, past_key_values=nqcompile.NexusCache(model.config, model.nqcompile_preset,
                                                               max_cache_len=400)).logits.shape == (1, 300, 256)
