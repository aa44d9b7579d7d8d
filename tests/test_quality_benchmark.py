"""The quality benchmark (benchmarks/quality.py) in its smoke configuration (two tiny random models), in-process."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("quality", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(bench, tmp_path_factory):
    """One ``--smoke`` run: its JSON, its stdout and the parsed arguments."""
    out = tmp_path_factory.mktemp("quality") / "quality.json"
    argv = ["--smoke", "--out", str(out), "--windows", "1", "--needle-depths", "0.5"]
    threads = torch.get_num_threads()
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert bench.main(argv) == 0
    assert torch.get_num_threads() == threads
    return json.loads(out.read_text()), stdout.getvalue(), bench.parse_args(argv)


def test_smoke_measures_every_cache_model_genre_and_window(bench, smoke):
    data, _, args = smoke
    assert data["meta"]["command"] == f"python benchmarks/quality.py --smoke --out {args.out} --windows 1 --needle-depths 0.5"
    assert list(data["results"]) == list(bench.TINY)
    for model, record in data["results"].items():
        assert list(record["caches"]) == [bench.BASELINE, "quant_only", "balanced"]
        base = record["caches"][bench.BASELINE]
        for cache, entry in record["caches"].items():
            assert "error" not in entry, entry
            assert [w["genre"] for w in entry["windows"]] == ["prose", "technical", "code"]
            assert list(entry["genres"]) == ["prose", "technical", "code", "overall"]
            assert entry["genres"]["overall"]["windows"] == 3
            assert [(t["length"], t["depth"]) for t in entry["needle"]["trials"]] == [(256, 0.5), (512, 0.5)]
            if cache == bench.BASELINE:
                assert "ppl_change_percent" not in entry["genres"]["overall"] and entry["preset"] is None
                continue
            assert entry["preset"]["compress_layers"] == "all"  # each preset's own: sliding layers compressed too
            for i, (w, ref) in enumerate(zip(entry["windows"], base["windows"])):
                assert (w["source"], w["start"]) == (ref["source"], ref["start"])  # the same windows for every cache
                genre = entry["genres"][w["genre"]]
                change = (ref["nll_sum"] - w["nll_sum"]) / w["n_tokens"]
                assert genre["loglik_change_nats"]["per_window"] == [pytest.approx(change)]
                assert genre["ppl_change_percent"]["per_window"] == [pytest.approx(100 * math.expm1(-change))]
                assert entry["genres"]["overall"]["loglik_change_nats"]["per_window"][i] == pytest.approx(change)
                assert w["memory"]["compression_ratio"] == pytest.approx(
                    w["memory"]["bf16_bytes"] / w["memory"]["allocated_bytes"])
            overall = entry["genres"]["overall"]
            assert overall["loglik_change_nats"]["mean"] == pytest.approx(
                sum(overall["loglik_change_nats"]["per_window"]) / 3)
            ratios = [w["memory"]["compression_ratio"] for w in entry["windows"]]
            assert overall["byte_ratio"] == pytest.approx({"mean": sum(ratios) / 3, "min": min(ratios), "max": max(ratios)})
            assert min(ratios) > 1.0


def test_smoke_baseline_perplexity_is_the_models_own(bench, smoke):
    """The baseline's NLL of each window, recomputed with one forward pass of the same seeded model over the window."""
    from nqcompile.eval import GENRES, perplexity_windows

    data, _, args = smoke
    for name in bench.TINY:
        model, tokenizer, _ = bench.load_model(name, args)
        entry = data["results"][name]["caches"][bench.BASELINE]
        for genre in GENRES:
            (w,) = perplexity_windows(tokenizer, n_windows=1, prefix=args.prefix, continuation=args.continuation,
                                      seed=args.seed, sources=GENRES[genre])
            with torch.inference_mode():
                logits = model(w.input_ids).logits[0, w.prefix - 1 : -1]
            nll = torch.nn.functional.cross_entropy(logits, w.input_ids[0, w.prefix :], reduction="sum").item()
            (got,) = [x for x in entry["windows"] if x["genre"] == genre]
            assert got["nll_sum"] == pytest.approx(nll, rel=1e-4)
            assert entry["genres"][genre]["perplexity"] == pytest.approx(math.exp(nll / args.continuation), rel=1e-4)


