"""Key and value transforms around the vector codes: the reference math behind ``nqcompile.ops``.

Keys (Hadamard-rotated after RoPE removal and per-channel normalization)::

    encode:  k_post --RoPE^-1(pos)--> k_pre --(k_pre - mean) / scale--> x --H--> codes, scale code
    decode:  codes --> x --H^T--> x * scale + mean --RoPE(pos)--> k_post

Values skip RoPE: ``v --(v - mean) / scale--> x --H--> codes``. The per-channel ``mean`` and ``scale`` (one
pair for keys, one for values, per sequence and KV head) come from the first prefill chunk, sinks excluded (KIVI, Liu et al. 2024,
arXiv:2402.02750, and KVQuant, Hooper et al. 2024, arXiv:2401.18079, observe per-channel structure in
keys); subtracting the mean removes a bias that would otherwise eat most of the code's range, and the
mean costs nothing in attention accuracy because it is stored exactly. ``H`` is the orthonormal Hadamard matrix of
:mod:`nqcompile.codec.hadamard`; the per-vector scale is one byte (:mod:`nqcompile.codec.scales`). All
math runs in float32 whatever the model dtype; decode returns float32.

The ``exact`` kind stores keys (post-RoPE) and values unchanged in the model's dtype; its "codes" are
those float tensors and its scale tensors are empty.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cpu_kernel import cpu_kernel, eager_on_cpu
from .lattice import E8LatticeCode, decode_words, word_view
from .registry import code_for
from .rope import apply_rotary, rotary_cos_sin, rotate_by
from .scales import decode_scale
from .vector import dequantize_vectors, quantize_vectors

__all__ = ["KVTransform", "NORMS", "VALUE_NORMS", "MIN_DEVIATION_TOKENS", "channel_statistics", "encode_keys", "decode_keys",
           "encode_values", "decode_values", "value_rows", "fold_values"]


#: Per-channel normalizations (:func:`channel_statistics`); values have no RoPE pairs, hence no ``per_pair``.
NORMS = ("per_pair", "per_channel", "mean", "none")
VALUE_NORMS = ("per_channel", "mean", "none")
#: Fewest measured tokens per sequence for which per-channel deviations are estimated (else scale 1).
MIN_DEVIATION_TOKENS = 64


@dataclass(frozen=True)
class KVTransform:
    """Static (non-tensor) parameters of one layer's key/value codec.

    Args:
        kind: ``"exact"`` or a codec name of :data:`~nqcompile.codec.registry.CODECS`.
        key_bits: bits per key element (ignored for exact).
        value_bits: bits per value element (ignored for exact).
        attention_scaling: the factor the model's RoPE multiplies cos/sin by.
        rotary_dim: leading dims of the head that RoPE rotates (partial rotary leaves the rest).
        layout: ``"half"`` (rotate_half) or ``"interleaved"`` pairs.
    """

    kind: str
    key_bits: int
    value_bits: int
    attention_scaling: float
    rotary_dim: int
    layout: str


def channel_statistics(x: torch.Tensor, select: torch.Tensor, mode: str, *, rotary_dim: int,
                       layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(sequence, KV head, channel) normalization statistics of the selected tokens.

    Args:
        x: ``[B, H, L, D]`` pre-RoPE keys or values (any float dtype).
        select: ``[B, L]`` bool, the tokens to measure.
        mode: ``"per_channel"`` (mean and standard deviation), ``"per_pair"`` (mean, and one deviation per
            RoPE pair: the root mean square of the pair's two), ``"mean"`` (mean, scale 1) or ``"none"``
            (mean 0, scale 1).
        rotary_dim, layout: which channels RoPE pairs (``"half"``: ``c`` with ``c + rotary_dim / 2``;
            ``"interleaved"``: ``2i`` with ``2i + 1``); channels past ``rotary_dim`` keep their own deviation.

    Returns:
        ``(mean, scale)``, float32 ``[B, H, D]``. Deviations are floored at 1% of the head's mean deviation
        (a near-constant channel is not blown up); a head with no deviation at all, or a sequence with fewer
        than ``MIN_DEVIATION_TOKENS`` selected tokens (too few to estimate one), gets scale 1.

    Raises:
        ValueError: unknown mode or layout.
    """
    if mode not in NORMS:
        raise ValueError(f"unknown normalization {mode!r}; use one of {NORMS}")
    if layout not in ("half", "interleaved"):
        raise ValueError(f"unknown rotary layout {layout!r}; use 'half' or 'interleaved'")
    batch, heads, _, dim = x.shape
    mean = torch.zeros(batch, heads, dim, dtype=torch.float32, device=x.device)
    scale = torch.ones_like(mean)
    if mode == "none":
        return mean, scale
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    w = select[:, None, :, None].to(x.dtype)
    n = w.sum(2).clamp(min=1.0)
    mean = (x * w).sum(2) / n
    if mode in ("per_channel", "per_pair"):
        var = (((x - mean[:, :, None]) ** 2) * w).sum(2) / n
        if mode == "per_pair":
            var = _pair_mean(var, rotary_dim, layout)
        std = var.sqrt()
        floor = 0.01 * std.mean(-1, keepdim=True)
        enough = (floor > 0) & (n >= MIN_DEVIATION_TOKENS)
        scale = torch.where(enough, std.clamp(min=floor), torch.ones_like(std))
    return mean.float(), scale.float()


