"""Token eviction policy: scorers (one per file) and the keep-set builder."""

from .base import TokenScorer
from .keep import layer_eviction_ratios, select_kept
from .key_diff import KeyDiffScorer
from .key_norm import KeyNormScorer
from .observation import ObservationScorer

__all__ = ["TokenScorer", "KeyDiffScorer", "KeyNormScorer", "ObservationScorer", "layer_eviction_ratios", "select_kept",
           "make_scorer"]


def make_scorer(name: str, *, observation_window: int = 32) -> TokenScorer:
    """Scorer for a preset's ``scorer`` field. Raises ValueError for an unknown name."""
    if name == "observation":
        return ObservationScorer(window=observation_window)
    if name == "key_norm":
        return KeyNormScorer()
    if name == "key_diff":
        return KeyDiffScorer()
    raise ValueError(f"unknown scorer {name!r}; use 'observation', 'key_norm' or 'key_diff'")
