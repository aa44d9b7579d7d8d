"""Attention and cache-update sites of a Dynamo-captured FX graph.

The backend looks at the graph Dynamo hands it (before AOT autograd renames or decomposes anything), so the
sites are the calls a model's Python code made:

* ``dequant_attention``: ``nqcompile::dequant_attention`` / ``dequant_attention_lse``, the attention of a model
  prepared by :func:`nqcompile.optimize` over a :class:`~nqcompile.NexusCache`;
* ``cache_write``: ``nqcompile::write_kv`` (quantize-on-write into the code buffers);
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``, the attention of an unprepared model;
* ``eager_attention``: the matmul-softmax-matmul form of transformers' ``eager_attention_forward``
  (``softmax(q @ k.transpose(2, 3) * scaling + mask, dim=-1) @ v``, with any dtype cast, dropout and logit
  soft-capping between), one site per attention call;
* ``cache_update``: a write into the keys or values an attention site reads: ``index_copy_`` / ``index_put_``
  (transformers' ``StaticCache``), slice assignment (``cache[..., pos] = k``, an ``operator.setitem`` node) or
  ``torch.cat`` (``DynamicCache``).

An attention site (``sdpa``, ``eager_attention``) records the key and value tensors it reads, the GQA head repeat
in front of them (transformers' ``repeat_kv``: ``x[:, :, None].expand(...).reshape(...)``, folded into the site
rather than reported on its own), its mask and its softmax scale.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from numbers import Number

import torch
import torch.nn.functional as F
from torch.fx import Node

__all__ = ["Site", "find_sites", "SITE_KINDS", "op_name", "module_of"]

#: Every kind of site, in report order.
SITE_KINDS = ("dequant_attention", "cache_write", "sdpa", "eager_attention", "cache_update")

_NEXUS_OPS = {
    "nqcompile::dequant_attention": "dequant_attention",
    "nqcompile::dequant_attention_lse": "dequant_attention",
    "nqcompile::write_kv": "cache_write",
}
# In-place writes that return the tensor they write into.
_WRITE_METHODS = {"index_copy_", "index_put_"}
# Ops whose first argument is the tensor whose storage (or values, for casts) they pass on.
_PASS_METHODS = {"view", "reshape", "expand", "transpose", "permute", "contiguous", "narrow", "unsqueeze", "to",
                 *_WRITE_METHODS}
_PASS_FUNCTIONS = {operator.getitem, torch.narrow, torch.transpose, torch.reshape}
_MATMULS = {torch.matmul, operator.matmul}
_SOFTMAXES = {F.softmax, torch.softmax}
_DROPOUTS = {F.dropout, torch.dropout}
# What may lie between the ``q @ k^T`` matmul and the softmax: scale, mask add, soft-capping, casts.
_SCORE_FUNCTIONS = {operator.add, operator.mul, operator.truediv, torch.add, torch.mul, torch.div, torch.tanh}
_SCORE_METHODS = {"add", "mul", "div", "tanh", "to", "float", "type_as"}
_CASTS = {"to", "float", "type_as"}
_SEARCH_DEPTH = 8


@dataclass(frozen=True)
class Site:
    """One site of a graph.

    Attributes:
        kind: one of :data:`SITE_KINDS`.
        node: the FX node's name: the call itself, for ``eager_attention`` the last matmul (whose output is the
            attention output).
        target: what the node calls, as text.
        nodes: names of every node that makes up the site, in graph order, ``node`` included: for an attention site
            also its GQA ``repeat_kv`` and, for ``eager_attention``, the key transpose, both matmuls, scale, mask
            add, softmax, casts and dropout.
        key, value: for an attention site, the names of the nodes holding the ``[B, H, L, D]`` keys and values as
            the attention reads them (after any GQA repeat); None for other kinds.
        repeat_kv: names of the nodes of the GQA head repeat feeding the keys and values (transformers'
            ``repeat_kv``: index with None, ``expand``, ``reshape``), empty when there is none.
        scale: the softmax scale when the graph holds it as a number (SDPA's ``scale=``; the constant the scores
            are multiplied or divided by in the eager form); None when it is SDPA's default (``head_dim ** -0.5``)
            or not a constant.
        mask: name of the node holding the attention mask (SDPA's ``attn_mask``; the tensor the eager form adds
            to its scores), None when there is none.
        module: the model's module the call was made in (``"model.layers.3.self_attn"``), from Dynamo's
            ``nn_module_stack``; empty when unknown.
    """

    kind: str
    node: str
    target: str
    nodes: tuple[str, ...] = ()
    key: str | None = None
    value: str | None = None
    repeat_kv: tuple[str, ...] = ()
    scale: float | None = None
    mask: str | None = None
    module: str = ""


def find_sites(gm: torch.fx.GraphModule) -> list[Site]:
    """The attention and cache-update sites of ``gm`` (a Dynamo-captured graph), in graph order.

    A ``cat``, ``index_copy_``, ``index_put_`` or slice assignment counts as a ``cache_update`` only when the
    tensor it produces or writes into reaches an attention site's keys or values through views and casts (a
    ``cat`` inside rotary embedding, or a mask built by index assignment, does not).
    """
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    found: list[tuple[Node, Site]] = []
    read: set[Node] = set()  # where the keys and values every attention site reads come from
    for node in gm.graph.nodes:
        site = _attention_site(node, order)
        if site is not None:
            found.append((node, site[0]))
            read.update(_root(operand) for operand in site[1:])
    for node in gm.graph.nodes:
        kind = _other_kind(node, read)
        if kind is not None:
            found.append((node, Site(kind, node.name, _target_name(node), (node.name,), module=module_of(node))))
    return [site for _, site in sorted(found, key=lambda pair: order[pair[0]])]


def _other_kind(node: Node, read: set[Node]) -> str | None:
    """The kind of a one-node site (nqcompile ops, cache updates into what attention reads ``read``), else None."""
    if node.op == "call_function":
        name = op_name(node.target)
        if name in _NEXUS_OPS:
            return _NEXUS_OPS[name]
        if (node.target is torch.cat and node in read) or (node.target is operator.setitem
                                                           and _root(node.args[0]) in read):
            return "cache_update"
    elif node.op == "call_method" and node.target in _WRITE_METHODS and _root(node) in read:
        return "cache_update"
    return None


def module_of(node: Node) -> str:
    """The innermost module whose forward made the call ``node`` (``"model.layers.3.self_attn"``), from Dynamo's
    ``nn_module_stack`` metadata; empty when the graph does not say."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = str(list(stack.values())[-1][0])
    path = re.sub(r"^L\['[^']*'\]\.?", "", path)  # Dynamo's source of the root module
    path = re.sub(r"\[(\d+)\]", r".\1", path)     # layers[3] -> layers.3
    return re.sub(r"\._modules\['([^']*)'\]", r".\1", path).lstrip(".")