def _pair_mean(x: torch.Tensor, rotary_dim: int, layout: str) -> torch.Tensor:
    """Average ``x`` ``[..., D]`` over the two channels of each RoPE pair (channels past ``rotary_dim`` unchanged)."""
    out = x.clone()
    if layout == "half":
        half = rotary_dim // 2
        m = (x[..., :half] + x[..., half:rotary_dim]) / 2
        out[..., :half], out[..., half:rotary_dim] = m, m
    else:
        m = (x[..., 0:rotary_dim:2] + x[..., 1:rotary_dim:2]) / 2
        out[..., 0:rotary_dim:2], out[..., 1:rotary_dim:2] = m, m
    return out


def encode_keys(key: torch.Tensor, positions: torch.Tensor, hadamard: torch.Tensor, inv_freq: torch.Tensor,
                norm_mean: torch.Tensor, norm_scale: torch.Tensor, t: KVTransform) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize post-RoPE keys.

    Args:
        key: ``[B, H, n, D]`` post-RoPE keys (any float dtype).
        positions: ``[B, H, n]`` int64 positions the keys were rotated at.
        hadamard: ``[D, D]`` float32 orthonormal rotation.
        inv_freq: ``[rotary_dim / 2]`` float32 RoPE inverse frequencies.
        norm_mean, norm_scale: ``[B, H, D]`` float32 per-channel normalization of pre-RoPE keys.
        t: static parameters.

    Returns:
        ``(codes, scale_codes)``: uint8 ``[B, H, n, key_bits * D / 8]`` and uint8 ``[B, H, n]``.
    """
    pre = apply_rotary(key.float(), positions, inv_freq, attention_scaling=t.attention_scaling,
                       rotary_dim=t.rotary_dim, layout=t.layout, inverse=True)
    x = (pre - norm_mean[:, :, None]) / norm_scale[:, :, None]
    return quantize_vectors(x @ hadamard.T, code_for(t.kind, t.key_bits))


def decode_keys(codes: torch.Tensor, scale_codes: torch.Tensor, positions: torch.Tensor, hadamard: torch.Tensor,
                inv_freq: torch.Tensor, norm_mean: torch.Tensor, norm_scale: torch.Tensor,
                t: KVTransform) -> torch.Tensor:
    """Inverse of :func:`encode_keys`: float32 ``[B, H, n, D]`` post-RoPE keys at ``positions`` ``[B, H|1, n]``
    (integer), from codes ``[B, H, n, key_bits * D / 8]`` and scale codes ``[B, H, n]`` (uint8); the other arguments
    as for :func:`encode_keys`.

    After the Hadamard product, the per-channel de-normalization and RoPE (:func:`_denormalize_rotate`) are
    elementwise: eagerly on the CPU they run as one kernel that Inductor generates from that function
    (:mod:`~nqcompile.codec.cpu_kernel`), one pass over the keys instead of about ten. RoPE's cos/sin tables are
    computed before it as :func:`~nqcompile.codec.rope.apply_rotary` computes them, and the kernel's products and
    sums round as the eager ops do, so both paths give the same keys bit for bit (``tests/codec/test_kv_kernel.py``).
    For 3- and 4-bit E8 codes the whole decode is one kernel (:func:`_fused_kernel`: the codes read in place as int32
    words, the E8 decode, the per-vector scale, the Hadamard product and the de-normalization and RoPE), the same
    keys bit for bit again.
    """
    dim = hadamard.shape[0]
    code = code_for(t.kind, t.key_bits)
    cos, sin = rotary_cos_sin(positions, inv_freq, attention_scaling=t.attention_scaling, layout=t.layout)
    fused = _fused_kernel(code, codes, scale_codes, hadamard, norm_mean, norm_scale, positions, inv_freq, t)
    if fused is not None:
        kernel, words, s = fused
        return kernel(words, s, code.shift, hadamard, norm_scale.contiguous(), norm_mean.contiguous(),
                      cos.contiguous(), sin.contiguous())
    x = dequantize_vectors(codes, scale_codes, code, dim) @ hadamard
    args = (x, norm_scale, norm_mean, cos, sin)
    kernel = _denormalize_rotate_kernel(*args, layout=t.layout) if x.numel() and eager_on_cpu(*args) else None
    if kernel is None:
        return _denormalize_rotate(*args, layout=t.layout)
    return kernel(*(a.contiguous() for a in args))


def _denormalize_rotate(x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor, *, layout: str) -> torch.Tensor:
    """Pre-RoPE keys ``x * scale + mean`` (``x`` float32 ``[B, H, n, D]``, ``scale``/``mean`` ``[B, H, D]``) rotated
    by RoPE's tables ``cos``/``sin`` ``[B, H or 1, n, rotary_dim]`` (:func:`~nqcompile.codec.rope.rotate_by`)."""
    return rotate_by(x * scale[:, :, None] + mean[:, :, None], cos, sin, layout=layout)


