"""Token eviction policy: scorers (one per file), their registry and the keep-set builder."""

from .base import TokenScorer
from .keep import layer_eviction_ratios, select_kept
from .key_diff import KeyDiffScorer
from .key_norm import KeyNormScorer
from .observation import ObservationScorer
from .registry import SCORERS, ScorerEntry, make_scorer

__all__ = ["TokenScorer", "KeyDiffScorer", "KeyNormScorer", "ObservationScorer", "layer_eviction_ratios", "select_kept",
           "SCORERS", "ScorerEntry", "make_scorer"]
