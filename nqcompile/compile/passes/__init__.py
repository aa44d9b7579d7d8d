"""The FX passes of the ``nexusquant`` backend, one module per rewrite, run in this order:

1. :mod:`.fuse_warm_attention`: the warm tier is decoded inside the attention (``dequant_kv`` + ``cat`` +
   ``dequant_attention`` -> ``nqcompile::cache_attention``);
2. :mod:`.fuse_flush_attention`: the window flush's quantize-on-write joins the attention
   (``write_kv`` + attention -> ``nqcompile::cache_attention``).

After both, a decode step of a compressed layer holds one attention node that a kernel replaces whole.
:func:`run_passes` runs them, each inside a ``GraphTransformObserver``. On a model that was not prepared,
:mod:`.simulate` (``options={"simulate": True}``) instead passes the attention's keys and values through
quantize-dequantize, a quality study.
"""

from __future__ import annotations

import torch
from torch.fx.passes.graph_transform_observer import GraphTransformObserver

from ..report import Rewrite
from .base import NexusPass
from .fuse_flush_attention import FuseFlushAttention
from .fuse_warm_attention import FuseWarmAttention

__all__ = ["NexusPass", "FuseWarmAttention", "FuseFlushAttention", "build_passes", "run_passes"]


def build_passes(*, cudagraphs: bool) -> list[NexusPass]:
    """The passes in the order they run, for a graph compiled with (or without) CUDA graphs."""
    return [FuseWarmAttention(), FuseFlushAttention(cudagraphs=cudagraphs)]


def run_passes(gm: torch.fx.GraphModule, passes: list[NexusPass]) -> tuple[list[Rewrite], dict[str, str]]:
    """Run ``passes`` over ``gm`` in order (in place; ``gm`` is recompiled).

    Returns:
        ``(rewrites, left_alone)``: every rewrite in pass order, and ``{site: reason}`` for the sites a pass looked
        at and did not rewrite (the last pass's reason wins).
    """
    rewrites, left_alone = [], {}
    for graph_pass in passes:
        with GraphTransformObserver(gm, graph_pass.name):
            graph_pass(gm.graph)
        rewrites += graph_pass.rewrites
        left_alone.update(graph_pass.left_alone)
    gm.graph.lint()
    gm.recompile()
    return rewrites, left_alone
