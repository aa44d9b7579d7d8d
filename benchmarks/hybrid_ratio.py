"""Byte ratio of every preset on a hybrid model against a full-attention one of the same size, from configs.

Two random-weight models built from configs (no download), seeded, with a 256-token vocabulary read as bytes
(``_common.byte_level_tokenizer``; the vocabulary does not change what the cache holds):

* ``smollm2``: SmolLM2-135M's shape (30 full-attention layers, 9 query / 3 KV heads, head_dim 64);
* ``gemma3``: Gemma-3-270M's shape (18 layers, 5 of every 6 sliding-window layers with ``sliding_window=512``,
  4 query / 1 KV head, head_dim 256, RoPE theta 1e4 sliding / 1e6 global, QK-norm).

For each preset and model: ``nqcompile.optimize``, a prefill of ``--prefix`` random tokens (compressed at its end;
the re-reading of an evicting preset included), then ``--continuation`` tokens as decode steps
(``NexusCache.replay_as_decode``), as the evaluation protocol does (``docs/design.md``); then
``memory_report()``: every byte the cache allocated against what transformers' ``DynamicCache`` holds in bf16
(a sliding-window layer: its last ``sliding_window - 1`` tokens). Random weights choose the ``relax_key_kl``
key bits at random too: the 3-bit-key layers are printed. The header repeats the command line.

Usage::

    python benchmarks/hybrid_ratio.py                                   # 3,584 + 512 tokens, every preset
    python benchmarks/hybrid_ratio.py --prefix 4096 --continuation 0    # right after a 4,096-token prefill
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
import transformers

import nqcompile
from nqcompile.models import cache_kwarg_name

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import byte_level_tokenizer  # noqa: E402

MODELS = {
    "smollm2": lambda: transformers.LlamaConfig(
        vocab_size=256, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rope_theta=100000.0,
        tie_word_embeddings=True),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        vocab_size=256, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
        layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3, max_position_embeddings=32768,
        pad_token_id=0),
}


def measure(kind: str, preset: str, args) -> dict:
    """One row: the cache's memory report after the prefill and the continuation."""
    torch.manual_seed(args.seed)
    config = MODELS[kind]()
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype)).eval()
    nqcompile.optimize(model, preset, tokenizer=byte_level_tokenizer())  # one token per byte: 256 ids
    ids = torch.randint(1, 256, (1, args.prefix + args.continuation), generator=torch.Generator().manual_seed(1))
    cache = nqcompile.NexusCache(model.config, preset, max_cache_len=ids.shape[1])
    kw = {cache_kwarg_name(model): cache, "logits_to_keep": 1}
    start = time.perf_counter()
    with torch.no_grad():
        model(ids[:, :args.prefix], **kw)
        if args.continuation:
            with cache.replay_as_decode():
                model(ids[:, args.prefix:], **kw)
    report = cache.memory_report()
    return dict(model=kind, preset=preset, tokens=report.logical_tokens, ratio=report.compression_ratio,
                bf16_mib=report.bf16_bytes / 2**20, allocated_mib=report.allocated_bytes / 2**20,
                key_bits=list(report.layer_key_bits), seconds=time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default=",".join(nqcompile.PRESETS))
    parser.add_argument("--models", default="smollm2,gemma3")
    parser.add_argument("--prefix", type=int, default=3584)
    parser.add_argument("--continuation", type=int, default=512)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="write every row here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    presets = [p for p in args.presets.split(",") if p]
    models = [m for m in args.models.split(",") if m]
    print("# python benchmarks/hybrid_ratio.py " + shlex.join(sys.argv[1:] if argv is None else argv))
    rows = []
    for preset in presets:
        for kind in models:
            row = measure(kind, preset, args)
            rows.append(row)
            print(f"{preset:>10} {kind:>8}: {row['ratio']:.2f}x ({row['allocated_mib']:.2f} of {row['bf16_mib']:.2f} "
                  f"MiB bf16; 3-bit-key layers {row['key_bits'].count(3)}/{len(row['key_bits'])}; "
                  f"{row['seconds']:.0f} s)", flush=True)
    print(f"\n| preset | {' | '.join(models)} | {models[-1]} / {models[0]} |\n|---|" + "---|" * (len(models) + 1))
    for preset in presets:
        ratios = [next(r["ratio"] for r in rows if r["preset"] == preset and r["model"] == m) for m in models]
        print(f"| `{preset}` | " + " | ".join(f"{x:.2f}x" for x in ratios) + f" | {ratios[-1] / ratios[0]:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": sys.argv[1:] if argv is None else argv, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
