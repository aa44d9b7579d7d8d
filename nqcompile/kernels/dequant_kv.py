"""``nqcompile::e8_dequant_kv``: E8 codes back to float keys (RoPE re-applied) and values, one launch.

The inverse of :func:`nqcompile.ops.write_kv` up to quantization error, as :func:`nqcompile.ops.dequant_kv` computes
it with torch ops (:func:`nqcompile.codec.kv.decode_keys`, :func:`~nqcompile.codec.kv.decode_values`), fused: one
program per (sequence, KV head, block of ``BLOCK_N`` slots; the block and the warps from
:func:`nqcompile.kernels.launch_configs.dequant_config`) reads the packed labels and scale codes and writes the
float32 rows. Per slot (:mod:`nqcompile.kernels.lattice` for the codewords):

* ``x H = gain * scale / sqrt(D) * (c @ sqrt(D) H - centroid @ sqrt(D) H)``, ``c`` the codebook representative of
  the labels: ``c`` and the ``±1`` matrix ``sqrt(D) H`` are exact in float16, so the product on the tensor cores is
  exact (float32 accumulation of half-integers);
* keys: de-normalized (``x H * scale + mean``, the pre-RoPE per-channel statistics) and rotated by RoPE at the
  slot's position, pair by pair (halves ``A``, ``B`` of the pairs, as the decode kernel); values: de-normalized.

The torch reference decodes the same codewords (bit for bit) and applies the same float32 operations in another
order, so the two agree to float32 rounding (about 1e-7 relative).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..codec.registry import code_for
from .launch_configs import dequant_config
from .lattice import codec_reason, decode_scales, e8_codewords, pow2, rope_pairs, rotated_keys

__all__ = ["e8_dequant_kv", "unsupported_reason", "MAX_HEAD_DIM"]

#: Largest head dimension the kernel takes (its ``[D, D]`` Hadamard matrix is held per program).
MAX_HEAD_DIM = 256
_TWO_PI = 2.0 * math.pi


@triton.jit
def _dequant_kernel(
    kc_ptr, ks_ptr, vc_ptr, vs_ptr, pos_ptr, hpm_ptr, freq_ptr, kmean_ptr, kscale_ptr, vmean_ptr, vscale_ptr,
    cent_ptr, ko_ptr, vo_ptr,
    skc_b, skc_h, skc_t, skc_c, sks_b, sks_h, sks_t,
    svc_b, svc_h, svc_t, svc_c, svs_b, svs_h, svs_t,
    sp_b, sp_h, sp_t, sn_b, sn_h, sn_d, so_b, so_h, so_t,
    H, N, key_unit, value_unit, attention_scaling,
    D: tl.constexpr, ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr, KEY_BITS: tl.constexpr,
    VALUE_BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
    TWO_PI: tl.constexpr,
):
    """One (sequence, KV head, block of slots): writes ``ko[b, h, t]`` and ``vo[b, h, t]`` (``[D]`` float32) for the
    block's slots ``t < N``."""
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    t = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    live = t < N

    pair, ca, cb, freq, amp = rope_pairs(freq_ptr, attention_scaling, D, ROTARY, INTERLEAVED, BLOCK_P)

    r = tl.arange(0, BLOCK_D)
    r_ok = r < D
    norm = b * sn_b + h * sn_h
    out_rows = b * so_b + h * so_h + t * so_t
    # Keys: x H in the halves A, B of the RoPE pairs, de-normalized, rotated.
    h_ok = r_ok[:, None] & pair[None, :]
    ha = tl.load(hpm_ptr + r[:, None] * D + ca[None, :], mask=h_ok, other=0.0)
    hb = tl.load(hpm_ptr + r[:, None] * D + cb[None, :], mask=h_ok, other=0.0)
    key_mu = tl.load(cent_ptr + (KEY_BITS - 2) * 8 + r % 8, mask=r_ok, other=0.0)
    mu_a = tl.sum(key_mu[:, None] * ha.to(tl.float32), axis=0)
    mu_b = tl.sum(key_mu[:, None] * hb.to(tl.float32), axis=0)
    ck = e8_codewords(kc_ptr + b * skc_b + h * skc_h + t * skc_t, skc_c, live, KEY_BITS, D, BLOCK_N, BLOCK_D)
    ck = ck.to(tl.float16)
    unit = decode_scales(ks_ptr + b * sks_b + h * sks_h + t * sks_t, live) * key_unit
    mean_a = tl.load(kmean_ptr + norm + ca * sn_d, mask=pair, other=0.0)
    mean_b = tl.load(kmean_ptr + norm + cb * sn_d, mask=pair, other=0.0)
    scale_a = tl.load(kscale_ptr + norm + ca * sn_d, mask=pair, other=0.0)
    scale_b = tl.load(kscale_ptr + norm + cb * sn_d, mask=pair, other=0.0)
    pos = tl.load(pos_ptr + b * sp_b + h * sp_h + t * sp_t, mask=live, other=0).to(tl.float32)
    k_a, k_b = rotated_keys(ck, unit, pos, ha, hb, mu_a, mu_b, scale_a, scale_b, mean_a, mean_b, freq, amp, TWO_PI)
    keep = live[:, None] & pair[None, :]
    tl.store(ko_ptr + out_rows[:, None] + ca[None, :], k_a, mask=keep)
    tl.store(ko_ptr + out_rows[:, None] + cb[None, :], k_b, mask=keep)
    # Values: x H, de-normalized.
    hv = tl.load(hpm_ptr + r[:, None] * D + r[None, :], mask=r_ok[:, None] & r_ok[None, :], other=0.0)
    value_mu = tl.load(cent_ptr + (VALUE_BITS - 2) * 8 + r % 8, mask=r_ok, other=0.0)
    mu_v = tl.sum(value_mu[:, None] * hv.to(tl.float32), axis=0)
    cv = e8_codewords(vc_ptr + b * svc_b + h * svc_h + t * svc_t, svc_c, live, VALUE_BITS, D, BLOCK_N, BLOCK_D)
    unit_v = decode_scales(vs_ptr + b * svs_b + h * svs_h + t * svs_t, live) * value_unit
    mean_v = tl.load(vmean_ptr + norm + r * sn_d, mask=r_ok, other=0.0)
    scale_v = tl.load(vscale_ptr + norm + r * sn_d, mask=r_ok, other=0.0)
    v = (tl.dot(cv.to(tl.float16), hv) - mu_v[None, :]) * unit_v[:, None] * scale_v[None, :] + mean_v[None, :]
    tl.store(vo_ptr + out_rows[:, None] + r[None, :], v, mask=live[:, None] & r_ok[None, :])


