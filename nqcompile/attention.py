"""The ``nexusquant`` attention implementation, registered with transformers' ``AttentionInterface``.

Every attention module of a model calls ``cache.update(...)`` and then the attention function of
``config._attn_implementation`` on the tensors ``update`` returned, with the model's extra keyword arguments.
The forward that :func:`nqcompile.optimize` wraps passes the model's :class:`~nqcompile.NexusCache` as one of them
(:data:`CACHE_KWARG`), so no state travels outside the call: when the module's layer of that cache is a
:class:`~nqcompile.cache.layer.NexusLayer`, :func:`nexus_attention_forward` hands it the query and the new keys and
values; it attends over its packed codes, exact sinks, exact window and the new tokens through
``nqcompile::dequant_attention`` and then stores the new tokens. For any other cache layer (a plain
``DynamicCache``, a sliding-window layer left as it is) it is transformers' own SDPA attention.

The mask function registered under the same name with ``AttentionMaskInterface`` is transformers'
``sdpa_mask``: a compressed layer only reads from it which of the new tokens are padding.
"""

from __future__ import annotations

import weakref

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .cache import NexusCache, NexusLayer

__all__ = ["ATTN_IMPLEMENTATION", "CACHE_KWARG", "nexus_attention_forward", "register_attention"]

#: Name under which the attention and mask functions are registered.
ATTN_IMPLEMENTATION = "nexusquant"
#: The keyword argument that carries the model's :class:`~nqcompile.NexusCache` down to the attention function
#: (the forward that :func:`nqcompile.optimize` wraps adds it; transformers passes a model's extra keyword
#: arguments on to every attention call).
CACHE_KWARG = "nqcompile_cache"


def _new_token_flags(attention_mask: torch.Tensor | None, seen: torch.Tensor | int, batch: int, q_len: int,
                     device) -> torch.Tensor:
    """``[B, q]`` bool, False for padding among the new tokens, read off the 4D mask at each new token's own
    column (``seen + i``: the logical position of new token ``i``; ``seen`` may be a 0-d device tensor)."""
    if attention_mask is None:
        return torch.ones(batch, q_len, dtype=torch.bool, device=device)
    if attention_mask.dim() != 4:
        raise ValueError(f"nexusquant attention expects a 4D mask or None, got shape {tuple(attention_mask.shape)}")
    rows = attention_mask[:, 0, -q_len:]  # [B or 1, q, kv]
    column = (torch.arange(q_len, device=device) + seen).view(1, q_len, 1).expand(rows.shape[0], q_len, 1)
    diag = rows.gather(2, column)[..., 0]
    flags = diag if diag.dtype == torch.bool else diag == 0
    return flags.expand(batch, q_len)


def _refuse_unapplied_arguments(kwargs: dict) -> None:
    """Raise for an attention argument that neither the compressed attention nor transformers' SDPA function (used
    for every other cache layer) applies. transformers would not have run such a model with SDPA; a registered
    attention function is never checked that way, so the check is here."""
    for name, what in (("softcap", "logit soft-capping (attn_logit_softcapping)"),
                       ("s_aux", "learned attention-sink logits (the attention module's sinks)"),
                       ("sinks", "learned attention-sink logits (the attention module's sinks)"),
                       ("position_bias", "a relative position bias")):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"this model's attention asks for {what} ({name}=...), which the nexusquant "
                                      "attention does not apply; nqcompile cannot compress this model's cache "
                                      "(docs/models.md lists what it honours)")


def _refuse_unsupported(module: torch.nn.Module, layer: NexusLayer, kwargs: dict) -> None:
    """Raise for what a model asks of the attention function that a compressed layer would silently not do."""
    if kwargs.get("is_causal", getattr(module, "is_causal", True)) is False:
        raise NotImplementedError("this attention module is not causal (is_causal=False), and a compressed layer "
                                  "attends causally; nqcompile cannot compress this model's cache")
    window = kwargs.get("sliding_window")
    if layer.window is not None:
        if window is not None and window != layer.window:
            raise NotImplementedError(f"this layer attends within sliding_window={window}, and its NexusCache layer "
                                      f"holds a window of {layer.window} tokens: build the NexusCache from this "
                                      "model's config")
    elif window is not None and not layer.rereading and (layer.max_cache_len is None or layer.max_cache_len > window):
        raise NotImplementedError(f"this layer attends within sliding_window={window}, and its NexusCache layer "
                                  "attends to every token it holds (the config calls it a full-attention layer): "
                                  "build the NexusCache from this model's config, whose sliding-window layers hold "
                                  "their window")


#: The 4D masks :func:`_check_causal` passed, by ``id``: ``(weak reference, seen, window)``. Every layer of a forward
#: (of one layer type) gets the same mask, which is checked once; entries of masks freed since are dropped at the next
#: insertion.
_CAUSAL_CHECKED: dict[int, tuple[weakref.ref, int, int | None]] = {}


