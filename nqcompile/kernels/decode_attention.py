"""``nqcompile::e8_decode_attention``: decode attention (one query per sequence) over E8 codes, split-K.

Flash-decoding (Dao, Haziza, Massa, Sizov 2023, "Flash-Decoding for long-context inference"): the code slots of
each (sequence, KV head) are cut into splits, one program per (sequence, KV head, split), each running the
online softmax (Milakov & Gimelshein 2018, "Online normalizer calculation for softmax", arXiv:1805.02867) over its
slots and writing a partial result ``(acc, m, l)``; a merge then combines the splits, the warm tier's splits and
the exact segment by their log-sum-exp. Nothing decoded ever reaches memory: the partials are ``[G, D]`` per
program.

One program of :func:`_code_split_kernel` holds all ``G`` query heads of its KV group (GQA: the codes are read
once per group) and, per block of ``BLOCK_N`` slots (the launch configuration,
:mod:`nqcompile.kernels.launch_configs`), in registers:

* keys: the packed labels of every 8-dim block are read as one little-endian word, turned into the lattice point
  ``k G`` and reduced to the codebook's representative ``c = k G - q e8_nearest(k G / q)``
  (:mod:`nqcompile.codec.lattice`; the nearest-point search is Conway and Sloane's, with the same tie rules, so
  ``c`` equals the reference bit for bit). ``c`` is exact in float16 (half-integers below 2**10) and so is the
  ``±1`` Hadamard matrix ``sqrt(D) H``: ``c @ (sqrt(D) H)`` runs on the tensor cores with no rounding at all. The
  centroid shift, the gain, the one-byte scale, ``1 / sqrt(D)`` and the per-channel normalization are applied to
  that product (``x H = gain * scale / sqrt(D) * (c @ sqrt(D) H - centroid @ sqrt(D) H)``), then RoPE is applied
  pair by pair: the product is taken as two halves, ``A`` the first and ``B`` the second dim of every RoPE pair
  (``"half"``: ``i`` and ``i + rotary_dim / 2``; ``"interleaved"``: ``2i`` and ``2i + 1``; the dims past
  ``rotary_dim`` paired among themselves with angle 0 and no scaling), so the rotation is elementwise and the score
  ``q . k = q_A . k_A + q_B . k_B``. Keys cannot fold the Hadamard matrix into the query: RoPE, which depends on
  each slot's position, sits between the two.
* values: the centroid, the inverse Hadamard transform and the normalization fold into the output, exactly (all
  linear). A value decodes as ``v_t = s * (x_t @ H) + mean`` with ``x_t = gain scale_t (c_t - centroid)``, so
  ``sum_t p_t v_t = s * ((sum_t p_t x_t) @ H) + mean * sum_t p_t``: a program accumulates ``(p gain scale) @ c`` and
  ``sum(p gain scale)`` over its slots and writes ``sum_t p_t x_t`` (the Hadamard domain); the merge applies ``H``,
  ``s`` and ``mean`` once per query head, after combining the splits of the codes and of the warm tier (which share
  the codec's ``H``, ``s`` and ``mean``).

Scores are taken in base 2 (``scaling * log2(e)`` folded into the query). Dots: ``c @ sqrt(D) H`` in float16 (exact),
``q . k`` in float32 (``input_precision="ieee"``: the scores are exponentiated, so their rounding matters most),
``p @ c`` at the default float32 precision (TF32 on NVIDIA GPUs: ``c`` is exact there, ``p`` rounded to 10 bits,
errors averaging over the slots).

The warm tier is the same kernel over the warm codes (at ``warm_bits``, validity from ``warm_mask``); the exact
segment (sinks, window, new tokens: a few dozen float tokens) and the merge (:func:`merge_partials`) are torch ops
inside the ``triton_op``, which Inductor fuses where the op is compiled.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..codec.registry import code_for
from .launch_configs import DecodeConfig, decode_config
from .lattice import centroid_table, codec_reason, decode_scales, e8_codewords, pow2, rope_pairs, rotated_keys

__all__ = ["e8_decode_attention", "code_split_partials", "merge_partials", "centroid_table", "unsupported_reason",
           "split_tokens", "decode_attention_float32", "MAX_HEAD_DIM", "MAX_GROUP"]

#: Largest head dimension the kernel takes (its ``[G, D]`` accumulator and ``[D, D / 2]`` Hadamard halves live in
#: registers and shared memory).
MAX_HEAD_DIM = 256
#: Most query heads per KV head the kernel takes (one program holds them all).
MAX_GROUP = 64

_LOG2E = math.log2(math.e)
_TWO_PI = 2.0 * math.pi


@triton.jit
def _code_split_kernel(
    q_ptr, kc_ptr, ks_ptr, vc_ptr, vs_ptr, pos_ptr, lim_ptr, hpm_ptr, freq_ptr, mean_ptr, scale_ptr, cent_ptr,
    o_ptr, m_ptr, l_ptr,
    sq_b, sq_h, sq_d,
    skc_b, skc_h, skc_t, skc_c, sks_b, sks_h, sks_t,
    svc_b, svc_h, svc_t, svc_c, svs_b, svs_h, svs_t,
    sp_b, sp_h, sp_t, sl_b, sl_t,
    sn_b, sn_h, sn_d,
    so_b, so_h, so_s, sm_b, sm_h, sm_s,
    H, C, split_tokens, qk_scale, key_unit, value_gain, attention_scaling,
    G: tl.constexpr, D: tl.constexpr, ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr,
    KEY_BITS: tl.constexpr, VALUE_BITS: tl.constexpr, BY_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
    TWO_PI: tl.constexpr,
):
    """One (sequence, KV head, split): online softmax of the group's queries over the split's code slots.

    Writes ``o[b, h*G + g, split]`` (``[D]``, the Hadamard-domain sum ``sum_t 2**(s_t - m) x_t``), ``m`` (the
    running max of the base-2 scores, ``-inf`` if no slot was seen) and ``l`` (``sum_t 2**(s_t - m)``). Slots
    seen: those of ``[split * split_tokens, (split + 1) * split_tokens)`` below ``min(lim[b], C)`` (``BY_MASK``
    false: ``lim`` holds the lengths) or below ``C`` whose ``lim[b, t]`` is true (``BY_MASK``: ``lim`` is a mask).
    """
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)

    pair, ca, cb, freq, amp = rope_pairs(freq_ptr, attention_scaling, D, ROTARY, INTERLEAVED, BLOCK_P)

    g = tl.arange(0, BLOCK_G)
    q_rows = q_ptr + b * sq_b + (h * G + g) * sq_h
    q_ok = (g < G)[:, None] & pair[None, :]
    qa = tl.load(q_rows[:, None] + ca[None, :] * sq_d, mask=q_ok, other=0.0).to(tl.float32) * qk_scale
    qb = tl.load(q_rows[:, None] + cb[None, :] * sq_d, mask=q_ok, other=0.0).to(tl.float32) * qk_scale

    r = tl.arange(0, BLOCK_D)
    r_ok = r < D
    h_ok = r_ok[:, None] & pair[None, :]
    key_mu = tl.load(cent_ptr + (KEY_BITS - 2) * 8 + r % 8, mask=r_ok, other=0.0)
    ha = tl.load(hpm_ptr + r[:, None] * D + ca[None, :], mask=h_ok, other=0.0)
    hb = tl.load(hpm_ptr + r[:, None] * D + cb[None, :], mask=h_ok, other=0.0)
    mu_a = tl.sum(key_mu[:, None] * ha.to(tl.float32), axis=0)
    mu_b = tl.sum(key_mu[:, None] * hb.to(tl.float32), axis=0)
    norm = b * sn_b + h * sn_h
    mean_a = tl.load(mean_ptr + norm + ca * sn_d, mask=pair, other=0.0)
    mean_b = tl.load(mean_ptr + norm + cb * sn_d, mask=pair, other=0.0)
    scale_a = tl.load(scale_ptr + norm + ca * sn_d, mask=pair, other=0.0)
    scale_b = tl.load(scale_ptr + norm + cb * sn_d, mask=pair, other=0.0)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    p_sum = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    start = split * split_tokens
    stop = tl.minimum(start + split_tokens, C)
    if not BY_MASK:
        stop = tl.minimum(stop, tl.load(lim_ptr + b * sl_b).to(tl.int32))
    for t0 in range(start, stop, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        live = t < stop
        if BY_MASK:
            live = live & (tl.load(lim_ptr + b * sl_b + t * sl_t, mask=live, other=0) != 0)
        # Keys: x H (halves A, B of the RoPE pairs), de-normalized, rotated.
        ck = e8_codewords(kc_ptr + b * skc_b + h * skc_h + t * skc_t, skc_c, live, KEY_BITS, D, BLOCK_N, BLOCK_D)
        ck = ck.to(tl.float16)
        unit = decode_scales(ks_ptr + b * sks_b + h * sks_h + t * sks_t, live) * key_unit
        pos = tl.load(pos_ptr + b * sp_b + h * sp_h + t * sp_t, mask=live, other=0).to(tl.float32)
        k_a, k_b = rotated_keys(ck, unit, pos, ha, hb, mu_a, mu_b, scale_a, scale_b, mean_a, mean_b, freq, amp, TWO_PI)
        s = tl.dot(qa, tl.trans(k_a), input_precision="ieee") + tl.dot(qb, tl.trans(k_b), input_precision="ieee")
        s = tl.where(live[None, :], s, float("-inf"))
        # Online softmax (base 2); m_use keeps exp2 finite while nothing has been seen.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        # Values, Hadamard domain: p weighted by gain * scale, times the codewords.
        cv = e8_codewords(vc_ptr + b * svc_b + h * svc_h + t * svc_t, svc_c, live, VALUE_BITS, D, BLOCK_N, BLOCK_D)
        pw = p * (decode_scales(vs_ptr + b * svs_b + h * svs_h + t * svs_t, live) * value_gain)[None, :]
        acc = acc * alpha[:, None] + tl.dot(pw, cv)
        p_sum = p_sum * alpha + tl.sum(pw, axis=1)
        m_i = m_new

    # sum_t p_t x_t = sum_t p_t gain scale_t (c_t - centroid).
    value_mu = tl.load(cent_ptr + (VALUE_BITS - 2) * 8 + r % 8, mask=r_ok, other=0.0)
    out = acc - p_sum[:, None] * value_mu[None, :]
    rows = b * so_b + (h * G + g) * so_h + split * so_s
    tl.store(o_ptr + rows[:, None] + r[None, :], out, mask=(g < G)[:, None] & r_ok[None, :])
    stats = b * sm_b + (h * G + g) * sm_h + split * sm_s
    tl.store(m_ptr + stats, m_i, mask=g < G)
    tl.store(l_ptr + stats, l_i, mask=g < G)


def split_tokens(capacity: int, batch_heads: int, config: DecodeConfig, device: torch.device) -> int:
    """Code slots per split (a multiple of ``config.block``) for ``capacity`` slots and ``batch_heads`` (sequence,
    KV head) pairs: enough splits for about ``config.programs_per_sm`` programs per streaming multiprocessor in all
    (off CUDA, as if there were 4 multiprocessors), never more splits than blocks. Depends on shapes only (no
    synchronization; CUDA-graph safe)."""
    blocks = max(1, triton.cdiv(capacity, config.block))
    units = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    splits = min(blocks, max(1, triton.cdiv(config.programs_per_sm * units, max(1, batch_heads))))
    return triton.cdiv(blocks, splits) * config.block


def code_split_partials(
    query: torch.Tensor, k_codes: torch.Tensor, k_scales: torch.Tensor, v_codes: torch.Tensor, v_scales: torch.Tensor,
    positions: torch.Tensor, limit: torch.Tensor, hadamard_pm1: torch.Tensor, inv_freq: torch.Tensor,
    key_mean: torch.Tensor, key_scale: torch.Tensor, centroids: torch.Tensor, *, key_bits: int, value_bits: int,
    attention_scaling: float, rotary_dim: int, layout: str, scaling: float, by_mask: bool, split: int,
    config: DecodeConfig, out: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> None:
    """Launch :func:`_code_split_kernel`: per-split partial attention of one query per sequence over a code segment.

    Args:
        query: ``[B, Hq, 1, D]`` post-RoPE queries (float16, bfloat16 or float32), ``Hq = H * G``.
        k_codes, v_codes: uint8 ``[B, H, C, bits * D / 8]`` packed E8 labels (:mod:`nqcompile.ops.layout`).
        k_scales, v_scales: uint8 ``[B, H, C]`` scale codes.
        positions: integer ``[B, H or 1, C]`` positions of the slots (RoPE is applied there).
        limit: ``by_mask`` false: int64 ``[B]`` (or ``[B, 1]``) slots held per sequence; ``by_mask`` true: bool
            ``[B, 1, C]``, the slots the query sees.
        hadamard_pm1: float16 ``[D, D]``, ``sqrt(D)`` times the orthonormal Hadamard matrix (entries ``±1``).
        inv_freq: float32 ``[rotary_dim / 2]``. key_mean, key_scale: float32 ``[B, H, D]`` with the same strides,
            the keys' per-channel normalization (``norm_mean[0]``, ``norm_scale[0]`` of :func:`nqcompile.ops.write_kv`).
        centroids: :func:`centroid_table` on the device.
        key_bits, value_bits: E8 bits per element (2, 3 or 4). attention_scaling, rotary_dim, layout: the RoPE.
        scaling: softmax scale of the scores.
        by_mask: how ``limit`` reads (above).
        split: code slots per program, a multiple of ``config.block`` (:func:`split_tokens`).
        config: the launch (:func:`nqcompile.kernels.launch_configs.decode_config`): ``block`` slots per step of
            the loop, ``warps`` per program (its ``programs_per_sm`` went into ``split``).
        out: ``(o, m, l)``, float32 ``[B, Hq, S, D]``, ``[B, Hq, S]``, ``[B, Hq, S]`` with ``S = ceil(C / split)``,
            every element overwritten. Per split: ``m`` the max base-2 score ``s_t = scaling * log2(e) * q . k_t``
            of the slots seen (``-inf``: none), ``l = sum_t 2**(s_t - m)``, and ``o = sum_t 2**(s_t - m) x_t`` in
            the Hadamard domain, ``x_t = gain * scale_t * (c_t - centroid)`` the dequantized (rotated, normalized)
            value, before ``@ H`` and the values' normalization (:func:`merge_partials` applies them).
    """
    batch, q_heads, _, dim = query.shape
    heads, capacity = k_codes.shape[1], k_codes.shape[2]
    o, m, l = out
    if key_mean.stride() != key_scale.stride():
        raise ValueError(f"key_mean and key_scale need the same strides, got {key_mean.stride()} and "
                         f"{key_scale.stride()}")
    lim_b, lim_t = (limit.stride(0), limit.stride(2)) if by_mask else (limit.stride(0), 0)
    pos_h = positions.stride(1) if positions.shape[1] > 1 else 0
    if split % config.block:
        raise ValueError(f"split={split} is not a multiple of the kernel's block of {config.block} slots")
    grid = (batch * heads, triton.cdiv(capacity, split))
    wrap_triton(_code_split_kernel)[grid](
        query, k_codes, k_scales, v_codes, v_scales, positions, limit, hadamard_pm1, inv_freq, key_mean, key_scale,
        centroids, o, m, l,
        query.stride(0), query.stride(1), query.stride(3),
        *k_codes.stride(), *k_scales.stride(),
        *v_codes.stride(), *v_scales.stride(),
        positions.stride(0), pos_h, positions.stride(2), lim_b, lim_t,
        *key_mean.stride(),
        o.stride(0), o.stride(1), o.stride(2), m.stride(0), m.stride(1), m.stride(2),
        heads, capacity, split, scaling * _LOG2E, code_for("e8", key_bits).gain / math.sqrt(dim),
        code_for("e8", value_bits).gain, attention_scaling,
        G=q_heads // heads, D=dim, ROTARY=rotary_dim, INTERLEAVED=layout == "interleaved", KEY_BITS=key_bits,
        VALUE_BITS=value_bits, BY_MASK=by_mask, BLOCK_N=config.block, BLOCK_G=pow2(q_heads // heads),
        BLOCK_D=pow2(dim), BLOCK_P=pow2(dim // 2), TWO_PI=_TWO_PI, num_warps=config.warps,
    )


def _segment(query, k_codes, k_scales, v_codes, v_scales, positions, limit, by_mask, key_bits, value_bits, codec,
             scaling):
    """Partials ``(o, m, l)`` of one code segment (:func:`code_split_partials`), launched as
    :func:`~nqcompile.kernels.launch_configs.decode_config` says for its head_dim, bits and capacity, splits by
    :func:`split_tokens`."""
    batch, q_heads, _, dim = query.shape
    capacity = k_codes.shape[2]
    config = decode_config(dim, key_bits, value_bits, capacity)
    split = split_tokens(capacity, batch * k_codes.shape[1], config, query.device)
    n_splits = triton.cdiv(capacity, split)
    o = torch.empty(batch, q_heads, n_splits, dim, dtype=torch.float32, device=query.device)
    m = torch.empty(batch, q_heads, n_splits, dtype=torch.float32, device=query.device)
    l = torch.empty_like(m)
    hadamard_pm1, inv_freq, key_mean, key_scale, centroids, attention_scaling, rotary_dim, layout = codec
    code_split_partials(query, k_codes, k_scales, v_codes, v_scales, positions, limit, hadamard_pm1, inv_freq, key_mean,
                        key_scale, centroids, key_bits=key_bits, value_bits=value_bits,
                        attention_scaling=attention_scaling, rotary_dim=rotary_dim, layout=layout, scaling=scaling,
                        by_mask=by_mask, split=split, config=config, out=(o, m, l))
    return o, m, l


def _exact_partials(query, exact_k, exact_v, exact_mask, scaling):
    """Partials ``(o, m, l)`` (one "split", base 2, float32, ``o`` in the value domain) of the exact segment:
    ``exact_k``/``exact_v`` ``[B, H, E, D]`` float, ``exact_mask`` ``[B, 1, E]`` bool."""
    batch, q_heads, _, dim = query.shape
    heads = exact_k.shape[1]
    q = query.reshape(batch, heads, q_heads // heads, dim).float()
    s = torch.matmul(q, exact_k.float().transpose(-1, -2)) * (scaling * _LOG2E)  # [B, H, G, E]
    s = s.masked_fill(~exact_mask[:, None], float("-inf"))
    m = s.amax(-1)
    p = torch.exp2(s - torch.where(m == float("-inf"), 0.0, m)[..., None])
    o = torch.matmul(p, exact_v.float())
    return o.reshape(batch, q_heads, 1, dim), m.reshape(batch, q_heads, 1), p.sum(-1).reshape(batch, q_heads, 1)


def merge_partials(coded: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                   exact: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], hadamard: torch.Tensor,
                   value_mean: torch.Tensor, value_scale: torch.Tensor) -> torch.Tensor:
    """Combine split partials into the softmax average (the flash-decoding reduction, by log-sum-exp).

    Args:
        coded: ``(o, m, l)`` triples of code segments as :func:`code_split_partials` writes them (``[B, Hq, S_i, D]``
            Hadamard-domain sums, ``[B, Hq, S_i]``, ``[B, Hq, S_i]``, float32, base-2 maxima), all of one codec
            (``H``, normalization); may be empty.
        exact: the same triple for value-domain partials (the exact segment), or None.
        hadamard: float32 ``[D, D]``. value_mean, value_scale: float32 ``[B, H, D]``, the values' per-channel
            normalization (``norm_mean[1]``, ``norm_scale[1]``).

    Returns:
        float32 ``[B, Hq, D]``: with ``M`` the max of every ``m`` and ``w = 2**(m - M)``,
        ``(value_scale * ((sum w o_coded) @ H) + value_mean * sum w l_coded + sum w o_exact) / sum w l``; zero for
        a query that saw nothing (every ``m = -inf``), as the torch reference.
    """
    parts = coded + ([exact] if exact is not None else [])
    top = torch.cat([part[1] for part in parts], 2).amax(-1, keepdim=True)
    top = torch.where(top == float("-inf"), 0.0, top)
    value, total = 0.0, 0.0
    if coded:
        w = torch.exp2(torch.cat([part[1] for part in coded], 2) - top)
        x = (w[..., None] * torch.cat([part[0] for part in coded], 2)).sum(2)  # [B, Hq, D], Hadamard domain
        seen = (w * torch.cat([part[2] for part in coded], 2)).sum(-1)
        batch, q_heads, dim = x.shape
        heads = value_mean.shape[1]
        grouped = torch.matmul(x, hadamard).view(batch, heads, q_heads // heads, dim)
        value = (grouped * value_scale[:, :, None] + value_mean[:, :, None] * seen.view(batch, heads, -1, 1))
        value, total = value.view(batch, q_heads, dim), seen
    if exact is not None:
        w = torch.exp2(exact[1] - top)
        value = value + (w[..., None] * exact[0]).sum(2)
        total = total + (w * exact[2]).sum(-1)
    return value / total.clamp(min=1.0)[..., None]  # total >= 1 once anything was seen (the max's own term is 1)


@triton_op("nqcompile::e8_decode_attention", mutates_args=())
def e8_decode_attention(
    query: torch.Tensor, k_codes: torch.Tensor, k_scales: torch.Tensor, v_codes: torch.Tensor, v_scales: torch.Tensor,
    code_pos: torch.Tensor, code_len: torch.Tensor,
    warm_k_codes: Optional[torch.Tensor], warm_k_scales: Optional[torch.Tensor], warm_v_codes: Optional[torch.Tensor],
    warm_v_scales: Optional[torch.Tensor], warm_pos: Optional[torch.Tensor], warm_mask: Optional[torch.Tensor],
    warm_bits: int, exact_k: torch.Tensor, exact_v: torch.Tensor, exact_mask: torch.Tensor, hadamard: torch.Tensor,
    inv_freq: torch.Tensor, norm_mean: torch.Tensor, norm_scale: torch.Tensor, centroids: torch.Tensor,
    key_bits: int, value_bits: int, attention_scaling: float, rotary_dim: int, layout: str, scaling: float,
) -> torch.Tensor:
    """Decode attention (one query per sequence) over E8 codes, an optional warm tier of E8 codes and an exact
    segment: the attention of :func:`nqcompile.ops.cache_attention` (no write) for ``q = 1``, kind ``"e8"``.

    Flash-decoding (Dao et al. 2023) with online softmax (Milakov & Gimelshein 2018); the design is in the module
    docstring. Only shapes decide the launch (no synchronization; CUDA-graph capturable).

    Args:
        query: ``[B, Hq, 1, D]`` post-RoPE queries, float16, bfloat16 or float32; ``Hq`` a multiple of ``H``.
        k_codes, k_scales, v_codes, v_scales: E8 codes at ``key_bits``/``value_bits`` ``[B, H, C, bits * D / 8]``
            and uint8 scale codes ``[B, H, C]`` (:mod:`nqcompile.ops.layout`).
        code_pos: integer ``[B, H or 1, C]`` slot positions. code_len: int64 ``[B]`` or ``[B, 1]``, slots held.
        warm_k_codes, warm_k_scales, warm_v_codes, warm_v_scales: the warm tier's codes at ``warm_bits``
            ``[B, H, W, ...]``, or all None. warm_pos: integer ``[B, H or 1, W]``. warm_mask: bool ``[B, 1, W]``.
        warm_bits: E8 bits of the warm codes (ignored without them).
        exact_k, exact_v: ``[B, H, E, D]`` float post-RoPE keys and values (E may be 0). exact_mask: ``[B, 1, E]``.
        hadamard: float32 ``[D, D]``, :func:`~nqcompile.codec.hadamard.hadamard_matrix` of ``D`` (its ``±1 /
            sqrt(D)`` entries are used as ``±1`` in float16: exact for every order with a true Hadamard matrix,
            which :func:`unsupported_reason` requires).
        inv_freq, norm_mean, norm_scale, attention_scaling, rotary_dim, layout: the codec's RoPE and per-channel
            normalization, as for :func:`nqcompile.ops.write_kv`.
        centroids: :func:`centroid_table` on the query's device.
        key_bits, value_bits: E8 bits of the codes (2, 3 or 4). scaling: softmax scale.

    Returns:
        ``[B, Hq, 1, D]`` in the query's dtype (zero for a query that sees nothing).
    """
    return decode_attention_float32(
        query, k_codes, k_scales, v_codes, v_scales, code_pos, code_len, warm_k_codes, warm_k_scales, warm_v_codes,
        warm_v_scales, warm_pos, warm_mask, warm_bits, exact_k, exact_v, exact_mask, hadamard, inv_freq, norm_mean,
        norm_scale, centroids, key_bits, value_bits, attention_scaling, rotary_dim, layout, scaling,
    ).unsqueeze(2).to(query.dtype)


def decode_attention_float32(
    query: torch.Tensor, k_codes: torch.Tensor, k_scales: torch.Tensor, v_codes: torch.Tensor, v_scales: torch.Tensor,
    code_pos: torch.Tensor, code_len: torch.Tensor,
    warm_k_codes: Optional[torch.Tensor], warm_k_scales: Optional[torch.Tensor], warm_v_codes: Optional[torch.Tensor],
    warm_v_scales: Optional[torch.Tensor], warm_pos: Optional[torch.Tensor], warm_mask: Optional[torch.Tensor],
    warm_bits: int, exact_k: torch.Tensor, exact_v: torch.Tensor, exact_mask: torch.Tensor, hadamard: torch.Tensor,
    inv_freq: torch.Tensor, norm_mean: torch.Tensor, norm_scale: torch.Tensor, centroids: torch.Tensor,
    key_bits: int, value_bits: int, attention_scaling: float, rotary_dim: int, layout: str, scaling: float,
) -> torch.Tensor:
    """:func:`e8_decode_attention` before its cast to the query's dtype: float32 ``[B, Hq, D]`` (arguments as
    there). The same kernels run (they write float32 partials whatever the query's dtype); the tuning script
    compares launch configurations on this result, where bfloat16 rounding would hide small differences."""
    dim = query.shape[-1]
    codec = ((hadamard * math.sqrt(dim)).to(torch.float16), inv_freq.float().contiguous(), norm_mean[0].contiguous(),
             norm_scale[0].contiguous(), centroids, attention_scaling, rotary_dim, layout)
    coded = []
    if k_codes.shape[2]:
        coded.append(_segment(query, k_codes, k_scales, v_codes, v_scales, code_pos, code_len, False, key_bits,
                              value_bits, codec, scaling))
    if warm_k_codes is not None and warm_k_codes.shape[2]:
        coded.append(_segment(query, warm_k_codes, warm_k_scales, warm_v_codes, warm_v_scales, warm_pos, warm_mask,
                              True, warm_bits, warm_bits, codec, scaling))
    exact = _exact_partials(query, exact_k, exact_v, exact_mask, scaling) if exact_k.shape[2] else None
    if not coded and exact is None:
        return query.new_zeros(query.shape[:2] + query.shape[3:], dtype=torch.float32)
    return merge_partials(coded, exact, hadamard, norm_mean[1], norm_scale[1])


def unsupported_reason(query: torch.Tensor, kv_heads: int, code_len: torch.Tensor, exact_mask: torch.Tensor, kind: str,
                       bits: tuple[int, ...], rotary_dim: int, layout: str, inv_freq: torch.Tensor,
                       warm_mask: Optional[torch.Tensor] = None) -> Optional[str]:
    """Why :func:`e8_decode_attention` cannot compute this attention call, or None when it can.

    The checks read shapes, dtypes and static arguments only (never tensor values).

    Args:
        query: ``[B, Hq, q, D]``. kv_heads: ``H``. code_len: ``[B]`` or ``[B, q]``. exact_mask: ``[B, q, E]``.
        kind: the codec name. bits: every E8 bit width the call reads (keys, values, warm tier).
        rotary_dim, layout, inv_freq: the codec's RoPE. warm_mask: ``[B, q, W]`` or None.

    Returns:
        None, or a sentence naming the first unsupported property (the caller then runs the torch reference).
    """
    dim = query.shape[-1]
    if query.dim() != 4 or query.shape[2] != 1:
        return f"the kernel decodes one query per sequence, got query shape {tuple(query.shape)}"
    codec = codec_reason(kind, bits, dim, rotary_dim, layout, inv_freq, MAX_HEAD_DIM)
    if codec is not None:
        return codec
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"query dtype {query.dtype} (the kernel computes in float32 for float16/bfloat16/float32 queries)"
    if query.shape[1] % kv_heads or query.shape[1] // kv_heads > MAX_GROUP:
        return f"{query.shape[1]} query heads over {kv_heads} KV heads (a group of at most {MAX_GROUP} expected)"
    if code_len.dim() not in (1, 2) or (code_len.dim() == 2 and code_len.shape[1] != 1):
        return f"code_len shape {tuple(code_len.shape)} (one length per sequence expected)"
    if exact_mask.shape[1] != 1 or (warm_mask is not None and warm_mask.shape[1] != 1):
        return "exact or warm mask with a row per query (one query expected)"
    return None
