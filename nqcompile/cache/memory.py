"""Honest accounting of a :class:`~nqcompile.NexusCache`: every byte it holds, against a bf16 cache of the same tokens."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .layer import NexusLayer

__all__ = ["CacheMemoryReport", "memory_report"]

_TYPE_NAMES = {"full_attention": "full-attention", "sliding_attention": "sliding-window"}


@dataclass(frozen=True)
class CacheMemoryReport:
    """What a :class:`NexusCache` holds, in bytes counted from the ``nbytes`` of every tensor it owns.

    Attributes:
        logical_tokens: tokens seen per sequence (padding included), first layer.
        physical_tokens: tokens held, summed over every layer and every sequence of the batch (in a compressed
            layer: sinks + codes + warm tier + window, and a chunk waiting for its re-reading; in a layer left to
            transformers: the keys it holds). Evicting presets keep a different number of tokens in each layer;
            ``physical_tokens / (layers * batch * logical_tokens)`` is the fraction kept.
        allocated_bytes: sum of ``nbytes`` over every distinct tensor storage the cache owns (codes, scales,
            positions, warm tier, exact sinks and window, lengths, normalization statistics, RoPE frequencies).
        unused_capacity_bytes: part of ``allocated_bytes`` preallocated for tokens not yet written.
        bf16_bytes: what transformers' ``DynamicCache`` would hold in bf16 for the same tokens:
            ``2 * 2 * B * Hkv * n * head_dim`` per layer, ``n`` the logical tokens in a full-attention layer and the
            last ``sliding_window - 1`` of them in a sliding-window layer (``DynamicSlidingWindowLayer``).
        layer_key_bits: key bits of each quantized layer, in layer order (``relax_key_kl`` lowers some at
            the first chunk).
        shared_bytes: codec constants the layers read but the cache does not own: the ``head_dim x head_dim``
            float32 Hadamard matrix of each distinct head size and device, built once per process and shared by
            every cache (256 KiB at head_dim 256, 16 KiB at 64); not in ``allocated_bytes``, since neither another
            cache nor a longer context adds to it and freeing the cache does not free it.
        by_layer_type: ``allocated_bytes`` and ``bf16_bytes`` split by layer type (``"full_attention"``,
            ``"sliding_attention"``), each ``{"layers": int, "allocated_bytes": int, "bf16_bytes": int}``: on a
            hybrid model the sliding-window layers hold their whole window, which is also all that the bf16
            reference holds there, so their ratio is the codec's and an evicting preset's shows in the full-attention
            layers only. A tensor storage two layers share counts in the first.
        compression_ratio: ``bf16_bytes / allocated_bytes``.
    """

    logical_tokens: int
    physical_tokens: int
    allocated_bytes: int
    unused_capacity_bytes: int
    bf16_bytes: int
    layer_key_bits: tuple[int, ...] = ()
    shared_bytes: int = 0
    by_layer_type: dict = dataclasses.field(default_factory=dict)

    @property
    def compression_ratio(self) -> float:
        return self.bf16_bytes / self.allocated_bytes if self.allocated_bytes else float("nan")

    def to_dict(self) -> dict:
        """The fields and ``compression_ratio`` as a JSON-ready dict."""
        return {**dataclasses.asdict(self), "layer_key_bits": list(self.layer_key_bits),
                "compression_ratio": self.compression_ratio}

    def layer_type_ratio(self, layer_type: str) -> float:
        """``bf16_bytes / allocated_bytes`` of the layers of ``layer_type`` (a key of ``by_layer_type``).

        Raises:
            KeyError: the cache has no layer of that type (the message lists the types it has).
        """
        if layer_type not in self.by_layer_type:
            raise KeyError(f"no {layer_type!r} layers in this cache; it has {sorted(self.by_layer_type)}")
        part = self.by_layer_type[layer_type]
        return part["bf16_bytes"] / part["allocated_bytes"] if part["allocated_bytes"] else float("nan")

    def __str__(self) -> str:
        mib = 2.0**20
        lines = [
            f"logical tokens (per sequence)     {self.logical_tokens:>12,}",
            f"tokens held (all layers, seqs)    {self.physical_tokens:>12,}",
            f"bf16 cache of the same tokens     {self.bf16_bytes / mib:>12.3f} MiB",
            f"allocated by NexusCache           {self.allocated_bytes / mib:>12.3f} MiB",
            f"  of which unused capacity        {self.unused_capacity_bytes / mib:>12.3f} MiB",
            f"compression ratio (bytes)         {self.compression_ratio:>12.2f}x",
            *(f"  {_TYPE_NAMES.get(name, name)} layers ({part['layers']})".ljust(34)
              + f"{self.layer_type_ratio(name):>12.2f}x  ({part['allocated_bytes'] / mib:.3f} MiB for "
                f"{part['bf16_bytes'] / mib:.3f} MiB of bf16)"
              for name, part in sorted(self.by_layer_type.items()) if len(self.by_layer_type) > 1),
            f"codec constants shared by caches  {self.shared_bytes / mib:>12.3f} MiB (not in the ratio)",
        ]
        if self.layer_key_bits:
            bits = self.layer_key_bits
            lines.append("quantized layers by key bits      "
                         + ", ".join(f"{b} bits: {bits.count(b)}" for b in sorted(set(bits))))
        return "\n".join(lines)


def memory_report(layers) -> CacheMemoryReport:
    """Account for ``layers`` (a cache's ``NexusLayer`` and transformers layers): the ``nbytes`` of every distinct
    tensor storage they own, the unused capacity, what a bf16 ``DynamicCache`` would hold for the same tokens
    (:meth:`NexusLayer.bf16_tokens` per sequence: all of them, or a sliding-window layer's last ``window - 1``), and
    apart, the codec constants shared with every other cache (``shared_bytes``)."""
    seen: set[int] = set()
    shared_seen: set[int] = set()
    allocated = unused = bf16 = shared = 0
    logical = None
    physical = 0
    key_bits = []
    by_type: dict[str, dict[str, int]] = {}
    for layer in layers:
        allocated_before, bf16_before = allocated, bf16
        tensors = layer.tensors() if isinstance(layer, NexusLayer) else {
            k: v for k, v in vars(layer).items() if isinstance(v, torch.Tensor)}
        for t in tensors.values():
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen or t.untyped_storage().nbytes() == 0:
                seen.add(ptr)
                allocated += t.untyped_storage().nbytes()
        if isinstance(layer, NexusLayer) and layer.storage is not None:
            st = layer.storage
            for t in st.shared_tensors().values():
                if t.untyped_storage().data_ptr() not in shared_seen:
                    shared_seen.add(t.untyped_storage().data_ptr())
                    shared += t.untyped_storage().nbytes()
            unused += st.unused_bytes()
            bf16 += 4 * st.batch * st.heads * st.head_dim * layer.bf16_tokens()
            logical = layer.seen_tokens() if logical is None else logical
            key_bits += [layer.key_bits] if layer.kind != "exact" else []
            physical += layer.physical_tokens()
        elif getattr(layer, "keys", None) is not None and layer.keys.numel():
            b, h, _, d = layer.keys.shape
            bf16 += 4 * b * h * d * layer.keys.shape[2]  # transformers' own layer: what it holds
            physical += b * layer.keys.shape[2]
        part = by_type.setdefault("sliding_attention" if getattr(layer, "is_sliding", False) else "full_attention",
                                  {"layers": 0, "allocated_bytes": 0, "bf16_bytes": 0})
        part["layers"] += 1
        part["allocated_bytes"] += allocated - allocated_before
        part["bf16_bytes"] += bf16 - bf16_before
    return CacheMemoryReport(logical or 0, physical, allocated, unused, bf16, tuple(key_bits), shared, by_type)
