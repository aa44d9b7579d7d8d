"""Which RoPE a HuggingFace attention layer applies: :class:`RotarySpec`, read from the model config.

:class:`RotarySpec` describes the rotation of one attention layer (inverse frequencies, attention scaling,
rotary dims, pair layout; the maths are in :mod:`nqcompile.codec.rope`), built from the model config with
transformers' own frequency functions (``transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS``), so rope
scaling variants are never re-derived here.

Pair layout. ``"half"`` is used by Llama, Mistral, Qwen2/3, Phi-3, Gemma 1-3, GPT-NeoX, StableLM, Falcon,
... (the vast majority); ``"interleaved"`` by GPT-J, CodeGen, Cohere / Cohere2, GLM / GLM-4, Helium,
ERNIE-4.5 and Llama-4 (complex-number form). transformers 5 has no config flag for this (the layout is
hard-coded in each ``modeling_*.py``), so :meth:`RotarySpec.from_config` picks ``"interleaved"`` only for
the model types above, read from their 5.24 modeling files (:data:`INTERLEAVED_MODEL_TYPES`); for any other
model pass ``layout="interleaved"`` explicitly. Partial rotary (Phi-3 / GPT-NeoX ``partial_rotary_factor``)
sets ``rotary_dim`` below ``head_dim``.

Sources:
    * ``linear``: S. Chen et al., "Extending Context Window of Large Language Models via Positional
      Interpolation", 2023, arXiv:2306.15595.
    * ``dynamic``: dynamic NTK-aware scaling (reddit users /u/bloc97 and /u/emozilla, 2023).
    * ``yarn``: B. Peng et al., "YaRN: Efficient Context Window Extension of Large Language Models", 2023,
      arXiv:2309.00071.
    * ``llama3``: Llama Team, "The Llama 3 Herd of Models", 2024, arXiv:2407.21783.
    * ``longrope``: Y. Ding et al., "LongRoPE: Extending LLM Context Window Beyond 2 Million Tokens", 2024,
      arXiv:2402.13753 (as used by Phi-3).
    * ``proportional``: transformers' Gemma-4 proportional RoPE (zero frequency on the non-rotated pairs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..codec.rope import _as_positions, _check_layout, apply_rotary, rotary_cos_sin

__all__ = ["INTERLEAVED_MODEL_TYPES", "RotarySpec"]

#: ``config.model_type`` values whose transformers (5.17-5.24) attention applies RoPE to interleaved
#: pairs ``(0, 1), (2, 3), ...`` with the rotary part first (``rotate_every_two``, ``x[..., ::2]``-style
#: ``rotate_half`` with ``repeat_interleave``'d cos/sin, or ``view_as_complex``). Checked against
#: ``transformers/models/<type>/modeling_<type>.py`` of 5.24. Every other model type defaults to ``"half"``.
INTERLEAVED_MODEL_TYPES = frozenset({
    "gptj",
    "codegen",
    "cohere",
    "cohere2",
    "cohere2_moe",
    "glm",
    "glm4",
    "helium",
    "ernie4_5",
    "ernie4_5_moe",
    "llama4",
    "llama4_text",
})

# Rope types whose frequencies change once the sequence passes a threshold length; value: name of the
# config field holding that threshold (for error messages).
_LENGTH_DEPENDENT = {
    "dynamic": "max_position_embeddings",
    "longrope": "original_max_position_embeddings",
}

# Model types whose transformers rotary embedding is not driven by `rope_parameters` but by a fixed
# sinusoid table (theta 10000 over `config.rotary_dim` leading dims, interleaved pairs).
_GPTJ_LIKE = frozenset({"gptj", "codegen"})

_DEFAULT_THETA = 10_000.0


# ---------------------------------------------------------------------------------------------------------
# Config reading
# ---------------------------------------------------------------------------------------------------------


class _RopeConfigView:
    """Minimal config handed to transformers' ``ROPE_INIT_FUNCTIONS``.

    Carries one already-resolved, flat ``rope_parameters`` dict (per-layer-type nesting and legacy
    ``rope_theta`` / ``rope_scaling`` attributes resolved by :meth:`RotarySpec.from_config`), the head
    dim and ``max_position_embeddings``; ``standardize_rope_params`` is a no-op because the dict is
    already standard. Any other attribute falls through to the original config, so user-registered rope
    functions that read model-specific fields still work. This keeps the call identical on transformers
    5.17 (``config=None`` default) and 5.24 (``config`` required) and independent of how either version
    nests per-layer parameters.
    """

    def __init__(self, base: Any, rope_parameters: dict, head_dim: int, hidden_size: int | None,
                 num_attention_heads: int | None, max_position_embeddings: int | None) -> None:
        self._base = base
        self.rope_parameters = rope_parameters
        self.head_dim = head_dim
        self.hidden_size = hidden_size if hidden_size is not None else head_dim
        self.num_attention_heads = num_attention_heads if num_attention_heads is not None else 1
        self.max_position_embeddings = max_position_embeddings
        self.is_heterogeneous = False

    def standardize_rope_params(self) -> None:
        return None

    def __getattr__(self, name: str) -> Any:  # only called for attributes not set above
        if name.startswith("__") or name == "_base":
            raise AttributeError(name)
        return getattr(self._base, name)


def _rope_init_functions() -> dict:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    return ROPE_INIT_FUNCTIONS


def _default_rope_parameters(view: _RopeConfigView, rotary_dim: int) -> tuple[torch.Tensor, float]:
    """transformers' default (unscaled) RoPE frequencies.

    transformers 5.x has no ``"default"`` entry in ``ROPE_INIT_FUNCTIONS``; each model's
    ``*RotaryEmbedding.compute_default_rope_parameters`` computes
    ``1 / theta ** (arange(0, dim, 2) / dim)`` in float32 (Phi-3 / GPT-NeoX / GLM variants with
    ``dim = int(head_dim * partial_rotary_factor)``), attention scaling 1. Older versions (4.x) had a
    ``"default"`` table entry, used when present.
    """
    table = _rope_init_functions()
    if "default" in table:
        return table["default"](view, device=None, seq_len=None)
    base = view.rope_parameters["rope_theta"]
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    return inv_freq, 1.0


def _model_type(config: Any) -> str:
    return str(getattr(config, "model_type", "") or "")


def _default_layout(config: Any) -> str:
    """``"interleaved"`` for :data:`INTERLEAVED_MODEL_TYPES`, else ``"half"``."""
    return "interleaved" if _model_type(config) in INTERLEAVED_MODEL_TYPES else "half"


def _describe(config: Any) -> str:
    mt = _model_type(config)
    return f"config (model_type={mt!r})" if mt else f"config {type(config).__name__}"


def _check_positional_kind(config: Any) -> None:
    """Raise ValueError for configs whose attention uses something other than RoPE."""
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{_describe(config)} is an encoder-decoder model; nqcompile only handles the self-attention "
                         "KV cache of decoder-only causal LMs")
    pet = getattr(config, "position_embedding_type", None)
    if isinstance(pet, str) and pet.lower() not in ("rope", "rotary", "rotary_embedding"):
        raise ValueError(f"{_describe(config)} has position_embedding_type={pet!r}, not rotary; there is no RoPE to "
                         "remove from its keys")
    alibi = getattr(config, "alibi", None)
    attn_config = getattr(config, "attn_config", None)
    if alibi is None and attn_config is not None:
        alibi = attn_config.get("alibi") if isinstance(attn_config, dict) else getattr(attn_config, "alibi", None)
    if alibi:
        raise ValueError(f"{_describe(config)} uses ALiBi attention biases, not rotary embeddings; there is no RoPE "
                         "to remove from its keys")
    if getattr(config, "kv_lora_rank", None) is not None and getattr(config, "qk_rope_head_dim", None) is not None:
        raise ValueError(
            f"{_describe(config)} uses multi-head latent attention (kv_lora_rank={config.kv_lora_rank}): its keys are "
            f"[nope | rope] with the qk_rope_head_dim={config.qk_rope_head_dim} rotary dims *last* and shared across "
            "heads; RotarySpec only describes heads whose leading dims are rotated")


def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    if callable(get):
        try:
            text = get(decoder=True)
        except (TypeError, ValueError, AttributeError):
            text = None
        if text is not None:
            return text
    return config


def _num_layers(config: Any) -> int | None:
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return len(layer_types)
    n = getattr(config, "num_hidden_layers", None)
    return n if isinstance(n, int) else None


#: Model types whose attention applies no RoPE in some layers by code rather than by a config flag (checked against
#: ``modeling_<type>.py`` of transformers 5.17 and 5.24): ``(config, layer_idx) -> True`` for a layer without RoPE.
#: Cohere 2 and AFMoE rotate only in their sliding-window layers; EXAONE 4 too when it has any (``sliding_window``
#: set), else everywhere.
_NOPE_BY_MODEL_TYPE = {
    "cohere2": lambda config, i: config.layer_types[i] != "sliding_attention",
    "afmoe": lambda config, i: config.layer_types[i] != "sliding_attention",
    "exaone4": lambda config, i: config.sliding_window is not None and config.layer_types[i] != "sliding_attention",
}


def _layer_has_no_rope(config: Any, layer_idx: int) -> bool:
    """Whether layer ``layer_idx`` uses no positional embedding (NoPE): SmolLM3 / Llama-4 ``no_rope_layers`` (entry 0),
    or the model types of :data:`_NOPE_BY_MODEL_TYPE`."""
    flags = getattr(config, "no_rope_layers", None)
    if flags and layer_idx < len(flags) and not flags[layer_idx]:
        return True
    by_code = _NOPE_BY_MODEL_TYPE.get(_model_type(config))
    return by_code is not None and bool(by_code(config, layer_idx))


def _resolve_head_dim(config: Any) -> int:
    head_dim = getattr(config, "head_dim", None)
    if not head_dim:
        hidden = getattr(config, "hidden_size", None)
        heads = getattr(config, "num_attention_heads", None)
        if not hidden or not heads:
            raise ValueError(f"{_describe(config)} has neither head_dim nor hidden_size/num_attention_heads")
        head_dim = hidden // heads
    return int(head_dim)


def _resolve_rope_parameters(config: Any, layer_idx: int | None) -> dict | None:
    """The flat, standardized rope parameter dict that applies to ``layer_idx`` (mirrors
    ``RotaryEmbeddingConfigMixin.standardize_rope_params`` of transformers 5.17-5.24), or None for a layer type whose
    entry is None (no positional embedding)."""
    legacy_theta = getattr(config, "rope_theta", None)
    if legacy_theta is None:
        legacy_theta = getattr(config, "rotary_emb_base", None)  # GPT-NeoX 4.x name
    legacy_prf = getattr(config, "partial_rotary_factor", None)
    if legacy_prf is None:
        legacy_prf = getattr(config, "rotary_pct", None)  # GPT-NeoX 4.x name
    default_theta = getattr(config, "default_theta", _DEFAULT_THETA)
    max_pos = getattr(config, "max_position_embeddings", None)

    params = getattr(config, "rope_parameters", None)
    if not params:
        # transformers < 5 (and remote-code / hand-built configs): `rope_scaling` dict + `rope_theta` attribute.
        params = getattr(config, "rope_scaling", None)
    if params is not None and not isinstance(params, dict):
        params = dict(params)

    if not params and legacy_theta is None and legacy_prf is None:
        if _model_type(config) in _GPTJ_LIKE:
            rotary_dim = getattr(config, "rotary_dim", None)
            params = {"rope_type": "default", "rope_theta": _DEFAULT_THETA}
            if rotary_dim:
                params["partial_rotary_factor"] = rotary_dim / _resolve_head_dim(config)
            return params
        raise ValueError(
            f"{_describe(config)} has no rotary position embedding settings (no rope_parameters, rope_scaling or "
            "rope_theta); models with absolute/learned positions (GPT-2, OPT) or ALiBi (Bloom, MPT) have no RoPE to "
            "remove from their keys")
    params = dict(params or {})

    labels = getattr(config, "_rope_type_labels", None) or getattr(config, "layer_types", None) or ()
    nested = [key for key in params if key in labels]
    if nested:
        layer_types = getattr(config, "layer_types", None)
        if layer_idx is None:
            raise ValueError(f"{_describe(config)} has per-layer-type rope_parameters for {sorted(nested)}; pass "
                             "layer_idx to pick the layer")
        if not layer_types:
            raise ValueError(f"{_describe(config)} nests rope_parameters by {sorted(nested)} but has no layer_types")
        layer_type = layer_types[layer_idx]
        if layer_type not in params:
            raise ValueError(f"layer {layer_idx} has layer type {layer_type!r}, which has no entry in the per-layer-type "
                             f"rope_parameters (keys: {sorted(params)}); this model maps layers to rope entries in "
                             "model-specific code that RotarySpec does not replicate")
        if params[layer_type] is None:  # no positional embedding (NoPE) in this layer type
            return None
        params = dict(params[layer_type])
        params.setdefault("rope_type", params.get("type", "default"))
        params.setdefault("rope_theta", legacy_theta if legacy_theta is not None else default_theta)
        if legacy_prf is not None:
            params.setdefault("partial_rotary_factor", legacy_prf)
        if params["rope_type"] in ("llama3", "yarn", "longrope"):
            params.setdefault("original_max_position_embeddings", max_pos)
    else:
        params.setdefault("rope_type", params.get("type", "default"))
        params.setdefault("rope_theta", legacy_theta if legacy_theta is not None else default_theta)
        if legacy_prf is not None:
            params.setdefault("partial_rotary_factor", legacy_prf)
        if params["rope_type"] in ("llama3", "yarn", "longrope"):
            # Phi-3 keeps the pretraining length outside rope_parameters and transformers gives it priority.
            if getattr(config, "original_max_position_embeddings", None) is not None:
                params["original_max_position_embeddings"] = config.original_max_position_embeddings
            else:
                params.setdefault("original_max_position_embeddings", max_pos)
    default_rope_type = getattr(config, "default_rope_type", "default")
    if params["rope_type"] == "default" and default_rope_type != "default":
        params["rope_type"] = default_rope_type
    params.pop("type", None)
    return params


# ---------------------------------------------------------------------------------------------------------
# RotarySpec
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class RotarySpec:
    """Exact description of the RoPE one attention layer applies to its keys.

    Attributes:
        inv_freq: float32 CPU tensor ``[rotary_dim/2]``, inverse frequency of each rotary pair in radians per
            position (pair ``i`` is rotated by ``position * inv_freq[i]``). Already includes the rope
            type's scaling (linear / llama3 / yarn / longrope short factor / ...).
        attention_scaling: float multiplying cos and sin (1.0 except YaRN / LongRoPE ``attention_factor``).
        rotary_dim: number of leading head dims that are rotated, even, ``<= head_dim``; the rest pass through.
        head_dim: size of one key head.
        layout: ``"half"`` (Llama ``rotate_half``) or ``"interleaved"`` (GPT-J pairs ``(0,1),(2,3),...``).
        rope_type: transformers rope type (``default``, ``linear``, ``dynamic``, ``llama3``, ``yarn``,
            ``longrope``, ``proportional``, or any other key of ``ROPE_INIT_FUNCTIONS``).
        max_exact_length: for length-dependent types (``dynamic``, ``longrope``) the largest sequence length
            (``max(position) + 1``) at which transformers still uses these frequencies; ``None`` = unlimited.
        rope_theta: base wavelength the frequencies were derived from (informational).

    Instances compare equal when every field (including ``inv_freq`` values) is equal, and are hashable.
    """

    inv_freq: torch.Tensor
    attention_scaling: float
    rotary_dim: int
    head_dim: int
    layout: str = "half"
    rope_type: str = "default"
    max_exact_length: int | None = None
    rope_theta: float | None = None

    def __post_init__(self) -> None:
        inv_freq = torch.as_tensor(self.inv_freq).detach().to(device="cpu", dtype=torch.float32).contiguous()
        object.__setattr__(self, "inv_freq", inv_freq)
        object.__setattr__(self, "attention_scaling", float(self.attention_scaling))
        object.__setattr__(self, "rotary_dim", int(self.rotary_dim))
        object.__setattr__(self, "head_dim", int(self.head_dim))
        _check_layout(self.layout)
        if self.rotary_dim <= 0 or self.rotary_dim % 2:
            raise ValueError(f"rotary_dim must be a positive even number, got {self.rotary_dim}")
        if self.rotary_dim > self.head_dim:
            raise ValueError(f"rotary_dim={self.rotary_dim} exceeds head_dim={self.head_dim}")
        if inv_freq.ndim != 1 or inv_freq.shape[0] != self.rotary_dim // 2:
            raise ValueError(f"inv_freq must have shape [{self.rotary_dim // 2}], got {tuple(inv_freq.shape)}")
        if not torch.isfinite(inv_freq).all():
            raise ValueError("inv_freq has non-finite entries")
        if not self.attention_scaling > 0 or not math.isfinite(self.attention_scaling):
            raise ValueError(f"attention_scaling must be a positive finite float, got {self.attention_scaling}")
        if self.max_exact_length is not None and self.max_exact_length <= 0:
            raise ValueError(f"max_exact_length must be positive or None, got {self.max_exact_length}")
        object.__setattr__(self, "_inv_freq_by_device", {inv_freq.device: inv_freq})

    def _inv_freq_on(self, device: torch.device) -> torch.Tensor:
        """``inv_freq`` on ``device``, copied there once per device."""
        cache = self._inv_freq_by_device
        device = torch.device(device)
        if device not in cache:
            cache[device] = self.inv_freq.to(device)
        return cache[device]

    # -- identity ------------------------------------------------------------------------------------------

    def _key(self) -> tuple:
        return (tuple(self.inv_freq.tolist()), self.attention_scaling, self.rotary_dim, self.head_dim, self.layout,
                self.rope_type, self.max_exact_length, self.rope_theta)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RotarySpec):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    # -- construction --------------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Any, *, layer_idx: int | None = None, layout: str | None = None) -> "RotarySpec":
        """Build the spec of layer ``layer_idx`` of a HuggingFace causal-LM config.

        Reads, in transformers' priority order: ``config.rope_parameters`` (transformers 5; either one flat
        dict or a dict of per-layer-type dicts such as ``{"full_attention": {...}, "sliding_attention": {...}}``,
        resolved with ``config.layer_types[layer_idx]``), else the transformers-4 ``config.rope_scaling`` dict;
        ``rope_theta`` / ``partial_rotary_factor`` attributes fill keys missing from the dict (transformers 5
        folds them into ``rope_parameters`` at construction, so setting ``config.rope_theta`` on an existing
        transformers-5 config has no effect there, nor here). Phi-3's top-level
        ``original_max_position_embeddings`` wins over the dict's, as in transformers. Composite (e.g.
        vision-language) configs are reduced to ``config.get_text_config(decoder=True)``; heterogeneous
        configs (``per_layer_config``) to ``config.per_layer_config[layer_idx]``.

        The frequencies come from ``transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS[rope_type]`` (default
        rope: transformers' ``compute_default_rope_parameters`` formula, which has no table entry in 5.x),
        called on the resolved parameters exactly as the model's rotary module calls it at init.

        Args:
            config: a ``transformers.PretrainedConfig`` or any object with the same attributes.
            layer_idx: attention layer index; required when rope parameters differ per layer type; also used
                to find layers without positional embedding (NoPE: ``no_rope_layers``, a per-layer-type entry
                ``None``, or by code in the model types of :data:`_NOPE_BY_MODEL_TYPE`), which get
                :meth:`identity`.
            layout: ``"half"`` or ``"interleaved"``; ``None`` -> ``"interleaved"`` for
                :data:`INTERLEAVED_MODEL_TYPES`, else ``"half"``. transformers 5 has no config flag for the
                pair layout (DeepSeek's ``rope_interleave`` belongs to MLA models, rejected below).

        Returns:
            The :class:`RotarySpec`. For ``dynamic`` / ``longrope`` it is exact only up to
            ``max_exact_length`` (see :meth:`check_length`).

        Raises:
            ValueError: encoder-decoder config; no rotary settings (absolute / learned positions,
                ``position_embedding_type`` other than rotary, ALiBi as in Bloom / MPT / Falcon-alibi);
                multi-head latent attention (DeepSeek-V2/V3); multimodal ``mrope_section`` rope;
                per-layer-type parameters without ``layer_idx``; unknown rope type; odd or zero rotary dim
                (``int(head_dim * partial_rotary_factor)``); unknown layout.
        """
        _check_positional_kind(config)
        text = _text_config(config)
        if text is not config:
            _check_positional_kind(text)
            config = text

        if layer_idx is not None:
            layer_idx = int(layer_idx)
            n_layers = _num_layers(config)
            if layer_idx < 0 or (n_layers is not None and layer_idx >= n_layers):
                raise ValueError(f"layer_idx={layer_idx} out of range for {_describe(config)} with {n_layers} layers")
            no_rope = _layer_has_no_rope(config, layer_idx)
            if getattr(config, "is_heterogeneous", False) is True:
                config = config.per_layer_config[layer_idx]
            if no_rope:
                return cls.identity(_resolve_head_dim(config), layout=layout or _default_layout(config))
        elif getattr(config, "is_heterogeneous", False) is True:
            try:
                return cls._from_layer_config(config, None, layout)
            except RuntimeError as exc:  # transformers' AmbiguousGlobalPerLayerAttributeError
                raise ValueError(f"{_describe(config)} is heterogeneous (per_layer_config) and its rotary settings "
                                 f"vary per layer; pass layer_idx ({exc})") from exc
        return cls._from_layer_config(config, layer_idx, layout)

    @classmethod
    def _from_layer_config(cls, config: Any, layer_idx: int | None, layout: str | None) -> "RotarySpec":
        """:meth:`from_config` after the text / per-layer config has been selected."""
        params = _resolve_rope_parameters(config, layer_idx)
        if params is None:
            return cls.identity(_resolve_head_dim(config), layout=layout or _default_layout(config))
        rope_type = params["rope_type"]
        if params.get("mrope_section") is not None:
            raise ValueError(f"{_describe(config)} uses multimodal rotary embedding (mrope_section="
                             f"{params['mrope_section']}): each frequency band follows its own position axis, which "
                             "RotarySpec's one position per token cannot express")

        table = _rope_init_functions()
        if rope_type != "default" and rope_type not in table:
            known = sorted({"default", *table})
            raise ValueError(f"unknown rope type {rope_type!r} in {_describe(config)}; supported: {known}")

        head_dim = _resolve_head_dim(config)
        prf = params.get("partial_rotary_factor")
        prf = 1.0 if prf is None else float(prf)
        rotary_dim = int(head_dim * prf)
        if rotary_dim <= 0 or rotary_dim > head_dim:
            raise ValueError(f"{_describe(config)}: partial_rotary_factor={prf} with head_dim={head_dim} gives "
                             f"rotary dim {rotary_dim}, outside (0, head_dim]")
        if rotary_dim % 2 and rope_type != "proportional":  # proportional pads to head_dim/2 pairs itself
            raise ValueError(f"{_describe(config)}: the rotary part of the head is odd (head_dim={head_dim}, "
                             f"partial_rotary_factor={prf} -> rotary dim {rotary_dim}); RoPE rotates dims in pairs")

        view = _RopeConfigView(config, params, head_dim, getattr(config, "hidden_size", None),
                               getattr(config, "num_attention_heads", None),
                               getattr(config, "max_position_embeddings", None))
        with torch.device("cpu"):
            if rope_type == "default":
                inv_freq, attention_scaling = _default_rope_parameters(view, rotary_dim)
            else:
                inv_freq, attention_scaling = table[rope_type](view, device=None, seq_len=None)
        inv_freq = torch.as_tensor(inv_freq).detach().to("cpu", torch.float32)
        if isinstance(attention_scaling, torch.Tensor):
            attention_scaling = attention_scaling.item()
        spec_rotary_dim = 2 * inv_freq.shape[-1]  # 'proportional' returns head_dim/2 entries (zeros for NoPE pairs)
        if spec_rotary_dim > head_dim:
            raise ValueError(f"{_describe(config)}: rope type {rope_type!r} produced {inv_freq.shape[-1]} frequencies "
                             f"for head_dim={head_dim}")

        max_exact_length = None
        if rope_type in _LENGTH_DEPENDENT:
            limit_key = _LENGTH_DEPENDENT[rope_type]
            # dynamic: transformers regrows once max(position)+1 > config.max_position_embeddings
            # longrope: switches to long_factor once max(position)+1 > original_max_position_embeddings
            limit = params.get(limit_key) if rope_type == "longrope" else getattr(config, limit_key, None)
            if limit is None:
                raise ValueError(f"{_describe(config)}: rope type {rope_type!r} needs {limit_key}")
            max_exact_length = int(limit)

        if layout is None:
            layout = _default_layout(config)
        return cls(inv_freq=inv_freq, attention_scaling=float(attention_scaling), rotary_dim=spec_rotary_dim,
                   head_dim=head_dim, layout=layout, rope_type=rope_type, max_exact_length=max_exact_length,
                   rope_theta=float(params["rope_theta"]) if params.get("rope_theta") is not None else None)

    @classmethod
    def identity(cls, head_dim: int, *, layout: str = "half") -> "RotarySpec":
        """The spec of a layer without positional embedding (NoPE): every frequency zero, so :meth:`apply` and
        :meth:`remove` return the keys unchanged (bit for bit: cos 1, sin 0). ``rope_type`` is ``"none"``."""
        pairs = int(head_dim) // 2
        return cls(inv_freq=torch.zeros(pairs), attention_scaling=1.0, rotary_dim=2 * pairs, head_dim=head_dim,
                   layout=layout, rope_type="none")

    # -- use -----------------------------------------------------------------------------------------------

    def check_length(self, seq_len: int) -> None:
        """Raise if transformers would use different frequencies for a sequence of ``seq_len`` tokens.

        ``seq_len`` is ``max(position) + 1`` (transformers' own definition). A no-op for length-independent
        rope types.

        Raises:
            NotImplementedError: ``dynamic`` rope with ``seq_len > max_position_embeddings`` or ``longrope``
                with ``seq_len > original_max_position_embeddings``: transformers then changes the
                frequencies of every position, including keys already in the cache, which nqcompile cannot
                re-rotate consistently once they are compressed.
        """
        if self.max_exact_length is None or seq_len <= self.max_exact_length:
            return
        limit_key = _LENGTH_DEPENDENT.get(self.rope_type, "max_exact_length")
        what = {"dynamic": "changes the frequencies",
                "longrope": "switches from short_factor to long_factor, which changes the frequencies"}.get(
                    self.rope_type, "changes the frequencies")
        raise NotImplementedError(
            f"{self.rope_type} rope beyond {limit_key}={self.max_exact_length} (sequence length {seq_len}) {what} of "
            "already-cached keys; nqcompile cannot re-rotate compressed keys consistently")

    def _check_positions(self, positions: torch.Tensor) -> None:
        if self.max_exact_length is not None and positions.numel():
            self.check_length(int(positions.max()) + 1)

    def cos_sin(self, positions: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled cos/sin tables at ``positions``, laid out for :attr:`layout`.

        Args:
            positions: integer tensor ``[..., n]`` (any device).
            dtype: float32 (default) or float64.

        Returns:
            ``(cos, sin)``: ``dtype`` ``[..., n, rotary_dim]`` on ``positions.device``, multiplied by
            :attr:`attention_scaling` -- for ``"half"`` layout equal to transformers' ``*RotaryEmbedding`` output.

        Raises:
            TypeError: non-integer positions. NotImplementedError: see :meth:`check_length`.
        """
        positions = _as_positions(positions)
        self._check_positions(positions)
        return rotary_cos_sin(positions, self._inv_freq_on(positions.device), attention_scaling=self.attention_scaling, layout=self.layout,
                              dtype=dtype)

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate pre-RoPE keys ``x [..., n, head_dim]`` to their post-RoPE value at ``positions [..., n]``.

        ``positions``' leading dims line up with ``x``'s leading dims; missing ones are inserted before ``n``
        (``x [B, H, n, D]`` takes ``positions [B, n]``, ``[B, H, n]`` or ``[n]``). Returns ``x``'s shape and
        dtype, computed in float32 (float64 for float64 ``x``); the non-rotary tail is unchanged. For
        float32 input the result is bit-identical to transformers' ``apply_rotary_pos_emb`` (half layout);
        for half-precision input it is rounded once from float32 (transformers rounds cos/sin to the input
        dtype first and rounds each product, so results may differ by a few ulps of that dtype).

        For ``dynamic`` / ``longrope`` specs this reads ``max(positions)`` (a device sync on GPU) to enforce
        :meth:`check_length`; other rope types never sync.

        Raises:
            ValueError: last dim of ``x`` is not ``head_dim``, or shapes do not broadcast.
            TypeError: non-float ``x`` / non-integer positions. NotImplementedError: see :meth:`check_length`.
        """
        return self._run(x, positions, inverse=False)

    def remove(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Exact inverse of :meth:`apply`: rotate by ``-theta`` and divide by :attr:`attention_scaling`.

        Same shapes, dtypes and errors as :meth:`apply`.
        """
        return self._run(x, positions, inverse=True)

    def _run(self, x: torch.Tensor, positions: torch.Tensor, *, inverse: bool) -> torch.Tensor:
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"x has last dim {x.shape[-1]}, expected head_dim={self.head_dim}")
        positions = _as_positions(positions, device=x.device)
        self._check_positions(positions)
        return apply_rotary(x, positions, self._inv_freq_on(x.device), attention_scaling=self.attention_scaling,
                            rotary_dim=self.rotary_dim, layout=self.layout, inverse=inverse)
