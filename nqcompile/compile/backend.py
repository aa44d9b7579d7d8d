"""The ``nexusquant`` ``torch.compile`` backend.

``torch.compile(model, backend="nexusquant")`` (registered through the ``torch_dynamo_backends`` entry point, so
no import of nqcompile is needed) hands each graph Dynamo captures to :func:`nexusquant`, which finds its attention
and cache-update sites (:func:`~nqcompile.compile.sites.find_sites`), records them (:func:`last_reports`) and
compiles the graph with Inductor's ``compile_fx`` under the settings of ``mode``. A graph of a model prepared by
:func:`nqcompile.optimize` holds the compressed-cache ops; a graph with attention but none of them is compiled
unchanged, with a warning (once per process) that names :func:`nqcompile.optimize`, or, with
``options={"simulate": True}``, with its keys and values passed through quantize-dequantize to study the codec's
effect on quality (:mod:`~nqcompile.compile.passes.simulate`; no memory saved).

This is the backend's first part: it finds and reports. The FX passes that rewrite and fuse the sites are next
(the compiled code is what the default Inductor backend produces today).
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any

import torch

from .passes.simulate import simulate_kv
from .report import CompileReport, next_index, record
from .sites import find_sites

__all__ = ["nexusquant"]

_WARNED = False
#: Keys of ``options`` that nqcompile reads (:func:`~nqcompile.compile.passes.simulate.simulate_kv`); the others
#: are Inductor config patches.
_NEXUS_OPTIONS = ("simulate", "preset")


def nexusquant(gm: torch.fx.GraphModule, example_inputs: list, *, mode: str | None = None,
               options: dict[str, Any] | None = None):
    """The ``nexusquant`` Dynamo backend: report the sites of ``gm``, then compile it with Inductor.

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
    sites = tuple(find_sites(gm))
    counts = Counter(site.kind for site in sites)
    prepared = bool(counts["dequant_attention"] or counts["cache_write"])
    code_before = gm.code
    rewrites = tuple(simulate_kv(gm, nexus)) if simulate else ()
    record(CompileReport(next_index(), sites, prepared, mode, dict(counts), rewrites=rewrites,
                         pass_counts={"simulate": len(rewrites)} if simulate else {}, simulated=simulate,
                         code_before=code_before, code_after=gm.code))
    attention = counts["sdpa"] + counts["eager_attention"]
    if not prepared and (attention or counts["cache_update"]) and not _WARNED:
        _WARNED = True
        done = ("its attention reads keys and values through quantize-dequantize (options simulate: a quality "
                "study; everything is still stored in full precision, no memory is saved)") if simulate \
            else "it is compiled unchanged"
        warnings.warn(f"nexusquant: this graph has {attention} attention and {counts['cache_update']} cache-"
                      f"update sites but no compressed cache; {done}. Prepare the model with "
                      "nqcompile.optimize(model, preset) and pass a NexusCache (generate builds one) to compress "
                      "its key/value cache", stacklevel=2)
    from torch._inductor.compile_fx import compile_fx

    patches = dict(torch._inductor.list_mode_options(mode)) if mode not in (None, "default") else {}
    patches.update(inductor)
    return compile_fx(gm, example_inputs, config_patches=patches or None)