def test_smoke_table_has_a_row_per_cache_and_columns_per_model_and_genre(bench, smoke):
    _, out, args = smoke
    lines = [line for line in out.splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    per_model = ["prose", "technical", "code", "overall", "byte ratio", "needle @256", "needle @512"]
    assert head == ["cache"] + [f"{m} {c}" for m in bench.TINY for c in per_model]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [r[0] for r in rows] == ["exact (DynamicCache)", "`quant_only`", "`balanced`"]
    assert all(len(r) == len(head) for r in rows)
    assert rows[0][1].startswith("ppl ") and rows[1][1].endswith(tuple("0123456789")) and "% / " in rows[1][1]
    assert rows[1][5].endswith("x") and rows[1][6].count("/") == 1
    assert "command: python benchmarks/quality.py --smoke --out " in out


def test_a_failed_cache_is_recorded_and_fails_the_run(bench, tmp_path, monkeypatch, capsys):
    """A cache that raises (here every NexusCache of quant_only, as a config the preset refuses would) is recorded with
    its error, the other caches still run, and the exit status is 1."""
    real = bench._cache_factory

    def factory(model, preset):
        if preset is not None and preset.name == "quant_only":
            def refuse(n):
                raise ValueError("sliding_window=64 is shorter than max_cache_len")
            return refuse
        return real(model, preset)

    monkeypatch.setattr(bench, "_cache_factory", factory)
    out = tmp_path / "q.json"
    assert bench.main(["--smoke", "--models", "tiny-llama", "--windows", "1", "--needle-lengths", "",
                       "--out", str(out)]) == 1
    caches = json.loads(out.read_text())["results"]["tiny-llama"]["caches"]
    assert caches["quant_only"]["error"] == "ValueError: sliding_window=64 is shorter than max_cache_len"
    assert "error" not in caches["exact"] and caches["balanced"]["genres"]["overall"]["windows"] == 3
    assert "| `quant_only` | error: ValueError: sliding_window=64" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--presets", "nope"], "unknown presets"),
    (["--genres", "poetry"], "--genres"),
    (["--needle-depths", "1.5"], "--needle-depths"),
    (["--custom", '{"exact": {}}'], "taken"),
    (["--custom", '{"k9": {"key_bits": 9}}'], "key_bits"),
    (["--models", ""], "--models is empty"),
    (["--jobs", "0"], "--jobs 0"),
    (["--custom", '{"s4": {"sliding_bits": 4}}', "--compress-layers", "global_only"], "sliding_bits=None"),
])
def test_bad_arguments_are_usage_errors(bench, argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        bench.parse_args(argv)
    assert err.value.code == 2 and message in capsys.readouterr().err


def test_compress_layers_overrides_every_preset_and_custom_cache(bench):
    args = bench.parse_args(["--presets", "quant_only", "--custom", '{"k4": {"key_bits": 4, "value_bits": 2}}',
                             "--compress-layers", "global_only"])
    assert {n: p.compress_layers for n, p in args.caches.items()} == {"quant_only": "global_only", "k4": "global_only"}
    assert bench.parse_args(["--presets", "quant_only"]).caches["quant_only"].compress_layers == "all"


def test_jobs_run_the_models_in_their_own_processes_and_give_the_same_results(smoke, tmp_path):
    """``--jobs 2`` as a user runs it (the script, two spawned processes, one thread each): the same windows, NLLs and
    needles as the in-process run, each model's results also written beside ``--out`` as it went."""
    data, _, args = smoke
    out = tmp_path / "quality.json"
    env = dict(os.environ, TQDM_DISABLE="1", OMP_WAIT_POLICY="PASSIVE")
    run = subprocess.run([sys.executable, str(_SCRIPT), "--smoke", "--jobs", "2", "--threads", "1", "--windows", "1",
                          "--needle-depths", "0.5", "--out", str(out)], capture_output=True, text=True, env=env,
                         timeout=900)
    assert run.returncode == 0, run.stderr
    assert "1 threads in each of 2 processes" in run.stdout
    jobs = json.loads(out.read_text())["results"]
    assert list(jobs) == list(data["results"])
    for model, record in jobs.items():
        partial = json.loads((tmp_path / f"quality.{model}.json").read_text())["results"][model]
        assert partial["caches"] == record["caches"]
        for cache, entry in record["caches"].items():
            ref = data["results"][model]["caches"][cache]
            assert [w["nll_sum"] for w in entry["windows"]] == pytest.approx([w["nll_sum"] for w in ref["windows"]],
                                                                           rel=1e-5)
            assert [t["output"] for t in entry["needle"]["trials"]] == [t["output"] for t in ref["needle"]["trials"]]
