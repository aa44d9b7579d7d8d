"""The ``nexusquant`` ``torch.compile`` backend.

``torch.compile(model, backend="nexusquant")`` (registered through the ``torch_dynamo_backends`` entry point, so
no import of nqcompile is needed) hands each graph Dynamo captures to :func:`nexusquant`, which finds its attention
and cache-update sites (:func:`~nqcompile.compile.sites.find_sites`), records them (:func:`last_reports`) and
compiles the graph with Inductor's ``compile_fx`` under the settings of ``mode``. A graph of a model prepared by
:func:`nqcompile.optimize` holds the compressed-cache ops; a graph with attention but none of them is compiled
unchanged, with a warning (once per process) that names :func:`nqcompile.optimize`, or, with
``options={"simulate": True}``, with its keys and values passed through quantize-dequantize to study the codec's
effect on quality (:mod:`~nqcompile.compile.passes.simulate`; no memory saved).

On a prepared graph the passes of :mod:`nqcompile.compile.passes` then fold each compressed layer's decode step
(flush write, warm-tier decode, attention) into one ``nqcompile::cache_attention`` node. Every site no pass rewrote
is reported with the reason (:class:`~nqcompile.compile.report.LeftAlone`); the graph-diff tool
(:mod:`nqcompile.compile.diff`, ``nqcompile diff``) shows it all.
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any

import torch
from torch.fx.passes.graph_transform_observer import GraphTransformObserver

from .diff import emit_structured
from .passes import build_passes, run_passes
from .passes.simulate import simulate_kv
from .report import CompileReport, LeftAlone, next_index, record
from .sites import find_sites

__all__ = ["nexusquant"]

_WARNED = False
#: Keys of ``options`` that nqcompile reads (:func:`~nqcompile.compile.passes.simulate.simulate_kv`); the others
#: are Inductor config patches.
_NEXUS_OPTIONS = ("simulate", "preset")


def nexusquant(gm: torch.fx.GraphModule, example_inputs: list, *, mode: str | None = None,
               options: dict[str, Any] | None = None):
    """The ``nexusquant`` Dynamo backend: find the sites of ``gm``, rewrite them (a prepared graph), report, then
    compile with Inductor.

    Args:
        gm: the graph Dynamo captured. example_inputs: its example inputs.
        mode: ``torch.compile``'s mode (``"default"``, ``"reduce-overhead"``, ``"max-autotune"``, ...), mapped to
            Inductor settings by ``torch._inductor.list_mode_options``.
        options: Inductor config patches, applied over the mode's, and nqcompile's own keys: ``"simulate"``
            (True, or a preset name or :class:`~nqcompile.Preset`) has the attention of a model that was not
            prepared read its keys and values through quantize-dequantize at that preset's bits (``"preset"``
            names it when ``"simulate"`` is True; default ``"quant_only"``: 4-bit keys, 2-bit values), a quality
            study that saves no memory (:mod:`nqcompile.compile.passes.simulate`).

    Returns:
        the compiled callable.

    Raises:
        ValueError: an unknown mode (Inductor's message); ``"simulate"`` on a prepared model's graph, or with an
            exact or unknown preset.
    """
    global _WARNED
    inductor = dict(options or {})
    nexus = {key: inductor.pop(key) for key in _NEXUS_OPTIONS if key in inductor}
    simulate = bool(nexus.get("simulate"))
    patches = dict(torch._inductor.list_mode_options(mode)) if mode not in (None, "default") else {}
    patches.update(inductor)
    on_cuda = any(isinstance(x, torch.Tensor) and x.is_cuda for x in example_inputs)
    cudagraphs = on_cuda and bool(patches.get("triton.cudagraphs", torch._inductor.config.triton.cudagraphs))
    sites = tuple(find_sites(gm))
    counts = Counter(site.kind for site in sites)
    prepared = bool(counts["dequant_attention"] or counts["cache_write"])
    code_before = gm.code
    rewrites, reasons, pass_counts = [], {}, Counter()
    if simulate:
        with GraphTransformObserver(gm, "simulate"):
            rewrites = simulate_kv(gm, nexus)  # refuses a prepared graph
        pass_counts["simulate"] = 0
    elif prepared:
        passes = build_passes(cudagraphs=cudagraphs)
        rewrites, reasons = run_passes(gm, passes)
        pass_counts.update({p.name: 0 for p in passes})
    pass_counts.update(r.pass_name for r in rewrites)
    done = {r.site for r in rewrites} | {name for r in rewrites for name in r.fused}
    left_alone = tuple(LeftAlone(site.node, site.kind, reasons.get(site.node) or _reason(site, prepared, simulate))
                       for site in sites if site.node not in done)
    report = record(CompileReport(next_index(), sites, prepared, mode, dict(counts), tuple(rewrites), left_alone,
                                  dict(pass_counts), simulated=simulate, code_before=code_before, code_after=gm.code))
    emit_structured(report)  # the report as a structured-trace artifact, for tlparse
    attention = counts["sdpa"] + counts["eager_attention"]
    if not prepared and (attention or counts["cache_update"]) and not _WARNED:
        _WARNED = True
        fate = ("its attention reads keys and values through quantize-dequantize (options simulate: a quality "
                "study; everything is still stored in full precision, no memory is saved)") if simulate \
            else "it is compiled unchanged"
        warnings.warn(f"nexusquant: this graph has {attention} attention and {counts['cache_update']} cache-"
                      f"update sites but no compressed cache; {fate}. Prepare the model with "
                      "nqcompile.optimize(model, preset) and pass a NexusCache (generate builds one) to compress "
                      "its key/value cache", stacklevel=2)
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches=patches or None)


_UNPREPARED = ("the model was not prepared by nqcompile.optimize(model, preset) or not called with a NexusCache: "
               "its own cache and attention are compiled unchanged")
_SIMULATED = ("simulation: the model's own cache, which keeps keys and values in full precision (the attention "
              "reads them through quantize-dequantize)")
_PREPARED_REASONS = {
    "dequant_attention": "no pass rewrites this form (the re-reading's attention, which also returns each query's "
                         "log-sum-exp, stays nqcompile::dequant_attention_lse)",
    "cache_write": "a quantize-on-write that no attention reads right after (the warm tier's): it stays its own op",
    "sdpa": "a layer the NexusCache leaves uncompressed: transformers' own attention",
    "eager_attention": "a layer the NexusCache leaves uncompressed: transformers' own attention",
    "cache_update": "a layer the NexusCache leaves uncompressed: transformers' own cache update",
}


def _reason(site, prepared: bool, simulate: bool) -> str:
    """Why ``site`` is left alone when no pass said why."""
    if prepared:
        return _PREPARED_REASONS[site.kind]
    return _SIMULATED if simulate else _UNPREPARED
