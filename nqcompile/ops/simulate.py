"""``nqcompile::simulate_qdq``: keys or values through the cache's quantize-dequantize, for a quality study.

The ``nexusquant`` backend inserts this op in front of the attention of a model that was not prepared by
:func:`nqcompile.optimize` when asked to (``options={"simulate": True}``, :mod:`nqcompile.compile.passes.simulate`):
the attention then reads keys and values with the error the compressed cache would give them, while everything is
still stored in full precision (no memory is saved).

It differs from what a :class:`~nqcompile.NexusCache` stores in three ways, all because it sees only the tensor the
attention reads: keys are quantized as they are there, after RoPE (the cache removes RoPE first, which needs the
positions); the per-channel statistics are computed at every call over the tokens present then (the cache measures
them once, on the first prefill chunk, sinks excluded); every token is quantized (the cache keeps sinks, the recent
window and the new tokens exact).
"""

from __future__ import annotations

import torch

from ..codec.hadamard import hadamard_matrix
from ..codec.kv import VALUE_NORMS, KVTransform, channel_statistics, decode_values, encode_values

__all__ = ["simulate_qdq"]


# The reference encoder sizes its E8 codebook search by the data, so it cannot run inside a CUDA-graph capture.
@torch.library.custom_op("nqcompile::simulate_qdq", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def simulate_qdq(x: torch.Tensor, bits: int, norm: str, codec: str) -> torch.Tensor:
    """Quantize and dequantize keys or values the way the cache codes them, with the error that gives.

    Each ``[D]`` vector is normalized per channel, rotated by the ``D x D`` Hadamard matrix and coded at ``bits``
    per element with a one-byte scale (:func:`~nqcompile.codec.kv.encode_values`), then decoded
    (:func:`~nqcompile.codec.kv.decode_values`). The normalization statistics (per sequence, head and channel) are
    measured over the tokens present: those whose vector is non-zero in some head (a preallocated cache's empty
    slots are all zero); those slots are returned unchanged. Keys are taken as they are (after RoPE; see the module
    docstring).

    Args:
        x: ``[B, H, L, D]`` keys or values, any float dtype, ``D`` a multiple of 8.
        bits: bits per element, one that ``codec`` offers (``CODECS[codec].bits``: 2, 3 or 4 for ``"e8"``).
        norm: per-channel normalization, one of :data:`~nqcompile.codec.kv.VALUE_NORMS` (``"per_channel"``,
            ``"mean"``, ``"none"``; see :func:`~nqcompile.codec.kv.channel_statistics`).
        codec: a name in :data:`~nqcompile.codec.registry.CODECS`.

    Returns:
        ``[B, H, L, D]`` contiguous, in ``x``'s dtype and device (the math runs in float32).

    Raises:
        ValueError: ``x`` not 4D, ``D`` not a multiple of 8, unknown ``norm`` or ``codec``, ``bits`` not offered.
    """
    if x.dim() != 4:
        raise ValueError(f"simulate_qdq expects [B, H, L, D] keys or values, got shape {tuple(x.shape)}")
    if norm not in VALUE_NORMS:
        raise ValueError(f"simulate_qdq: unknown normalization {norm!r}; use one of {VALUE_NORMS}")
    dim = x.shape[-1]
    present = (x != 0).any(-1).any(1)  # [B, L]
    mean, scale = channel_statistics(x, present, norm, rotary_dim=dim, layout="half")
    t = KVTransform(codec, bits, bits, attention_scaling=1.0, rotary_dim=dim, layout="half")
    hadamard = hadamard_matrix(dim, device=x.device)
    codes, scale_codes = encode_values(x, hadamard, mean, scale, t)
    out = decode_values(codes, scale_codes, hadamard, mean, scale, t).to(x.dtype)
    return torch.where(present[:, None, :, None], out, x).contiguous()


@simulate_qdq.register_fake
def _(x, bits, norm, codec):
    return torch.empty_like(x, memory_format=torch.contiguous_format)
