"""nqcompile: compressed key/value cache for HuggingFace causal LMs (token eviction + E8 lattice codes).

Quick start::

    import nqcompile
    model = nqcompile.optimize(model, "balanced")
    out = model.generate(input_ids, max_new_tokens=64)

See :class:`NexusCache` for what is stored and :data:`PRESETS` for the named settings.
"""

from .api import compress_kv_cache, optimize
from .cache import CacheMemoryReport, NexusCache
from .presets import PRESETS, Preset, get_preset

__all__ = ["optimize", "compress_kv_cache", "NexusCache", "CacheMemoryReport", "PRESETS", "Preset", "get_preset"]
__version__ = "0.1.0"
