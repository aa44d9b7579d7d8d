"""The ``nexusquant`` ``torch.compile`` backend (:mod:`.backend`), the attention and cache-update sites it finds
in a captured graph (:mod:`.sites`), its per-graph reports (:mod:`.report`) and the graph-diff tool that renders
them (:mod:`.diff`)."""

from .backend import nexusquant
from .diff import GraphDiff, graph_diff
from .report import CompileReport, LeftAlone, Rewrite, last_reports
from .sites import Site, find_sites

__all__ = ["nexusquant", "GraphDiff", "graph_diff", "CompileReport", "LeftAlone", "Rewrite", "last_reports", "Site",
           "find_sites"]
