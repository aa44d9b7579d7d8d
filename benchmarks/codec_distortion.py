"""Distortion of the fixed-rate codes (E8 Voronoi, Lloyd-Max, uniform) per bits/dim.

Every source is Hadamard-rotated (``nqcompile.codec.hadamard``), then quantized with a one-byte
per-vector RMS scale (``nqcompile.codec.vector.quantize_vectors``) and reconstructed. Printed per
source, code and rate: the mean squared error per coordinate (in the units of the source) and the SNR
``10 log10(sum x^2 / sum (x - x_hat)^2)`` in dB. The header repeats the command line.

Sources:

* ``gaussian``: iid N(0, 1) vectors;
* ``student_t``: iid Student-t vectors (``--dof``, default 8), also shown WITHOUT the rotation
  (``student_t_norot``), where the heavier tails are still there;
* ``--real``: keys and values of SmolLM2-135M on ``--real-tokens`` tokens of an Austen novel
  (:func:`collect_real_kv`): keys with RoPE removed, without and with a per-channel normalization (mean and
  std per layer, KV head and channel; its SNR is measured after undoing the normalization, in pre-RoPE key
  space, so both key rows are comparable), and values.

Extra studies: ``--tune-gain`` (the E8 lattice gain per rate that maximizes the Gaussian SNR, the source of
``nqcompile.codec.lattice.DEFAULT_GAIN``), ``--ablation`` (E8 encoder variants, and an exhaustive
nearest-codeword search at 2 bits), ``--scale-rounding`` (ceil vs nearest one-byte scales).

Usage::

    python benchmarks/codec_distortion.py                       # synthetic sources
    python benchmarks/codec_distortion.py --real --ablation --scale-rounding
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from nqcompile.codec.hadamard import hadamard_rotate
from nqcompile.codec.lattice import DEFAULT_GAIN, E8LatticeCode
from nqcompile.codec.registry import CODECS, code_for
from nqcompile.codec.vector import dequantize_vectors, quantize_vectors
from nqcompile.eval.perplexity import DATA_DIR

#: The real keys and values come from SmolLM2 reading *Persuasion* (vendored in ``nqcompile/data/``).
DEFAULT_TEXT = DATA_DIR / "persuasion.txt"


@dataclass
class Source:
    """One data source.

    Attributes:
        name: row label.
        x: float32 ``[N, D]``: what the codec quantizes (already rotated / normalized).
        reference: float32 ``[N, D]``: what the reconstruction is compared with (defaults to ``x``).
        to_reference: maps a reconstruction of ``x`` to the space of ``reference`` (default identity).
    """

    name: str
    x: torch.Tensor
    reference: torch.Tensor | None = None
    to_reference: Callable[[torch.Tensor], torch.Tensor] | None = None


def gaussian_vectors(n: int, dim: int, seed: int) -> torch.Tensor:
    """iid N(0, 1), float32 [n, dim]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g)


def student_t_vectors(n: int, dim: int, dof: int, seed: int) -> torch.Tensor:
    """iid Student-t with ``dof`` degrees of freedom, float32 [n, dim] (normal / sqrt(chi2 / dof))."""
    if int(dof) != dof or dof < 1:
        raise ValueError(f"dof must be a positive integer, got {dof}")
    g = torch.Generator().manual_seed(seed + 1)
    z = torch.randn(n, dim, generator=g, dtype=torch.float64)
    # chi2(dof) as a sum of dof squared normals (seeded generator, no global RNG state).
    chi2 = torch.randn(n, dim, int(dof), generator=g, dtype=torch.float64).square().sum(-1)
    return (z / (chi2 / dof).sqrt()).float()


