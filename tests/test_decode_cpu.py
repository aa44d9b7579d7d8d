"""The CPU decode benchmark (benchmarks/decode_cpu.py) in its smoke configuration (tiny random Llama), in-process."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "decode_cpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("decode_cpu", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(bench, tmp_path, *flags: str) -> list[dict]:
    out = tmp_path / "decode_cpu.json"
    threads = torch.get_num_threads()
    assert bench.main(["--smoke", "--out", str(out), *flags]) == 0
    assert torch.get_num_threads() == threads  # restored
    data = json.loads(out.read_text())
    assert data["meta"]["command"].startswith("python benchmarks/decode_cpu.py --smoke")
    assert data["meta"]["torch"] == torch.__version__ and data["meta"]["cpu"]
    return data["rows"]


def test_smoke_has_a_row_per_length_threads_cache_and_mode(bench, tmp_path, capsys):
    presets = ["quant_only", "balanced"]
    rows = _run(bench, tmp_path, "--lengths", "320,512", "--presets", ",".join(presets))
    expected = [(T, n, cache, mode) for T in (320, 512) for n in (1, 2)
                for cache in [bench.BASELINE, *presets] for mode in bench.MODES]
    assert [(r["T"], r["threads"], r["cache"], r["mode"]) for r in rows] == expected
    for row in rows:
        assert "error" not in row, row
        for key in ("prefill_s", "decode_ms_per_token", "tokens_per_s", "speed_ratio", "prefill_ratio",
                    "allocated_mib", "ratio"):
            assert row[key] > 0, (key, row)
        assert len(row["step_ms"]) == 3 and all(t > 0 for t in row["step_ms"])
        assert len(row["tokens"]) == 3 + 1 + (row["mode"] == "compiled")  # timed + warm-up + compiling call
        if row["mode"] == "compiled":
            assert row["compile_s"] > 0 and row["graphs"] >= 1 and row["timed_recompiles"] == 0, row
        if row["cache"] == bench.BASELINE:
            assert row["ratio"] == 0.5 and "decode_pass" not in row  # float32 keys and values; the reference
        else:
            assert row["ratio"] > 1 and isinstance(row["decode_pass"], bool) and isinstance(row["prefill_pass"], bool)
            assert row["decode_target"] == bench.DECODE_TARGETS[row["mode"]]
    for eager, compiled in zip(rows[::2], rows[1::2]):
        assert eager["prefill_s"] == compiled["prefill_s"]  # one prefill for both modes
    assert all(r["speed_ratio"] == r["prefill_ratio"] == 1.0 for r in rows if r["cache"] == bench.BASELINE
               and r["mode"] == "eager")
    balanced = [r for r in rows if r["cache"] == "balanced"]
    assert all(r["reread_s"] > 0 for r in balanced) and all(r["ratio"] > 1.5 for r in balanced)
    assert all(r["reread_s"] == 0 for r in rows if r["cache"] != "balanced")
    printed = capsys.readouterr().out
    assert "| T | threads | cache | mode | prefill s | re-read s |" in printed
    assert "| 512 | 2 | `balanced` | compiled |" in printed


def test_failed_compile_is_reported_and_the_run_goes_on(bench, tmp_path, monkeypatch, capsys):
    def broken_compile(*args, **kwargs):
        raise RuntimeError("compile failed here\nsecond line")

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    rows = _run(bench, tmp_path, "--threads", "1", "--presets", "quant_only", "--lengths", "256")
    assert [(r["cache"], r["mode"]) for r in rows] == [(bench.BASELINE, "eager"), (bench.BASELINE, "compiled"),
                                                        ("quant_only", "eager"), ("quant_only", "compiled")]
    for eager, compiled in (rows[0:2], rows[2:4]):
        assert "error" not in eager and eager["decode_ms_per_token"] > 0
        assert compiled["error"] == "RuntimeError: compile failed here"
        assert "broken_compile" in compiled["traceback"]
        assert compiled["prefill_s"] == eager["prefill_s"]
    assert rows[2]["speed_ratio"] > 0
    assert rows[2]["decode_pass"] == (rows[2]["speed_ratio"] >= rows[2]["decode_target"] == 0.33)
    assert "warning: OMP_WAIT_POLICY is not PASSIVE" in capsys.readouterr().out