def _denormalize_rotate_kernel(x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, cos: torch.Tensor,
                               sin: torch.Tensor, *, layout: str):
    """The CPU kernel of :func:`_denormalize_rotate` for these tensors' head dim, rotary dim, layout and whether the
    positions are shared by the heads (``cos.shape[1] == 1``), or None where Inductor cannot build it. It is traced
    with distinct sizes (every size a symbol) and takes contiguous tensors."""
    dim, rotary_dim, shared = x.shape[-1], cos.shape[-1], cos.shape[1] == 1
    example = (torch.zeros(2, 3, 5, dim), torch.zeros(2, 3, dim), torch.zeros(2, 3, dim),
               torch.zeros(2, 1 if shared else 3, 5, rotary_dim), torch.zeros(2, 1 if shared else 3, 5, rotary_dim))
    heads = "shared" if shared else "per_head"
    return cpu_kernel(f"denormalize_rotate(head_dim={dim}, rotary_dim={rotary_dim}, layout={layout}, "
                      f"positions={heads})", lambda *a: _denormalize_rotate(*a, layout=layout), *example)


def _decode_keys_words(words: torch.Tensor, s: torch.Tensor, shift: torch.Tensor, hadamard: torch.Tensor,
                       scale: torch.Tensor, mean: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                       bits: int, gain: float, layout: str) -> torch.Tensor:
    """:func:`decode_keys` from the codes' int32 words (:func:`~nqcompile.codec.lattice.word_view`), the decoded
    per-vector scales ``s`` ``[B, H, n]`` and RoPE's tables, traceable: what the fused CPU kernel computes."""
    x = (decode_words(words, shift, bits=bits, gain=gain) * s[..., None]) @ hadamard
    return _denormalize_rotate(x, scale, mean, cos, sin, layout=layout)


