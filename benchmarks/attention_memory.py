"""Peak memory and time of one ``nqcompile::dequant_attention`` call: a prefill chunk and a decode step over
N held tokens.

Default shape: Llama-3.1-8B attention (batch 1, 32 query / 8 KV heads, head_dim 128, bfloat16 queries), keys
and values held as K4V2 E8 codes (4 bits per key element, 2 per value element; :mod:`nqcompile.codec`). A call
attends over ``N`` coded tokens plus its own ``q`` tokens as the exact segment (causal), like a prefill chunk
(``q = --chunk``) or a decode step (``q = 1``) of the cache. The codes are those of ``--distinct`` random
tokens written by ``nqcompile::write_kv``, repeated to ``N`` slots.

Implementations: ``blockwise``, the torch reference (score tiles and key blocks, :mod:`nqcompile.ops.blockwise`);
``op``, the op as dispatched on the device (a prefill chunk takes the chunk path where
:func:`nqcompile.ops.chunk_attention.unsupported_reason` allows it, a decode step the Triton kernel on CUDA).

Measured per call (after one warm-up call): the peak memory above what was allocated before the call (the
call's transients and its output) -- on CUDA ``torch.cuda.max_memory_allocated``, on CPU the running sum of
the profiler's raw allocator records -- and the median wall time of ``--repeat`` calls (CUDA synchronized).
``--dense`` also measures the previous implementation (every code decoded, one masked
``F.scaled_dot_product_attention`` over all held tokens), skipped where its float32 scores alone would
exceed ``--dense-limit`` GiB. The header repeats the command line.

Usage::

    python benchmarks/attention_memory.py                  # CUDA: N = 32,768 and 131,072; q = 8,192 and 1
    python benchmarks/attention_memory.py --small --dense  # CPU check (under a minute): N = 1,024 and 4,096, q = 256
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from nqcompile import ops
from nqcompile.codec.hadamard import hadamard_matrix
from nqcompile.eval.allocations import peak_allocated_bytes
from nqcompile.ops import blockwise
from nqcompile.ops.reference import _attention


def held_tokens(args, n_tokens: int, q_len: int, device: torch.device) -> tuple:
    """``dequant_attention``'s arguments for one call: ``n_tokens`` coded tokens, ``q_len`` queries and exact tokens."""
    g = torch.Generator().manual_seed(0)
    heads, dim, distinct = args.kv_heads, args.head_dim, args.distinct
    codec = (hadamard_matrix(dim, device=device),
             (1.0 / (500000.0 ** (torch.arange(0, dim, 2).float() / dim))).to(device),
             torch.zeros(2, 1, heads, dim, device=device), torch.ones(2, 1, heads, dim, device=device),
             "e8", args.key_bits, args.value_bits, 1.0, dim, "half")
    store = [torch.zeros(1, heads, distinct, *tail, dtype=torch.uint8, device=device)  # k/v codes and scale codes
             for tail in ((args.key_bits * dim // 8,), (), (args.value_bits * dim // 8,), ())]
    key, value = (torch.randn(1, heads, distinct, dim, generator=g).to(device) for _ in range(2))
    positions = torch.arange(distinct, device=device).expand(1, heads, distinct).contiguous()
    ops.write_kv(*store, key, value, positions, torch.zeros(1, dtype=torch.long, device=device),
                 torch.tensor([distinct], device=device), *codec)
    reps = -(-n_tokens // distinct)
    store = [x.repeat(1, 1, reps, *([1] * (x.dim() - 3)))[:, :, :n_tokens].contiguous() for x in store]
    code_pos = torch.arange(n_tokens, device=device)[None, None]
    dtype = getattr(torch, args.dtype)
    query = torch.randn(1, args.q_heads, q_len, dim, generator=g).to(device, dtype)
    exact_k, exact_v = (torch.randn(1, heads, q_len, dim, generator=g).to(device, dtype) for _ in range(2))
    causal = torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril()[None]
    return (query, *store, code_pos, torch.tensor([n_tokens], device=device), exact_k, exact_v, causal, *codec,
            dim ** -0.5)


def blockwise_attention(*inputs):
    """The torch reference's output (what every device ran before the chunk path and the kernels)."""
    return _attention(*inputs)[0]


def dense_attention(query, k_codes, k_scales, v_codes, v_scales, code_pos, code_len, exact_k, exact_v, exact_mask,
                    *codec_and_scaling):
    """The previous ``dequant_attention``: decode all ``C`` codes, one masked SDPA over ``C + E`` tokens (float32)."""
    *codec, scaling = codec_and_scaling
    kc, vc = ops.dequant_kv(k_codes, k_scales, v_codes, v_scales, code_pos, *codec)
    batch, q_len, capacity = query.shape[0], query.shape[2], kc.shape[2]
    code_mask = torch.arange(capacity, device=query.device)[None, None, :] < code_len[:, None, None]
    mask = torch.cat([code_mask.expand(batch, q_len, capacity), exact_mask], dim=-1)
    keys = torch.cat([kc, exact_k.float()], dim=2)
    values = torch.cat([vc, exact_v.float()], dim=2)
    out = F.scaled_dot_product_attention(query.float(), keys, values, attn_mask=mask[:, None], scale=scaling,
                                         enable_gqa=True)
    return out.to(query.dtype)


def measure(fn, device: torch.device, repeat: int) -> tuple[int, float]:
    """``(peak bytes above the memory allocated before the call, median seconds)`` of ``fn()``."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = peak_allocated_bytes(fn)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return peak, statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", help="held (coded) tokens N (default 32768 131072)")
    parser.add_argument("--chunk", type=int, help="queries of the prefill call (default 8192)")
    parser.add_argument("--small", action="store_true", help="CPU-sized defaults: N = 1024 4096, chunk 256")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--key-bits", type=int, default=4)
    parser.add_argument("--value-bits", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--distinct", type=int, default=1024, help="distinct tokens encoded, repeated to N")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per row (median)")
    parser.add_argument("--dense", action="store_true", help="also measure the previous (dense) implementation")
    parser.add_argument("--dense-limit", type=float, default=32.0,
                        help="skip the dense implementation where its float32 scores exceed this many GiB")
    args = parser.parse_args(argv)
    tokens = args.tokens or ([1024, 4096] if args.small else [32768, 131072])
    chunk = args.chunk or (256 if args.small else 8192)
    device = torch.device(args.device)
    print("command: python " + shlex.join(sys.argv if argv is None else ["benchmarks/attention_memory.py", *argv]))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {name}; batch 1, {args.q_heads} query / {args.kv_heads} KV heads of "
          f"{args.head_dim}, {args.dtype} queries, K{args.key_bits}V{args.value_bits} E8 codes; budgets: score tile "
          f"{blockwise.SCORE_TILE_BYTES / 2**20:g} MiB, key block {blockwise.KEY_BLOCK_BYTES / 2**20:g} MiB")
    print(f"\n{'call':<8} {'q':>6} {'N held':>8} {'impl':<9} {'tiles q x k':>12} {'peak MiB':>10} {'ms':>10}")
    for n_tokens in tokens:
        for call, q_len in (("prefill", chunk), ("decode", 1)):
            inputs = held_tokens(args, n_tokens, q_len, device)
            tiles = blockwise.tile_sizes(1, args.q_heads, args.kv_heads, args.head_dim, q_len, n_tokens + q_len,
                                         torch.float32)
            impls = [("blockwise", blockwise_attention), ("op", ops.dequant_attention)]
            impls += [("dense", dense_attention)] if args.dense else []
            for impl, fn in impls:
                label = f"{tiles[0]} x {tiles[1]}" if impl == "blockwise" else "-"
                scores = args.q_heads * q_len * (n_tokens + q_len) * 4
                if impl == "dense" and scores > args.dense_limit * 2**30:
                    print(f"{call:<8} {q_len:>6} {n_tokens:>8} {impl:<9} {label:>12}   skipped: scores alone "
                          f"{scores / 2**30:.1f} GiB")
                    continue
                peak, seconds = measure(lambda: fn(*inputs), device, args.repeat)
                print(f"{call:<8} {q_len:>6} {n_tokens:>8} {impl:<9} {label:>12} {peak / 2**20:>10.1f} "
                      f"{seconds * 1e3:>10.2f}")
            del inputs


if __name__ == "__main__":
    main()
