"""``NexusCache`` (:mod:`.nexus_cache`) and its layers (:mod:`.layer`)."""

from .layer import NexusLayer
from .nexus_cache import CacheMemoryReport, NexusCache

__all__ = ["NexusCache", "CacheMemoryReport", "NexusLayer"]
