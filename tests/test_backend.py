"""The nexusquant torch.compile backend: registered by entry point, reports the sites of each graph, compiles
prepared models to the eager cache's tokens and unprepared ones unchanged (with a warning)."""

import subprocess
import sys

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import nqcompile
from nqcompile.compile import backend as nexus_backend
from nqcompile.compile import report as nexus_report
from tiny_models import tiny_model

STEPS = 16


@pytest.fixture(autouse=True)
def _fresh_dynamo(monkeypatch):
    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(nexus_report, "_REPORTS", [])
    monkeypatch.setattr(nexus_backend, "_WARNED", False)
    yield
    torch._dynamo.reset()


def test_backend_is_found_in_a_fresh_interpreter_that_never_imported_nqcompile():
    code = ("import sys, torch, torch._dynamo as d; print('nexusquant' in d.list_backends()); "
            "print('nqcompile' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False"]


def _greedy(model, ids, cache, step):
    with torch.no_grad():
        out = model(ids, past_key_values=cache)
        token, tokens = out.logits[:, -1:].argmax(-1), []
        for _ in range(STEPS):
            token = step(token, past_key_values=cache).logits[:, -1:].argmax(-1)
            tokens.append(int(token))
    return tokens


@pytest.mark.parametrize("mode", [None, "max-autotune-no-cudagraphs"])
def test_prepared_model_decodes_like_eager_and_every_attention_site_is_reported(mode):
    model = nqcompile.optimize(tiny_model("llama"), "quant_only", recent_window=16, warm_tokens=32, relax_key_kl=0)
    ids = torch.randint(1, 256, (1, 80), generator=torch.Generator().manual_seed(0))

    def fresh():
        return nqcompile.NexusCache(model.config, model.nqcompile_preset, max_cache_len=80 + STEPS + 1)

    eager = _greedy(model, ids, fresh(), model.forward)
    compiled = _greedy(model, ids, fresh(), torch.compile(model.forward, backend="nexusquant", mode=mode,
                                                          fullgraph=True))
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
