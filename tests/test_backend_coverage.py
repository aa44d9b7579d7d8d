"""The nexusquant backend over every model family nqcompile covers: an optimized model's decode step compiles
(fullgraph) to one graph with no graph break and no recompile, and gives the eager cache's greedy tokens. Llama,
Mistral, Qwen2, Qwen3 (QK-norm), Phi-3 (head_dim 96) and Gemma 3 (sliding-window layers held as rings of code blocks,
and global layers) built from configs, and the real SmolLM2 (slow)."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import nqcompile
import nqcompile.eval
from nqcompile.compile import report as nexus_report
from nqcompile.models import load_pretrained
from tiny_models import MODEL_KINDS, greedy_tokens, tiny_model

PROMPT = 100
STEPS = 32
# A 16-token window and a 32-token warm tier flush several times in 32 steps; a 32-token minimum evicts from the
# prompt. Fixed key bits: the test is about the compiled graph, not the relax trial.
SMALL = dict(recent_window=16, warm_tokens=32, min_evict_tokens=32, relax_key_kl=0, keep_line_breaks=False)


pytestmark = pytest.mark.usefixtures("no_recompiles")


def _check_compiled_decode(model, ids, graphs: int = 1):
    eager = greedy_tokens(model, ids, model.forward, STEPS)
    compiled = greedy_tokens(model, ids, torch.compile(model.forward, backend="nexusquant", fullgraph=True), STEPS)
    assert compiled == eager
    assert dict(counters["graph_break"]) == {}, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == graphs, dict(counters["stats"])
    assert all(report.prepared for report in nexus_report.last_reports())


def _tiny(kind: str):
    return nqcompile.optimize(tiny_model(kind), "balanced", **SMALL)


def _prompt():
    return torch.randint(1, 256, (1, PROMPT), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_compiled_decode_matches_eager_with_one_graph(kind):
    _check_compiled_decode(_tiny(kind), _prompt())


@pytest.mark.slow
def test_compiled_decode_on_smollm2():
    model, tokenizer = load_pretrained()
    nqcompile.optimize(model, "balanced", **SMALL)
    ids = tokenizer(nqcompile.eval.read_data_text("prompt.txt"), return_tensors="pt").input_ids[:, :PROMPT]
    _check_compiled_decode(model, ids)
