"""The graph-diff tool: what the ``nexusquant`` backend found and did in every graph of a compiled decode step.

:func:`graph_diff` runs an eager prefill and a few decode steps compiled with ``backend="nexusquant"`` and
returns a :class:`GraphDiff`: per captured graph, every attention and cache-update site
(:class:`~nqcompile.compile.sites.Site`), what it became (:class:`~nqcompile.compile.report.Rewrite`) or why it
was left alone (:class:`~nqcompile.compile.report.LeftAlone`), the per-pass rewrite counts and the graph's code
before and after the passes; plus Dynamo's graph breaks and recompiles during the call. It renders as a console
table (:meth:`GraphDiff.to_text`), one self-contained HTML page with the code side by side
(:meth:`GraphDiff.to_html`) and JSON (:meth:`GraphDiff.to_dict`). ``nqcompile diff`` is its command line.

The backend also hands each report to :func:`emit_structured`, which writes it to ``torch._logging``'s
structured trace (run with ``TORCH_TRACE=/some/folder``; ``tlparse`` then lists an artifact
``nqcompile_graph_diff`` under the compile that produced the graph).
"""

from __future__ import annotations

import difflib
import html
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch._dynamo
from torch._dynamo.utils import counters, get_compilation_metrics

from .report import CompileReport, LeftAlone, Rewrite, last_reports
from .sites import SITE_KINDS

__all__ = ["GraphDiff", "FrameCompile", "SiteOutcome", "graph_diff", "site_outcomes", "report_to_dict",
           "emit_structured", "ARTIFACT_NAME"]

#: Name of the structured-trace artifact :func:`emit_structured` writes (what ``tlparse`` lists).
ARTIFACT_NAME = "nqcompile_graph_diff"

_NOT_PREPARED = ("the graph has no compressed-cache ops: the model was not prepared by nqcompile.optimize(model, "
                 "preset), or was called without a NexusCache; Inductor compiles it unchanged")
_NO_PASS_RAN = "no nqcompile pass ran on this graph; Inductor compiles it unchanged"
_NO_REASON = "no pass rewrote it and none recorded why"


@dataclass(frozen=True)
class SiteOutcome:
    """What happened to one site of a graph, read from its :class:`CompileReport`.

    Attributes:
        node: the site's FX node name (in the graph before the passes).
        kind: its :data:`~nqcompile.compile.sites.SITE_KINDS` entry; ``"other"`` for a node a pass rewrote that
            the site finder does not list.
        target: what the node calls, as text (empty for ``"other"``).
        status: ``"rewritten"`` (a pass replaced it), ``"fused"`` (folded into another site's rewrite) or
            ``"left alone"``.
        rewrites: the rewrites of this node (``"rewritten"``), or the one that folded it in (``"fused"``).
        reason: why it was left alone (empty otherwise).
        recorded: whether the reason comes from the report (a :class:`LeftAlone` entry); false when the diff tool
            inferred it because no pass recorded one.
        module: the model's module the site is in (``"model.layers.3.self_attn"``), empty when unknown.
    """

    node: str
    kind: str
    target: str
    status: str
    rewrites: tuple[Rewrite, ...] = ()
    reason: str = ""
    recorded: bool = True
    module: str = ""

    def describe(self) -> str:
        """One line for a table: the op it became and the nodes fused, or the reason it was left alone."""
        if self.status == "rewritten":
            parts = []
            for rw in self.rewrites:
                fused = f" (fused: {', '.join(rw.fused)})" if rw.fused else ""
                note = f" [{rw.note}]" if rw.note else ""
                parts.append(f"{rw.became} by {rw.pass_name}{fused}{note}")
            return "became " + "; then ".join(parts)
        if self.status == "fused":
            rw = self.rewrites[0]
            return f"fused into {rw.site} -> {rw.became} by {rw.pass_name}"
        return f"left alone: {self.reason}" if self.recorded else f"left alone (inferred): {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (lists for tuples)."""
        return {"node": self.node, "kind": self.kind, "target": self.target, "status": self.status,
                "rewrites": [_rewrite_dict(rw) for rw in self.rewrites], "reason": self.reason,
                "recorded": self.recorded, "module": self.module, "outcome": self.describe()}


