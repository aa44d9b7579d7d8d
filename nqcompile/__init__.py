"""nqcompile: compressed key/value cache for HuggingFace causal LMs (token eviction + E8 lattice codes).

Quick start::

    import nqcompile
    model = nqcompile.optimize(model, "balanced", tokenizer=tokenizer)
    out = model.generate(input_ids, max_new_tokens=64)

See :class:`NexusCache` for what is stored and :data:`PRESETS` for the named settings.

The names below are imported on first use (PEP 562), so that ``import nqcompile`` (and ``nqcompile --help``)
does not import torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["optimize", "compress_kv_cache", "NexusCache", "CacheMemoryReport", "PRESETS", "Preset", "get_preset"]
__version__ = "0.1.0"

_WHERE = {"optimize": ".api", "compress_kv_cache": ".api", "NexusCache": ".cache", "CacheMemoryReport": ".cache",
          "PRESETS": ".presets", "Preset": ".presets", "get_preset": ".presets"}
_SUBPACKAGES = {"api", "attention", "cache", "cli", "codec", "compile", "eval", "models", "ops", "policy", "presets"}

if TYPE_CHECKING:
    from .api import compress_kv_cache, optimize
    from .cache import CacheMemoryReport, NexusCache
    from .presets import PRESETS, Preset, get_preset


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name], __name__), name)
        globals()[name] = value
        return value
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'nqcompile' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *_SUBPACKAGES})
