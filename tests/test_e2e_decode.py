"""The end-to-end decode benchmark (benchmarks/e2e_decode.py) in its CPU smoke configuration, in-process."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "e2e_decode.py"


@pytest.fixture(scope="module")
def e2e():
    spec = importlib.util.spec_from_file_location("e2e_decode", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(e2e, tmp_path, *flags: str) -> list[dict]:
    out = tmp_path / "e2e.json"
    assert e2e.main(["--smoke", "--out", str(out), *flags]) == 0
    data = json.loads(out.read_text())
    assert data["meta"]["command"].startswith("python benchmarks/e2e_decode.py --smoke")
    return data["rows"]


def test_smoke_eager_rows(e2e, tmp_path, capsys):
    rows = _run(e2e, tmp_path, "--modes", "eager", "--presets", "quant_only,balanced")
    assert [(r["T"], r["cache"], r["mode"]) for r in rows] == [
        (512, "quant_only", "eager"), (512, "balanced", "eager"), (512, e2e.BASELINE, "eager"),
        (512, e2e.STATIC, "compiled")]
    for row in rows:
        assert "error" not in row, row
        for key in ("prefill_s", "decode_ms_per_token", "allocated_mib", "bf16_mib", "ratio"):
            assert row[key] > 0, (key, row)
        assert row["peak_gib"] is None and row["seqs_128k"] is None  # no CUDA allocator on the CPU
    for baseline in rows[2:]:
        assert baseline["ratio"] == 1.0 and baseline["allocated_mib"] == baseline["bf16_mib"]
    # The StaticCache holds its whole capacity (the prompt and every decode call) in the model's bf16, 2 layers x
    # 2 (keys, values) x KV heads x head_dim x 2 bytes per token.
    config = e2e.build_model(e2e.parse_args(["--smoke"])).config
    per_token = 2 * 2 * config.num_key_value_heads * config.head_dim * 2
    assert rows[3]["capacity_tokens"] == 512 + 1 + 2 + 4
    assert rows[3]["allocated_mib"] * 2**20 == per_token * rows[3]["capacity_tokens"]
    assert 2.0 < rows[0]["ratio"] < rows[1]["ratio"]  # balanced evicts on top of quant_only's codes
    assert rows[1]["layer_key_bits"] and set(rows[1]["layer_key_bits"]) <= {3, 4}
    printed = capsys.readouterr().out
    assert "| T | cache | mode | prefill s | decode ms/token |" in printed
    assert "| 512 | NexusCache `balanced` | eager |" in printed


def test_sequences_that_fit_count_the_weights_the_workspace_and_the_cache_per_token(e2e, monkeypatch):
    """seqs_128k = (card - weights - workspace) // (131,072 x bytes per token), the workspace being the peak less
    the weights and the cache; recomputed here by hand for a made-up card and row."""
    model = torch.nn.Linear(1000, 1000, bias=False).to(torch.bfloat16)  # 2,000,000 bytes of weights
    card = 100 * 2**30
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("P", (), {"total_memory": card}))
    row = {"T": 4096, "allocated_mib": 64.0, "peak_gib": 3.0}  # 16 KiB per token
    workspace = 3 * 2**30 - 2_000_000 - 64 * 2**20
    expected = (card - 2_000_000 - workspace) // (16 * 1024 * 131072)
    assert e2e.seqs_128k(row, model, torch.device("cuda")) == expected == 48
    static = dict(row, capacity_tokens=8192)  # a StaticCache: its bytes over its capacity, 8 KiB per token
    assert e2e.seqs_128k(static, model, torch.device("cuda")) == 2 * expected + 1
    assert e2e.seqs_128k(row, model, torch.device("cpu")) is None
    assert e2e.seqs_128k({"T": 4096, "error": "x"}, model, torch.device("cuda")) is None


def test_failed_row_is_reported_and_the_run_goes_on(e2e, tmp_path, monkeypatch):
    def broken_compile(*args, **kwargs):
        raise RuntimeError("compile failed here\nsecond line")

    monkeypatch.setattr(torch, "compile", broken_compile)
    rows = _run(e2e, tmp_path, "--no-baseline", "--presets", "quant_only", "--modes", "compiled,eager",
                "--lengths", "256,512")
    assert [(r["T"], r["mode"]) for r in rows] == [(256, "eager"), (256, "compiled"), (512, "eager"),
                                                   (512, "compiled")]
    for eager, compiled in (rows[0:2], rows[2:4]):
        assert "error" not in eager and eager["decode_ms_per_token"] > 0
        assert compiled["error"] == "RuntimeError: compile failed here"
        assert "broken_compile" in compiled["traceback"]
        assert compiled["prefill_s"] == eager["prefill_s"]  # one prefill for both modes


def test_plot_draws_one_line_per_cache_and_mode_over_the_files(tmp_path, capsys):
    """benchmarks/plot_decode.py joins the rows of several runs into one line per cache and mode, sorted by
    context length, leaves failed rows out, and writes a PNG."""
    spec = importlib.util.spec_from_file_location("plot_decode", _SCRIPT.parent / "plot_decode.py")
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    meta = {"device": "card", "torch": "2.x", "transformers": "5.x", "args": {"layers": 32}}
    runs = {131072: [("bf16 DynamicCache", "eager", None, 80.0), ("quant_only", "compiled", "nexusquant", 12.0)],
            32768: [("bf16 DynamicCache", "eager", None, 50.0), ("quant_only", "compiled", "nexusquant", None)]}
    files = []
    for T, rows in runs.items():
        path = tmp_path / f"e2e_{T}.json"
        path.write_text(json.dumps({"meta": meta, "rows": [
            dict({"T": T, "cache": cache, "mode": mode, "decode_ms_per_token": ms},
                 **({"backend": backend, "compile_mode": "reduce-overhead"} if backend else {}),
                 **({} if ms else {"error": "RuntimeError: failed"}))
            for cache, mode, backend, ms in rows]}))
        files.append(str(path))
    out = tmp_path / "plot.png"
    assert plot.main([*files, "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines, _ = plot.series([Path(f) for f in files])
    assert lines == {"bf16 DynamicCache (eager)": [(32768, 50.0), (131072, 80.0)],
                     "quant_only (compiled, nexusquant, reduce-overhead)": [(131072, 12.0)]}
    assert "left out quant_only compiled at T=32768: RuntimeError: failed" in capsys.readouterr().err
    (tmp_path / "other.json").write_text("[]")
    with pytest.raises(ValueError, match="not an e2e_decode.py result"):
        plot.series([tmp_path / "other.json"])
