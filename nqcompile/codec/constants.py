"""Constant tables of the codecs, copied to each device once.

A codec's lookup tables live on the CPU; copying one to the GPU at every call would fail inside a CUDA-graph
capture (a host-to-device copy from pageable memory cannot be captured) and costs a transfer per call anyway.
:func:`on_device` keeps one copy per (table, device).
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
        hit = _COPIES[key] = (weakref.ref(table), table.to(device))
    return hit[1]
