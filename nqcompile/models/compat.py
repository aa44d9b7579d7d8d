"""Shims over the transformers versions nqcompile supports (5.17 on the GPU machine, 5.2x elsewhere)."""

from __future__ import annotations

import inspect

__all__ = ["cache_kwarg_name"]


def cache_kwarg_name(model) -> str:
    """Return the keyword a model's ``forward`` takes its KV cache under.

    transformers renamed ``past_key_values`` to ``cache`` around 5.2x (the old name still works there
    but warns); 5.17 only knows ``past_key_values``. Use as ``model(ids, **{cache_kwarg_name(model): cache})``.
    (For ``generate``, pass ``past_key_values=``: the generate wrapper of ``nqcompile.optimize`` reads that name.)
    """
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
