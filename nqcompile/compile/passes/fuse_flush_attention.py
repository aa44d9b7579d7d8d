"""Pass ``fuse_flush_attention``: the window flush's quantize-on-write and the attention in one op.

Pattern (a decode step, :func:`nqcompile.cache.tiers.decode_steps`: the window's oldest block is coded into the
code buffers, then the step's attention reads those buffers)::

    nqcompile::write_kv(k_codes, k_scales, v_codes, v_scales, key, value, positions, dest, count, codec)
    ...                                   # position and length bookkeeping; nothing reads the code buffers
    out = nqcompile::cache_attention(query, k_codes[:, :, :C], ...)   # or nqcompile::dequant_attention

Replacement::

    ...
    out = nqcompile::cache_attention(query, k_codes, ..., new_k=key, new_v=value, new_pos=positions,
                                     new_dest=dest', new_count=count', codec)

where ``dest'`` and ``count'`` (and any other write argument that the bookkeeping in between updates in place,
such as the code length) are copies taken where the write was. The write moves to the attention, so a kernel can
quantize the flushed block and attend in one launch.

When the graph is compiled for CUDA graphs (``mode="reduce-overhead"``) the pass fuses only where the fused op
runs Triton kernels for both halves on CUDA (:func:`nqcompile.ops.cuda.write_kernel_reason` and
:func:`~nqcompile.ops.cuda.decode_kernel_reason` on the traced shapes): they read nothing back to the host, so the
fused op is captured with the rest of the step. Elsewhere the torch reference of the quantize-on-write cannot be
captured (it sizes its search by the data and skips empty writes on the host), so the fused op would take the
attention out of the CUDA graph with it; the write then stays its own op (tagged ``cudagraph_unsafe``), run between
CUDA-graph partitions.
"""

from __future__ import annotations

import torch

from ...ops import fused  # noqa: F401  (registers nqcompile::cache_attention)
from ..report import Rewrite
from .base import SITE_META, NexusPass, full_view_base, is_op, mutated_between, op_args, used_between

__all__ = ["FuseFlushAttention"]

_BUFFERS = ("k_codes", "k_scales", "v_codes", "v_scales")
_CODEC = ("hadamard", "inv_freq", "norm_mean", "norm_scale", "kind", "key_bits", "value_bits", "attention_scaling",
          "rotary_dim", "layout")
_WRITE_DATA = ("key", "value", "positions", "dest", "count")
_ATTENTION = ("nqcompile::cache_attention", "nqcompile::dequant_attention")
#: The reason given for an attention site left alone because the graph is compiled for CUDA graphs.
CUDAGRAPH_REASON = ("compiled for CUDA graphs and {why}: the reference quantize-on-write cannot be captured, so the "
                    "flush write stays its own op between CUDA-graph partitions and the attention stays in the graph")


class FuseFlushAttention(NexusPass):
    """The ``fuse_flush_attention`` pass (module docstring).

    Args:
        cudagraphs: the graph is compiled for CUDA graphs (then nothing is fused, each attention site reports why).
    """

    name = "fuse_flush_attention"

    def __init__(self, *, cudagraphs: bool = False) -> None:
        super().__init__()
        self.cudagraphs = cudagraphs

    def match(self, node):
        if not is_op(node, *_ATTENTION):
            return None
        a = op_args(node)
        if a.get("new_k") is not None:
            return None  # already carries its write
        views = [a[name] for name in _BUFFERS]
        buffers = [full_view_base(view) for view in views]
        if None in buffers:
            return "it reads only part of the code buffers (an eager step over the held slots)"
        write = node.prev
        while write.op != "root" and not (is_op(write, "nqcompile::write_kv") and op_args(write)["k_codes"] is buffers[0]):
            write = write.prev
        if write.op == "root":
            return "no flush into its code buffers precedes it in the graph"
        w = op_args(write)
        if [w[name] for name in _BUFFERS] != buffers:
            return "the write before it fills other buffers than the ones it reads"
        if any(w[name] is not a[name] if isinstance(w[name], torch.fx.Node) else w[name] != a[name]
               for name in _CODEC):
            return "the write before it codes with other parameters than the ones it reads with"
        allowed = set(views)
        for buffer in buffers:
            other = used_between(buffer, write, node, allowed)
            if other is not None:
                return f"{other.name} uses the code buffers between the write and the attention"
        if self.cudagraphs:
            why = _kernel_reason(a, w)
            if why is not None:
                return CUDAGRAPH_REASON.format(why=why)
        return write

    def replace(self, graph, node, write):
        a, w = op_args(node), op_args(write)
        data = {}
        for name in _WRITE_DATA:
            value = w[name]
            if mutated_between(value, write, node):
                with graph.inserting_before(write):
                    value = graph.call_method("clone", (value,))
            data[name] = value
        buffers = [w[name] for name in _BUFFERS]
        warm = ([a[name] for name in ("warm_k_codes", "warm_k_scales", "warm_v_codes", "warm_v_scales", "warm_pos",
                                      "warm_mask", "warm_offset", "warm_bits")]
                if "warm_k_codes" in a else [None] * 6 + [0, 0])
        with graph.inserting_before(node):
            fused_node = graph.call_function(torch.ops.nqcompile.cache_attention.default, (
                a["query"], *buffers, a["code_pos"], a["code_len"], *warm, a["exact_k"], a["exact_v"],
                a["exact_mask"], *(data[name] for name in _WRITE_DATA), *(a[name] for name in _CODEC), a["scaling"]))
        fused_node.meta.update(node.meta)
        fused_node.meta[SITE_META] = node.meta.get(SITE_META, node.name)
        node.replace_all_uses_with(fused_node)
        graph.erase_node(node)
        for view in {a[name] for name in _BUFFERS}:
            if view not in buffers and not view.users:
                graph.erase_node(view)
        graph.erase_node(write)
        return Rewrite(self.name, fused_node.meta[SITE_META], "nqcompile::cache_attention", (write.name,))


def _kernel_reason(attention: dict, write: dict) -> str | None:
    """Why the fused op of this attention and write would not run the Triton kernels on CUDA (so it could not be
    captured in a CUDA graph), or None when it would; read from the traced (fake) tensors' shapes and dtypes."""
    from ...ops import cuda as ops_cuda

    def val(x):
        return x.meta.get("val") if isinstance(x, torch.fx.Node) else x

    query = val(attention["query"])
    if query is None or query.device.type != "cuda":
        return "the step does not run on CUDA"
    codec = {name: val(write[name]) for name in _CODEC}
    bits = (codec["key_bits"], codec["value_bits"])
    why = ops_cuda.write_kernel_reason(val(write["k_codes"]), val(write["k_scales"]), val(write["key"]),
                                       codec["kind"], bits, codec["hadamard"].shape[0], codec["rotary_dim"],
                                       codec["layout"], codec["inv_freq"])
    if why is not None:
        return f"the write runs the torch reference ({why})"
    warm = val(attention.get("warm_mask"))
    bits = bits + ((attention["warm_bits"],) if warm is not None else ())
    why = ops_cuda.decode_kernel_reason(query, val(write["k_codes"]).shape[1], val(attention["code_len"]),
                                        val(attention["exact_mask"]), codec["kind"], bits, codec["rotary_dim"],
                                        codec["layout"], codec["inv_freq"], warm)
    return None if why is None else f"the attention runs the torch reference ({why})"
