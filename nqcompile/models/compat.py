"""Shims over the transformers versions nqcompile supports (5.17 on the GPU machine, 5.2x elsewhere)."""

from __future__ import annotations

import inspect

__all__ = ["cache_kwarg_name", "cache_layer_types"]


def cache_kwarg_name(model) -> str:
    """Return the keyword a model's ``forward`` takes its KV cache under.

    transformers renamed ``past_key_values`` to ``cache`` around 5.2x (the old name still works there
    but warns); 5.17 only knows ``past_key_values``. Use as ``model(ids, **{cache_kwarg_name(model): cache})``.
    (For ``generate``, pass ``past_key_values=``: the generate wrapper of ``nqcompile.optimize`` reads that name.)
    """
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_layer_types(text_config) -> list[tuple[str, int | None]]:
    """Each layer's type and window as transformers' ``DynamicCache(config=...)`` reads them.

    The types come from transformers' own ``get_layer_types_and_kwargs`` (``config.layer_types``, else
    ``"sliding_attention"`` in every layer when ``sliding_window`` is set, else ``"chunked_attention"`` when
    ``attention_chunk_size`` is, else ``"full_attention"``). The window, in tokens, is ``sliding_window`` for a
    sliding layer, ``attention_chunk_size`` for a chunked one (transformers keeps the last ``window - 1`` tokens of
    either) and ``None`` otherwise. 5.2x returns the windows per layer (heterogeneous configs); 5.17 one dict for
    all layers, whose single window would be the chunk size for both kinds, so there the config's fields are read.

    Args:
        text_config: the decoder's config (``config.get_text_config(decoder=True)``), without cross-layer KV
            sharing (5.17 drops the sharing layers from the list, 5.2x calls them ``"dummy"``).

    Returns:
        ``[(layer_type, window or None)]``, one entry per layer.
    """
    from transformers.cache_utils import get_layer_types_and_kwargs

    types, kwargs = get_layer_types_and_kwargs(text_config)
    if isinstance(kwargs, list):  # transformers >= 5.2x: one dict per layer
        windows = [layer_kwargs.get("sliding_window") for layer_kwargs in kwargs]
    else:
        fields = {"sliding_attention": "sliding_window", "chunked_attention": "attention_chunk_size"}
        windows = [getattr(text_config, fields[t]) if t in fields else None for t in types]
    return [(t, w if t in ("sliding_attention", "chunked_attention") else None) for t, w in zip(types, windows)]
