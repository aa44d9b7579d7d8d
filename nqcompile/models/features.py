"""Which attention features of a model config a :class:`~nqcompile.NexusCache` honours, and a clear refusal of the rest.

A compressed layer (:class:`~nqcompile.cache.layer.NexusLayer`) attends causally, with softmax over ``scaling * q.k``,
to every token it holds, with the queries, keys and values the model's attention module computed (so anything the
module does before the attention function is honoured: QK-norm, partial or per-layer RoPE, query scaling, biases).
Config fields that change the attention function itself are read here, once per cache, and either honoured or
refused with a ``ValueError`` that names the field and says what to do. ``docs/models.md`` has the audit table
(every such field of transformers 5.17-5.24, honoured or refused, and where); the attention function
(:mod:`nqcompile.attention`) refuses at run time what only shows there (learned sink logits, soft-capping, a mask
that is not causal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..presets import Preset
from .compat import cache_layer_types
from .rope_spec import RotarySpec

__all__ = ["LayerPlan", "WINDOW_FIELDS", "plan_layers"]

#: Layer types with a window, and the config field that holds it (tokens).
WINDOW_FIELDS = {"sliding_attention": "sliding_window", "chunked_attention": "attention_chunk_size"}
_ATTENTION_LAYER_TYPES = ("full_attention", *WINDOW_FIELDS)


@dataclass(frozen=True)
class LayerPlan:
    """How a :class:`~nqcompile.NexusCache` holds one layer of a model.

    Attributes:
        layer_type: transformers' type of the layer (``"full_attention"``, ``"sliding_attention"``,
            ``"chunked_attention"``).
        window: tokens a query may attend to (sliding) or the chunk size (chunked); ``None`` for full attention.
        rotary: the layer's :class:`~nqcompile.models.rope_spec.RotarySpec` when compressed, else ``None`` (the layer
            is left to transformers' own ``DynamicSlidingWindowLayer``).
    """

    layer_type: str
    window: int | None
    rotary: RotarySpec | None

    @property
    def compressed(self) -> bool:
        """Whether a :class:`~nqcompile.cache.layer.NexusLayer` holds this layer."""
        return self.rotary is not None


def _describe(text: Any) -> str:
    model_type = getattr(text, "model_type", "") or type(text).__name__
    return f"this model ({model_type})"


def _refuse_config_features(text: Any) -> None:
    """Raise for config fields a compressed layer cannot honour in any layer of this model."""
    what = _describe(text)
    softcap = getattr(text, "attn_logit_softcapping", None)
    if softcap:
        raise ValueError(f"{what} sets attn_logit_softcapping={softcap}: its attention scores pass through "
                         "softcap * tanh(score / softcap), which the nexusquant attention does not apply. nqcompile "
                         "refuses it rather than attend without the cap (Gemma 2 and VaultGemma cap every layer)")
    shared = getattr(text, "num_kv_shared_layers", None) or 0
    modes = getattr(text, "kv_sharing_modes", None) or ()
    if shared > 0 or "reuse" in modes:
        field = f"num_kv_shared_layers={shared}" if shared > 0 else "kv_sharing_modes"
        raise ValueError(f"{what} shares keys and values across layers ({field}; Gemma 3n / Gemma 4): its "
                         "later layers attend to the keys and values an earlier layer's cache update returns, "
                         "which a compressed layer does not return (it keeps codes). nqcompile does not support "
                         "cross-layer KV sharing")
    bidirectional = getattr(text, "use_bidirectional_attention", None)
    if bidirectional is True or bidirectional == "all":
        raise ValueError(f"{what} sets use_bidirectional_attention={bidirectional!r}: every token attends to the "
                         "tokens after it too, and the nexusquant attention is causal. Use the model without "
                         "nqcompile (a bidirectional encoder keeps no growing KV cache to compress)")
    declared = getattr(text, "layer_types", None) or ()
    other = sorted(set(declared) - set(_ATTENTION_LAYER_TYPES))
    if other:
        raise ValueError(f"{what} has layer_types {other} (linear-attention, state-space, sparse-indexed or MLP "
                         "layers), whose cache is not per-token keys and values that NexusCache could hold. "
                         f"NexusCache supports layers of types {list(_ATTENTION_LAYER_TYPES)}")


def plan_layers(config: Any, preset: Preset, *, max_cache_len: int | None,
                check_windows: bool = True) -> list[LayerPlan]:
    """Decide how a :class:`~nqcompile.NexusCache` holds each layer of a model, refusing what it cannot honour.

    Full-attention layers are compressed. A sliding-window layer (``sliding_window``; the layer types come from
    transformers' own reading of the config, :func:`~nqcompile.models.compat.cache_layer_types`) is compressed as a
    :class:`~nqcompile.cache.sliding.SlidingLayer`, which holds its window. A chunked layer (``attention_chunk_size``)
    is compressed only while its chunk cannot exclude any token, that is when ``max_cache_len <= chunk`` (a query then
    sees the whole cache, as a compressed layer does). With ``preset.compress_layers="global_only"`` both are left to
    transformers' cache.

    Args:
        config: the model's config (a composite config is reduced to its text decoder's).
        preset: the cache's :class:`~nqcompile.Preset` (``compress_layers``; its bits for the head_dim check).
        max_cache_len: logical capacity in tokens per sequence, or ``None`` (unbounded).
        check_windows: ``False`` to skip the chunk-length check (``optimize()`` validates a model before any
            length is known; the cache that ``generate`` builds checks it).

    Returns:
        one :class:`LayerPlan` per layer.

    Raises:
        ValueError: naming the config field: encoder-decoder models, ``attn_logit_softcapping``, cross-layer KV
            sharing (``num_kv_shared_layers``, ``kv_sharing_modes``), ``use_bidirectional_attention``,
            ``layer_types`` other than full / sliding / chunked attention, an ``attention_chunk_size`` shorter than
            ``max_cache_len`` (or no ``max_cache_len``) with ``compress_layers="all"``, a ``max_cache_len`` past the length where a ``dynamic`` or ``longrope`` rope
            changes its frequencies (``max_position_embeddings`` / ``original_max_position_embeddings``), and every
            rotary refusal of
            :meth:`~nqcompile.models.rope_spec.RotarySpec.from_config` (no RoPE, ALiBi, multi-head latent attention,
            ``mrope_section``, ...); a compressed layer's head_dim not a multiple of 8 with a quantized preset.
    """
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError("NexusCache supports decoder-only causal LMs; this config is encoder-decoder "
                         "(is_encoder_decoder=True)")
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    _refuse_config_features(text)
    kinds = cache_layer_types(text)
    plans = []
    for i, (layer_type, window) in enumerate(kinds):
        if window is not None and preset.compress_layers == "global_only":
            plans.append(LayerPlan(layer_type, window, None))
            continue
        if layer_type == "chunked_attention" and check_windows and (max_cache_len is None or max_cache_len > window):
            raise ValueError(_window_message(text, i, layer_type, window, max_cache_len,
                                             all_windowed=all(w is not None for _, w in kinds)))
        rotary = RotarySpec.from_config(text, layer_idx=i)
        limit = rotary.max_exact_length
        if max_cache_len is not None and limit is not None and max_cache_len > limit:
            raise ValueError(_rope_length_message(text, rotary, max_cache_len))
        if not preset.exact and rotary.head_dim % 8:
            raise ValueError(f"layer {i} has head_dim={rotary.head_dim}, not a multiple of 8, which the E8 codec "
                             "needs; use an exact preset (key_bits=None, value_bits=None)")
        plans.append(LayerPlan(layer_type, window, rotary))
    return plans


def _rope_length_message(text: Any, rotary: RotarySpec, max_cache_len: int) -> str:
    field = "max_position_embeddings" if rotary.rope_type == "dynamic" else "original_max_position_embeddings"
    return (f"{_describe(text)} has rope_type={rotary.rope_type!r}, whose frequencies change once the sequence passes "
            f"{field}={rotary.max_exact_length} tokens (transformers then re-rotates every cached key), which "
            f"compressed keys cannot follow; this cache has max_cache_len={max_cache_len}. Build it with "
            f"max_cache_len <= {rotary.max_exact_length} (generate: prompt + max_new_tokens <= "
            f"{rotary.max_exact_length + 1})")


def _window_message(text: Any, layer: int, layer_type: str, window: int, max_cache_len: int | None,
                    all_windowed: bool) -> str:
    field = WINDOW_FIELDS[layer_type]
    capacity = "no max_cache_len (unbounded)" if max_cache_len is None else f"max_cache_len={max_cache_len}"
    leave = (" (every layer of this model has a window, so nothing would then be compressed)" if all_windowed
             else "")
    return (f"{_describe(text)} has {field}={window}: a query of layer {layer} ({layer_type}) attends to the tokens "
            f"of its own {window}-token chunk only, while a compressed layer attends to every token it holds, so "
            f"NexusCache honours {field} only when it holds at most {window} tokens per sequence; this cache has "
            f"{capacity}. Build it with max_cache_len <= {window} (generate: prompt + max_new_tokens <= {window + 1}), "
            f"or pass compress_layers='global_only' to leave the {layer_type} layers to transformers' own cache{leave}")
