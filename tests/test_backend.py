"""The nexusquant torch.compile backend: registered by entry point, reports the sites of each graph, compiles
prepared models to the eager cache's tokens and unprepared ones unchanged (with a warning)."""

import subprocess
import sys

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from transformers import CompileConfig

import nqcompile
import nqcompile.eval
from nqcompile.models import load_pretrained
from nqcompile.compile import report as nexus_report
from tiny_models import byte_level_tokenizer, greedy_tokens, tiny_model

STEPS = 16


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def test_backend_is_found_in_a_fresh_interpreter_that_never_imported_nqcompile():
    code = ("import sys, torch, torch._dynamo as d; print('nexusquant' in d.list_backends()); "
            "print('nqcompile' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False"]


@pytest.mark.parametrize("mode", [None, "max-autotune-no-cudagraphs"])
def test_prepared_model_decodes_like_eager_and_every_attention_site_is_reported(mode):
    model = nqcompile.optimize(tiny_model("llama"), "quant_only", recent_window=16, warm_tokens=32, relax_key_kl=0)
    ids = torch.randint(1, 256, (1, 80), generator=torch.Generator().manual_seed(0))

    eager = greedy_tokens(model, ids, model.forward, STEPS)
    compiled = greedy_tokens(model, ids, torch.compile(model.forward, backend="nexusquant", mode=mode,
                                                       fullgraph=True), STEPS)
    assert compiled == eager
    reports = nexus_report.last_reports()
    assert len(reports) == 1 and reports[0].prepared and reports[0].mode == mode
    layers = model.config.num_hidden_layers
    assert reports[0].counts == {"dequant_attention": layers, "cache_write": 2 * layers}  # warm tier + codes


def test_unprepared_model_compiles_unchanged_with_one_warning_naming_optimize():
    model = tiny_model("llama")
    ids = torch.randint(1, 256, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
        compiled = torch.compile(model, backend="nexusquant")
        with pytest.warns(UserWarning, match=r"nqcompile.optimize\(model, preset\)"):
            got = compiled(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    reports = nexus_report.last_reports()
    assert not reports[0].prepared and reports[0].counts["sdpa"] == model.config.num_hidden_layers


def _decode_tokens(model, ids, call, steps: int, prefill=None):
    """Prefill ``ids`` through ``prefill`` (default ``call``; a module, so that ``optimize``'s hook re-reads the prompt
    when the preset asks for it, line breaks kept), then ``steps`` greedy steps through ``call``. The first step
    compiles; the later ones run with Dynamo's ``error_on_recompile``. Returns the tokens and the graph breaks and
    graphs the later steps added."""
    cache = nqcompile.NexusCache(model.config, model.nqcompile_preset, max_cache_len=ids.shape[1] + steps + 1)
    with torch.no_grad():
        token = (prefill or call)(ids, past_key_values=cache).logits[:, -1:].argmax(-1)
        token = call(token, past_key_values=cache).logits[:, -1:].argmax(-1)
        tokens = [int(token)]
        breaks, graphs = sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(steps - 1):
                token = call(token, past_key_values=cache).logits[:, -1:].argmax(-1)
                tokens.append(int(token))
    return tokens, sum(counters["graph_break"].values()) - breaks, counters["stats"]["unique_graphs"] - graphs


@pytest.mark.parametrize("route", ["torch.compile(model)", "model.compile()"])
def test_compiling_the_whole_model_decodes_like_eager_in_one_graph(route):
    """The prefill (a plan step) runs eagerly inside the compiled model; the 64 decode steps run one fused graph with
    no break and no recompile."""
    model = nqcompile.optimize(tiny_model("llama"), "balanced", recent_window=16, warm_tokens=32, min_evict_tokens=32,
                               relax_key_kl=0, tokenizer=byte_level_tokenizer())
    ids = torch.randint(1, 256, (1, 90), generator=torch.Generator().manual_seed(5))
    eager, _, _ = _decode_tokens(model, ids, model, 64)
    if route == "model.compile()":
        model.compile(backend="nexusquant")
        call = model
    else:
        call = torch.compile(model, backend="nexusquant")
    compiled, breaks, graphs = _decode_tokens(model, ids, call, 64)
    assert compiled == eager and breaks == 0 and graphs == 0
    decode = [r for r in nexus_report.last_reports() if r.prepared]
    layers = model.config.num_hidden_layers
    assert len(decode) == 1 and decode[0].pass_counts == {"fuse_warm_attention": layers, "fuse_flush_attention": layers}


def test_generate_with_compile_config_uses_the_backend():
    model = nqcompile.optimize(tiny_model("qwen2"), "quant_only", recent_window=16, warm_tokens=32, relax_key_kl=0)
    ids = torch.randint(1, 256, (1, 90), generator=torch.Generator().manual_seed(6))
    eager = model.generate(ids, max_new_tokens=64, do_sample=False)
    config = CompileConfig(backend="nexusquant", fullgraph=True, mode="default")
    config._compile_all_devices = True  # transformers compiles on GPUs only unless told otherwise
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = model.generate(ids, max_new_tokens=64, do_sample=False, compile_config=config)
    assert torch.equal(compiled, eager)
    assert dict(counters["graph_break"]) == {} and counters["stats"]["unique_graphs"] == 1
    (report,) = nexus_report.last_reports()
    assert report.pass_counts == {"fuse_warm_attention": 3, "fuse_flush_attention": 3}


@pytest.mark.slow
def test_smollm2_every_attention_layer_is_rewritten_and_decodes_like_eager():
    model, tokenizer = load_pretrained()
    nqcompile.optimize(model, "balanced", tokenizer=tokenizer)
    ids = tokenizer(nqcompile.eval.read_data_text("prompt.txt"), return_tensors="pt").input_ids[:, :1024]
    eager, _, _ = _decode_tokens(model, ids, model.forward, 64, prefill=model)
    step = torch.compile(model.forward, backend="nexusquant", fullgraph=True)  # decode only: prefill is eager
    compiled, breaks, graphs = _decode_tokens(model, ids, step, 64, prefill=model)
    assert compiled == eager and breaks == 0 and graphs == 0
    (report,) = nexus_report.last_reports()
    # balanced's warm tier and window flush fuse with every layer's attention into one node.
    assert report.pass_counts == {"fuse_warm_attention": 30, "fuse_flush_attention": 30}
    assert report.code_after.count("nqcompile.cache_attention.default(") == 30
    assert "nqcompile.dequant_attention.default(" not in report.code_after
