"""Attention of a prefill chunk (many queries) over codes plus an exact segment: the codes decoded one piece at a
time by ``nqcompile::dequant_kv`` (on the GPU the Triton dequant kernel) and attended by torch's fused attention
kernels, which never hold a score matrix in memory. :mod:`nqcompile.ops.cuda` and :mod:`nqcompile.ops.cpu` run it
behind the attention ops.

The torch reference (:func:`nqcompile.ops.dequant_attention`) decodes and attends key block by key block with
matmuls and an online softmax: right on every device, but on a GPU a 8,192-token chunk over 64K held tokens costs
thousands of small launches per layer (host-bound: about 1.6 s per layer on an H200). Here a chunk costs, per
sequence and piece of :data:`PIECE_BYTES` decoded bytes, one dequant launch and one FlashAttention call (Dao 2023,
"FlashAttention-2", arXiv:2307.08691; ``torch.ops.aten._scaled_dot_product_flash_attention``) over the codes, which
every query of the chunk sees whole (no mask), then one memory-efficient attention call (Rabe & Staats 2021,
arXiv:2112.05682; ``_scaled_dot_product_efficient_attention``) over the exact segment with its ``[q, E]`` mask. The
parts are merged by their log-sum-exps (the softmax over the union: ``out = sum_i exp(lse_i - lse) out_i`` with
``lse = logaddexp_i lse_i``), which is also the log-sum-exp returned for the reconstruction re-read.

Over the codes the queries of a KV group attend as one longer query sequence (``[B, H, G * q, D]`` against the KV
head's keys), so GQA costs no copy of the decoded keys; over the exact segment the keys and values are repeated per
query head (the mask differs per query, not per head), a transient of ``E * Hq * D`` elements each.

The keys and values are attended in the query's dtype (on the GPU float16 or bfloat16, as the model's own SDPA
attends its bf16 cache; on the CPU also float32, which torch's CPU flash kernel takes), softmax statistics and the
merge in float32. Reading the code lengths synchronizes with the device once per call, so :func:`unsupported_reason`
keeps this path out of CUDA-graph captures (the decode kernel runs there). The exact segment's additive mask is
``q x E`` elements of the query's dtype; on the CPU, where the torch reference's tiles bound the memory a call takes,
:func:`unsupported_reason` leaves calls whose mask would exceed :data:`CPU_MASK_BYTES` to that reference.
"""

from __future__ import annotations

from typing import Optional

import torch

from .reference import dequant_kv

__all__ = ["PIECE_BYTES", "CPU_MASK_BYTES", "chunk_attention", "unsupported_reason"]

#: Budget of one decoded piece of codes (float32 keys plus values of one sequence), bytes.
PIECE_BYTES = 256 * 2**20
#: On the CPU, the largest exact-segment mask ``[B, 1, q, E]`` (query dtype) a call may build, bytes.
CPU_MASK_BYTES = 256 * 2**20