def _target_name(node: Node) -> str:
    """What ``node`` calls, as text (a function's name, a method's name, an op's qualified name)."""
    return getattr(node.target, "__name__", str(node.target))


def op_name(target) -> str | None:
    """``"namespace::name"`` of an op overload or packet, else None."""
    schema = getattr(target, "_schema", None)
    if schema is not None:
        return schema.name
    return getattr(target, "_qualified_op_name", None)


def _arg(node: Node, index: int, name: str):
    """Argument ``name`` of a call, passed by keyword or at position ``index``; None when absent."""
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else None


def _root(value):
    """The node a tensor comes from once views, casts and in-place writes (which return what they write into)
    are looked through: a graph input, a ``cat``, a computation."""
    while isinstance(value, Node) and value.args and (
            (value.op == "call_method" and value.target in _PASS_METHODS)
            or (value.op == "call_function" and value.target in _PASS_FUNCTIONS)):
        value = value.args[0]
    return value


def _repeat_kv(node) -> list[Node]:
    """The nodes of transformers' ``repeat_kv`` (``x[:, :, None, :, :].expand(...).reshape(...)``) whose output is
    ``node``, first to last; empty when ``node`` is not one."""
    if not (isinstance(node, Node) and node.op == "call_method" and node.target == "reshape"):
        return []
    expand = node.args[0]
    if not (isinstance(expand, Node) and expand.op == "call_method" and expand.target == "expand"):
        return []
    index = expand.args[0]
    if not (isinstance(index, Node) and index.op == "call_function" and index.target is operator.getitem):
        return []
    item = index.args[1]
    if isinstance(item, tuple) and len(item) >= 3 and item[2] is None:
        return [index, expand, node]
    return []


def _attention_site(node: Node, order: dict[Node, int]) -> tuple[Site, Node, Node] | None:
    """``(site, key, value)`` when ``node`` is an SDPA call or the softmax of the eager form, else None."""
    if node.op == "call_function" and node.target is F.scaled_dot_product_attention:
        key, value, mask, scale = _arg(node, 1, "key"), _arg(node, 2, "value"), _arg(node, 3, "attn_mask"), \
            _arg(node, 6, "scale")
        return _attention("sdpa", node, [node], key, value, mask, scale, order), key, value
    if _is_softmax(node):
        return _eager_attention(node, order)
    return None


