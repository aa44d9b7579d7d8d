"""The ``simulate`` pass: keys and values of an unprepared model's attention through quantize-dequantize.

``torch.compile(model, backend="nexusquant", options={"simulate": True})`` on a model that was not prepared by
:func:`nqcompile.optimize` compiles it with every attention site (``sdpa``, ``eager_attention``) reading its keys
and values through ``nqcompile::simulate_qdq`` (:mod:`nqcompile.ops.simulate`): the logits then carry the error of
the compressed cache's codec, for a quality study. It is a simulation: the cache still stores everything in full
precision, so no memory is saved, and keys are quantized after RoPE with statistics measured at every call
(the op's docstring lists how this differs from a :class:`~nqcompile.NexusCache`).
"""

from __future__ import annotations

from typing import Any

import torch

from ...ops.simulate import simulate_qdq
from ...presets import Preset, get_preset
from ..report import Rewrite
from ..sites import find_sites

__all__ = ["simulate_kv", "simulation_preset"]

#: The preset whose bits a plain ``{"simulate": True}`` simulates (4-bit keys, 2-bit values).
DEFAULT_PRESET = "quant_only"
_OP = torch.ops.nqcompile.simulate_qdq.default
_NAME = "nqcompile::simulate_qdq"


def simulation_preset(options: dict[str, Any]) -> Preset:
    """The preset a simulation codes keys and values like.

    Args:
        options: the backend's nqcompile options: ``"simulate"`` is True (then ``"preset"``, a name or
            :class:`~nqcompile.Preset`, or :data:`DEFAULT_PRESET` when absent) or itself a preset name or
            :class:`~nqcompile.Preset`.

    Returns:
        the preset, whose ``codec``, ``key_bits``, ``value_bits``, ``key_norm`` and ``value_norm`` apply.

    Raises:
        ValueError: both ``"simulate"`` and ``"preset"`` name a preset, an unknown preset name, or an exact preset
            (``key_bits=None``: nothing to simulate).
        TypeError: ``"simulate"`` is neither True, a name nor a :class:`~nqcompile.Preset`.
    """
    choice, named = options.get("simulate"), options.get("preset")
    if choice is True:
        chosen = get_preset(DEFAULT_PRESET if named is None else named)
    elif isinstance(choice, (str, Preset)):
        if named is not None:
            raise ValueError(f"options name two presets (simulate={choice!r}, preset={named!r}); pass "
                             "simulate=True with preset=..., or simulate=<preset>")
        chosen = get_preset(choice)
    else:
        raise TypeError(f"options['simulate'] must be True, a preset name or a Preset, got {choice!r}")
    if chosen.exact:
        raise ValueError(f"preset {chosen.name!r} stores keys and values exactly; there is nothing to simulate")
    return chosen


def simulate_kv(gm: torch.fx.GraphModule, options: dict[str, Any]) -> list[Rewrite]:
    """Route the keys and values of every attention site of ``gm`` through ``nqcompile::simulate_qdq``.

    Each ``sdpa`` and ``eager_attention`` site gets two ``simulate_qdq`` nodes, placed just before the first node of
    the site that reads its keys or values (so a cache written in place earlier in the graph, such as a
    ``StaticCache``'s ``index_copy_``, holds the new token by then): keys at the preset's ``key_bits`` and
    ``key_norm``, values at ``value_bits`` and ``value_norm`` (``"per_pair"``, which pairs pre-RoPE channels, becomes
    ``"per_channel"``: the keys here are after RoPE). After a GQA ``repeat_kv`` the repeated heads are coded the
    same way as the head they copy, so the result is the one the KV heads would give. ``gm`` is changed in place and
    recompiled.

    Args:
        gm: a Dynamo-captured graph of a model not prepared by :func:`nqcompile.optimize`.
        options: the backend's nqcompile options (:func:`simulation_preset`).

    Returns:
        one :class:`~nqcompile.compile.report.Rewrite` per attention site, in graph order.

    Raises:
        ValueError: the graph holds nqcompile's compressed-cache ops (a prepared model: its cache already
            quantizes), or as :func:`simulation_preset`.
    """
    preset = simulation_preset(options)
    sites = find_sites(gm)
    if any(site.kind in ("dequant_attention", "cache_write") for site in sites):
        raise ValueError("options={'simulate': ...} studies quantization on a model that was not prepared; this "
                         "graph runs nqcompile's compressed cache already (compile without the option)")
    key_norm = "per_channel" if preset.key_norm == "per_pair" else preset.key_norm
    nodes = {node.name: node for node in gm.graph.nodes}
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    rewrites = []
    for site in sites:
        if site.kind not in ("sdpa", "eager_attention"):
            continue
        members = {nodes[name] for name in site.nodes}
        for name, bits, norm in ((site.key, preset.key_bits, key_norm), (site.value, preset.value_bits,
                                                                          preset.value_norm)):
            _route(gm.graph, nodes[name], members, order, (bits, norm, preset.codec))
        rewrites.append(Rewrite("simulate", site.node, _NAME))
    gm.graph.lint()
    gm.recompile()
    return rewrites


def _route(graph: torch.fx.Graph, tensor: torch.fx.Node, members: set, order: dict, settings: tuple) -> None:
    """Make the nodes of ``members`` that read ``tensor`` read ``simulate_qdq(tensor, *settings)`` instead."""
    readers = sorted((user for user in tensor.users if user in members), key=order.__getitem__)
    with graph.inserting_before(readers[0]):
        coded = graph.call_function(_OP, (tensor, *settings))
    fake = tensor.meta.get("example_value")
    if fake is not None:
        with fake.fake_mode:
            coded.meta["example_value"] = simulate_qdq(fake, *settings)
    for reader in readers:
        reader.replace_input_with(tensor, coded)
