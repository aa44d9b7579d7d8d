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
        RuntimeError: the model was not prepared by :func:`nqcompile.optimize` (no ``nqcompile_cache`` argument:
            a NexusCache would then be left unread, silently).
        NotImplementedError: ``output_attentions=True`` or dropout on a compressed layer.
        RuntimeError: gradients enabled on a compressed layer (inference only: use ``torch.no_grad()``).
    """
    if CACHE_KWARG not in kwargs:
        raise RuntimeError("the nexusquant attention runs in models prepared by nqcompile.optimize(model, preset), "
                           "whose forward hands the NexusCache to it; call optimize instead of setting the "
                           "attention implementation by hand (and call the model, not its inner base model)")
    cache = kwargs.pop(CACHE_KWARG)
    layer = cache.layers[module.layer_idx] if isinstance(cache, NexusCache) else None
    if not isinstance(layer, NexusLayer):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
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
