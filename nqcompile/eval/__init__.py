"""Quality evaluation of KV-cache compression: perplexity through the cache and needle recall.

Both follow the evaluation protocol of ``docs/design.md``: the prompt (or context) is prefilled in one chunk and
compressed at the end of it, and everything after it goes through the cache as generation would.
"""

from nqcompile.eval.needle import NeedleCase, NeedleResults, NeedleTrial, build_needle_case, needle_recall, run_needle_case
from nqcompile.eval.perplexity import (
    GENRES,
    BootstrapCI,
    Window,
    WindowResult,
    bootstrap_ci,
    continuation_nll,
    leading_special_ids,
    loglik_change,
    perplexity,
    perplexity_windows,
    ppl_change_percent,
    read_data_text,
    run_windows,
    window_nll,
    window_token_nll,
)

__all__ = [
    "GENRES",
    "BootstrapCI",
    "NeedleCase",
    "NeedleResults",
    "NeedleTrial",
    "Window",
    "WindowResult",
    "bootstrap_ci",
    "build_needle_case",
    "continuation_nll",
    "leading_special_ids",
    "loglik_change",
    "needle_recall",
    "perplexity",
    "perplexity_windows",
    "ppl_change_percent",
    "read_data_text",
    "run_needle_case",
    "run_windows",
    "window_nll",
    "window_token_nll",
]
