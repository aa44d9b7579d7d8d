"""Compiling Triton kernels for sm_90 (H100/H200) on a machine without a GPU, for the kernel tests.

Triton's own compiler and ptxas run in a fresh interpreter without ``TRITON_INTERPRET`` (which the test session
sets), so the CPU runs catch what only the GPU compiler checks (dot shapes, layouts, shared memory).
"""

import json
import os
import subprocess
import sys


def compile_for_sm90(script: str) -> list[dict]:
    """Run ``script`` (Python source that compiles kernels with ``triton.compile(..., GPUTarget("cuda", 90, 32))``
    and prints one JSON object per line) in a fresh interpreter with this checkout on its path; the printed objects.

    Raises:
        AssertionError: the script failed (the end of its stderr is in the message).
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
