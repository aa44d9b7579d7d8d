"""The nqcompile command line: errors a user can act on (one line, exit status 2, before the model loads), a help that
imports no torch, and generate's figures on a tiny model."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_models import save_tiny_model_with_tokenizer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_model_with_tokenizer(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tokenizer_only(tmp_path_factory, tiny_folder):
    """A folder with the tiny model's tokenizer and config but no weights: loading the model from it fails."""
    folder = tmp_path_factory.mktemp("tokenizer_only")
    for path in Path(tiny_folder).iterdir():
        if not path.name.endswith(".safetensors"):
            (folder / path.name).write_bytes(path.read_bytes())
    return str(folder)


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "nqcompile", *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300)


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nqcompile: "), result.stderr
    assert result.stdout == "", result.stdout  # nothing ran: no model line, no prompt line
    return lines[0]


# --- errors ----------------------------------------------------------------------------------------------------


def test_missing_prompt_file(tmp_path):
    line = _one_line_error(_cli("--prompt-file", str(tmp_path / "nope.txt"), "--model", str(tmp_path / "no-model")))
    assert line == f"nqcompile: cannot read --prompt-file {tmp_path / 'nope.txt'}: No such file or directory"


def test_prompt_file_that_is_a_folder(tmp_path):
    line = _one_line_error(_cli("--prompt-file", str(tmp_path), "--model", str(tmp_path / "no-model")))
    assert line == f"nqcompile: --prompt-file {tmp_path} is a folder; pass a text file"


def test_prompt_file_under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    path = tmp_path / "file" / "prompt.txt"
    line = _one_line_error(_cli("--prompt-file", str(path), "--model", str(tmp_path / "no-model")))
    assert line == f"nqcompile: cannot read --prompt-file {path}: Not a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_prompt_file(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_text("hello")
    path.chmod(0)
    line = _one_line_error(_cli("--prompt-file", str(path)))
    assert line == f"nqcompile: cannot read --prompt-file {path}: Permission denied"


@pytest.mark.parametrize("data, offset", [(b"PK\x03\x04\x00\x00binary", 4), (b"caf\xe9 au lait", 3)])
def test_binary_prompt_file(tmp_path, data, offset):
    path = tmp_path / "prompt.bin"
    path.write_bytes(data)
    line = _one_line_error(_cli("--prompt-file", str(path), "--model", str(tmp_path / "no-model")))
    assert line == (f"nqcompile: --prompt-file {path} is not text (binary data at byte {offset}); pass a UTF-8 "
                    "text file")


@pytest.mark.parametrize("text", ["", " \n\t\n"])
def test_empty_prompt_file(tmp_path, text):
    path = tmp_path / "empty.txt"
    path.write_text(text)
    line = _one_line_error(_cli("--prompt-file", str(path), "--model", str(tmp_path / "no-model")))
    assert line == f"nqcompile: --prompt-file {path} is empty; pass a text file with the prompt to continue"


def test_prompt_shorter_than_the_exact_part_fails_before_the_model_loads(tmp_path, tokenizer_only):
    """36 tokens (4 sinks + 32 recent) stay exact; a 30-byte prompt (30 tokens with the byte-level tokenizer) would
    compress nothing. The folder has no weights, so reaching the model load would fail differently."""
    path = tmp_path / "short.txt"
    path.write_text("x" * 30)
    line = _one_line_error(_cli("--prompt-file", str(path), "--model", tokenizer_only, "--preset", "asym"))
    assert line.startswith(f"nqcompile: the prompt in {path} has 30 tokens, no more than the 36 the cache keeps exact "
                           "(4 attention sinks + the 32 most recent tokens, in float32), so nothing would be "
                           "compressed and the cache would hold more bytes than a bf16 cache (ratio below 1)"), line


def test_bad_numbers_and_missing_model(tmp_path):
    assert _one_line_error(_cli("--max-new-tokens", "0")) == \
        "nqcompile: --max-new-tokens and --threads must be >= 1, --held-tokens >= 0"
    prompt = tmp_path / "p.txt"
    prompt.write_text("some text")
    line = _one_line_error(_cli("--prompt-file", str(prompt), "--model", str(tmp_path / "no-model")))
    assert line == f"nqcompile: cannot load model {tmp_path / 'no-model'}: model folder {tmp_path / 'no-model'} does not exist"