def collect_real_kv(
    *,
    n_tokens: int = 2048,
    text_path: str | Path = DEFAULT_TEXT,
    model_name: str | None = None,
) -> dict[str, torch.Tensor]:
    """Keys (RoPE removed) and values of every layer of SmolLM2-135M on ``n_tokens`` tokens of text.

    Runs the model once (float32, CPU, no grad) over the first ``n_tokens`` tokens of ``text_path``
    with a ``transformers.DynamicCache``, reads the post-RoPE keys ``[B, Hkv, T, D]`` per layer from the
    cache and removes RoPE with ``nqcompile.models.rope_spec.RotarySpec.from_config(config, layer_idx=i)``.

    Returns:
        dict with float32 tensors ``keys`` and ``values`` of shape ``[L, Hkv, T, D]`` (batch 1 dropped).

    Raises:
        ImportError / ModuleNotFoundError: ``nqcompile.models`` or its demo packages are missing.
    """
    from transformers import DynamicCache

    from nqcompile.models.rope_spec import RotarySpec
    from nqcompile.models import cache_kwarg_name, load_pretrained

    model, tok = load_pretrained(model_name)
    text = Path(text_path).read_text(encoding="utf-8")
    ids = tok(text[: 20 * n_tokens], return_tensors="pt").input_ids[:, :n_tokens]
    t = ids.shape[1]
    try:
        cache = DynamicCache(config=model.config)
    except TypeError:  # older constructors take no config
        cache = DynamicCache()
    with torch.no_grad():
        model(ids, use_cache=True, **{cache_kwarg_name(model): cache})
    layers = getattr(cache, "layers", None)
    if layers is not None:
        pairs = [(layer.keys, layer.values) for layer in layers]
    else:  # transformers < 4.56 layout
        pairs = list(zip(cache.key_cache, cache.value_cache))
    positions = torch.arange(t)
    keys, values = [], []
    for i, (k, v) in enumerate(tqdm(pairs, desc="remove RoPE", leave=False)):
        spec = RotarySpec.from_config(model.config, layer_idx=i)
        keys.append(spec.remove(k.float(), positions)[0])
        values.append(v.float()[0])
    return {"keys": torch.stack(keys), "values": torch.stack(values)}


def real_sources(n_tokens: int, text_path: Path) -> list[Source]:
    """SmolLM2 keys (raw and per-channel normalized) and values as Hadamard-rotated sources."""
    kv = collect_real_kv(n_tokens=n_tokens, text_path=text_path)
    keys, values = kv["keys"], kv["values"]  # [L, H, T, D]
    d = keys.shape[-1]
    mean = keys.mean(dim=2, keepdim=True)  # per layer, KV head, channel
    std = keys.std(dim=2, keepdim=True).clamp_min(1e-6)
    flat_keys = keys.reshape(-1, d)
    normed = ((keys - mean) / std).reshape(-1, d)
    shape = keys.shape

    def denorm(xhat_rot: torch.Tensor) -> torch.Tensor:
        xhat = hadamard_rotate(xhat_rot, inverse=True).reshape(shape)
        return (xhat * std + mean).reshape(-1, d)

    return [
        Source("smollm2_keys", hadamard_rotate(flat_keys)),
        Source("smollm2_keys_chnorm", hadamard_rotate(normed), flat_keys, denorm),
        Source("smollm2_values", hadamard_rotate(values.reshape(-1, d))),
    ]


def measure(src: Source, code, *, scale_rounding: str = "ceil") -> tuple[float, float, float]:
    """(MSE per coordinate, SNR in dB, encode+decode seconds per million vectors) of ``code`` on ``src``."""
    d = src.x.shape[-1]
    start = time.perf_counter()
    codes, scales = quantize_vectors(src.x, code, scale_rounding=scale_rounding)
    xhat = dequantize_vectors(codes, scales, code, d)
    secs = (time.perf_counter() - start) / src.x.shape[0] * 1e6
    ref = src.x if src.reference is None else src.reference
    if src.to_reference is not None:
        xhat = src.to_reference(xhat)
    err = (ref.double() - xhat.double()).square()
    mse = float(err.mean())
    snr = 10.0 * math.log10(float(ref.double().square().sum()) / float(err.sum()))
    return mse, snr, secs


def snr_db(x: torch.Tensor, code) -> float:
    """SNR in dB of ``code`` on rotated vectors ``x`` [N, D]."""
    return measure(Source("x", x), code)[1]


