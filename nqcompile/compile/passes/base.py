"""What every pass of the ``nexusquant`` backend shares: :class:`NexusPass` and the FX helpers its patterns use.

A pass is an Inductor :class:`~torch._inductor.custom_graph_pass.CustomGraphPass` (``__call__(graph)`` and a
``uuid()`` that hashes the pass's source, Inductor's contract for passes whose output its caches must key on). It
is a pattern/replacement pair: :meth:`NexusPass.match` looks at one node and returns either a match (what the
replacement needs) or the reason the node does not fit; :meth:`NexusPass.replace` rewrites one match and returns
the :class:`~nqcompile.compile.report.Rewrite`. Each rewrite adds one to
``torch._dynamo.utils.counters["nqcompile"][pass name]``.

The passes run on the graph Dynamo captured (before AOT autograd), where the cache's in-place updates are still
in-place calls in program order: a pattern that moves a mutating op checks what happens between its old and new
place (:func:`mutated_between`, :func:`used_between`).
"""

from __future__ import annotations

import inspect
import operator
from typing import Any

import torch
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from ..report import Rewrite
from ..sites import op_name

__all__ = ["NexusPass", "SITE_META", "op_args", "is_op", "full_view_base", "token_prefix", "mutated_between",
           "used_between", "static_size", "site_of"]

#: ``node.meta`` key under which a replacement node keeps the name of the site it replaced (so a later pass
#: reports the original site).
SITE_META = "nqcompile_site"


class NexusPass(CustomGraphPass):
    """One rewrite of the backend, applied to every node it matches (base class).

    Subclasses set :attr:`name` and implement :meth:`match` and :meth:`replace`.

    Attributes:
        name: the pass's name in reports and counters.
        rewrites: the rewrites of the last call. left_alone: ``{original site name: reason}`` for the nodes of
            the kind the pass rewrites that it did not (last call).
    """

    name = ""

    def __init__(self) -> None:
        self.rewrites: list[Rewrite] = []
        self.left_alone: dict[str, str] = {}

    def match(self, node: torch.fx.Node) -> Any:
        """What the replacement of ``node`` needs; a ``str`` (why it does not fit) for a node of the kind the
        pass rewrites that does not fit; ``None`` for any other node."""
        raise NotImplementedError

    def replace(self, graph: torch.fx.Graph, node: torch.fx.Node, found: Any) -> Rewrite:
        """Rewrite the match ``found`` at ``node``; returns what was done."""
        raise NotImplementedError

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.rewrites, self.left_alone = [], {}
        for node in list(graph.nodes):
            if node._erased:
                continue
            found = self.match(node)
            if isinstance(found, str):
                self.left_alone[site_of(node)] = found
            elif found is not None:
                self.rewrites.append(self.replace(graph, node, found))
                counters["nqcompile"][self.name] += 1

    def uuid(self) -> str:
        """A hash of the pass's source and of this module (Inductor's cache key for custom passes)."""
        return get_hash_for_files((inspect.getfile(type(self)), __file__)).hex()


def is_op(node: Any, *names: str) -> bool:
    """Whether ``node`` is a ``call_function`` of one of the ops ``names`` (``"nqcompile::write_kv"``, ...)."""
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and op_name(node.target) in names


def op_args(node: torch.fx.Node) -> dict[str, Any]:
    """The arguments of an op call by schema name (positional and keyword)."""
    names = [a.name for a in node.target._schema.arguments]
    return {**dict(zip(names, node.args)), **node.kwargs}


def site_of(node: torch.fx.Node) -> str:
    """The name of the site ``node`` stands for: its own, or that of the site an earlier pass replaced by it."""
    return node.meta.get(SITE_META, node.name)


def static_size(node: Any, dim: int) -> int | None:
    """Size of dimension ``dim`` of the tensor ``node`` produces, from Dynamo's example value (None if unknown or
    symbolic)."""
    value = node.meta.get("example_value") if isinstance(node, torch.fx.Node) else None
    if not isinstance(value, torch.Tensor):
        return None
    size = value.shape[dim]
    return size if isinstance(size, int) else None


def token_prefix(node: Any) -> tuple[torch.fx.Node, int | None] | None:
    """``(base, n)`` when ``node`` is ``base[:, :, :n]`` (the first ``n`` tokens along dim 2; ``n`` None for
    ``base[:, :, :]``); None for any other node."""
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is operator.getitem):
        return None
    base, index = node.args
    whole = slice(None, None, None)
    if not (isinstance(index, tuple) and len(index) == 3 and index[:2] == (whole, whole)):
        return None
    last = index[2]
    if not (isinstance(last, slice) and last.start in (None, 0) and last.step in (None, 1)
            and (last.stop is None or isinstance(last.stop, int))):
        return None
    return base, last.stop


def full_view_base(node: Any) -> torch.fx.Node | None:
    """The tensor ``node`` views whole: ``node`` itself, or ``base[:, :, :n]`` with ``n`` at least ``base``'s size
    along dim 2; None otherwise."""
    if not isinstance(node, torch.fx.Node):
        return None
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], tuple):
        prefix = token_prefix(node)
        if prefix is None:
            return None
        base, stop = prefix
        size = static_size(base, 2)
        return base if stop is None or (size is not None and stop >= size) else None
    return node


def _nodes_between(start: torch.fx.Node, end: torch.fx.Node):
    node = start.next
    while node is not end and node.op != "root":
        yield node
        node = node.next


def _writes(node: torch.fx.Node, tensor: torch.fx.Node) -> bool:
    """Whether ``node`` writes into ``tensor`` in place (an in-place method, or an op argument marked written)."""
    if node.op == "call_method":
        return node.target.endswith("_") and bool(node.args) and node.args[0] is tensor
    if node.op == "call_function" and hasattr(node.target, "_schema"):
        written = {a.name for a in node.target._schema.arguments if a.alias_info is not None and a.alias_info.is_write}
        return any(value is tensor for name, value in op_args(node).items() if name in written)
    return False


def mutated_between(tensor: torch.fx.Node, start: torch.fx.Node, end: torch.fx.Node) -> bool:
    """Whether a node strictly between ``start`` and ``end`` (graph order) writes into ``tensor`` in place."""
    return any(_writes(node, tensor) for node in _nodes_between(start, end))


def used_between(tensor: torch.fx.Node, start: torch.fx.Node, end: torch.fx.Node,
                 allowed: set[torch.fx.Node]) -> torch.fx.Node | None:
    """The first node strictly between ``start`` and ``end`` that takes ``tensor`` as an input, other than the
    ``allowed`` ones (views feeding ``end``); None if there is none."""
    for node in _nodes_between(start, end):
        if node not in allowed and tensor in node.all_input_nodes:
            return node
    return None
