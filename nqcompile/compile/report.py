"""What the ``nexusquant`` backend did to each graph it compiled: :class:`CompileReport` and its parts.

A report lists every attention and cache-update site the backend found (:class:`~nqcompile.compile.sites.Site`),
every rewrite a pass made (:class:`Rewrite`), every site no pass rewrote and why (:class:`LeftAlone`), and the
graph's Python code before and after the passes. :func:`last_reports` returns the reports of this process; the
graph-diff tool renders them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .sites import SITE_KINDS, Site

__all__ = ["CompileReport", "LeftAlone", "Rewrite", "last_reports", "next_index", "record"]

_REPORTS: list["CompileReport"] = []


@dataclass(frozen=True)
class Rewrite:
    """One rewrite a pass made.

    Attributes:
        pass_name: the pass (its module name, e.g. ``"fuse_flush_attention"``).
        site: the node name of the attention or cache site rewritten (in the graph before the passes).
        became: the op that replaced it (``"nqcompile::cache_attention"``, ...).
        fused: names of the other nodes folded into it (empty for a one-to-one rewrite).
        note: anything else the rewrite changed, in words (empty if nothing).
    """

    pass_name: str
    site: str
    became: str
    fused: tuple[str, ...] = ()
    note: str = ""


@dataclass(frozen=True)
class LeftAlone:
    """A site that no pass rewrote.

    Attributes:
        site: its node name. kind: its :data:`~nqcompile.compile.sites.SITE_KINDS` entry.
        reason: why, in words a user can act on.
    """

    site: str
    kind: str
    reason: str


@dataclass(frozen=True)
class CompileReport:
    """What the backend found and did in one captured graph.

    Attributes:
        graph: index of the graph in this process (0 for the first one compiled).
        sites: every attention and cache-update site, in graph order (before the passes).
        prepared: whether the graph holds nqcompile's compressed-cache ops (a model prepared by
            :func:`nqcompile.optimize`, called with a :class:`~nqcompile.NexusCache`).
        mode: the ``torch.compile`` mode the graph was compiled under.
        counts: number of sites of each kind (:data:`~nqcompile.compile.sites.SITE_KINDS`).
        rewrites: what each pass rewrote, in pass order.
        left_alone: the sites no pass rewrote, with the reason.
        pass_counts: rewrites per pass name (every pass that ran has an entry, 0 included).
        simulated: keys and values pass through quantize-dequantize (``options={"simulate": True}``): a quality
            study on an unprepared model, with no memory saved.
        code_before, code_after: the graph's Python code (``GraphModule.code``) before and after the passes.
    """

    graph: int
    sites: tuple[Site, ...]
    prepared: bool
    mode: str | None
    counts: dict[str, int] = field(default_factory=dict)
    rewrites: tuple[Rewrite, ...] = ()
    left_alone: tuple[LeftAlone, ...] = ()
    pass_counts: dict[str, int] = field(default_factory=dict)
    simulated: bool = False
    code_before: str = ""
    code_after: str = ""

    def __str__(self) -> str:
        found = ", ".join(f"{self.counts.get(kind, 0)} {kind}" for kind in SITE_KINDS)
        state = "compressed-cache ops" if self.prepared else "no compressed-cache ops (not prepared by optimize)"
        if self.simulated:
            state += ", keys/values simulated (quantize-dequantize, no memory saved)"
        done = ", ".join(f"{name} {n}" for name, n in self.pass_counts.items()) or "no passes"
        return f"graph {self.graph}: {found}; {state}; rewrites: {done}; {len(self.left_alone)} sites left alone"


def last_reports() -> list[CompileReport]:
    """The reports of every graph the backend compiled in this process, oldest first."""
    return list(_REPORTS)


def record(report: CompileReport) -> CompileReport:
    """Append ``report`` to the process's reports (the backend calls this once per graph)."""
    _REPORTS.append(report)
    return report


def next_index() -> int:
    """The index the next graph's report gets."""
    return len(_REPORTS)