# --- help --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"], ["diff", "--help"]])
def test_help_imports_no_torch_and_is_plain_text(argv):
    code = ("import sys\nfrom nqcompile.cli import main\ntry:\n    main(%r)\nexcept SystemExit as e:\n    "
            "assert e.code == 0\nheavy = sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules)\n"
            "print('IMPORTED', heavy)" % (argv,))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip().endswith("IMPORTED []"), out
    assert "``" not in out and "usage: nqcompile" in out


def test_preset_choices_match_the_library():
    import nqcompile
    from nqcompile import cli

    assert list(cli.PRESET_NAMES) == sorted(nqcompile.PRESETS)


def test_diff_refuses_an_unknown_compile_mode():
    line = _one_line_error(_cli("diff", "--mode", "fastest"))
    assert line.startswith("nqcompile: diff: --mode fastest is not a torch.compile mode; pass one of default, ")


def test_quality_benchmark_help_prints_each_default_once():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import quality
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    parser = quality.build_parser()
    text = parser.format_help()
    written = sum(action.help.count("default") for action in parser._actions if action.help)
    assert text.count("default") == written and "(default: None)" not in text, text


# --- generate on a tiny model ------------------------------------------------------------------------------------


def test_generate_prints_and_writes_the_figures(tmp_path, tiny_folder, capsys):
    from nqcompile.cli import main
    from nqcompile.eval import read_data_text

    prompt = tmp_path / "prompt.txt"
    prompt.write_text(read_data_text("prompt.txt")[:700])
    figures = tmp_path / "out" / "figures.json"
    argv = ["--model", tiny_folder, "--prompt-file", str(prompt), "--max-new-tokens", "6", "--held-tokens", "40",
            "--threads", "1", "--json", str(figures)]
    threads = torch.get_num_threads()
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    for needle in ("1 thread)", "prompt: 660 tokens", "(40 more held out", "warm-up: balanced on the prompt's first 512 "
                   "tokens in", "--- continuation (6 tokens, greedy, preset "
                   "balanced)", "tokens held (all layers, seqs)", "ratio", "uncompressed (DynamicCache)    prefill 659 "
                   "tokens in", "generate 6 tokens in", "tokens/s", "compressed (balanced)", "re-reading",
                   "perplexity of the 40 held-out tokens", f"written to {figures}"):
        assert needle in out, out
    assert re.search(r"\ncompressed \(balanced\) +perplexity [\d.]+ \([+-][\d.]+%; log-likelihood [+-][\d.]+ nats per token\)\n",
                     out), out
    data = json.loads(figures.read_text())
    assert data["threads"] == 1 and data["prompt_tokens"] == 660 and data["preset"]["name"] == "balanced"
    assert 0 < data["warm_up_s"] < data["total_s"]
    for run in ("compressed", "uncompressed"):
        speed = data["speed"][run]
        assert speed["new_tokens"] == 6 and speed["tokens_per_s"] == pytest.approx(6 / speed["generate_s"])
        assert speed["prefill_tokens"] == 659 and speed["held_tokens"] == 40
    assert data["memory"]["compression_ratio"] > 1 and data["memory"]["logical_tokens"] == 660 + 5  # the last new token is not fed
    assert data["quality"]["change_percent"] == pytest.approx(
        100 * (data["quality"]["perplexity_compressed"] / data["quality"]["perplexity_uncompressed"] - 1))
    assert data["quality"]["loglik_change_nats"] == pytest.approx(
        math.log(data["quality"]["perplexity_uncompressed"] / data["quality"]["perplexity_compressed"]))


def test_generate_explains_a_ratio_below_one(tmp_path, tiny_folder, capsys):
    from nqcompile.cli import main

    prompt = tmp_path / "prompt.txt"
    prompt.write_text("It is a truth universally acknowledged, that a single man.")  # 58 tokens, 36 of them exact
    assert main(["--model", tiny_folder, "--prompt-file", str(prompt), "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "feeding all of it, no perplexity check" in out
    assert "note: the ratio is below 1 because the prompt is short: the cache keeps 36 tokens per layer exact" in out