def _rewrite_dict(rw: Rewrite) -> dict[str, Any]:
    return {"pass_name": rw.pass_name, "site": rw.site, "became": rw.became, "fused": list(rw.fused),
            "note": rw.note}


def _left_alone_dict(la: LeftAlone) -> dict[str, str]:
    return {"site": la.site, "kind": la.kind, "reason": la.reason}


def site_outcomes(report: CompileReport) -> list[SiteOutcome]:
    """The outcome of every site of ``report``, in graph order, then any rewrite or left-alone entry that names a
    node the site finder did not list (so nothing in the report goes unshown).

    A site is ``"rewritten"`` when a :class:`Rewrite` names it, ``"fused"`` when it is among another rewrite's
    ``fused`` nodes, else ``"left alone"`` with the reason of its :class:`LeftAlone` entry; with no entry, the
    reason is inferred (``recorded=False``): the graph was not prepared, no pass ran, or no pass said why.
    """
    by_site: dict[str, list[Rewrite]] = {}
    fused_into: dict[str, Rewrite] = {}
    for rw in report.rewrites:
        by_site.setdefault(rw.site, []).append(rw)
        for name in rw.fused:
            fused_into.setdefault(name, rw)
    reasons = {la.site: la for la in report.left_alone}
    if not report.prepared:
        inferred = _NOT_PREPARED
    elif not report.pass_counts:
        inferred = _NO_PASS_RAN
    else:
        inferred = _NO_REASON

    def outcome(node: str, kind: str, target: str, module: str = "") -> SiteOutcome:
        if node in by_site:
            return SiteOutcome(node, kind, target, "rewritten", tuple(by_site[node]), module=module)
        if node in fused_into:
            return SiteOutcome(node, kind, target, "fused", (fused_into[node],), module=module)
        if node in reasons:
            return SiteOutcome(node, kind, target, "left alone", reason=reasons[node].reason, module=module)
        return SiteOutcome(node, kind, target, "left alone", reason=inferred, recorded=False, module=module)

    listed = {site.node for site in report.sites}
    out = [outcome(site.node, site.kind, site.target, site.module) for site in report.sites]
    out += [outcome(node, "other", "") for node in by_site if node not in listed]
    out += [SiteOutcome(la.site, la.kind, "", "left alone", reason=la.reason)
            for la in report.left_alone if la.site not in listed and la.site not in by_site]
    return out


def report_to_dict(report: CompileReport) -> dict[str, Any]:
    """JSON-able form of one :class:`CompileReport`, with each site's outcome (:func:`site_outcomes`)."""
    return {
        "graph": report.graph,
        "prepared": report.prepared,
        "mode": report.mode,
        "simulated": report.simulated,
        "counts": dict(report.counts),
        "pass_counts": dict(report.pass_counts),
        "sites": [o.to_dict() for o in site_outcomes(report)],
        "rewrites": [_rewrite_dict(rw) for rw in report.rewrites],
        "left_alone": [_left_alone_dict(la) for la in report.left_alone],
        "code_before": report.code_before,
        "code_after": report.code_after,
    }


def emit_structured(report: CompileReport) -> None:
    """Write ``report`` to ``torch._logging``'s structured trace as the JSON artifact :data:`ARTIFACT_NAME`.

    The backend calls this once per graph, inside Dynamo's compile, so the trace files it under that compile's id.
    It costs nothing when no trace is being written (``TORCH_TRACE`` unset): the payload is built lazily.
    """
    torch._logging.trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": ARTIFACT_NAME, "encoding": "json"},
        payload_fn=lambda: json.dumps(report_to_dict(report)),
    )