def _decode_values_words(words: torch.Tensor, s: torch.Tensor, shift: torch.Tensor, hadamard: torch.Tensor,
                         scale: torch.Tensor, mean: torch.Tensor, *, bits: int, gain: float) -> torch.Tensor:
    """:func:`decode_values` from the codes' int32 words and decoded scales ``s``, traceable (the fused CPU kernel)."""
    y = (decode_words(words, shift, bits=bits, gain=gain) * s[..., None]) @ hadamard
    return y * scale[:, :, None] + mean[:, :, None]


def _fused_kernel(code, codes: torch.Tensor, scale_codes: torch.Tensor, hadamard: torch.Tensor,
                  norm_mean: torch.Tensor, norm_scale: torch.Tensor, positions: torch.Tensor | None,
                  inv_freq: torch.Tensor | None, t: KVTransform):
    """``(kernel, words, s)`` for decoding ``codes`` by one CPU kernel that Inductor generates from
    :func:`_decode_keys_words` (``positions`` given) or :func:`_decode_values_words`: the E8 decode straight from the
    codes' int32 words (no transposed copy of the codes), the per-vector scale, the Hadamard product, the
    per-channel scale and mean and, for keys, RoPE (its cos/sin tables computed eagerly before: in the kernel they
    would be computed once per head and element instead of once per position, several times slower, and round
    differently). The same values as the ops one by one, bit for bit. None where this path does
    not apply (another code, 2 bits, 3 bits with a head dim not a multiple of 32, not on the CPU, inside a trace, no
    tokens) or Inductor cannot build the kernel; the caller then runs the ops one by one."""
    if not isinstance(code, E8LatticeCode) or code.bits == 2 or codes.shape[-2] == 0:
        return None
    tensors = (codes, scale_codes, hadamard, norm_mean, norm_scale) + (() if positions is None else (positions,))
    if not eager_on_cpu(*tensors) or hadamard.dtype != torch.float32 or norm_mean.dtype != torch.float32 \
            or norm_scale.dtype != torch.float32:
        return None
    words = word_view(codes, code.bits)
    if words is None:
        return None
    dim, bits, gain, lead = hadamard.shape[0], code.bits, code.gain, codes.shape[:-1]
    if len(lead) != 3:
        return None
    width, rotary_half = words.shape[-1], 0 if inv_freq is None else inv_freq.shape[-1]
    # Example sizes for the batch, heads and tokens that no fixed size equals: make_fx gives equal sizes one symbol.
    b, h, n = [size for size in range(2, 64) if size not in (width, 8, dim, 2 * rotary_half)][:3]
    example = [torch.zeros(b, h, n, width, dtype=torch.int32), torch.zeros(b, h, n), torch.zeros(8),
               torch.zeros(dim, dim), torch.zeros(b, h, dim), torch.zeros(b, h, dim)]
    if positions is None:
        name = f"decode_values_words(bits={bits}, gain={gain!r}, head_dim={dim})"
        kernel = cpu_kernel(name, lambda *a: _decode_values_words(*a, bits=bits, gain=gain), *example)
    else:
        if positions.dim() != 3 or positions.is_floating_point() or inv_freq is None:
            return None
        shared, rotary_dim = positions.shape[1] == 1, 2 * rotary_half
        example += [torch.zeros(b, 1 if shared else h, n, rotary_dim) for _ in range(2)]  # distinct: cos, sin
        name = (f"decode_keys_words(bits={bits}, gain={gain!r}, head_dim={dim}, rotary_dim={rotary_dim}, "
                f"layout={t.layout}, positions={'shared' if shared else 'per_head'})")
        kernel = cpu_kernel(name, lambda *a: _decode_keys_words(*a, bits=bits, gain=gain, layout=t.layout),
                            *example)
    if kernel is None:
        return None
    return kernel, words.contiguous(), decode_scale(scale_codes).contiguous()


