"""A decode step over a NexusCache compiles (default Inductor backend, fullgraph) with no graph break and no
recompile, and gives the eager cache's greedy tokens."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from transformers import CompileConfig

import nqcompile
import nqcompile.eval
from nqcompile.models import load_pretrained
from tiny_models import greedy_tokens, tiny_model

STEPS = 64
# A 16-token window and a 32-token warm tier flush several times in 64 steps; a 32-token minimum evicts from the
# prompt. Fixed key bits: the test is about shapes, not the relax trial.
SMALL = dict(recent_window=16, warm_tokens=32, min_evict_tokens=32, relax_key_kl=0, keep_line_breaks=False)


pytestmark = pytest.mark.usefixtures("no_recompiles")


def _assert_one_graph():
    assert dict(counters["graph_break"]) == {}, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


@pytest.mark.parametrize("kind, preset", [("llama", "quant_only"), ("llama", "balanced"), ("qwen2", "asym"),
                                          ("phi3", "balanced")])
def test_compiled_decode_step_matches_eager_with_one_graph(kind, preset):
    model = nqcompile.optimize(tiny_model(kind), preset, **SMALL)
    ids = torch.randint(1, 256, (1, 100), generator=torch.Generator().manual_seed(0))

    eager = greedy_tokens(model, ids, model.forward, STEPS)
    compiled = greedy_tokens(model, ids, torch.compile(model.forward, fullgraph=True), STEPS)
    assert compiled == eager
    _assert_one_graph()


def test_generate_with_compile_config_compiles_decode():
    """generate builds a NexusCache sized for the prompt and new tokens, and compiles its decode steps: a
    left-padded batch of two gives the eager tokens."""
    model = nqcompile.optimize(tiny_model("llama"), "balanced", **SMALL)
    ids = torch.randint(1, 256, (2, 100), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :20] = 0
    eager = model.generate(ids, attention_mask=mask, max_new_tokens=STEPS, do_sample=False)
    config = CompileConfig(fullgraph=True)
    config._compile_all_devices = True  # transformers compiles on GPUs only unless told otherwise
    compiled = model.generate(ids, attention_mask=mask, max_new_tokens=STEPS, do_sample=False, compile_config=config)
    assert torch.equal(compiled, eager)
    _assert_one_graph()


def test_a_cache_without_max_cache_len_is_not_compileable():
    model = tiny_model("llama")
    assert not nqcompile.NexusCache(model.config, "quant_only").is_compileable
    assert nqcompile.NexusCache(model.config, "quant_only", max_cache_len=64).is_compileable


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["quant_only", "balanced"])
def test_compiled_decode_on_smollm2(preset):
    model, tokenizer = load_pretrained()
    nqcompile.optimize(model, preset, tokenizer=tokenizer)
    text = nqcompile.eval.read_data_text("prompt.txt")
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :1024]

    eager = greedy_tokens(model, ids, model.forward, STEPS)
    compiled = greedy_tokens(model, ids, torch.compile(model.forward, fullgraph=True), STEPS)
    assert compiled == eager
    _assert_one_graph()
