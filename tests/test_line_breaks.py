"""Line breaks kept through eviction (``Preset.keep_line_breaks``, :mod:`nqcompile.policy.line_breaks`)."""

from __future__ import annotations

import pytest
import torch

import nqcompile
from nqcompile.policy.line_breaks import line_break_ids
from tiny_models import byte_level_tokenizer, tiny_model


def test_line_break_ids_are_the_bytes_of_a_line_break():
    """In a byte-level vocabulary the ids holding a line break are exactly those of bytes 0x0A and 0x0D."""
    tokenizer = byte_level_tokenizer()
    expected = sorted(tokenizer.convert_tokens_to_ids([chr(0x10A), chr(0x10D)]))  # GPT-2's byte-to-unicode map
    assert line_break_ids(tokenizer).tolist() == expected


@pytest.mark.slow
def test_line_break_ids_of_smollm2_match_its_byte_level_tokens():
    """SmolLM2's byte-level BPE spells a line break as 'Ċ' (\\n) or 'č' (\\r) inside a token's raw string: the
    ids found by decoding equal those found by reading the raw tokens."""
    from transformers import AutoTokenizer
    from nqcompile.models.demo import converted_dir

    tokenizer = AutoTokenizer.from_pretrained(converted_dir("smollm2"))
    raw = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    expected = [i for i, token in enumerate(raw) if "\u010a" in token or "\u010d" in token]
    assert len(expected) > 10 and line_break_ids(tokenizer).tolist() == expected


def _kept_positions(cache) -> list[set[int]]:
    """Per evicting layer, the positions its codes hold (sequence 0)."""
    return [set(layer.storage.code_pos[0, 0, :int(layer.storage.code_len[0])].tolist())
            for layer in cache.layers if hasattr(layer.storage, "code_pos")]


@pytest.mark.parametrize("keep", [False, True])
def test_every_evicting_layer_keeps_every_line_break_of_the_chunk(keep):
    """With keep_line_breaks every line break outside the sinks and window stays in every evicting layer's codes;
    without it the same prefill evicts some (so the rule is what keeps them)."""
    tokenizer = byte_level_tokenizer()
    # keep_mass=0: the budget is the 36% that eviction_ratio leaves, whatever random weights spread the scores
    opts = dict(recent_window=16, min_evict_tokens=64, relax_key_kl=0, warm_tokens=0, keep_mass=0,
                keep_line_breaks=keep)
    model = nqcompile.optimize(tiny_model("llama"), "balanced", tokenizer=tokenizer, **opts)
    text = "".join(f"line {i} of a hard-wrapped text\n" for i in range(12))
    ids = tokenizer(text, return_tensors="pt").input_ids
    cache = nqcompile.NexusCache(model.config, model.nqcompile_preset, max_cache_len=ids.shape[1] + 1)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    breaks = set(torch.nonzero(ids[0] == tokenizer.convert_tokens_to_ids(chr(0x10A))).flatten().tolist())
    middle = {p for p in breaks if 4 <= p < ids.shape[1] - 16}  # sinks (4) and window (16) are never candidates
    kept = _kept_positions(cache)
    assert kept and len(middle) >= 8
    if keep:
        assert all(middle <= layer for layer in kept)
    else:
        assert any(not middle <= layer for layer in kept)


def test_balanced_keeps_line_breaks_and_needs_the_tokenizer():
    assert nqcompile.PRESETS["balanced"].keep_line_breaks and not nqcompile.PRESETS["max"].keep_line_breaks
    with pytest.raises(ValueError, match=r"needs the tokenizer.*tokenizer=tokenizer\), or pass keep_line_breaks=False"):
        nqcompile.optimize(tiny_model("llama"), "balanced")
    nqcompile.optimize(tiny_model("llama"), "balanced", eviction_ratio=0)  # nothing evicted: no line breaks to keep
    nqcompile.optimize(tiny_model("llama"), "max")


def test_keeping_line_breaks_needs_the_tokenizer_and_a_reconstruction_scorer():
    with pytest.raises(ValueError, match=r"needs the tokenizer.*tokenizer=tokenizer"):
        nqcompile.optimize(tiny_model("llama"), "balanced", keep_line_breaks=True)
    with pytest.raises(ValueError, match=r"scorer='observation' does not compute"):
        nqcompile.get_preset("balanced", scorer="observation", keep_mass=0, keep_line_breaks=True)
    # A cache that keeps line breaks on a model prepared without a tokenizer: refused at the re-reading.
    model = nqcompile.optimize(tiny_model("llama"), "balanced", min_evict_tokens=64, keep_line_breaks=False)
    cache = nqcompile.NexusCache(model.config, "balanced", min_evict_tokens=64,
                                 max_cache_len=200)
    with pytest.raises(ValueError, match=r"keeps line breaks.*optimize\(model, preset, tokenizer=tokenizer\)"):
        with torch.no_grad():
            model(torch.randint(1, 256, (1, 128)), past_key_values=cache)
    assert cache.awaiting_reconstruction  # nothing was lost: the chunk still waits for its re-reading


def test_reconstruct_refuses_a_keep_mask_of_another_shape():
    model = nqcompile.optimize(tiny_model("llama"), "balanced", min_evict_tokens=64, tokenizer=byte_level_tokenizer())
    model._nqcompile_reconstruct_hook.remove()
    cache = nqcompile.NexusCache(model.config, "balanced", min_evict_tokens=64, max_cache_len=200)
    ids = torch.randint(1, 256, (1, 128))
    with torch.no_grad():
        model(ids, past_key_values=cache)
    with pytest.raises(ValueError, match=r"keep must mark each token of input_ids, \(1, 128\), got \(1, 127\)"):
        cache.reconstruct(model, ids, keep=torch.zeros(1, 127, dtype=torch.bool))
    cache.reconstruct(model, ids, keep=ids == 10)
    assert not cache.awaiting_reconstruction