def _check_causal(attention_mask: torch.Tensor | None, real: torch.Tensor, seen: int, q_len: int,
                  window: int | None) -> None:
    """Raise unless the 4D mask lets each real new token see exactly the real new tokens up to itself, and within
    ``window`` tokens when the layer has one (what a compressed layer does): another window, a chunk boundary, a
    bidirectional block or any other pattern among the new tokens would otherwise be ignored. ``real``: ``[B, q]``;
    ``seen``: tokens held before them. Reads ``q_len ** 2`` mask entries, once per mask and ``seen``."""
    if attention_mask is None or q_len == 1:
        return
    checked = _CAUSAL_CHECKED.get(id(attention_mask))
    if checked is not None and checked[0]() is attention_mask and checked[1:] == (seen, window):
        return
    block = attention_mask[:, 0, -q_len:, seen:seen + q_len]  # [B or 1, q, q]
    visible = block if block.dtype == torch.bool else block == 0
    causal = torch.ones(q_len, q_len, dtype=torch.bool, device=block.device).tril()
    if window is not None:
        causal = causal.triu(1 - window)
    if ((visible != (causal & real[:, None, :])) & real[:, :, None]).any():
        raise NotImplementedError(
            "the attention mask of this forward does not let each new token see exactly the tokens up to itself (and "
            "within its sliding window, in a sliding-window layer): a chunk narrower than the input, a bidirectional "
            "block such as image tokens, or a custom 4D mask; a compressed layer attends causally to every token it "
            "holds. For a model with chunked layers pass compress_layers='global_only'; otherwise run this input "
            "without nqcompile")
    for key in [key for key, (ref, *_) in _CAUSAL_CHECKED.items() if ref() is None]:
        del _CAUSAL_CHECKED[key]
    _CAUSAL_CHECKED[id(attention_mask)] = (weakref.ref(attention_mask), seen, window)


def nexus_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            **kwargs) -> tuple[torch.Tensor, None]:
    """Attention over a :class:`~nqcompile.NexusCache` layer, or SDPA for any other cache.

    Args:
        module: the attention module (transformers passes itself).
        query: ``[B, Hq, q, D]``; key, value: ``[B, Hkv, q, D]`` as returned by the cache's ``update``.
        attention_mask: the 4D boolean mask from ``sdpa_mask`` (``[B, 1, q, kv]``) or ``None``.
        dropout: must be 0 for a compressed layer (inference only).
        scaling: softmax scale, default ``head_dim ** -0.5``.
        **kwargs: ``nqcompile_cache`` (:data:`CACHE_KWARG`: the model's cache, whose layer ``module.layer_idx``
            this call attends with) and ``position_ids`` (``[B or 1, q]``) are read; the others are passed to
            SDPA for plain layers.

    Returns:
        ``(attn_output [B, q, Hq, D], None)`` like transformers' attention functions.

    Raises:
        RuntimeError: no ``nqcompile_cache`` argument (a NexusCache would then be left unread, silently): the model
            was not prepared by :func:`nqcompile.optimize`, or its decoder layers do not pass keyword arguments on to
            their attention.
        NotImplementedError: logit soft-capping (``softcap``), learned sink logits (``s_aux`` / ``sinks``) or a
            position bias, on any layer; on a compressed layer, anything else it would ignore:
            ``output_attentions=True``, dropout, a non-causal module, a ``sliding_window`` other than the layer's
            (or any, shorter than ``max_cache_len``, on a full-attention layer), or a mask that is not causal (within
            the layer's window) over the new tokens (checked on multi-token inputs outside ``torch.compile``).
        RuntimeError: gradients enabled on a compressed layer (inference only: use ``torch.no_grad()``).
    """
    if CACHE_KWARG not in kwargs:
        raise RuntimeError("the nexusquant attention did not receive the model's cache: it runs in models prepared "
                           "by nqcompile.optimize(model, preset), whose forward hands the NexusCache to it, so call "
                           "optimize instead of setting the attention implementation by hand (and call the model, "
                           "not its inner base model). If you did, this model's decoder layers do not pass keyword "
                           "arguments on to their attention (StableLM does not), and nqcompile cannot serve it")
    cache = kwargs.pop(CACHE_KWARG)
    _refuse_unapplied_arguments(kwargs)
    layer = cache.layers[module.layer_idx] if isinstance(cache, NexusCache) else None
    if not isinstance(layer, NexusLayer):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    _refuse_unsupported(module, layer, kwargs)
    if dropout:
        raise NotImplementedError("nexusquant attention is inference-only; call model.eval()")
    if kwargs.get("output_attentions"):
        raise NotImplementedError("nexusquant attention does not return attention weights")
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        raise RuntimeError("nexusquant attention is inference-only (the compressed cache is not differentiable): run "
                           "the model under torch.no_grad() or torch.inference_mode(), as generate does")
    batch, _, q_len, head_dim = query.shape
    if not (torch.compiler.is_compiling() or layer.rereading):
        layer.check_room(q_len)  # before reading the mask at the new tokens' columns
    positions = kwargs.get("position_ids")
    if positions is None:
        positions = torch.arange(q_len, device=query.device)[None] + layer.get_seq_length()
    positions = positions.to(torch.int64).expand(batch, q_len)
    real = _new_token_flags(attention_mask, layer.get_seq_length(), batch, q_len, query.device)
    if q_len > 1 and not (torch.compiler.is_compiling() or layer.rereading):
        _check_causal(attention_mask, real, layer.seen_tokens(), q_len, layer.window)
    out = layer.attend(query, key, value, real=real, positions=positions,
                       scaling=scaling if scaling is not None else head_dim**-0.5)
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> str:
    """Register ``"nexusquant"`` with ``AttentionInterface`` and ``AttentionMaskInterface`` (idempotent).

    Returns:
        the implementation name to set as ``config._attn_implementation``.
    """
    AttentionInterface.register(ATTN_IMPLEMENTATION, nexus_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    return ATTN_IMPLEMENTATION