def print_table(sources: list[Source], bits: list[int], kinds: list[str]) -> None:
    """The main table: per source, code and rate, MSE, SNR and the gain over Lloyd-Max."""
    rows = []
    jobs = [(s, b, k) for s in sources for b in bits for k in kinds]
    for src, b, kind in tqdm(jobs, desc="codes", leave=False):
        rows.append((src.name, b, kind, *measure(src, code_for(kind, b))))
    lm = {(r[0], r[1]): r[4] for r in rows if r[2] == "lloyd_max"}
    print(f"{'source':<22}{'bits':>5}  {'code':<10}{'MSE/coord':>12}{'SNR dB':>9}{'vs LM dB':>10}{'s/1M vec':>10}")
    for name, b, kind, mse, snr, secs in rows:
        delta = f"{snr - lm[(name, b)]:+10.2f}" if (name, b) in lm else f"{'':>10}"
        print(f"{name:<22}{b:>5}  {kind:<10}{mse:>12.5f}{snr:>9.2f}{delta}{secs:>10.1f}")
    print("Gaussian rate-distortion bound: " + ", ".join(f"{b} bits {6.0206 * b:.2f} dB" for b in bits))


def tune_gain(x: torch.Tensor, bits: list[int]) -> None:
    """Grid search of the E8 lattice gain maximizing the SNR on ``x`` (coarse 2 % steps, then 0.5 %)."""
    print("\n## E8 lattice gain tuning (maximize SNR; reconstruction = gain * (codeword - centroid))")
    for b in bits:
        g0 = DEFAULT_GAIN[b]
        coarse = [g0 * (0.8 + 0.02 * i) for i in range(21)]
        res = {g: snr_db(x, E8LatticeCode(b, gain=g)) for g in tqdm(coarse, desc=f"gain {b}b", leave=False)}
        best = max(res, key=res.get)
        fine = [best * (0.98 + 0.005 * i) for i in range(9)]
        res.update({g: snr_db(x, E8LatticeCode(b, gain=g)) for g in tqdm(fine, desc=f"fine {b}b", leave=False)})
        best = max(res, key=res.get)
        print(f"bits={b}: best gain {best:.4f} -> {res[best]:.3f} dB (default {g0:.4f} -> "
              f"{snr_db(x, E8LatticeCode(b)):.3f} dB)")


def exhaustive_snr(x: torch.Tensor, code: E8LatticeCode) -> float:
    """SNR with an exhaustive nearest-codeword search over all 2**16 codewords (2 bits only)."""
    from nqcompile.codec.lattice import _representatives
    from nqcompile.codec.scales import decode_scale, encode_scale
    from nqcompile.codec.vector import vector_rms

    q = code.q
    labels = torch.cartesian_prod(*[torch.arange(q)] * 8)
    book = (_representatives(labels, q) - code.shift) * code.gain  # [q^8, 8]
    s = decode_scale(encode_scale(vector_rms(x))).unsqueeze(-1)
    blocks = (x / s).reshape(-1, 8)
    out = torch.empty_like(blocks)
    for i in tqdm(range(0, blocks.shape[0], 4096), desc="exhaustive", leave=False):
        chunk = blocks[i : i + 4096]
        out[i : i + 4096] = book[torch.cdist(chunk, book).argmin(dim=1)]
    xhat = out.reshape(x.shape) * s
    return 10.0 * math.log10(float(x.square().sum()) / float((x - xhat).square().sum()))


