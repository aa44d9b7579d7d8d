"""The cost benchmark (benchmarks/genre_cost.py): token kinds, the one-layer cache, a smoke run."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import DynamicCache

import nqcompile
from nqcompile.cache.layer import NexusLayer
from nqcompile.eval import window_token_nll
from tiny_models import tiny_model

_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "genre_cost.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("genre_cost", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_token_kinds(bench):
    # tokens 0-4 "x = os.path", 5-9 " foo_bar ( Hello the", 10-14 "x = os.path" again: tokens 13 and 14 end 4-grams
    # seen at 0-3 and 1-4; token 10 joins "the" into one word ("thex")
    pieces = ["x", " =", " os", ".", "path", " foo", "_bar", " (", " Hello", " the",
              "x", " =", " os", ".", "path"]
    ids = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2, 3, 4, 5]
    kinds = bench.token_kinds(ids, pieces, 1)
    assert kinds == ["markup", "identifier", "markup", "identifier", "identifier", "identifier", "markup", "word",
                     "word", "word", "markup", "identifier", "copied", "copied"]


def test_one_layer_cache_codes_only_its_layer(bench):
    """Only the named layer is coded; with an exact preset the cache gives the DynamicCache's per-token NLL, with
    the coded layer it does not."""
    model = nqcompile.optimize(tiny_model("llama"), "quant_only")
    ids = torch.randint(1, 256, (1, 200), generator=torch.Generator().manual_seed(0))
    preset = nqcompile.PRESETS["quant_only"]
    for layer in (0, 1):
        cache = bench.one_layer_cache(model, preset, layer, 200)
        n = model.config.num_hidden_layers
        assert [x.kind for x in cache.layers] == ["e8" if i == layer else "exact" for i in range(n)]
        assert all(isinstance(x, NexusLayer) for x in cache.layers)
    exact = preset.replace(key_bits=None, value_bits=None, relax_key_kl=0.0, warm_tokens=0)
    want = window_token_nll(model, ids, 160, DynamicCache())
    got = window_token_nll(model, ids, 160, bench.one_layer_cache(model, exact, 0, 200))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    coded = window_token_nll(model, ids, 160, bench.one_layer_cache(model, preset, 0, 200))
    assert not torch.allclose(coded, want, rtol=1e-5, atol=1e-5)


def test_smoke_run(bench, tmp_path):
    out = tmp_path / "cost.json"
    argv = ["--smoke", "--per-layer", "--genres", "prose,code", "--out", str(out)]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert bench.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["meta"]["command"] == "python benchmarks/genre_cost.py " + " ".join(argv)
    assert [w["genre"] for w in data["windows"]] == ["prose", "code"]
    for w in data["windows"]:
        base = np.array(w["exact_nll"])
        entry = w["caches"]["quant_only"]
        assert len(base) == len(entry["nll"]) == len(w["kinds"]) == 64
        kl = entry["layer_key_kl"]  # the key-bit trial's KL per layer; 3-bit keys exactly where it is below 0.02
        assert len(kl) == 2 and [b == 3 for b in entry["layer_key_bits"]] == [x < 0.02 for x in kl]
        delta = np.array(entry["nll"]) - base
        table = entry["kinds"]
        assert sum(k["tokens"] for k in table.values()) == 64
        assert sum(k["share"] for k in table.values()) == pytest.approx(1.0)
        assert sum(k["delta_nll"] * k["tokens"] for k in table.values()) == pytest.approx(delta.sum(), abs=1e-5)
        assert list(w["layers"]) == ["0", "1"] and all(np.isfinite(list(w["layers"].values())))
    text = stdout.getvalue()
    assert "| prose | `quant_only` |" in text and "One layer coded by `quant_only` at a time" in text
