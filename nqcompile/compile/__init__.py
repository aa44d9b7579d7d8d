"""The ``nexusquant`` ``torch.compile`` backend (:mod:`.backend`) and the attention and cache-update sites it finds
in a captured graph (:mod:`.sites`)."""

from .backend import nexusquant
from .report import CompileReport, LeftAlone, Rewrite, last_reports
from .sites import Site, find_sites

__all__ = ["nexusquant", "CompileReport", "LeftAlone", "Rewrite", "last_reports", "Site", "find_sites"]
