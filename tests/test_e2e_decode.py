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
        (512, e2e.BASELINE, "eager"), (512, "quant_only", "eager"), (512, "balanced", "eager")]
    for row in rows:
        assert "error" not in row, row
        for key in ("prefill_s", "decode_ms_per_token", "allocated_mib", "bf16_mib", "ratio"):
            assert row[key] > 0, (key, row)
        assert row["peak_gib"] is None  # no CUDA allocator on the CPU
    assert rows[0]["ratio"] == 1.0 and rows[0]["allocated_mib"] == rows[0]["bf16_mib"]
    assert 2.0 < rows[1]["ratio"] < rows[2]["ratio"]  # balanced evicts on top of quant_only's codes
    assert rows[2]["layer_key_bits"] and set(rows[2]["layer_key_bits"]) <= {3, 4}
    printed = capsys.readouterr().out
    assert "| T | cache | mode | prefill s | decode ms/token |" in printed
    assert "| 512 | NexusCache `balanced` | eager |" in printed


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
