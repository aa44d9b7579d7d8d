"""The compaction benchmark (benchmarks/compaction.py) in its smoke configuration (tiny CPU shapes), in-process; and
the functions it times against what the cache computes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from nqcompile import ops

_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compaction.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("compaction_benchmark", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_timed_functions_compute_the_compaction(bench):
    """The chunk's kept tokens are those the indices name, with or without the custom op; the warm tier keeps its
    newest slots; the window step keeps the stream's unflushed tokens."""
    args = bench.parse_args(["--smoke"])
    g = torch.Generator().manual_seed(1)
    case = bench.chunk_case(args, 0.25, g)
    index = case["index"]
    assert index.shape == (1, 8, 16) and bool((index.diff(dim=-1) > 0).all())
    keys, values, pos = bench.chunk_keep_op(**case)
    h, k = 3, 5
    assert torch.equal(keys[0, h, k], case["pk"][0, h, index[0, h, k]])
    assert torch.equal(values[0, h, k], case["pv"][0, h, index[0, h, k]]) and torch.equal(pos, index)
    assert all(torch.equal(a, b) for a, b in zip(bench.chunk_keep_gather(**case), (keys, values, pos)))
    assert torch.equal(keys, ops.gather_tokens(case["pk"], index))

    warm = bench.warm_case(args, 16, g)
    out = bench.warm_take(**bench.fresh(warm))
    assert torch.equal(out[0], warm["ext"][0][:, :, 16:]) and torch.equal(out[3], warm["ext"][3][:, :, 16:])
    assert torch.equal(out[4], torch.arange(16, 48, dtype=torch.int32).expand(1, 8, 32))

    window = bench.window_case(args, 2, g)
    st = bench.fresh(window["st"])
    stream_k, _, win_k, _, win_len = bench.window_step(st, window["key"], window["value"], window["positions"])
    assert torch.equal(win_len, torch.tensor([32, 32]))  # 31 held + the new one: nothing flushed yet
    assert torch.equal(win_k[:, :, :31], window["st"].win_k[:, :, :31]) and torch.equal(win_k[:, :, 31:],
                                                                                       window["key"])
    assert torch.equal(stream_k[:, :, :32], win_k)


def test_smoke_rows(bench, tmp_path, capsys):
    out = tmp_path / "compaction.json"
    assert bench.main(["--smoke", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["meta"]["command"] == f"python benchmarks/compaction.py --smoke --out {out}"
    rows = data["rows"]
    assert [(r["step"], r["function"]) for r in rows] == [
        ("chunk_keep", "chunk_keep_op"), ("chunk_keep", "chunk_keep_gather"), ("warm_take", "warm_take"),
        ("warm_take", "warm_take"), ("window", "window_step")]
    for r in rows:
        assert r["equal"] is True and not any(k.endswith("_error") for k in r), r
        assert all(r[f"{m}_{k}"] > 0 for m in ("eager", "compiled") for k in ("call_us", "graph_us", "tb_per_s")), r
    # 32 of the 64-token chunk kept: keys and values 2 x 8 x 32 x 128 bf16 and int64 positions, written and read
    # once, and three reads of the int64 indices.
    assert rows[0]["mb"] == (2 * (2 * 8 * 32 * 128 * 2 + 8 * 32 * 8) + 3 * 8 * 32 * 8) / 1e6
    assert "| step | case | function | MB |" in capsys.readouterr().out
