"""Pass ``fuse_warm_attention``: decode the warm tier inside the attention instead of before it.

Pattern (a decode step of a layer with a warm tier, :func:`nqcompile.cache.tiers.decode_steps`)::

    tier = nqcompile::dequant_kv(warm codes, warm positions, codec at warm_bits)
    out = nqcompile::dequant_attention(query, codes, ..., exact_k=cat([sinks_k, tier[0], stream_k], 2),
                                       exact_v=cat([sinks_v, tier[1], stream_v], 2),
                                       exact_mask=cat([sinks_mask, warm_mask, stream_mask], 2), codec, scale)

Replacement::

    out = nqcompile::cache_attention(query, codes, ..., warm codes, warm positions, warm_mask,
                                     exact_k=cat([sinks_k, stream_k], 2), ...)

so the warm tier is read from its codes by the attention (in registers, in the kernel) and never exists in float
in memory. When the decoded tier has other users that only read its first ``n`` tokens (the block a flush codes
into the code buffers), the ``dequant_kv`` is shrunk to decode those ``n`` tokens only.
"""

from __future__ import annotations

import operator

import torch

from ...ops import fused  # noqa: F401  (registers nqcompile::cache_attention)
from ..report import Rewrite
from .base import SITE_META, NexusPass, is_op, op_args, static_size, token_prefix

__all__ = ["FuseWarmAttention"]

_CODEC = ("hadamard", "inv_freq", "norm_mean", "norm_scale")
_TRANSFORM = ("kind", "attention_scaling", "rotary_dim", "layout")


def _cat_parts(node, dims=(2,)) -> list | None:
    """The tensors of ``torch.cat(parts, dim)`` along one of ``dims`` (negative dims counted on a 3-D mask)."""
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is torch.cat):
        return None
    parts = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return list(parts) if dim in dims else None


def _output_of(node, index: int):
    """The node ``x`` when ``node`` is ``x[index]`` (an output of a multi-output op)."""
    if isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is operator.getitem \
            and node.args[1] == index:
        return node.args[0]
    return None


class FuseWarmAttention(NexusPass):
    """The ``fuse_warm_attention`` pass (module docstring)."""

    name = "fuse_warm_attention"

    def match(self, node):
        if not is_op(node, "nqcompile::dequant_attention"):
            return None
        a = op_args(node)
        ks, vs, ms = _cat_parts(a["exact_k"]), _cat_parts(a["exact_v"]), _cat_parts(a["exact_mask"], (2, -1))
        if ks is None or vs is None or ms is None or not len(ks) == len(vs) == len(ms):
            return "its exact segment is not a concatenation of parallel key, value and mask parts"
        for i, (k, v) in enumerate(zip(ks, vs)):
            source = _output_of(k, 0)
            if not is_op(source, "nqcompile::dequant_kv") or _output_of(v, 1) is not source:
                continue
            d = op_args(source)
            if any(d[name] is not a[name] for name in _CODEC) or any(d[name] != a[name] for name in _TRANSFORM) \
                    or d["key_bits"] != d["value_bits"]:
                return "the decoded tokens in its exact segment are not this layer's warm tier"
            offset = [static_size(part, 2) for part in ks[:i]]
            if None in offset:
                return "the exact tokens before the warm tier have no static length"
            return i, source, ks, vs, ms, sum(offset)
        return "no warm tier is decoded into its exact segment"

    def replace(self, graph, node, found):
        i, source, ks, vs, ms, offset = found
        a, d = op_args(node), op_args(source)
        old_cats = [a["exact_k"], a["exact_v"], a["exact_mask"]]
        with graph.inserting_before(node):
            cat_k, cat_v, cat_m = (graph.call_function(torch.cat, (parts[:i] + parts[i + 1:], 2))
                                   for parts in (ks, vs, ms))
            fused_node = graph.call_function(torch.ops.nqcompile.cache_attention.default, (
                a["query"], a["k_codes"], a["k_scales"], a["v_codes"], a["v_scales"], a["code_pos"], a["code_len"],
                d["k_codes"], d["k_scales"], d["v_codes"], d["v_scales"], d["positions"], ms[i], offset,
                d["key_bits"], cat_k, cat_v, cat_m, None, None, None, None, None,
                *(a[name] for name in ("hadamard", "inv_freq", "norm_mean", "norm_scale", "kind", "key_bits",
                                       "value_bits", "attention_scaling", "rotary_dim", "layout", "scaling"))))
        fused_node.meta.update(node.meta)
        fused_node.meta[SITE_META] = node.meta.get(SITE_META, node.name)
        node.replace_all_uses_with(fused_node)
        graph.erase_node(node)
        for cat in old_cats:
            if not cat.users:
                graph.erase_node(cat)
        name, tokens = source.name, static_size(d["k_codes"], 2)
        shrunk = self._shrink(graph, source)
        note = f"{name} now decodes only the {shrunk} tokens the flush codes, of {tokens}" if shrunk else ""
        return Rewrite(self.name, fused_node.meta[SITE_META], "nqcompile::cache_attention", (name,), note)

    @staticmethod
    def _shrink(graph, source) -> int | None:
        """Erase ``source`` (a ``dequant_kv``) if nothing else reads it, or make it decode only the first ``n``
        tokens when every other reader takes ``[:, :, :n]`` of it. Returns ``n`` if it did the latter."""
        outputs = list(source.users)
        readers = [user for out in outputs for user in out.users]
        if not readers:
            for out in outputs:
                graph.erase_node(out)
            graph.erase_node(source)
            return None
        prefixes = [token_prefix(user) for user in readers]
        stops = {prefix[1] for prefix in prefixes if prefix is not None}
        if None in prefixes or len(stops) != 1 or None in stops:
            return None
        n = stops.pop()
        tokens = (slice(None), slice(None), slice(None, n))
        with graph.inserting_before(source):
            sliced = [graph.call_function(operator.getitem, (x, tokens)) for x in source.args[:5]]
            small = graph.call_function(source.target, (*sliced, *source.args[5:]), dict(source.kwargs))
            small_out = [graph.call_function(operator.getitem, (small, j)) for j in range(2)]
        small.meta.update({k: v for k, v in source.meta.items() if k != "example_value"})
        for user in readers:
            user.replace_all_uses_with(small_out[user.args[0].args[1]])
            graph.erase_node(user)
        for out in outputs:
            graph.erase_node(out)
        graph.erase_node(source)
        return n
