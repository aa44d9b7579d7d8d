"""Rotary position embedding (RoPE) as applied to attention keys: the rotation and its inverse.

nqcompile quantizes keys *without* their rotary embedding (pre-RoPE keys have a stable per-channel
distribution; post-RoPE keys do not) and re-applies RoPE when the keys are read back for attention. That is
only lossless if the rotation removed and re-applied is bit-for-bit the one the model's attention layer
applied; :class:`~nqcompile.models.rope_spec.RotarySpec` reads that rotation from a model config.

Maths. For a key ``x`` at integer position ``p`` and rotary pair ``i`` (``0 <= i < rotary_dim / 2``)
with inverse frequency ``inv_freq[i]`` (radians per position), RoPE rotates the pair
``(x_a, x_b)`` by the angle ``theta_i = p * inv_freq[i]`` and multiplies it by ``attention_scaling``::

    x_a' = s * (x_a cos(theta_i) - x_b sin(theta_i))
    x_b' = s * (x_b cos(theta_i) + x_a sin(theta_i))

Which dims form a pair is the ``layout``: ``"half"`` (Llama ``rotate_half``, GPT-NeoX style): pair ``i`` is
``(i, i + rotary_dim/2)``; ``"interleaved"`` (GPT-J / Mesh-TensorFlow style): pair ``i`` is ``(2i, 2i+1)``.
Only the first ``rotary_dim`` dims of a head are rotated (partial rotary); the rest pass through unchanged.

Angles are computed exactly as transformers computes them: ``float32(position) * float32(inv_freq)``
in float32, so that removing RoPE inverts the model's rotation to float32 rounding even at large
positions (where a float64 angle would differ from the model's float32 angle by up to ~1e-3 rad).
The trigonometry and the rotation itself run in float32, or float64 when the input is float64.

Source: J. Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding", 2021, arXiv:2104.09864.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["LAYOUTS", "apply_rotary", "rotary_cos_sin", "rotate_by"]

#: Pair layouts understood by :func:`apply_rotary` (see the module docstring).
LAYOUTS = ("half", "interleaved")


# ---------------------------------------------------------------------------------------------------------
# Functional core
# ---------------------------------------------------------------------------------------------------------


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown RoPE layout {layout!r}; expected one of {LAYOUTS}")


def _as_positions(positions: Any, device: torch.device | None = None) -> torch.Tensor:
    positions = torch.as_tensor(positions, device=device)
    if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
        raise TypeError(f"positions must be an integer tensor, got dtype {positions.dtype}")
    return positions


def _angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """float32 ``[..., n, rotary_dim/2]`` angles in radians, computed exactly as transformers does."""
    inv = inv_freq.to(device=positions.device, dtype=torch.float32)
    return positions[..., None].float() * inv


def _expand_pairs(half: torch.Tensor, layout: str) -> torch.Tensor:
    """``[..., r/2]`` per-pair values -> ``[..., r]`` per-dim values for ``layout``."""
    if layout == "half":
        return torch.cat((half, half), dim=-1)
    return torch.repeat_interleave(half, 2, dim=-1)


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, *, attention_scaling: float = 1.0,
                   layout: str = "half", dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled cos/sin tables of RoPE at ``positions``.

    Args:
        positions: integer tensor ``[..., n]`` of token positions (any integer dtype).
        inv_freq: float ``[rotary_dim/2]`` inverse frequencies in radians per position (used as float32).
        attention_scaling: factor transformers multiplies cos and sin by (YaRN / LongRoPE ``attention_factor``).
        layout: ``"half"`` -> ``cat(f, f)``; ``"interleaved"`` -> ``repeat_interleave(f, 2)`` along the last dim.
        dtype: float32 (default) or float64 for the trigonometry; the angle itself is always float32.

    Returns:
        ``(cos, sin)``, each ``dtype`` ``[..., n, rotary_dim]`` on ``positions.device``, already multiplied
        by ``attention_scaling`` (same convention as transformers' ``*RotaryEmbedding.forward``).

    Raises:
        TypeError: non-integer positions. ValueError: unknown layout.
    """
    _check_layout(layout)
    positions = _as_positions(positions)
    angles = _angles(positions, inv_freq).to(dtype)  # one cosine and sine per pair, then the pair's two dims
    return (_expand_pairs(angles.cos() * attention_scaling, layout),
            _expand_pairs(angles.sin() * attention_scaling, layout))


