"""The ``nexusquant`` ``torch.compile`` backend.

``torch.compile(model, backend="nexusquant")`` (registered through the ``torch_dynamo_backends`` entry point, so
no import of nqcompile is needed) hands each graph Dynamo captures to :func:`nexusquant`, which finds its attention
and cache-update sites (:func:`~nqcompile.compile.sites.find_sites`), records them (:func:`last_reports`) and
compiles the graph with Inductor's ``compile_fx`` under the settings of ``mode``. A graph of a model prepared by
:func:`nqcompile.optimize` holds the compressed-cache ops; a graph with attention but none of them is compiled
unchanged, with a warning (once per process) that names :func:`nqcompile.optimize`.

This is the backend's first part: it finds and reports. The FX passes that rewrite and fuse the sites are next
(the compiled code is what the default Inductor backend produces today).
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any

import torch

from .diff import emit_structured
from .report import CompileReport, next_index, record
from .sites import find_sites

__all__ = ["nexusquant"]

_WARNED = False


def nexusquant(gm: torch.fx.GraphModule, example_inputs: list, *, mode: str | None = None,
               options: dict[str, Any] | None = None):
    """The ``nexusquant`` Dynamo backend: report the sites of ``gm``, then compile it with Inductor.

    Args:
        gm: the graph Dynamo captured. example_inputs: its example inputs.
        mode: ``torch.compile``'s mode (``"default"``, ``"reduce-overhead"``, ``"max-autotune"``, ...), mapped to
            Inductor settings by ``torch._inductor.list_mode_options``.
        options: Inductor config patches, applied over the mode's.

    Returns:
        the compiled callable.

    Raises:
        ValueError: an unknown mode (Inductor's message).
    """
    global _WARNED
    sites = tuple(find_sites(gm))
    counts = Counter(site.kind for site in sites)
    prepared = bool(counts["dequant_attention"] or counts["cache_write"])
    report = record(CompileReport(next_index(), sites, prepared, mode, dict(counts), code_before=gm.code,
                                  code_after=gm.code))
    emit_structured(report)  # the report as a structured-trace artifact, for tlparse
    if not prepared and (counts["sdpa"] or counts["cache_update"]) and not _WARNED:
        _WARNED = True
        warnings.warn(f"nexusquant: this graph has {counts['sdpa']} attention and {counts['cache_update']} cache-"
                      "update sites but no compressed cache; it is compiled unchanged. Prepare the model with "
                      "nqcompile.optimize(model, preset) and pass a NexusCache (generate builds one) to compress "
                      "its key/value cache", stacklevel=2)
    from torch._inductor.compile_fx import compile_fx

    patches = dict(torch._inductor.list_mode_options(mode)) if mode not in (None, "default") else {}
    patches.update(options or {})
    return compile_fx(gm, example_inputs, config_patches=patches or None)