@dataclass(frozen=True)
class FrameCompile:
    """One compilation of a Python frame by Dynamo (an entry of ``torch._dynamo.utils.get_compilation_metrics``).

    Attributes:
        compile_id: Dynamo's id, ``"frame/attempt"`` (``"0/1"`` is the first recompile of frame 0).
        function: the compiled function's name (``co_name``).
        recompile_reason: the guard that failed, for a recompile; None for a frame's first compile.
        fail_reason: why the compile failed, if it did.
    """

    compile_id: str
    function: str
    recompile_reason: str | None = None
    fail_reason: str | None = None


@dataclass(frozen=True)
class GraphDiff:
    """What :func:`graph_diff` saw: the backend's report of every graph captured, and Dynamo's breaks and recompiles.

    Attributes:
        model: the model's class name.
        preset: name of the preset the model was prepared with, or None (not prepared: a plain ``DynamicCache``).
        prepared_here: whether :func:`graph_diff` called :func:`nqcompile.optimize` on the model.
        mode: the ``torch.compile`` mode (None = default).
        options: the backend options passed to ``torch.compile``.
        prompt_tokens: tokens per sequence of the eager prefill. batch: sequences.
        steps: decode steps run through the compiled forward.
        reports: one :class:`CompileReport` per graph the backend compiled during the call, oldest first.
        graph_breaks: Dynamo's graph-break reasons during the call, with how often each occurred.
        frames: every frame compile during the call (the first compile of a frame, recompiles, resume functions
            after a graph break); at most the last 64 (Dynamo keeps no more).
        unique_graphs: graphs Dynamo captured during the call (``counters["stats"]["unique_graphs"]``).
    """

    model: str
    preset: str | None
    prepared_here: bool
    mode: str | None
    options: dict[str, Any]
    prompt_tokens: int
    batch: int
    steps: int
    reports: tuple[CompileReport, ...]
    graph_breaks: dict[str, int] = field(default_factory=dict)
    frames: tuple[FrameCompile, ...] = ()
    unique_graphs: int = 0

    @property
    def recompiles(self) -> tuple[FrameCompile, ...]:
        """The frame compiles that were recompiles (a guard of an earlier compile failed)."""
        return tuple(f for f in self.frames if f.recompile_reason is not None)

    def _summary(self) -> list[str]:
        if self.preset is None:
            state = "not prepared (plain DynamicCache; prepare with nqcompile.optimize to compress)"
        else:
            state = f"preset {self.preset} ({'prepared by this call' if self.prepared_here else 'prepared before'})"
        options = f", options {self.options}" if self.options else ""
        return [
            f"model {self.model}, {state}, mode {self.mode or 'default'}{options}",
            f"eager prefill of {self.batch} x {self.prompt_tokens} tokens, then {self.steps} decode steps compiled "
            f"with backend nexusquant (fullgraph=False)",
            f"graphs compiled by the backend: {len(self.reports)}; graphs captured: {self.unique_graphs}; "
            f"graph breaks: {sum(self.graph_breaks.values())}; frame compiles: {len(self.frames)}, "
            f"recompiles: {len(self.recompiles)}",
        ]

    def to_text(self) -> str:
        """A console report: the summary, per graph a table (site, kind, outcome), its pass counts and code size,
        then the graph-break reasons and the recompiles with their failed guard."""
        lines = ["nqcompile graph diff", *self._summary()]
        for report in self.reports:
            lines += ["", _graph_title(report)]
            rows, notes = [("module", "site", "kind", "outcome")], {}
            for o in site_outcomes(report):
                if o.status == "left alone":  # a reason shared by many sites is printed once, under the table
                    note = o.reason if o.recorded else f"{o.reason} [inferred: no pass recorded a reason]"
                    rows.append((o.module or "-", o.node, o.kind,
                                 f"left alone ({notes.setdefault(note, len(notes) + 1)})"))
                else:
                    rows.append((o.module or "-", o.node, o.kind, o.describe()))
            width = [max(len(r[i]) for r in rows) for i in range(3)]
            lines += [f"  {m:<{width[0]}}  {a:<{width[1]}}  {b:<{width[2]}}  {c}" for m, a, b, c in rows]
            lines += [f"  ({i}) {note}" for note, i in notes.items()]
            lines.append(f"  passes: {_pass_counts(report)}")
            changed = "unchanged" if report.code_after == report.code_before else "changed"
            lines.append(f"  code: {len(report.code_before.splitlines())} lines before the passes, "
                         f"{len(report.code_after.splitlines())} after ({changed})")
        if not self.reports:
            lines += ["", "no graph reached the nexusquant backend (everything ran eagerly?)"]
        if self.graph_breaks:
            lines += ["", "graph breaks:"] + [f"  {n} x {reason}" for reason, n in self.graph_breaks.items()]
        if self.recompiles:
            lines += ["", "recompiles:"] + [f"  {f.compile_id} {f.function}: {f.recompile_reason}"
                                            for f in self.recompiles]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: ``json.loads(json.dumps(d)) == d``. Option values that are not JSON scalars are
        given as their ``repr``."""
        return {
            "model": self.model,
            "preset": self.preset,
            "prepared_here": self.prepared_here,
            "mode": self.mode,
            "options": {str(k): v if isinstance(v, (str, int, float, bool, type(None))) else repr(v)
                        for k, v in self.options.items()},
            "prompt_tokens": self.prompt_tokens,
            "batch": self.batch,
            "steps": self.steps,
            "graphs": [report_to_dict(r) for r in self.reports],
            "graph_breaks": dict(self.graph_breaks),
            "frames": [{"compile_id": f.compile_id, "function": f.function, "recompile_reason": f.recompile_reason,
                        "fail_reason": f.fail_reason} for f in self.frames],
            "recompiles": len(self.recompiles),
            "unique_graphs": self.unique_graphs,
        }

    def to_html(self, path: str | Path) -> Path:
        """Write one self-contained HTML page (no scripts, no external files): the summary, per graph a table of
        its sites and their outcomes and the graph's code before and after the passes side by side (changed lines
        marked, ``difflib.HtmlDiff``), then the graph breaks and recompiles.

        Returns:
            the path written.
        Raises:
            OSError: the file cannot be written.
        """
        esc = html.escape
        body = ["<h1>nqcompile graph diff</h1>"] + [f"<p>{esc(line)}</p>" for line in self._summary()]
        for report in self.reports:
            body.append(f'<h2 id="graph-{report.graph}">{esc(_graph_title(report))}</h2>')
            body.append('<table class="sites"><tr><th>module</th><th>site</th><th>kind</th><th>target</th><th>outcome</th></tr>')
            for o in site_outcomes(report):
                cls = "left" if o.status == "left alone" else "done"
                body.append(f'<tr class="{cls}"><td>{esc(o.module)}</td><td>{esc(o.node)}</td><td>{esc(o.kind)}</td><td>{esc(o.target)}</td>'
                            f"<td>{esc(o.describe())}</td></tr>")
            body.append("</table>")
            body.append(f"<p>passes: {esc(_pass_counts(report))}</p>")
            same = " (identical)" if report.code_after == report.code_before else ""
            body.append(f"<h3>code before and after the passes{same}</h3>")
            body.append(difflib.HtmlDiff(tabsize=4, wrapcolumn=110).make_table(
                report.code_before.splitlines(), report.code_after.splitlines(),
                f"graph {report.graph} before the passes", f"graph {report.graph} after the passes"))
        if not self.reports:
            body.append("<p>no graph reached the nexusquant backend</p>")
        body.append(f"<h2>graph breaks ({sum(self.graph_breaks.values())})</h2><ul>")
        body += [f"<li>{n} &times; {esc(reason)}</li>" for reason, n in self.graph_breaks.items()]
        body.append(f"</ul><h2>recompiles ({len(self.recompiles)})</h2><ul>")
        body += [f"<li>{esc(f.compile_id)} {esc(f.function)}: {esc(str(f.recompile_reason))}</li>"
                 for f in self.recompiles]
        body.append("</ul>")
        head = (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>nqcompile graph diff: {esc(self.model)}'
                f"</title><style>{_CSS}</style></head><body>\n")
        page = head + "\n".join(body) + "\n</body></html>\n"
        path = Path(path)
        path.write_text(page, encoding="utf-8")
        return path


_CSS = """
body { font-family: sans-serif; margin: 1em 2em; }
table.sites { border-collapse: collapse; margin-bottom: 0.5em; }
table.sites td, table.sites th { border: 1px solid #ccc; padding: 2px 8px; text-align: left; font-size: 90%; }
table.sites tr.left td { background: #fff8e0; }
table.sites tr.done td { background: #e6ffe6; }
table.diff { font-family: monospace; font-size: 80%; border: 1px solid #ccc; border-collapse: collapse; }
table.diff td { padding: 0 4px; vertical-align: top; white-space: pre-wrap; }
.diff_header { background: #e0e0e0; } td.diff_header { text-align: right; }
.diff_next { background: #c0c0c0; }
.diff_add { background: #aaffaa; } .diff_chg { background: #ffff77; } .diff_sub { background: #ffaaaa; }
"""


def _graph_title(report: CompileReport) -> str:
    counts = ", ".join(f"{report.counts[kind]} {kind}" for kind in SITE_KINDS if report.counts.get(kind))
    state = "compressed-cache ops" if report.prepared else "no compressed-cache ops"
    if report.simulated:
        state += ", simulated (quantize-dequantize)"
    return f"graph {report.graph} ({state}; {counts or 'no sites'})"


def _pass_counts(report: CompileReport) -> str:
    return ", ".join(f"{name} {n}" for name, n in report.pass_counts.items()) or "none ran"


def graph_diff(model: torch.nn.Module, preset=None, *, input_ids: torch.Tensor | None = None,
               prompt_tokens: int = 64, steps: int = 4, mode: str | None = None,
               options: dict[str, Any] | None = None, tokenizer=None,
               progress: Callable[[str], None] | None = None) -> GraphDiff:
    """Compile a model's decode step with the ``nexusquant`` backend and report what it did to every graph.

    The prompt is prefilled eagerly (with re-reading when the preset's scorer asks for it); then ``steps`` greedy
    decode steps run through ``torch.compile(model.forward, backend="nexusquant", fullgraph=False, mode=mode,
    options=options)``. Dynamo's caches are cleared first (``torch._dynamo.reset()``) so that every graph of the
    step is captured and reported: code compiled earlier in the process is compiled again on its next call.

    Which cache the decode runs with:

    * a model prepared by :func:`nqcompile.optimize` (it has ``nqcompile_preset``): a
      :class:`~nqcompile.NexusCache` with the model's own preset; ``preset`` must then be None or that preset;
    * an unprepared model and a ``preset``: the model is prepared here with ``nqcompile.optimize(model, preset,
      tokenizer=tokenizer)`` (in place, as ``optimize`` does; ``GraphDiff.prepared_here`` says so), then as above;
    * an unprepared model and ``preset=None``: a plain ``DynamicCache``; the sites are listed and left alone
      (the backend also warns, once per process, naming ``nqcompile.optimize``).

    Args:
        model: a HuggingFace causal LM.
        preset: a preset name from :data:`nqcompile.PRESETS`, a :class:`~nqcompile.Preset`, or None.
        input_ids: ``[B, L]`` int64 prompt ids; default ``[1, prompt_tokens]`` ids drawn uniformly from the
            vocabulary with a fixed seed.
        prompt_tokens: prompt length when ``input_ids`` is not given (>= 1).
        steps: decode steps to compile and run (>= 1).
        mode, options: ``torch.compile``'s ``mode`` and ``options``, handed to the backend.
        tokenizer: the model's tokenizer, for a preset that keeps line breaks (``"balanced"``) on an
            unprepared model (:func:`nqcompile.optimize` needs it).
        progress: called with a short line before the prefill, before the compiled steps and after them (e.g.
            ``print``).

    Returns:
        a :class:`GraphDiff`.

    Raises:
        ValueError: ``steps`` or ``prompt_tokens`` below 1, ``input_ids`` not 2-D, or a ``preset`` that differs
            from the one a prepared model already has; from :func:`nqcompile.optimize`: an unsupported model, an
            unknown preset, or a preset that keeps line breaks without ``tokenizer``.
        TypeError: ``preset`` neither a name, a :class:`~nqcompile.Preset` nor None.
    """
    from ..api import optimize
    from ..cache import NexusCache
    from ..models import cache_kwarg_name
    from ..presets import get_preset

    if steps < 1 or prompt_tokens < 1:
        raise ValueError(f"steps and prompt_tokens must be >= 1, got steps={steps}, prompt_tokens={prompt_tokens}")
    prepared_here = False
    chosen = getattr(model, "nqcompile_preset", None)
    if chosen is not None and preset is not None and get_preset(preset) != chosen:
        raise ValueError(f"the model was prepared with preset {chosen.name!r}; pass preset=None to use it, or "
                         "call nqcompile.optimize(model, preset) first to change it")
    if chosen is None and preset is not None:
        optimize(model, preset, tokenizer=tokenizer)
        chosen, prepared_here = model.nqcompile_preset, True
    device = next(model.parameters()).device
    if input_ids is None:
        vocab = model.config.get_text_config(decoder=True).vocab_size
        input_ids = torch.randint(0, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
    input_ids = input_ids.to(device)
    batch, length = input_ids.shape
    if chosen is None:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
    else:
        cache = NexusCache(model.config, chosen, max_cache_len=length + steps + 1)
    kw = cache_kwarg_name(model)

    torch._dynamo.reset()
    reports_before = len(last_reports())
    breaks_before = Counter(counters["graph_break"])
    graphs_before = counters["stats"]["unique_graphs"]
    metrics_before = get_compilation_metrics()
    seen = {id(m) for m in metrics_before}
    step = torch.compile(model.forward, backend="nexusquant", fullgraph=False, mode=mode, options=options)
    with torch.no_grad():
        if progress:
            progress(f"prefill: {batch} x {length} tokens, eager")
        out = model(input_ids, **{kw: cache})
        if getattr(cache, "awaiting_reconstruction", False):
            cache.reconstruct(model, input_ids)
        token = out.logits[:, -1:].argmax(-1)
        if progress:
            progress(f"compiling the decode step (backend nexusquant, mode {mode or 'default'}) and running "
                     f"{steps} steps")
        start = time.perf_counter()
        for _ in range(steps):
            token = step(token, **{kw: cache}).logits[:, -1:].argmax(-1)
        if progress:
            progress(f"compiled and ran in {time.perf_counter() - start:.1f} s")
    breaks = Counter(counters["graph_break"])
    breaks.subtract(breaks_before)
    frames = tuple(FrameCompile(str(m.compile_id), str(m.co_name), m.recompile_reason, m.fail_reason)
                   for m in get_compilation_metrics() if id(m) not in seen)
    return GraphDiff(
        model=type(model).__name__,
        preset=None if chosen is None else chosen.name,
        prepared_here=prepared_here,
        mode=mode,
        options=dict(options or {}),
        prompt_tokens=length,
        batch=batch,
        steps=steps,
        reports=tuple(last_reports()[reports_before:]),
        graph_breaks={reason: n for reason, n in breaks.items() if n > 0},
        frames=frames,
        unique_graphs=counters["stats"]["unique_graphs"] - graphs_before,
    )