def unsupported_reason(query: torch.Tensor, code_len: torch.Tensor, kind: str, exact_len: int) -> Optional[str]:
    """Why :func:`chunk_attention` does not run a call, or None when it does (shapes, dtypes and static arguments
    only; on CUDA the codec itself is checked by the dequant kernel's own reason,
    :func:`nqcompile.ops.cuda.dequant_kernel_reason`).

    Args:
        query: ``[B, Hq, q, D]``. code_len: ``[B]`` or ``[B, q]`` int64. kind: the codec name.
        exact_len: ``E``, the exact tokens of the call.

    Returns:
        None, or a sentence naming what the path does not cover.
    """
    batch, _, q_len, _ = query.shape
    if q_len < 2:
        return "one query per sequence (a decode step)"
    cpu = query.device.type == "cpu"
    dtypes = (torch.float16, torch.bfloat16, torch.float32) if cpu else (torch.float16, torch.bfloat16)
    if query.dtype not in dtypes:
        taken = "float16, bfloat16 or float32 on the CPU" if cpu else "float16 or bfloat16"
        return f"a {query.dtype} query (the fused attention kernels take {taken})"
    if cpu and batch * q_len * -(-exact_len // 16) * 16 * query.dtype.itemsize > CPU_MASK_BYTES:
        return (f"an exact-segment mask of {q_len} x {exact_len} tokens over CPU_MASK_BYTES (the reference's tiles "
                "bound the memory on the CPU)")
    if code_len.dim() != 1:
        return "per-query code lengths (a chunk replayed as decode steps)"
    if kind == "exact":
        return "exact storage (no codes to decode)"
    if query.is_cuda and torch.cuda.is_current_stream_capturing():
        return "a CUDA-graph capture (the path reads the code lengths on the host)"
    return None


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: Optional[torch.Tensor],
            scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused attention with its log-sum-exp: ``(out [B, H, q, D] in the query's dtype, lse [B, H, q] float32)``.
    ``query``, ``key``, ``value`` ``[B, H, *, D]`` with the same heads; ``bias`` None or an additive mask broadcast to
    ``[B, H, q, n]``. CUDA: FlashAttention without a mask, memory-efficient attention with one; CPU (tests): the CPU
    flash kernel, which takes a mask."""
    q_len = query.shape[2]
    if query.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, False,
                                                                              attn_mask=bias, scale=scaling)
    elif bias is None:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, False, False,
                                                                      scale=scaling)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, bias, True, 0.0, False,
                                                                          scale=scaling)[:2]
    return out, lse[..., :q_len].float()


def _merge(out: torch.Tensor, lse: torch.Tensor, part: torch.Tensor, part_lse: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                       torch.Tensor]:
    """The softmax over the union of two key sets from each one's output (float32 ``[..., q, D]``, any float) and
    log-sum-exp (float32 ``[..., q]``, ``-inf`` for no key): float32 output and log-sum-exp."""
    total = torch.logaddexp(lse, part_lse)
    safe = total.masked_fill(total == float("-inf"), 0.0)  # neither part saw a key: weights exp(-inf) = 0
    part = part.float().masked_fill((part_lse == float("-inf"))[..., None], 0.0)  # a fully masked row may be NaN
    return out * (lse - safe).exp()[..., None] + part * (part_lse - safe).exp()[..., None], total


def _exact_bias(exact_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask ``[B, 1, q, E]`` (0 where visible, ``-inf`` elsewhere) of ``exact_mask`` ``[B, q, E]``, its rows
    padded to a multiple of 16 elements in memory (the memory-efficient kernel's alignment)."""
    batch, q_len, n = exact_mask.shape
    padded = torch.zeros(batch, 1, q_len, -(-n // 16) * 16, dtype=dtype, device=exact_mask.device)[..., :n]
    return padded.masked_fill_(~exact_mask[:, None], float("-inf"))


def chunk_attention(query, k_codes, k_scales, v_codes, v_scales, code_pos, code_len, exact_k, exact_v, exact_mask,
                    hadamard, inv_freq, norm_mean, norm_scale, kind, key_bits, value_bits, attention_scaling,
                    rotary_dim, layout, scaling) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`nqcompile.ops.dequant_attention_lse` for a chunk of queries (module docstring for the method).

    Args:
        query: ``[B, Hq, q, D]`` float16/bfloat16 post-RoPE queries (float32 too on the CPU), ``Hq`` a multiple of the
            KV heads ``H``.
        k_codes, k_scales, v_codes, v_scales, code_pos: the code storage (:mod:`nqcompile.ops.layout`), ``C`` slots.
        code_len: ``[B]`` int64: every query of sequence ``b`` sees its first ``code_len[b]`` slots.
        exact_k, exact_v: ``[B, H, E, D]`` exact keys/values; exact_mask ``[B, q, E]`` bool, what each query sees
            (every query must see at least one key overall).
        hadamard, inv_freq, norm_mean, norm_scale, kind, key_bits, value_bits, attention_scaling, rotary_dim,
            layout: the codec parameters (:func:`nqcompile.ops.write_kv`).
        scaling: softmax scale.

    Returns:
        ``(out, lse)``: ``out`` ``[B, Hq, q, D]`` in the query's dtype, ``lse`` ``[B, Hq, q]`` float32.

    Raises:
        ValueError: a call :func:`unsupported_reason` rejects.
    """
    reason = unsupported_reason(query, code_len, kind, exact_k.shape[2])
    if reason is not None:
        raise ValueError(f"chunk_attention does not cover {reason}; call nqcompile.ops.dequant_attention_lse")
    batch, q_heads, q_len, dim = query.shape
    kv_heads = k_codes.shape[1]
    group = q_heads // kv_heads
    query = query.contiguous()
    grouped = query.view(batch, kv_heads, group * q_len, dim)  # a KV group's queries as one sequence
    out = torch.zeros(batch, kv_heads, group * q_len, dim, dtype=torch.float32, device=query.device)
    lse = torch.full((batch, kv_heads, group * q_len), float("-inf"), dtype=torch.float32, device=query.device)
    piece = max(1, PIECE_BYTES // (2 * kv_heads * dim * 4))
    lengths = code_len.tolist()  # the one synchronization
    for b, n in enumerate(lengths):
        for start in range(0, n, piece):
            sl = slice(start, min(n, start + piece))
            k, v = dequant_kv(k_codes[b:b + 1, :, sl], k_scales[b:b + 1, :, sl], v_codes[b:b + 1, :, sl],
                              v_scales[b:b + 1, :, sl], code_pos[b:b + 1, :, sl], hadamard, inv_freq,
                              norm_mean[:, b:b + 1], norm_scale[:, b:b + 1], kind, key_bits, value_bits,
                              attention_scaling, rotary_dim, layout)
            part, part_lse = _attend(grouped[b:b + 1], k.to(query.dtype), v.to(query.dtype), None, scaling)
            del k, v
            out[b:b + 1], lse[b:b + 1] = _merge(out[b:b + 1], lse[b:b + 1], part, part_lse)
    out, lse = out.view(batch, q_heads, q_len, dim), lse.view(batch, q_heads, q_len)
    if exact_k.shape[2]:
        ek = exact_k.to(query.dtype).repeat_interleave(group, dim=1)
        ev = exact_v.to(query.dtype).repeat_interleave(group, dim=1)
        bias = _exact_bias(exact_mask, query.dtype).expand(batch, q_heads, q_len, exact_k.shape[2])
        part, part_lse = _attend(query, ek, ev, bias, scaling)
        out, lse = _merge(out, lse, part, part_lse)
    return out.to(query.dtype), lse
