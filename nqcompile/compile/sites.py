"""Attention and cache-update sites of a Dynamo-captured FX graph.

The backend looks at the graph Dynamo hands it (before AOT autograd renames or decomposes anything), so the
sites are the calls a model's Python code made:

* ``dequant_attention``: ``nqcompile::dequant_attention`` / ``dequant_attention_lse``, the attention of a model
  prepared by :func:`nqcompile.optimize` over a :class:`~nqcompile.NexusCache`;
* ``cache_write``: ``nqcompile::write_kv`` (quantize-on-write into the code buffers);
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``, the attention of an unprepared model;
* ``cache_update``: ``index_copy_`` / ``index_put_`` / ``torch.cat`` on the key/value path of an unprepared
  model's cache (transformers' ``StaticCache`` and ``DynamicCache``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["Site", "find_sites", "SITE_KINDS"]

_NEXUS_OPS = {
    "nqcompile::dequant_attention": "dequant_attention",
    "nqcompile::dequant_attention_lse": "dequant_attention",
    "nqcompile::write_kv": "cache_write",
}
_CACHE_UPDATE_METHODS = {"index_copy_", "index_put_"}
#: Every kind of site, in report order.
SITE_KINDS = ("dequant_attention", "cache_write", "sdpa", "cache_update")


@dataclass(frozen=True)
class Site:
    """One site of a graph.

    Attributes:
        kind: one of :data:`SITE_KINDS`.
        node: the FX node's name.
        target: what the node calls, as text.
    """

    kind: str
    node: str
    target: str


def _op_name(target) -> str | None:
    """``"namespace::name"`` of an op overload or packet, else None."""
    schema = getattr(target, "_schema", None)
    if schema is not None:
        return schema.name
    packet = getattr(target, "_qualified_op_name", None)
    return packet


def find_sites(gm: torch.fx.GraphModule) -> list[Site]:
    """The attention and cache-update sites of ``gm`` (a Dynamo-captured graph), in graph order."""
    sites = []
    for node in gm.graph.nodes:
        kind = None
        if node.op == "call_function":
            name = _op_name(node.target)
            if name in _NEXUS_OPS:
                kind = _NEXUS_OPS[name]
            elif node.target is F.scaled_dot_product_attention:
                kind = "sdpa"
            elif node.target is torch.cat and _on_kv_path(node):
                kind = "cache_update"
        elif node.op == "call_method" and node.target in _CACHE_UPDATE_METHODS:
            kind = "cache_update"
        if kind is not None:
            sites.append(Site(kind, node.name, getattr(node.target, "__name__", str(node.target))))
    return sites


def _on_kv_path(node: torch.fx.Node) -> bool:
    """Whether a ``torch.cat`` feeds an attention call (a ``DynamicCache`` appending keys or values)."""
    return any(user.op == "call_function" and user.target is F.scaled_dot_product_attention for user in node.users)
