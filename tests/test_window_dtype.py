"""The sinks and recent window of a quantized layer (``Preset.window_dtype``): bfloat16 for a float32 model by
default, the model's dtype under ``"model"`` and in exact layers; checked against the keys of transformers'
``DynamicCache`` rounded to bfloat16, and against the bytes the preset's formula gives."""

import pytest
import torch
import transformers

import nqcompile
from tiny_models import tiny_model

OPTS = dict(sink_tokens=4, recent_window=16, warm_tokens=0, relax_key_kl=0.0)
PROMPT, STEPS = 70, 5


def _run(model, cache, ids):
    with torch.no_grad():
        model(ids[:, :PROMPT], past_key_values=cache)
        for t in range(PROMPT, PROMPT + STEPS):
            model(ids[:, t:t + 1], past_key_values=cache)
    return cache


@pytest.fixture(scope="module")
def ids():
    return torch.randint(1, 256, (2, PROMPT + STEPS), generator=torch.Generator().manual_seed(3))


def test_a_float32_models_window_holds_its_keys_and_values_rounded_to_bfloat16(ids):
    reference = _run(tiny_model("llama"), transformers.DynamicCache(), ids).layers[0]
    model = nqcompile.optimize(tiny_model("llama"), "quant_only", **OPTS)
    st = _run(model, nqcompile.NexusCache(model.config, "quant_only", **OPTS), ids).layers[0].storage
    assert st.win_k.dtype == st.sink_k.dtype == torch.bfloat16 and st.dtype == torch.float32
    # Layer 0's keys and values depend on the tokens only: the same float32 numbers in both runs, so the rounding
    # to bfloat16 must give the very same bits.
    for b in range(2):
        held = int(st.win_len[b])
        assert held > 0 and int(st.sink_len[b]) == 4
        pos = st.win_pos[b, :held]
        assert torch.equal(pos, torch.arange(PROMPT + STEPS - held, PROMPT + STEPS))
        assert torch.equal(st.win_k[b, :, :held], reference.keys[b, :, pos].to(torch.bfloat16))
        assert torch.equal(st.win_v[b, :, :held], reference.values[b, :, pos].to(torch.bfloat16))
        assert torch.equal(st.sink_k[b], reference.keys[b, :, :4].to(torch.bfloat16))
        assert torch.equal(st.sink_v[b], reference.values[b, :, :4].to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_window_dtype_saves_exactly_the_bytes_of_two_bytes_per_element(dtype, ids):
    """``"16bit"`` against ``"model"``: every quantized layer's sinks and window at 2 bytes per element instead of the
    model's itemsize (nothing else moves); the exact boundary layers keep the model's dtype."""
    reports, layers = {}, {}
    for window_dtype in ("16bit", "model"):
        opts = dict(OPTS, window_dtype=window_dtype, boundary_layers=1)
        model = nqcompile.optimize(tiny_model("llama", dtype=dtype), "quant_only", **opts)
        cache = _run(model, nqcompile.NexusCache(model.config, "quant_only", **opts), ids)
        reports[window_dtype], layers[window_dtype] = cache.memory_report(), cache.layers
    for layer in layers["model"]:
        assert layer.storage.win_k.dtype == dtype
    boundary, middle = layers["16bit"][0].storage, layers["16bit"][1].storage
    assert boundary.kind == "exact" and boundary.win_k.dtype == dtype
    assert middle.kind == "e8" and middle.win_k.dtype == (torch.bfloat16 if dtype == torch.float32 else dtype)
    saved = reports["model"].allocated_bytes - reports["16bit"].allocated_bytes
    per_layer = 2 * 1 * (4 + 16) * 2 * 64 * (dtype.itemsize - 2)  # B, KV heads, sinks + window, K and V, head_dim
    assert saved == per_layer * 1  # three layers, two of them exact boundary layers
    assert reports["16bit"].logical_tokens == reports["model"].logical_tokens == PROMPT + STEPS


def test_window_dtype_is_validated_and_reported_by_window_dtype_for():
    preset = nqcompile.get_preset("quant_only")
    assert preset.window_dtype == "16bit"
    assert preset.window_dtype_for(torch.float32) == torch.bfloat16
    assert preset.window_dtype_for(torch.float64) == torch.bfloat16
    assert preset.window_dtype_for(torch.float16) == torch.float16
    assert preset.window_dtype_for(torch.float32, (None, None)) == torch.float32  # an exact layer
    assert preset.replace(window_dtype="model").window_dtype_for(torch.float32) == torch.float32
    exact = nqcompile.get_preset("quant_only", key_bits=None, value_bits=None, relax_key_kl=0.0, warm_tokens=0)
    assert exact.window_dtype_for(torch.float32) == torch.float32
    with pytest.raises(ValueError, match="window_dtype='float8' is not one of"):
        preset.replace(window_dtype="float8")