@triton_op("nqcompile::e8_dequant_kv", mutates_args=())
def e8_dequant_kv(
    k_codes: torch.Tensor, k_scales: torch.Tensor, v_codes: torch.Tensor, v_scales: torch.Tensor,
    positions: torch.Tensor, hadamard: torch.Tensor, inv_freq: torch.Tensor, norm_mean: torch.Tensor,
    norm_scale: torch.Tensor, centroids: torch.Tensor, key_bits: int, value_bits: int, attention_scaling: float,
    rotary_dim: int, layout: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode ``n`` stored E8 tokens per (sequence, KV head): :func:`nqcompile.ops.dequant_kv` for kind ``"e8"``.

    Args:
        k_codes, v_codes: uint8 ``[B, H, n, bits * D / 8]`` packed labels at ``key_bits`` / ``value_bits``
            (:mod:`nqcompile.ops.layout`). k_scales, v_scales: uint8 ``[B, H, n]`` scale codes.
        positions: integer ``[B, H or 1, n]`` positions at which RoPE is re-applied to the keys.
        hadamard: float32 ``[D, D]`` (:func:`~nqcompile.codec.hadamard.hadamard_matrix`, a ``±1 / sqrt(D)`` matrix:
            :func:`unsupported_reason` requires one). inv_freq: float32 ``[rotary_dim / 2]``.
        norm_mean, norm_scale: float32 ``[2, B, H, D]``, the keys' (``[0]``, pre-RoPE) and the values' (``[1]``)
            per-channel normalization.
        centroids: :func:`nqcompile.kernels.decode_attention.centroid_table` on the codes' device.
        key_bits, value_bits: E8 bits per element (2, 3 or 4). attention_scaling, rotary_dim, layout: the RoPE.

    Returns:
        ``(keys, values)``: float32 ``[B, H, n, D]``, post-RoPE keys and values.
    """
    batch, heads, n = k_codes.shape[:3]
    dim = hadamard.shape[0]
    keys = torch.empty(batch, heads, n, dim, dtype=torch.float32, device=k_codes.device)
    values = torch.empty_like(keys)
    if n == 0:
        return keys, values
    hpm = (hadamard * math.sqrt(dim)).to(torch.float16)
    mean, scale = norm_mean.contiguous(), norm_scale.contiguous()
    pos_h = positions.stride(1) if positions.shape[1] > 1 else 0
    block, warps = dequant_config(dim, key_bits, value_bits)
    grid = (batch * heads, triton.cdiv(n, block))
    wrap_triton(_dequant_kernel)[grid](
        k_codes, k_scales, v_codes, v_scales, positions, hpm, inv_freq.float().contiguous(), mean[0], scale[0],
        mean[1], scale[1], centroids, keys, values,
        *k_codes.stride(), *k_scales.stride(), *v_codes.stride(), *v_scales.stride(),
        positions.stride(0), pos_h, positions.stride(2), *mean[0].stride(), *keys.stride()[:3],
        heads, n, code_for("e8", key_bits).gain / math.sqrt(dim), code_for("e8", value_bits).gain / math.sqrt(dim),
        attention_scaling,
        D=dim, ROTARY=rotary_dim, INTERLEAVED=layout == "interleaved", KEY_BITS=key_bits, VALUE_BITS=value_bits,
        BLOCK_N=block, BLOCK_D=pow2(dim), BLOCK_P=pow2(dim // 2), TWO_PI=_TWO_PI, num_warps=warps,
    )
    return keys, values


def unsupported_reason(k_codes: torch.Tensor, kind: str, bits: tuple[int, ...], dim: int, rotary_dim: int,
                       layout: str, inv_freq: torch.Tensor) -> Optional[str]:
    """Why :func:`e8_dequant_kv` cannot decode these codes, or None when it can (shapes, dtypes and static arguments
    only, never tensor values).

    Args:
        k_codes: ``[B, H, n, ...]`` uint8. kind: the codec name. bits: key and value bits. dim: head_dim.
        rotary_dim, layout, inv_freq: the codec's RoPE.

    Returns:
        None, or a sentence naming the first unsupported property (the caller then runs the torch reference).
    """
    if k_codes.dim() != 4 or k_codes.dtype != torch.uint8:
        return f"codes of shape {tuple(k_codes.shape)} and dtype {k_codes.dtype} (uint8 [B, H, n, bytes] expected)"
    return codec_reason(kind, bits, dim, rotary_dim, layout, inv_freq, MAX_HEAD_DIM)
