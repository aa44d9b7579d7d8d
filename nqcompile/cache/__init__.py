"""``NexusCache`` and what it is made of.

* :mod:`.nexus_cache`: the ``transformers.Cache`` (one layer per attention layer, the re-reading driver).
* :mod:`.layer`: ``NexusLayer``, transformers' cache-layer face of one compressed layer.
* :mod:`.sliding`: ``SlidingLayer``, a sliding-window layer's: exact recent tokens and a ring of code blocks.
* :mod:`.storage`: ``LayerStorage`` (every buffer and length) and ``CodecParams``.
* :mod:`.tiers`: the exact window, warm tier and window flush. :mod:`.compress`: chunk-end compression.
* :mod:`.reread`: chunks deferred for their re-reading (KVzip). :mod:`.memory`: the byte accounting.
"""

from .layer import NexusLayer
from .memory import CacheMemoryReport
from .nexus_cache import NexusCache
from .sliding import SlidingLayer

__all__ = ["NexusCache", "CacheMemoryReport", "NexusLayer", "SlidingLayer"]
