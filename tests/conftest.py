"""Fixtures shared by the compile tests."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from nqcompile.compile import backend as nexus_backend
from nqcompile.compile import report as nexus_report


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