def _rotate(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Multiply each pair by ``i``: ``(a, b) -> (-b, a)`` (transformers' ``rotate_half`` / ``rotate_every_two``)."""
    if layout == "half":
        h = x.shape[-1] // 2
        return torch.cat((-x[..., h:], x[..., :h]), dim=-1)
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def _align_positions(positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Give ``positions`` ``x.ndim - 1`` dims by inserting size-1 dims just before ``n``.

    The leading dims of ``positions`` line up with the *leading* dims of ``x`` (HF convention:
    ``x [B, H, n, D]`` with ``positions [B, n]`` -> ``[B, 1, n]``).
    """
    if x.ndim < 2:
        raise ValueError(f"x must be [..., n, head_dim], got shape {tuple(x.shape)}")
    if positions.ndim == 0:
        raise ValueError("positions must have at least one dim [..., n]")
    if positions.ndim > x.ndim - 1:
        raise ValueError(f"positions {tuple(positions.shape)} has more dims than x {tuple(x.shape)} minus head_dim")
    while positions.ndim < x.ndim - 1:
        positions = positions.unsqueeze(-2)
    if positions.shape[-1] not in (1, x.shape[-2]):
        raise ValueError(f"positions {tuple(positions.shape)} do not match the n={x.shape[-2]} tokens of x "
                         f"{tuple(x.shape)}")
    return positions


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, *, attention_scaling: float = 1.0,
                 rotary_dim: int | None = None, layout: str = "half", inverse: bool = False) -> torch.Tensor:
    """Apply (or, with ``inverse=True``, remove) RoPE on the leading ``rotary_dim`` dims of ``x``.

    Args:
        x: float tensor ``[..., n, head_dim]`` (e.g. keys ``[B, H, n, D]``).
        positions: integer tensor ``[..., n]``; its leading dims line up with the leading dims of ``x``
            and missing ones are inserted just before ``n`` (``[B, n]`` and ``[B, H, n]`` both work for
            ``x [B, H, n, D]``; ``[n]`` works for any ``x``).
        inv_freq: ``[rotary_dim/2]`` inverse frequencies, radians per position (used as float32).
        attention_scaling: factor multiplying cos/sin (the forward rotation scales the norm by it).
        rotary_dim: number of leading dims rotated (even, ``<= head_dim``); default ``2 * len(inv_freq)``.
        layout: ``"half"`` or ``"interleaved"`` (see module docstring).
        inverse: rotate by ``-theta`` and divide by ``attention_scaling`` -- the exact inverse.

    Returns:
        Tensor of ``x``'s shape and dtype. Computed in float32 (float64 if ``x`` is float64); the
        ``head_dim - rotary_dim`` tail dims are returned bit-for-bit unchanged.

    Raises:
        ValueError: bad layout / shapes / rotary_dim. TypeError: non-float ``x`` or non-integer positions.
    """
    _check_layout(layout)
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor, got dtype {x.dtype}")
    half = inv_freq.shape[-1]
    if rotary_dim is None:
        rotary_dim = 2 * half
    if inv_freq.ndim != 1 or rotary_dim != 2 * half:
        raise ValueError(f"inv_freq must be 1-D with rotary_dim/2={rotary_dim // 2} entries, got {tuple(inv_freq.shape)}")
    if rotary_dim > x.shape[-1]:
        raise ValueError(f"rotary_dim={rotary_dim} exceeds the last dim of x {tuple(x.shape)}")
    if not attention_scaling > 0 or not math.isfinite(attention_scaling):
        raise ValueError(f"attention_scaling must be a positive finite float, got {attention_scaling}")
    positions = _align_positions(_as_positions(positions, device=x.device), x)

    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    if not inverse:
        cos, sin = rotary_cos_sin(positions, inv_freq, attention_scaling=attention_scaling, layout=layout, dtype=compute)
        return rotate_by(x, cos, sin, layout=layout)
    rot = x[..., :rotary_dim].to(compute)
    cos, sin = rotary_cos_sin(positions, inv_freq, layout=layout, dtype=compute)
    return _with_tail(((rot * cos - _rotate(rot, layout) * sin) / attention_scaling).to(x.dtype), x)


def rotate_by(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, layout: str = "half") -> torch.Tensor:
    """The forward rotation of :func:`apply_rotary` from its cos/sin tables: ``x * cos + rotate(x) * sin`` on the
    leading ``rotary_dim`` dims (transformers' op order), the rest of ``x`` unchanged.

    Elementwise ops only, so a compiled kernel can fuse it with what produces ``x``
    (:func:`nqcompile.codec.kv.decode_keys` on the CPU) and still give :func:`apply_rotary`'s values bit for bit.

    Args:
        x: float ``[..., n, head_dim]``.
        cos, sin: ``[..., n, rotary_dim]`` from :func:`rotary_cos_sin` (with ``attention_scaling``), broadcastable
            against ``x``'s leading dims, in the compute dtype (float32, or float64 for a float64 ``x``).
        layout: ``"half"`` or ``"interleaved"``.

    Returns:
        Tensor of ``x``'s shape and dtype.
    """
    rot = x[..., :cos.shape[-1]].to(cos.dtype)
    return _with_tail((rot * cos + _rotate(rot, layout) * sin).to(x.dtype), x)


def _with_tail(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out`` (the rotated leading dims of ``x``) followed by ``x``'s remaining dims, which are not rotated."""
    rotary_dim = out.shape[-1]
    if rotary_dim == x.shape[-1]:
        return out
    tail = x[..., rotary_dim:]
    return torch.cat((out, tail.expand(*out.shape[:-1], tail.shape[-1])), dim=-1)
