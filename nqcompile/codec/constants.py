"""Constant tables of the codecs, copied to each device once.

A codec's lookup tables live on the CPU; copying one to the GPU at every call would fail inside a CUDA-graph
capture (a host-to-device copy from pageable memory cannot be captured) and costs a transfer per call anyway.
:func:`on_device` keeps one copy per (table, device).

A CUDA copy is made on a stream of its own. Inductor's CUDA graphs (``mode="reduce-overhead"``) run each graph
eagerly once before capturing it, with the allocations of the current stream routed to the graphs' private memory
pool, which may hold only the graphs' outputs: a table first needed there (a compiled decode step run before any
eager one) would land in that pool and stay alive in this cache, and Inductor refuses the graph ("Detected 1
tensor(s) in the cudagraph pool not tracked as outputs", seen on an H200 with torch 2.11). Made on another stream,
the copy comes from the ordinary pool.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

__all__ = ["on_device"]

_COPIES: dict[tuple[int, torch.device], tuple[weakref.ref, Tensor]] = {}


def on_device(table: Tensor, device: torch.device | str) -> Tensor:
    """``table`` (a constant the caller never mutates) on ``device``; the first call per device copies it, later
    calls return that copy. The table itself is returned when it already lives there."""
    device = torch.device(device)
    if table.device == device:
        return table
    key = (id(table), device)
    hit = _COPIES.get(key)
    if hit is None or hit[0]() is not table:  # a new table, or one that reuses a freed table's id
        hit = _COPIES[key] = (weakref.ref(table), _copy(table, device))
    return hit[1]


def _copy(table: Tensor, device: torch.device) -> Tensor:
    """``table.to(device)``; for CUDA on a side stream, complete when this returns (module docstring)."""
    if device.type != "cuda":
        return table.to(device)
    stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        copy = table.to(device)
    stream.synchronize()
    return copy