def _attention(kind: str, node: Node, parts: list[Node], key: Node, value: Node, mask, scale,
               order: dict[Node, int]) -> Site:
    """An attention site made of ``parts`` plus the GQA repeat feeding ``key`` and ``value``."""
    repeat = _repeat_kv(key) + _repeat_kv(value)
    nodes = sorted({*parts, *repeat}, key=order.__getitem__)
    return Site(kind, node.name, _target_name(node), tuple(n.name for n in nodes),
                key=key.name, value=value.name, repeat_kv=tuple(n.name for n in sorted(repeat, key=order.__getitem__)),
                scale=float(scale) if isinstance(scale, Number) else None,
                mask=mask.name if isinstance(mask, Node) else None, module=module_of(node))


def _is_call(node, functions: set, methods: set) -> bool:
    """Whether ``node`` calls one of ``functions`` or one of the tensor methods named in ``methods``."""
    return isinstance(node, Node) and ((node.op == "call_function" and node.target in functions)
                                       or (node.op == "call_method" and node.target in methods))


def _is_softmax(node: Node) -> bool:
    """A softmax over the last dimension (``dim=-1``, or ``3`` of the ``[B, H, q, kv]`` scores)."""
    if not _is_call(node, _SOFTMAXES, {"softmax"}):
        return False
    return _arg(node, 1, "dim") in (-1, 3)


def _is_key_transpose(node) -> bool:
    """``k.transpose(2, 3)`` (or ``-2, -1``), the right operand of the score matmul."""
    if not _is_call(node, {torch.transpose}, {"transpose"}) or len(node.args) < 3:
        return False
    return set(node.args[1:3]) in ({2, 3}, {-2, -1})


def _scores_path(node, depth: int = 0) -> list[Node] | None:
    """``[q @ k^T, ..., node]``: the chain of scale, mask, soft-capping and cast ops from the score matmul to
    ``node``, or None when ``node`` is not reached from one that way."""
    if depth > _SEARCH_DEPTH or not isinstance(node, Node):
        return None
    if _is_call(node, _MATMULS, {"matmul"}) and len(node.args) == 2 and _is_key_transpose(node.args[1]):
        return [node]
    if _is_call(node, _SCORE_FUNCTIONS, _SCORE_METHODS):
        for arg in node.args:
            path = _scores_path(arg, depth + 1)
            if path is not None:
                return path + [node]
    return None


def _scale_of(scores: list[Node]) -> float | None:
    """The constant the score matmul's output is multiplied by (or divided by: its inverse), else None."""
    if len(scores) < 2:
        return None
    step, matmul = scores[1], scores[0]
    other = next((a for a in step.args if a is not matmul), None)
    if not isinstance(other, Number) or isinstance(other, bool):
        return None
    if _is_call(step, {operator.mul, torch.mul}, {"mul"}):
        return float(other)
    if _is_call(step, {operator.truediv, torch.div}, {"div"}) and step.args[0] is matmul:
        return 1.0 / other
    return None


def _mask_of(scores: list[Node]):
    """The tensor added to the scores (the attention mask), or None."""
    for prev, step in zip(scores, scores[1:]):
        if _is_call(step, {operator.add, torch.add}, {"add"}):
            other = next((a for a in step.args if a is not prev), None)
            if isinstance(other, Node):
                return other
    return None


def _eager_attention(softmax: Node, order: dict[Node, int]) -> tuple[Site, Node, Node] | None:
    """The eager form around ``softmax``: back to ``q @ k^T`` through the scores' ops, on through casts and
    dropout to ``probs @ v``; None when either end is missing."""
    scores = _scores_path(softmax.args[0])
    if scores is None:
        return None
    after, current = [], softmax
    for _ in range(_SEARCH_DEPTH):
        step = next((user for user in current.users if user.args and user.args[0] is current
                     and _is_call(user, _MATMULS | _DROPOUTS, {"matmul", *_CASTS})), None)
        if step is None:
            return None
        after.append(step)
        if _is_call(step, _MATMULS, {"matmul"}):
            break
        current = step
    else:
        return None
    output = after[-1]
    transpose = scores[0].args[1]
    key, value = transpose.args[0], output.args[1]
    site = _attention("eager_attention", output, [transpose, *scores, softmax, *after], key, value,
                      _mask_of(scores), _scale_of(scores), order)
    return site, key, value
