"""The token scorers a preset may name: one :class:`ScorerEntry` per line of :data:`SCORERS`.

An entry holds the scorer class, or ``None`` when the model's re-reading of the chunk scores the tokens, and
what the scores need besides the keys: the prefill chunk's queries, or the model itself. Preset validation,
:func:`nqcompile.compress_kv_cache` and the ``generate`` wrapper of :func:`nqcompile.optimize` read these
abilities instead of comparing names. Adding a scorer is one line in :data:`SCORERS`;
``tests/test_policy_registry.py`` then checks it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .base import TokenScorer
from .key_diff import KeyDiffScorer
from .key_norm import KeyNormScorer
from .observation import ObservationScorer

__all__ = ["ScorerEntry", "SCORERS", "make_scorer"]


@dataclass(frozen=True)
class ScorerEntry:
    """One eviction scorer and what its scores need.

    Args:
        name: the value of ``Preset.scorer`` that selects it.
        scorer: a :class:`~nqcompile.policy.base.TokenScorer` subclass, which each layer calls on its chunk
            inside the attention call; or ``None``: the model re-reads the chunk
            (:meth:`nqcompile.NexusCache.reconstruct`, run by the hook :func:`nqcompile.optimize` installs) and
            a token's score is the attention that re-reading pays it (:mod:`nqcompile.policy.reconstruction`).
        needs_queries: the scores read the prefill chunk's queries, which only the attention call has (so not
            :func:`nqcompile.compress_kv_cache`).
        needs_model: the scores come from the model's re-reading (exactly when ``scorer`` is ``None``): the
            prompt must come as token ids (not ``inputs_embeds``), there must be a model (not
            :func:`nqcompile.compress_kv_cache`), and since the scores are compared across layers, one budget is
            shared by all of them (``layer_budget="uniform"`` only).

    Raises:
        ValueError: ``needs_model`` disagrees with ``scorer is None``.
    """

    name: str
    scorer: type[TokenScorer] | None
    needs_queries: bool
    needs_model: bool

    def __post_init__(self) -> None:
        if self.needs_model != (self.scorer is None):
            raise ValueError(
                f"scorer entry {self.name!r}: needs_model={self.needs_model} with scorer={self.scorer!r}; the cache "
                "scores either with a TokenScorer class (needs_model=False) or by the model's re-reading (scorer=None, "
                "needs_model=True)")


#: Scorer name -> entry. ``observation``: SnapKV (Li et al. 2024, arXiv:2404.14469); ``key_norm``: Devoto et al.
#: 2024 (arXiv:2406.11430); ``key_diff``: KeyDiff (Park et al. 2025, arXiv:2504.15364); ``reconstruction``: KVzip
#: (Kim et al. 2025, arXiv:2505.23416).
SCORERS: dict[str, ScorerEntry] = {entry.name: entry for entry in (
    ScorerEntry("observation", ObservationScorer, needs_queries=True, needs_model=False),
    ScorerEntry("key_norm", KeyNormScorer, needs_queries=False, needs_model=False),
    ScorerEntry("key_diff", KeyDiffScorer, needs_queries=False, needs_model=False),
    ScorerEntry("reconstruction", None, needs_queries=False, needs_model=True),
)}


def make_scorer(name: str, /, **options: Any) -> TokenScorer | None:
    """The scorer a preset's ``scorer`` field names, configured from preset fields.

    Args:
        name: a name in :data:`SCORERS`.
        **options: :class:`~nqcompile.Preset` fields by name (e.g. ``observation_window=32``, or all of them:
            ``**preset.to_dict()``); the scorer takes those its dataclass fields name and ignores the rest.

    Returns:
        A :class:`~nqcompile.policy.base.TokenScorer`, or ``None`` for an entry scored by the model's re-reading
        (``needs_model``).

    Raises:
        ValueError: unknown ``name`` (the message lists the registered ones).
    """
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; use one of {tuple(SCORERS)}")
    cls = SCORERS[name].scorer
    if cls is None:
        return None
    return cls(**{f.name: options[f.name] for f in dataclasses.fields(cls) if f.name in options})