def ablation(x: torch.Tensor, bits: list[int], n_exhaustive: int) -> None:
    """E8 encoder variants on rotated Gaussian vectors."""
    print("\n## E8 encoder ablation (SNR dB; each variant at the default gain)")
    variants = {
        "plain Voronoi (wrap), no centroid": dict(shrink_grid=(), search_steps=0, centroid_shift=False),
        "plain Voronoi (wrap) + centroid": dict(shrink_grid=(), search_steps=0),
        "shrink grid, no centroid": dict(search_steps=0, centroid_shift=False),
        "shrink grid + centroid": dict(search_steps=0),
        "shrink 13-pt grid + centroid": dict(
            search_steps=0,
            shrink_grid=(0.975, 0.95, 0.925, 0.9, 0.875, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.5, 0.4),
        ),
        "shrink + search, no centroid": dict(centroid_shift=False),
        "shrink + centroid + 1 search step": dict(search_steps=1),
        "shrink + centroid + search (default)": dict(),
    }
    print(f"{'variant':<40}" + "".join(f"{str(b) + ' bits':>17}" for b in bits))
    for name, kw in tqdm(variants.items(), desc="ablation", leave=False):
        cells = []
        for b in bits:
            src = Source("x", x)
            _, snr, secs = measure(src, E8LatticeCode(b, **kw))
            cells.append(f"{snr:9.2f} ({secs:4.1f}s)")
        print(f"{name:<40}" + "".join(cells))
    print("(seconds: encode + decode per million 64-dim vectors on this machine)")
    # The default gain is tuned for the default encoder; the plain encoder wants a much larger one
    # (a larger codebook overloads, and wraps, less often).
    cells = []
    for b in bits:
        res = {}
        for f in [1.0 + 0.05 * i for i in range(41)]:
            g = f * DEFAULT_GAIN[b]
            res[g] = snr_db(x, E8LatticeCode(b, gain=g, shrink_grid=(), search_steps=0))
        best = max(res, key=res.get)
        cells.append(f"{res[best]:9.2f} (g={best:.3f})")
    print(f"{'plain Voronoi + centroid, own best gain':<40}" + "".join(cells))
    if 2 in bits and n_exhaustive:
        sub = x[:n_exhaustive]
        print(f"2 bits on the first {n_exhaustive} vectors: default encoder "
              f"{snr_db(sub, E8LatticeCode(2)):.3f} dB, exhaustive nearest codeword "
              f"{exhaustive_snr(sub, E8LatticeCode(2)):.3f} dB")


def scale_rounding_study(x: torch.Tensor, bits: list[int], kinds: list[str]) -> None:
    """SNR with ceil vs nearest rounding of the one-byte scale."""
    print("\n## One-byte scale rounding (SNR dB, Gaussian)")
    print(f"{'code':<10}{'bits':>5}{'ceil':>9}{'nearest':>9}")
    for kind in kinds:
        for b in bits:
            src = Source("x", x)
            c = measure(src, code_for(kind, b), scale_rounding="ceil")[1]
            n = measure(src, code_for(kind, b), scale_rounding="nearest")[1]
            print(f"{kind:<10}{b:>5}{c:>9.3f}{n:>9.3f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-vectors", type=int, default=50_000, help="synthetic vectors per source")
    p.add_argument("--dim", type=int, default=64, help="vector dimension (multiple of 8)")
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--codes", nargs="+", default=list(CODECS), choices=list(CODECS))
    p.add_argument("--dof", type=int, default=8, help="Student-t degrees of freedom")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch default; 1 is fastest for these small ops on a shared machine)")
    p.add_argument("--real", action="store_true", help="add SmolLM2-135M keys/values (loads the model)")
    p.add_argument("--real-tokens", type=int, default=2048)
    p.add_argument("--real-text", type=Path, default=DEFAULT_TEXT)
    p.add_argument("--tune-gain", action="store_true", help="grid-search the E8 gain per rate")
    p.add_argument("--ablation", action="store_true", help="E8 encoder variants")
    p.add_argument("--n-exhaustive", type=int, default=2000, help="vectors for the exhaustive 2-bit search")
    p.add_argument("--scale-rounding", action="store_true", help="ceil vs nearest one-byte scales")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    print("command: " + " ".join(shlex.quote(a) for a in [sys.executable.split("/")[-1], *sys.argv]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.n_vectors} vectors of dim "
          f"{args.dim}, seed {args.seed}; Hadamard-rotated, one-byte per-vector RMS scale (ceil)\n")
    gauss = gaussian_vectors(args.n_vectors, args.dim, args.seed)
    t_raw = student_t_vectors(args.n_vectors, args.dim, args.dof, args.seed)
    sources = [
        Source("gaussian", hadamard_rotate(gauss)),
        Source(f"student_t{args.dof}", hadamard_rotate(t_raw)),
        Source(f"student_t{args.dof}_norot", t_raw),
    ]
    if args.real:
        sources += real_sources(args.real_tokens, args.real_text)
    print_table(sources, args.bits, args.codes)
    if args.tune_gain:
        tune_gain(sources[0].x, [b for b in args.bits if b in DEFAULT_GAIN])
    if args.ablation:
        ablation(sources[0].x, [b for b in args.bits if b in DEFAULT_GAIN], args.n_exhaustive)
    if args.scale_rounding:
        scale_rounding_study(sources[0].x, args.bits, args.codes)


if __name__ == "__main__":
    main()
