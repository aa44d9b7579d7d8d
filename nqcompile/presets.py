"""Compression presets: validated, versioned dataclasses naming exactly what a cache does.

A :class:`Preset` says, per attention layer, how keys and values are stored (codec family and bits
per element), how many tokens are evicted at the end of each prefill chunk and by which scorer, how
many tokens stay exact (attention sinks and the recent window), and which layers are protected.
``PRESETS`` holds the named ones; any field can be overridden by keyword
(``get_preset("balanced", eviction_ratio=0.4)``). The layout follows torchao's
``core/config.py``: validation in ``__post_init__`` raising ``ValueError``, a ``version`` field and
``to_dict`` / ``from_dict``.

Bytes per compressed token and KV head (what :func:`Preset.bytes_per_token` returns and what the
cache's accounting test checks against ``nbytes``), with ``bytes_per_vector`` the codec's
:meth:`~nqcompile.codec.registry.CodecEntry.bytes_per_vector` (``bits * head_dim / 8`` for every codec in
:data:`~nqcompile.codec.registry.CODECS` today)::

    bytes_per_vector(key_bits, head_dim)                  packed key code
    + bytes_per_vector(value_bits, head_dim)              packed value code
    + 2                                                   one uint8 scale code each for key and value
    + position_bytes  (2 for int16 / 4 for int32)         only when eviction_ratio > 0 (kept tokens are
                                                          no longer contiguous, so their positions are stored)

An exact (``key_bits=None``) layer stores ``2 * head_dim * itemsize`` bytes per token and KV head.

Everything a compressed layer allocates (:meth:`Preset.layer_bytes`), for batch ``B``, ``H`` KV heads and
a code capacity of ``C`` tokens per sequence (a multiple of 16)::

    B * H * C * bytes_per_token                      codes, scales, positions
    + B * H * (sink_tokens + recent_window) * 2 * head_dim * window_itemsize   sinks and window, uncompressed
    + B * recent_window * 8                          window positions (int64)
    + B * H * warm_tokens * (2 * bytes_per_vector(warm_bits, head_dim) + 2 + position_bytes)   warm tier
                                                     codes, scales, positions; only in layers whose bits are
                                                     below warm_bits
    + 5 * B * 8                                      lengths and first code position (int64)
    + 4 * B * H * head_dim * 4                       per-channel key and value mean and scale (float32)
    + rotary_dim / 2 * 4                             RoPE inverse frequencies (float32)

with ``window_itemsize`` 2 under ``window_dtype="16bit"`` and the model dtype's itemsize under ``"model"`` (the
``head_dim x head_dim`` float32 Hadamard matrix is built once per process and shared by every cache:
``CacheMemoryReport.shared_bytes``, not in a cache's bytes). With ``relax_key_kl``, ``key_bits`` is the width each
layer chose at the first chunk (``CacheMemoryReport.layer_key_bits``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from .codec.kv import NORMS, VALUE_NORMS
from .codec.registry import CODECS
from .ops.layout import BLOCK_TOKENS
from .policy.registry import SCORERS

__all__ = ["Preset", "PRESETS", "get_preset", "LAYER_BUDGETS", "WINDOW_DTYPES"]

#: How the eviction budget is spread over layers.
LAYER_BUDGETS = ("uniform", "pyramid")
#: How a quantized layer holds its uncompressed sinks and recent window (``Preset.window_dtype``).
WINDOW_DTYPES = ("16bit", "model")


@dataclass(frozen=True)
class Preset:
    """What a :class:`~nqcompile.NexusCache` does to each attention layer's key/value cache.

    Args:
        name: label used in reports.
        key_bits: bits per element of the stored keys, one the codec offers (``CODECS[codec].bits``: 2, 3 or 4
            for ``"e8"``, 1 to 8 for the scalar baselines), or ``None`` for exact storage in the model's dtype
            (then ``value_bits`` must be ``None`` too).
        value_bits: bits per element of the stored values (as ``key_bits``), or ``None`` (exact).
        codec: a name in :data:`nqcompile.codec.registry.CODECS`: ``"e8"`` (E8 lattice code, Conway and Sloane)
            or a scalar baseline (``"lloyd_max"``, ``"uniform"``), applied after the Hadamard rotation.
        key_norm: per-channel normalization of the pre-RoPE keys before the Hadamard rotation, with
            statistics per (sequence, KV head, channel) measured on the first prefill chunk (KIVI / KVQuant
            observe per-channel key offsets and outliers): ``"per_channel"`` subtracts the mean and divides
            by the standard deviation, ``"per_pair"`` shares one deviation between the two channels that RoPE
            rotates into each other, ``"mean"`` only subtracts the mean, ``"none"`` skips it.
        value_norm: the same for the values (``"per_channel"``, ``"mean"`` or ``"none"``: values have no RoPE pairs).
        eviction_ratio: fraction of each prefill chunk's tokens removed at the chunk's end, in [0, 1).
            Sinks and the recent window count as kept. Decode tokens and chunks shorter than
            ``min_evict_tokens`` are never evicted.
        scorer: a name in :data:`nqcompile.policy.registry.SCORERS`, whose entry says what its scores need
            (queries, the model). ``"observation"`` ranks tokens by the attention the chunk's last
            ``observation_window`` queries pay them (SnapKV, Li et al. 2024, arXiv:2404.14469), computed inside the attention op;
            ``"key_norm"`` ranks by low key L2 norm (Devoto et al. 2024, arXiv:2406.11430);
            ``"key_diff"`` keeps the keys least similar to the chunk's mean key (Park et al. 2025,
            arXiv:2504.15364), needing no queries; ``"reconstruction"`` (KVzip, Kim et al. 2025,
            arXiv:2505.23416) ranks each token by the most attention it gets while the model re-reads the
            chunk, one more forward pass that :func:`nqcompile.optimize` runs after each prefill chunk, and
            shares the layers' total budget among them by those scores (:mod:`nqcompile.policy.reconstruction`);
            query-agnostic, so it keeps what a later question will ask for.
        keep_mass: with a scorer whose scores are attention probabilities (``"reconstruction"``), the share in
            [0, 1] of the chunk's score mass that the kept tokens must carry: each chunk keeps the fewest best tokens
            (pooled over the layers, as the budget is shared) whose summed scores reach this share of all the
            candidates' scores, and never fewer than ``eviction_ratio`` leaves, which is then the most a chunk
            evicts (:func:`~nqcompile.policy.reconstruction.allocate_across_layers`). A model whose attention
            needs more tokens keeps more. 0 disables: ``eviction_ratio`` alone sets the budget.
        keep_line_breaks: with ``scorer="reconstruction"``, every prefill token whose text holds a line break gets
            the highest score (1.0, also counted by ``keep_mass``), so each chunk keeps its line breaks first
            (:mod:`nqcompile.policy.line_breaks`; hard-wrapped text predicts its line ends from them). On in
            ``"balanced"``. Needs the tokenizer when the preset evicts: :func:`nqcompile.optimize` takes
            it as ``tokenizer=``.
        observation_window: number of last queries of a chunk whose attention scores tokens.
        min_evict_tokens: a prefill chunk with fewer new tokens than this is quantized but not evicted: a
            short follow-up (a question, a chat turn) saves little memory, and evicting from it (and from
            the recent window it pushes out) drops the very words the answer depends on.
        pooling_kernel: odd max-pooling width over token scores (SnapKV keeps neighbours of hot tokens); 1 disables.
        sink_tokens: first tokens of each sequence kept exact and never evicted (StreamingLLM attention sinks).
        recent_window: most recent tokens kept uncompressed (in ``window_dtype``); a multiple of 16 (the block
            size). Decode tokens enter here and are flushed into codes 16 at a time.
        window_dtype: how a quantized layer holds its sinks and recent window: ``"16bit"`` in the model's dtype
            when that has 16 bits (bfloat16, float16) and in bfloat16 when the model computes in float32 or float64
            (what transformers' bf16 cache holds, against which every ratio is reported). Rounding to bfloat16
            moves each element by at most 2**-9 of its magnitude, against a relative RMS error of 0.09 (4 bits) to
            0.30 (2 bits) for the codes; a model whose attention hangs on the last bits of its newest keys still
            pays for it (Gemma 3 270M, ``benchmarks/README.md``). ``"model"``: in the model's dtype whatever it
            is. Exact layers (``key_bits=None``, exact boundary layers) always keep the model's dtype.
        warm_tokens: size of the warm tier, a multiple of 16 (0: none): the most recent compressed tokens
            are held at ``warm_bits`` for keys and values; when the tier overflows, its oldest tokens are
            decoded and re-encoded once at ``key_bits`` / ``value_bits`` into the compressed past. Recent
            tokens carry most of the attention, so their precision is worth more bytes (README, Presets).
        warm_bits: bits per element of the warm tier's keys and values, one the codec offers, at least ``key_bits``
            and ``value_bits``.
        relax_key_kl: attention-aware key bits (:mod:`nqcompile.policy.key_bits`): at the first prefill chunk
            each layer stored at the preset's bits tries its keys at ``key_bits - 1`` and keeps that width if the
            last ``trial_queries`` queries' attention moves by less than this KL divergence (nats, mean
            over queries and query heads) in every sequence that codes at least 64 tokens (none: no change).
            0 disables; needs queries (not ``compress_kv_cache``).
        trial_queries: number of last queries of the first prefill chunk whose attention the ``relax_key_kl`` trial
            measures (more than ``observation_window``: 32 queries at the end of a chunk underrate layers whose
            later queries need the keys, ``benchmarks/README.md``).
        layer_budget: ``"uniform"`` evicts ``eviction_ratio`` in every layer (with a scorer that ``needs_model``,
            such as ``"reconstruction"``: in all layers together); ``"pyramid"`` keeps more in lower layers and
            fewer in upper ones with the same mean (PyramidKV, Cai et al. 2024).
        boundary_layers: the first and last ``boundary_layers`` layers are stored at ``boundary_bits``
            (``None``: exact) and never evicted.
        boundary_bits: bits for the boundary layers' keys and values (one the codec offers), or ``None`` for exact
            storage.
        sliding_bits: bits for the keys and values of a hybrid model's sliding-window layers (one the codec offers),
            or ``None`` for the preset's ``key_bits`` / ``value_bits``. As in boundary layers, ``relax_key_kl``
            applies only where these equal the preset's bits; a sliding-window layer that is also a boundary layer
            takes ``boundary_bits``. Every token a sliding-window layer holds is recent (its last
            ``sliding_window - 1``), the tokens a full-attention layer keeps in its warm tier: on Gemma 3 270M,
            ``quant_only`` with ``sliding_bits=4`` costs +0.80% (every genre under +1.5%) at 4.00x, against +1.86%
            at 4.50x (``benchmarks/README.md``, "Hybrid models"). Needs ``compress_layers="all"``.
        compress_layers: ``"all"``: sliding-window layers of hybrid models hold their window as codes (exact recent
            tokens and a ring of code blocks at the layer's bits; no sinks, warm tier or eviction there:
            :mod:`nqcompile.cache.sliding`); ``"global_only"`` leaves sliding-window and chunked layers as
            transformers' own layers (uncompressed, in the model's dtype).
        version: schema version of this dataclass.

    Raises:
        ValueError: for any field out of range (message names the field and the allowed values).
    """

    name: str = "custom"
    key_bits: int | None = 3
    value_bits: int | None = 2
    codec: str = "e8"
    key_norm: str = "per_pair"
    value_norm: str = "none"
    eviction_ratio: float = 0.0
    scorer: str = "observation"
    keep_mass: float = 0.0
    keep_line_breaks: bool = False
    observation_window: int = 32
    min_evict_tokens: int = 256
    pooling_kernel: int = 7
    sink_tokens: int = 4
    recent_window: int = 32
    window_dtype: str = "16bit"
    warm_tokens: int = 0
    warm_bits: int = 4
    relax_key_kl: float = 0.0
    trial_queries: int = 256
    layer_budget: str = "uniform"
    boundary_layers: int = 0
    boundary_bits: int | None = None
    sliding_bits: int | None = None
    compress_layers: str = "all"
    version: int = 2

    def __post_init__(self) -> None:
        if (self.key_bits is None) != (self.value_bits is None):
            raise ValueError(
                f"key_bits={self.key_bits} and value_bits={self.value_bits}: set both to None for exact storage, "
                "or both to a bit width"
            )
        _choice("codec", self.codec, tuple(CODECS))
        offered = CODECS[self.codec].bits
        for fname in ("key_bits", "value_bits", "boundary_bits", "sliding_bits", "warm_bits"):
            bits = getattr(self, fname)
            if bits is not None and bits not in offered:
                raise ValueError(f"{fname}={bits!r} is not offered by codec={self.codec!r}; choose one of {offered} "
                                 "or None (exact)")
        _choice("key_norm", self.key_norm, NORMS)
        _choice("value_norm", self.value_norm, VALUE_NORMS)  # values have no RoPE pairs
        _choice("scorer", self.scorer, tuple(SCORERS))
        _choice("layer_budget", self.layer_budget, LAYER_BUDGETS)
        if SCORERS[self.scorer].needs_model and self.layer_budget != "uniform":
            raise ValueError(f"scorer={self.scorer!r} shares one budget among the layers by their scores; "
                             f"layer_budget={self.layer_budget!r} cannot apply, use 'uniform'")
        if not 0.0 <= float(self.keep_mass) <= 1.0:
            raise ValueError(f"keep_mass={self.keep_mass!r} must be in [0, 1] (a share of the attention mass; "
                             "0 disables)")
        if self.keep_mass and not SCORERS[self.scorer].needs_model:
            raise ValueError(f"keep_mass={self.keep_mass} needs scores that are attention probabilities shared among "
                             f"the layers (scorer='reconstruction'); scorer={self.scorer!r} has none, use keep_mass=0")
        if self.keep_line_breaks and not SCORERS[self.scorer].needs_model:
            raise ValueError(f"keep_line_breaks=True raises the reconstruction scores of line breaks, which "
                             f"scorer={self.scorer!r} does not compute; use scorer='reconstruction' or "
                             "keep_line_breaks=False")
        _choice("compress_layers", self.compress_layers, ("all", "global_only"))
        if self.sliding_bits is not None and self.compress_layers != "all":
            raise ValueError(f"sliding_bits={self.sliding_bits} sets the bits of compressed sliding-window layers, but "
                             f"compress_layers={self.compress_layers!r} leaves them to transformers; use "
                             "compress_layers='all' or sliding_bits=None")
        _choice("window_dtype", self.window_dtype, WINDOW_DTYPES)
        if not 0.0 <= float(self.eviction_ratio) < 1.0:
            raise ValueError(f"eviction_ratio={self.eviction_ratio!r} must be in [0, 1)")
        if self.recent_window < BLOCK_TOKENS or self.recent_window % BLOCK_TOKENS:
            raise ValueError(f"recent_window={self.recent_window} must be a positive multiple of {BLOCK_TOKENS}")
        if self.warm_tokens < 0 or self.warm_tokens % BLOCK_TOKENS:
            raise ValueError(f"warm_tokens={self.warm_tokens} must be a non-negative multiple of {BLOCK_TOKENS}")
        if self.warm_tokens and not self.exact and self.warm_bits < max(self.key_bits, self.value_bits):
            raise ValueError(f"warm_bits={self.warm_bits} is below key_bits={self.key_bits} or value_bits="
                             f"{self.value_bits}; the warm tier holds recent tokens at least as precisely as the past")
        for fname in ("sink_tokens", "boundary_layers", "min_evict_tokens"):
            if getattr(self, fname) < 0:
                raise ValueError(f"{fname}={getattr(self, fname)} must be >= 0")
        if not self.relax_key_kl >= 0.0:
            raise ValueError(f"relax_key_kl={self.relax_key_kl!r} must be >= 0 (nats; 0 disables)")
        if self.relax_key_kl and (self.exact or self.key_bits - 1 not in offered):
            raise ValueError(f"relax_key_kl={self.relax_key_kl} tries keys one bit below key_bits={self.key_bits}, "
                             f"which codec={self.codec!r} does not offer; use key_bits in "
                             f"{tuple(b for b in offered if b - 1 in offered)}, or relax_key_kl=0")
        for fname in ("observation_window", "trial_queries"):
            if getattr(self, fname) < 1:
                raise ValueError(f"{fname}={getattr(self, fname)} must be >= 1")
        if self.pooling_kernel < 1 or self.pooling_kernel % 2 == 0:
            raise ValueError(f"pooling_kernel={self.pooling_kernel} must be a positive odd number")
        if self.version != 2:
            raise ValueError(f"Preset version {self.version} is not supported by this nqcompile (version 2: version 1 "
                             "had no value_norm and min_evict_tokens and normalized keys per channel by default)")

    @property
    def exact(self) -> bool:
        """True when keys and values are stored in the model's dtype (no quantization)."""
        return self.key_bits is None

    def replace(self, **overrides: Any) -> "Preset":
        """Return a copy with ``overrides`` applied (validated). Unknown names raise ``TypeError``."""
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown preset field(s) {sorted(unknown)}; fields are {[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (JSON-serializable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Preset":
        """Inverse of :meth:`to_dict`; validates like the constructor."""
        return cls(**data)

    def bytes_per_token(self, head_dim: int, *, bits: tuple[int | None, int | None] | None = None,
                        position_bytes: int = 4, exact_itemsize: int = 2) -> int:
        """Bytes stored per compressed token and KV head (see the module docstring for the formula).

        Args:
            head_dim: elements per key (and value) vector.
            bits: ``(key_bits, value_bits)`` to use instead of the preset's (boundary layers).
            position_bytes: itemsize of the stored position (2 or 4), counted only when evicting.
            exact_itemsize: itemsize of the model dtype, used when the layer is exact.

        Raises:
            ValueError: a quantized layer's ``head_dim`` is not a positive multiple of 8.
        """
        kb, vb = bits if bits is not None else (self.key_bits, self.value_bits)
        position = position_bytes if self.eviction_ratio > 0 else 0
        if kb is None:
            return 2 * head_dim * exact_itemsize + position
        codec = CODECS[self.codec]
        return codec.bytes_per_vector(kb, head_dim) + codec.bytes_per_vector(vb, head_dim) + 2 + position

    def layer_bytes(self, *, batch: int, kv_heads: int, head_dim: int, capacity: int, itemsize: int,
                    rotary_dim: int, bits: tuple[int | None, int | None] | None = None, position_bytes: int = 4,
                    evicting: bool | None = None) -> int:
        """Bytes one compressed layer allocates (formula in the module docstring), Hadamard excluded.

        Args:
            batch, kv_heads, head_dim: cache shape. capacity: code slots per sequence (tokens).
            itemsize: bytes per element of the model dtype. rotary_dim: rotated dims of a head.
            bits: the layer's ``(key_bits, value_bits)`` when it differs from the preset's (boundary layers).
            position_bytes: itemsize of stored positions. evicting: whether this layer evicts (default:
                ``eviction_ratio > 0``).
        """
        preset = self if evicting is None else self.replace(eviction_ratio=0.5 if evicting else 0.0)
        per_token = preset.bytes_per_token(head_dim, bits=bits, position_bytes=position_bytes, exact_itemsize=itemsize)
        window_itemsize = 2 if self._window_in_bf16(itemsize, bits) else itemsize
        exact = batch * kv_heads * (self.sink_tokens + self.recent_window) * 2 * head_dim * window_itemsize
        warm_tokens = self.warm_tokens_for(bits)
        warm_row = 2 * CODECS[self.codec].bytes_per_vector(self.warm_bits, head_dim) + 2 + position_bytes \
            if warm_tokens else 0
        warm = batch * kv_heads * warm_tokens * warm_row
        return (batch * kv_heads * capacity * per_token + exact + warm + batch * self.recent_window * 8
                + 5 * batch * 8 + 4 * batch * kv_heads * head_dim * 4 + rotary_dim // 2 * 4)

    def window_dtype_for(self, model_dtype: torch.dtype, bits: tuple[int | None, int | None] | None = None
                         ) -> torch.dtype:
        """dtype of the sinks and recent window of a layer stored at ``bits`` (default: the preset's) in a model
        computing in ``model_dtype``: bfloat16 for a quantized layer of a float32 or float64 model under
        ``window_dtype="16bit"``, else ``model_dtype``."""
        return torch.bfloat16 if self._window_in_bf16(model_dtype.itemsize, bits) else model_dtype

    def _window_in_bf16(self, itemsize: int, bits: tuple[int | None, int | None] | None) -> bool:
        key_bits = bits[0] if bits is not None else self.key_bits
        return key_bits is not None and self.window_dtype == "16bit" and itemsize > 2

    def warm_tokens_for(self, bits: tuple[int | None, int | None] | None = None) -> int:
        """Warm tier size in tokens of a layer stored at ``bits`` (default: the preset's): ``warm_tokens`` if the
        layer is quantized below ``warm_bits`` in keys or values, else 0 (the tier would add nothing)."""
        kb, vb = bits if bits is not None else (self.key_bits, self.value_bits)
        return self.warm_tokens if kb is not None and min(kb, vb) < self.warm_bits else 0


def _choice(fname: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{fname}={value!r} is not one of {allowed}")


PRESETS: dict[str, Preset] = {
    # 6 bits per key/value pair spent as 4 + 2: the same perplexity as 3 + 3 (benchmarks/kv_ablation.py), and
    # 4-bit keys kept every needle of SmolLM2's in the protocol where 3-bit keys lost some. The 512 newest compressed
    # tokens stay at 4 bits (recent tokens draw most of the attention; 512 instead of 256 since the window is held in
    # 16 bits: benchmarks/README.md, "Sinks and window in 16 bits"), paid for by 3-bit keys in the layers whose
    # attention barely moves with them (README, Presets): a KL below 0.03 over the first chunk's last 256 queries
    # (32 queries let a costly layer through on source code: benchmarks/README.md, genre_cost.py).
    "quant_only": Preset(name="quant_only", key_bits=4, value_bits=2, key_norm="mean", warm_tokens=512,
                         relax_key_kl=0.03),
    "high": Preset(name="high", key_bits=4, value_bits=3, key_norm="mean", warm_tokens=256),
    "asym": Preset(name="asym", key_bits=3, value_bits=2, warm_tokens=256),
    # Evicting presets rank tokens by KVzip's reconstruction scores (the model re-reads each prefill chunk):
    # query-agnostic, one budget shared among layers. 4-bit keys where the attention needs them: 3-bit keys
    # drop repeated digits of a needle (benchmarks/README.md). balanced evicts 0.64 at most: it keeps the tokens
    # carrying 97% of the scores' mass where 36% do not (Gemma 3's three global layers; on SmolLM2 36% carry
    # about 98%, so 0.64 holds there: benchmarks/README.md, "Why balanced collapsed on Gemma-3-270M"). The 256 newest
    # kept tokens stay at 4 bits, as in quant_only (benchmarks/README.md, "Sinks and window in 16 bits"). balanced
    # keeps every line break (the re-reading ranks them low, yet hard-wrapped text predicts its line ends from them),
    # so optimize() needs the tokenizer; max does not: in its fixed 25% they crowd out other tokens and cost more than
    # they save (benchmarks/README.md, "Line breaks").
    "balanced": Preset(name="balanced", key_bits=4, value_bits=2, key_norm="mean", relax_key_kl=0.03,
                       eviction_ratio=0.64, scorer="reconstruction", keep_mass=0.97, keep_line_breaks=True,
                       pooling_kernel=1, warm_tokens=256),
    "max": Preset(name="max", key_bits=2, value_bits=2, eviction_ratio=0.75, scorer="reconstruction",
                  pooling_kernel=1),
}


def get_preset(preset: "str | Preset" = "balanced", **overrides: Any) -> Preset:
    """Look up a preset by exact name (or take a :class:`Preset`) and apply keyword overrides.

    Raises:
        ValueError: unknown preset name (the message lists the valid ones).
        TypeError: unknown override field.
    """
    if isinstance(preset, Preset):
        base = preset
    elif isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)} or pass a Preset")
        base = PRESETS[preset]
    else:
        raise TypeError(f"preset must be a name or a Preset, got {type(preset).__name__}")
    return base.replace(**overrides) if overrides else base
