"""The README's code blocks and the examples run, on a tiny model where the README loads SmolLM2.

Substitutions, and only these: ``load_pretrained()`` loads a tiny random-weight Llama saved with a byte-level tokenizer
(:func:`tiny_models.save_tiny_model_with_tokenizer`) instead of SmolLM2; ``nqcompile`` commands get that folder as
``--model`` (for ``/path/to/hf/folder`` or appended); the examples get it as ``--model``. Commands that install
packages or run the test suite are what CI itself runs (``.ci/run``); the 48-minute quality benchmark is only parsed.
A slow test runs the Run it command as written, on SmolLM2.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_models import save_tiny_model_with_tokenizer

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    """The README's fenced blocks whose info string is ``language`` ("" for plain fences), in order."""
    return [m.group(2) for m in re.finditer(r"^```(\w*)\n(.*?)^```", README, re.S | re.M) if m.group(1) == language]


def _commands() -> list[str]:
    """Every command line of the README's bash and plain blocks (``&&`` chains split, comments dropped)."""
    lines = [line.split("  #")[0].strip() for block in _blocks("bash") + _blocks("") for line in block.splitlines()]
    return [part.strip() for line in lines if line for part in line.split("&&")]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_model_with_tokenizer(tmp_path_factory.mktemp("tiny") / "model")


def test_readme_python_blocks_run_in_order(tiny_folder, fresh_dynamo, capsys):
    """Use it, Evaluate and Compile it, in one namespace as a reader runs them top to bottom (Compile it continues
    from Use it's ``model`` and ``ids``)."""
    blocks = _blocks("python")
    assert len(blocks) == 3 and sum(b.count("load_pretrained()") for b in blocks) == 1
    namespace: dict = {"__name__": "__readme__"}
    for block in blocks:
        exec(compile(block.replace("load_pretrained()", f"load_pretrained({tiny_folder!r})"), "README.md", "exec"),
             namespace)
    out = capsys.readouterr().out
    assert "compression ratio (bytes)" in out and "needles found:" in out and out.count("perplexity ") == 2
    assert isinstance(namespace["cache"], namespace["nqcompile"].NexusCache)
    assert namespace["logits"].shape[:2] == (1, 1)  # the compiled decode step ran


def test_every_readme_command_is_run_or_parsed(tiny_folder, tmp_path, monkeypatch, capsys):
    from nqcompile.cli import main

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import quality
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    monkeypatch.chdir(tmp_path)  # --html diff.html
    ran = {"nqcompile": 0, "benchmark": 0}
    for command in _commands():
        argv = shlex.split(command)
        if argv[0] == "python" and argv[1:3] == ["-m", "venv"] or argv[0].endswith("pip") or "pytest" in argv:
            continue  # the environment CI builds and the suite it runs (.ci/run)
        if argv[0].endswith("nqcompile"):
            args = [tiny_folder if a == "/path/to/hf/folder" else a for a in argv[1:]]
            if "--model" not in args:
                args += ["--model", tiny_folder]
            if args[0] == "generate":
                args += ["--max-new-tokens", "4"]  # the tiny model's 6,721-token prompt: keep its decode short
            threads = torch.get_num_threads()
            try:
                assert main(args) == 0, command
            finally:
                torch.set_num_threads(threads)
            ran["nqcompile"] += 1
        elif argv[:2] == ["python", "benchmarks/quality.py"]:
            quality.parse_args(argv[2:])
            ran["benchmark"] += 1
        else:
            pytest.fail(f"README command not covered by this test: {command}")
    assert ran == {"nqcompile": 4, "benchmark": 1}
    assert (tmp_path / "diff.html").is_file()
    assert "--- continuation (4 tokens" in capsys.readouterr().out


@pytest.mark.parametrize("script, needle", [("generate_compressed.py", "compression ratio (bytes)"),
                                            ("multi_turn.py", "assistant: ")])
def test_example_runs(tiny_folder, script, needle):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--model", tiny_folder],
                            capture_output=True, text=True, cwd=ROOT, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert needle in result.stdout


@pytest.mark.slow
def test_readme_run_command_as_written(tmp_path):
    """The Run it block's nqcompile command as written, on SmolLM2 (about a minute on a 2-core CPU), with --json."""
    command = next(c for c in _commands() if shlex.split(c)[0].endswith("nqcompile"))
    assert shlex.split(command)[1:] == ["generate"]
    figures = tmp_path / "figures.json"
    result = subprocess.run([sys.executable, "-m", "nqcompile", "generate", "--json", str(figures)], capture_output=True,
                            text=True, cwd=tmp_path, timeout=1200, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(figures.read_text())
    assert data["prompt_tokens"] == 1566 and data["quality"]["held_tokens"] == 256
    assert data["memory"]["compression_ratio"] > 5 and abs(data["quality"]["change_percent"]) < 50
    assert all(data["speed"][run]["tokens_per_s"] > 0 for run in ("compressed", "uncompressed"))
    assert data["speed"]["compressed"]["reread"] and "--- the uncompressed cache's continuation" in result.stdout