def encode_values(value: torch.Tensor, hadamard: torch.Tensor, norm_mean: torch.Tensor, norm_scale: torch.Tensor,
                  t: KVTransform) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize values ``[B, H, n, D]`` -> uint8 codes ``[B, H, n, value_bits * D / 8]`` and scale codes ``[B, H, n]``.

    ``norm_mean``, ``norm_scale``: ``[B, H, D]`` float32 per-channel normalization of the values.
    """
    x = (value.float() - norm_mean[:, :, None]) / norm_scale[:, :, None]
    return quantize_vectors(x @ hadamard.T, code_for(t.kind, t.value_bits))


def decode_values(codes: torch.Tensor, scale_codes: torch.Tensor, hadamard: torch.Tensor, norm_mean: torch.Tensor,
                  norm_scale: torch.Tensor, t: KVTransform) -> torch.Tensor:
    """Inverse of :func:`encode_values`: float32 ``[B, H, n, D]``."""
    dim = hadamard.shape[0]
    code = code_for(t.kind, t.value_bits)
    fused = _fused_kernel(code, codes, scale_codes, hadamard, norm_mean, norm_scale, None, None, t)
    if fused is not None:
        kernel, words, s = fused
        return kernel(words, s, code.shift, hadamard, norm_scale.contiguous(), norm_mean.contiguous())
    return fold_values(dequantize_vectors(codes, scale_codes, code, dim), None, hadamard, norm_mean, norm_scale)


def value_rows(codes: torch.Tensor, scale_codes: torch.Tensor, dim: int, t: KVTransform) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    """Value codes ``[B, H, n, value_bits * D / 8]`` (scale codes ``[B, H, n]``) as the unit-RMS code vectors ``x``
    float32 ``[B, H, n, D]`` and their scales ``s`` float32 ``[B, H, n]``: :func:`decode_values` is
    ``fold_values(s * x, None, ...)``, so a weighted sum of values can be taken over ``x`` and mapped once."""
    return code_for(t.kind, t.value_bits).decode(codes, dim), decode_scale(scale_codes)


def fold_values(weighted: torch.Tensor, weight: torch.Tensor | None, hadamard: torch.Tensor, norm_mean: torch.Tensor,
                norm_scale: torch.Tensor) -> torch.Tensor:
    """The value decoder's map after the code: ``v = (y @ H) * scale + mean`` per channel, for ``y`` the
    dequantized vector, applied to a weighted sum ``weighted = sum_t w_t y_t``, which gives ``sum_t w_t v_t``
    (the map is linear plus an offset, so attention can average the coded vectors and map the average once).

    Args:
        weighted: float ``[B, H, ..., D]`` (float32 or float64; computed in its dtype).
        weight: ``sum_t w_t`` ``[B, H, ...]``, or None for single vectors (weight 1: :func:`decode_values`).
        hadamard: ``[D, D]`` float32. norm_mean, norm_scale: ``[B, H, D]`` float32 per-channel normalization.

    Returns:
        ``[B, H, ..., D]`` in ``weighted``'s dtype.
    """
    extra = [1] * (weighted.dim() - 3)
    mean = norm_mean.view(*norm_mean.shape[:2], *extra, -1).to(weighted.dtype)
    scale = norm_scale.view(*norm_scale.shape[:2], *extra, -1).to(weighted.dtype)
    y = (weighted @ hadamard.to(weighted.dtype)) * scale
    return y + (mean if weight is None else mean * weight[..., None])
