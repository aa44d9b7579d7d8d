"""Shared pytest configuration.

* Tests marked ``gpu`` (pyproject's markers) are skipped where CUDA is absent.
* Without CUDA, ``TRITON_INTERPRET=1`` is set (unless already set) before anything imports Triton, so the Triton
  kernels' tests run under Triton's interpreter on CPU tensors. It has to be set this early: Triton picks the
  interpreter when a function is decorated with ``triton.jit``, its own ``triton.language`` helpers included, and
  importing nqcompile imports Triton (through ``torch._dynamo``) when it is installed. It changes nothing else here:
  Inductor compiles CPU graphs to C++, never through Triton.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
