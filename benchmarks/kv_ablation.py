"""Codec ablation on a real model: which key/value bits and normalizations cost how much perplexity.

Isolates the codec from the cache policy: each window's prefix is prefilled exactly into a
``DynamicCache``, then the prefix keys and values (all but the first ``--sinks`` tokens, which the cache
keeps exact) are replaced by their decoded codes, ``decode(encode(x))`` with the very functions the
cache uses (:mod:`nqcompile.codec.kv`, statistics from :func:`~nqcompile.codec.kv.channel_statistics`),
and the continuation is scored in one forward with its own keys and values exact. The figure is the
perplexity change of the continuation against the unquantized cache, per window and on average. The full
protocol (continuation through the cache as decode steps, eviction, exact window) is
``benchmarks/quality.py``; this one says where the cost comes from.

A configuration is ``K<bits>V<bits>[/<key_norm>[/<value_norm>]]`` with ``x`` for "left exact", for
example ``K3Vx/per_pair`` (3-bit keys, exact values), ``KxV2`` or ``K4V2/mean/per_channel``; the key
normalization defaults to ``per_pair`` and the value normalization to ``none`` (the presets' defaults).

    python benchmarks/kv_ablation.py --threads 1 K3Vx/per_channel K3Vx/per_pair K3Vx/mean K3Vx/none KxV2 KxV3
"""

from __future__ import annotations

import argparse
import copy
import math
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from nqcompile.codec.hadamard import hadamard_matrix
from nqcompile.codec.kv import (NORMS, VALUE_NORMS, KVTransform, channel_statistics, decode_keys, decode_values,
                                encode_keys, encode_values)
from nqcompile.codec.rope import apply_rotary
from nqcompile.models.rope_spec import RotarySpec
from nqcompile.eval import perplexity_windows
from nqcompile.models import load_pretrained

_CONFIG = re.compile(r"^K(x|[234])V(x|[234])(?:/(\w+))?(?:/(\w+))?$")


@dataclass(frozen=True)
class Config:
    """One ablation: bits of keys and values (``None``: exact) and their normalizations."""

    key_bits: int | None
    value_bits: int | None
    key_norm: str
    value_norm: str
    label: str


def parse_config(text: str) -> Config:
    """Parse ``K<bits|x>V<bits|x>[/key_norm[/value_norm]]``; raises ``argparse.ArgumentTypeError``."""
    m = _CONFIG.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not K<2|3|4|x>V<2|3|4|x>[/key_norm[/value_norm]]")
    kb, vb, kn, vn = m.groups()
    kn, vn = kn or "per_pair", vn or "none"
    if kn not in NORMS:
        raise argparse.ArgumentTypeError(f"{text!r}: key normalization {kn!r} is not one of {NORMS}")
    if vn not in VALUE_NORMS:
        raise argparse.ArgumentTypeError(f"{text!r}: value normalization {vn!r} is not one of {VALUE_NORMS}")
    return Config(None if kb == "x" else int(kb), None if vb == "x" else int(vb), kn, vn, text)


def quantize_layer(keys: torch.Tensor, values: torch.Tensor, cfg: Config, rotary: RotarySpec, sinks: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``decode(encode(.))`` of one layer's ``[1, H, T, D]`` post-RoPE keys and values, first ``sinks`` tokens exact."""
    _, heads, length, dim = keys.shape
    had = hadamard_matrix(dim, device=keys.device)
    inv_freq = rotary.inv_freq.to(keys.device)
    t = KVTransform("e8", cfg.key_bits or 2, cfg.value_bits or 2, float(rotary.attention_scaling),
                    int(rotary.rotary_dim), rotary.layout)
    pos = torch.arange(length, device=keys.device).expand(1, heads, length)
    select = torch.arange(length, device=keys.device)[None] >= sinks
    out_k, out_v = keys.clone(), values.clone()
    if cfg.key_bits is not None:
        pre = apply_rotary(keys.float(), pos, inv_freq, attention_scaling=t.attention_scaling,
                           rotary_dim=t.rotary_dim, layout=t.layout, inverse=True)
        mean, scale = channel_statistics(pre, select, cfg.key_norm, rotary_dim=t.rotary_dim, layout=t.layout)
        codes, scales = encode_keys(keys, pos, had, inv_freq, mean, scale, t)
        out_k[:, :, sinks:] = decode_keys(codes, scales, pos, had, inv_freq, mean, scale, t)[:, :, sinks:].to(keys.dtype)
    if cfg.value_bits is not None:
        mean, scale = channel_statistics(values, select, cfg.value_norm, rotary_dim=t.rotary_dim, layout=t.layout)
        codes, scales = encode_values(values, had, mean, scale, t)
        out_v[:, :, sinks:] = decode_values(codes, scales, had, mean, scale, t)[:, :, sinks:].to(values.dtype)
    return out_k, out_v


@torch.inference_mode()
def run(args: argparse.Namespace) -> dict[str, list[float]]:
    """Perplexity change (%) of every configuration on every window."""
    model, tokenizer = load_pretrained(args.model)
    rotary = [RotarySpec.from_config(model.config, layer_idx=i) for i in range(model.config.num_hidden_layers)]
    windows = perplexity_windows(tokenizer, n_windows=args.windows, prefix=args.prefix, continuation=args.continuation)
    results: dict[str, list[float]] = {c.label: [] for c in args.configs}
    for w in tqdm(windows, desc="windows"):
        ids = w.input_ids.to(model.device)
        cache = DynamicCache()
        first = model(ids[:, : w.prefix], past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        target = ids[:, w.prefix :].flatten()

        def nll(c: DynamicCache) -> float:
            rest = model(ids[:, w.prefix : -1], past_key_values=c, use_cache=True).logits
            logits = torch.cat([first, rest], 1).float().flatten(0, 1)
            return float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))

        base = nll(copy.deepcopy(cache))
        for cfg in args.configs:
            c = copy.deepcopy(cache)
            for i, layer in enumerate(c.layers):
                layer.keys, layer.values = quantize_layer(layer.keys, layer.values, cfg, rotary[i], args.sinks)
            results[cfg.label].append(100.0 * (math.exp((nll(c) - base) / target.numel()) - 1.0))
    return results


def main(argv: list[str] | None = None) -> int:
    """Run the ablation and print a markdown table and the command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("configs", nargs="+", type=parse_config, help="K<bits|x>V<bits|x>[/key_norm[/value_norm]]")
    p.add_argument("--model", default=None, help="local model folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--prefix", type=int, default=3584)
    p.add_argument("--continuation", type=int, default=512)
    p.add_argument("--sinks", type=int, default=4, help="first tokens left exact, as the cache's attention sinks")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.windows < 1 or args.prefix <= args.sinks or args.continuation < 2:
        p.error("need --windows >= 1, --prefix > --sinks and --continuation >= 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results = run(args)
    print(f"\n| configuration | ppl change, mean over {args.windows} windows | per window |\n|---|---|---|")
    for label, values in results.items():
        print(f"| `{label}` | {sum(values) / len(values):+.2f}% | {' '.join(f'{v:+.2f}' for v in values)} |")
    print(f"\ncommand: {' '.join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
