"""User entry points: :func:`optimize` a model, or :func:`compress_kv_cache` an existing cache."""

from __future__ import annotations

import functools
import inspect
import types
from typing import Any

import torch
from transformers import DynamicCache
from transformers.generation.configuration_utils import GenerationMode

from .attention import CACHE_KWARG, register_attention
from .cache import NexusCache
from .models.features import plan_layers
from .policy.line_breaks import line_break_ids
from .policy.registry import SCORERS
from .presets import Preset, get_preset

__all__ = ["optimize", "compress_kv_cache"]


def optimize(model: torch.nn.Module, preset: "str | Preset" = "balanced", *, tokenizer=None,
             **overrides: Any) -> torch.nn.Module:
    """Prepare a HuggingFace causal LM so that ``model.generate(...)`` runs with a compressed cache.

    It registers the ``"nexusquant"`` attention (transformers' ``AttentionInterface``), switches the model
    to it, and wraps this model's ``generate``: transformers resolves every argument as it always
    does, and where it would build its own cache (``cache_implementation`` ``None``, ``"dynamic"`` or ``"static"``)
    a :class:`~nqcompile.NexusCache` is built instead, sized as transformers sizes a static cache (``max_length - 1``
    tokens per sequence, ``max_length`` resolved from ``max_new_tokens``, ``max_length`` or the generation config's
    defaults); a ``NexusCache`` passed to continue a conversation gets room for the new turn. Arguments the
    compressed cache cannot honour are refused before the prefill. Its ``forward`` is wrapped to hand a
    ``NexusCache`` among its arguments on to the attention functions (:data:`~nqcompile.attention.CACHE_KWARG`). A
    forward hook has the model re-read each prefill chunk that the cache holds back for a scorer that
    ``needs_model`` (:data:`~nqcompile.policy.registry.SCORERS`; ``"reconstruction"``): :meth:`NexusCache.reconstruct`,
    one more forward pass over the chunk. For other scorers it does nothing. Calling it again replaces the hook and
    the wrappers. The model's weights and dtype are untouched, and it still runs exactly with a plain
    ``DynamicCache``.

    Args:
        model: a decoder-only ``PreTrainedModel`` with rotary attention (``docs/models.md`` lists which attention
            features are honoured and which are refused).
        preset: a name from :data:`nqcompile.PRESETS` or a :class:`~nqcompile.Preset`.
        tokenizer: the model's tokenizer; needed when the preset evicts and keeps line breaks (``keep_line_breaks``,
            as ``"balanced"`` does), whose ids it gives the re-reading
            (:func:`~nqcompile.policy.line_breaks.line_break_ids`).
        **overrides: :class:`~nqcompile.Preset` fields to change.

    Returns:
        the same model object, ready for ``generate``.

    Raises:
        ValueError: an attention feature the cache cannot honour, named in the message
            (:func:`~nqcompile.models.features.plan_layers`; a window shorter than a generation is refused by the
            cache that ``generate`` builds, once the length is known), learned attention-sink logits on an attention
            module (``sinks``), unknown preset or field value, a preset that evicts and keeps line breaks without a
            ``tokenizer``; from ``generate``, before the prefill: the arguments
            :func:`_refuse_generate_arguments` lists.
        TypeError: from ``generate``: token ids that are not a tensor (a ``BatchEncoding``: pass its ``input_ids``).
    """
    chosen = get_preset(preset, **overrides)
    plan_layers(model.config, chosen, max_cache_len=None, check_windows=False)  # validates; allocates nothing
    if chosen.keep_line_breaks and chosen.eviction_ratio > 0 and tokenizer is None:
        raise ValueError(f"preset {chosen.name!r} keeps line breaks through eviction (keep_line_breaks=True), which "
                         "needs the tokenizer to find them: nqcompile.optimize(model, preset, tokenizer=tokenizer), "
                         "or pass keep_line_breaks=False")
    for name, module in model.named_modules():
        if isinstance(getattr(module, "sinks", None), torch.Tensor):
            raise ValueError(f"{name} holds learned attention-sink logits (sinks, as gpt-oss's attention does): each "
                             "softmax has an extra logit per head, which the nexusquant attention does not add. "
                             "nqcompile does not support attention sinks")
    model.set_attn_implementation(register_attention())
    # transformers >= 5.24 calls the cache argument `cache` (`past_key_values` is its deprecated alias).
    cache_arg = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    original = type(model).generate
    prepare_cache = type(model)._prepare_cache_for_generation

    # The wrappers are bound to the model (types.MethodType) and call the class's own methods on ``self``, so a
    # deep copy of the model rebinds them to the copy instead of running the original model.
    @functools.wraps(original)
    def generate(self, *args: Any, **kwargs: Any):
        if "past_key_values" in kwargs and cache_arg != "past_key_values":
            kwargs[cache_arg] = kwargs.pop("past_key_values")
        arguments = inspect.signature(original).bind(self, *args, **kwargs).arguments
        inputs = arguments.get("inputs", kwargs.get("input_ids"))
        if inputs is not None and not isinstance(inputs, torch.Tensor):
            raise TypeError(f"generate takes the token ids as a tensor, got {type(inputs).__name__}; for the output of "
                            "tokenizer(...) or apply_chat_template(..., return_dict=True) pass encoding['input_ids'] "
                            "(and attention_mask=encoding['attention_mask']), or **encoding")
        _refuse_generate_arguments(self, chosen, arguments)
        return original(self, *args, **kwargs)

    def prepare_cache_for_generation(self, generation_config, model_kwargs: dict, generation_mode, batch_size: int,
                                     max_cache_length: int) -> None:
        # transformers' generate calls this once every argument is resolved; max_cache_length is what it would size
        # a static cache with (max_length - 1, plus the inputs_embeds length where generate adds it).
        user_cache = model_kwargs.get(cache_arg)
        if user_cache is None and generation_config.use_cache is not False:
            capacity = max(max_cache_length, generation_config.max_cache_len or 0)
            model_kwargs[cache_arg] = NexusCache(self.config, chosen, max_cache_len=capacity)
            return
        prepare_cache(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)
        if isinstance(user_cache, NexusCache):
            user_cache.reserve(max_cache_length - user_cache.seen_tokens())

    @functools.wraps(type(model).forward)
    def forward(self, *args: Any, **kwargs: Any):
        # The NexusCache among the arguments (or None) also reaches the attention functions as a keyword argument
        # (transformers passes a model's extra keyword arguments to every attention call).
        cache = kwargs[CACHE_KWARG] = _nexus_cache_among(args, kwargs)
        if cache is not None and torch.compiler.is_compiling() and cache.is_plan_step(_new_tokens(args, kwargs)):
            # A prefill chunk decides on the host what the cache keeps: under torch.compile it runs eagerly (one
            # graph break per chunk) and only the decode steps are compiled.
            return _forward_eagerly(self, args, kwargs)
        return type(self).forward(self, *args, **kwargs)

    model.generate = types.MethodType(generate, model)
    model._prepare_cache_for_generation = types.MethodType(prepare_cache_for_generation, model)
    model.forward = types.MethodType(forward, model)
    previous = getattr(model, "_nqcompile_reconstruct_hook", None)
    if previous is not None:
        previous.remove()
    model._nqcompile_reconstruct_hook = model.register_forward_hook(_reconstruct_after_prefill, with_kwargs=True)
    model.nqcompile_preset = chosen
    model._nqcompile_tokenizer, model._nqcompile_line_breaks = tokenizer, None  # the ids are read when first needed
    return model


#: Cache implementations of ``generate`` that an optimized model replaces by a :class:`~nqcompile.NexusCache`.
REPLACED_CACHE_IMPLEMENTATIONS = (None, "dynamic", "static")
#: Generation modes a :class:`~nqcompile.NexusCache` supports: each sequence only ever appends.
SUPPORTED_GENERATION_MODES = (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)


def _refuse_generate_arguments(model, preset: Preset, arguments: dict) -> None:
    """Raise ``ValueError``, naming the argument, for a ``generate`` call the compressed cache cannot honour.

    The generation config is resolved by transformers' own ``_prepare_generation_config`` (model defaults, then the
    ``generation_config`` passed, then keyword arguments), as ``generate`` itself does next.

    Args:
        model: the optimized model.
        preset: its preset.
        arguments: ``generate``'s bound arguments (``inspect.BoundArguments.arguments``).

    Raises:
        ValueError: ``custom_generate``; a generation mode other than greedy decoding or sampling (``num_beams`` > 1,
            ``assistant_model`` or ``prompt_lookup_num_tokens``, ``penalty_alpha``, ``dola_layers``, constraints: they
            reorder, crop or select cache entries, which compressed tokens cannot undergo); ``cache_implementation``
            other than ``None`` / ``"dynamic"`` / ``"static"``; ``output_attentions=True``; ``inputs_embeds`` with a
            scorer that re-reads the prompt's token ids.
    """
    if arguments.get("custom_generate") is not None:
        raise ValueError("custom_generate: nqcompile cannot check what a custom decoding loop does with the cache; "
                         "generate without it, or with the unoptimized model")
    extra = dict(arguments.get("kwargs", {}))
    config, _ = model._prepare_generation_config(arguments.get("generation_config"), **extra)
    mode = config.get_generation_mode(arguments.get("assistant_model"))
    if mode not in SUPPORTED_GENERATION_MODES:
        raise ValueError(f"this generate call runs {mode.value} (num_beams={config.num_beams}, assistant_model / "
                         "prompt_lookup_num_tokens, penalty_alpha, dola_layers, constraints), which reorders, crops "
                         "or selects cache entries; a NexusCache only appends. Use greedy decoding or sampling "
                         "(num_beams=1, no assistant), or generate with the unoptimized model")
    if config.cache_implementation not in REPLACED_CACHE_IMPLEMENTATIONS:
        raise ValueError(f"cache_implementation={config.cache_implementation!r}: an optimized model generates with "
                         "a NexusCache; pass cache_implementation=None, 'dynamic' or 'static' (all three give a "
                         "NexusCache, compileable as a static cache is), or generate with the unoptimized model")
    if config.output_attentions:
        raise ValueError("output_attentions=True: the nexusquant attention does not compute attention weights; "
                         "generate without output_attentions, or with the unoptimized model")
    if SCORERS[preset.scorer].needs_model and preset.eviction_ratio > 0 and extra.get("inputs_embeds") is not None:
        raise ValueError(f"inputs_embeds: scorer={preset.scorer!r} re-reads the prompt's token ids; pass input_ids, "
                         "not inputs_embeds (or optimize with a scorer that needs no model)")


def _nexus_cache_among(args: tuple, kwargs: dict) -> NexusCache | None:
    """The :class:`~nqcompile.NexusCache` passed to a forward call, positionally or by keyword, or None."""
    return next((a for a in (*args, *kwargs.values()) if isinstance(a, NexusCache)), None)


def _new_tokens(args: tuple, kwargs: dict) -> int:
    """Tokens per sequence that a forward call feeds (``input_ids`` or ``inputs_embeds``, positionally or by
    keyword); 1 when neither is found."""
    inputs = kwargs.get("input_ids", kwargs.get("inputs_embeds", args[0] if args else None))
    return inputs.shape[1] if isinstance(inputs, torch.Tensor) and inputs.dim() >= 2 else 1


@torch.compiler.disable
def _forward_eagerly(model, args: tuple, kwargs: dict):
    """The model class's own forward, run outside ``torch.compile`` (Dynamo does not trace this call)."""
    return type(model).forward(model, *args, **kwargs)


def _reconstruct_after_prefill(model, args: tuple, kwargs: dict, output: Any) -> None:
    """Forward hook: after a forward that left a prefill chunk deferred (a scorer that ``needs_model``), run
    :meth:`NexusCache.reconstruct` on it, so the next step sees the compressed chunk. Under ``torch.compile`` the
    check is traced (a decode step leaves nothing deferred) and the re-reading runs eagerly."""
    cache = _nexus_cache_among(args, kwargs)
    if cache is None or not cache.awaiting_reconstruction \
            or any(getattr(layer, "rereading", False) for layer in cache.layers):
        return
    _reread_deferred(model, args, kwargs, cache)


@torch.compiler.disable
def _reread_deferred(model, args: tuple, kwargs: dict, cache: NexusCache) -> None:
    """Re-read the chunk the forward call ``(args, kwargs)`` fed and left deferred in ``cache``."""
    signature = inspect.signature(model.forward)
    bound = dict(signature.bind_partial(*args, **kwargs).arguments)
    for name, param in signature.parameters.items():  # names the signature only takes through **kwargs
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            bound.update(bound.pop(name, {}))
    if bound.get("input_ids") is None:
        raise ValueError(f"scorer={cache.preset.scorer!r} re-reads the prompt's token ids; pass input_ids, not "
                         "inputs_embeds (or use a scorer that needs no model)")
    input_ids = bound["input_ids"]
    keep = torch.isin(input_ids, _line_breaks(model, cache).to(input_ids.device)) \
        if cache.preset.keep_line_breaks else None
    cache.reconstruct(model, input_ids, bound.get("attention_mask"), keep=keep)


def _line_breaks(model, cache: NexusCache) -> torch.Tensor:
    """The line-break token ids of the tokenizer :func:`optimize` was given, found once per model."""
    if getattr(model, "_nqcompile_line_breaks", None) is None:
        tokenizer = getattr(model, "_nqcompile_tokenizer", None)
        if tokenizer is None:
            raise ValueError(f"the NexusCache's preset {cache.preset.name!r} keeps line breaks (keep_line_breaks=True), "
                             "which needs the tokenizer: prepare the model with nqcompile.optimize(model, preset, "
                             "tokenizer=tokenizer), or build the cache with keep_line_breaks=False")
        model._nqcompile_line_breaks = line_break_ids(tokenizer)
    return model._nqcompile_line_breaks


def compress_kv_cache(cache: DynamicCache, preset: "str | Preset" = "asym", *, config,
                      attention_mask: torch.Tensor | None = None, max_cache_len: int | None = None,
                      **overrides: Any) -> NexusCache:
    """Turn a ``DynamicCache`` filled by a prefill into a :class:`~nqcompile.NexusCache`.

    The prefill's tokens are compressed as one chunk: sinks and recent window kept exact, the middle
    evicted (not when the prefill is shorter than the preset's ``min_evict_tokens``) and quantized. Neither
    the prefill's queries nor the model are available here, so the scorer must need neither
    (``needs_queries`` and ``needs_model`` false in :data:`~nqcompile.policy.registry.SCORERS`: ``key_diff``
    or ``key_norm``).

    Args:
        cache: a ``DynamicCache`` holding ``[B, Hkv, L, D]`` keys and values in every layer.
        preset: name or :class:`~nqcompile.Preset`; the default ``"asym"`` only quantizes (``balanced`` and ``max``
            rank tokens by re-reading with the model, and ``quant_only`` measures its key bits on queries: neither
            is possible here without overrides).
        config: the model's config.
        attention_mask: ``[B, L]`` 2D padding mask of the prefill (1 = real token), default all real;
            positions are ``cumsum(mask) - 1`` as transformers' ``generate`` computes them.
        max_cache_len: logical capacity for what follows (default: grow as needed).
        **overrides: :class:`~nqcompile.Preset` fields.

    Raises:
        ValueError: the preset evicts with a scorer that ``needs_queries`` or ``needs_model`` (``observation``,
            ``reconstruction``) or sets ``relax_key_kl`` (they need the prefill's queries or the model; the
            message names the scorers that work here), the cache holds layers of another kind, or the config has an
            attention feature :class:`~nqcompile.NexusCache` refuses (``docs/models.md``; e.g. a ``sliding_window``
            shorter than ``max_cache_len``, or no ``max_cache_len``, with ``compress_layers="all"``).
    """
    chosen = get_preset(preset, **overrides)
    scorer = SCORERS[chosen.scorer]
    if chosen.eviction_ratio > 0 and (scorer.needs_queries or scorer.needs_model):
        usable = " or ".join(f"scorer={name!r}" for name, entry in SCORERS.items()
                             if not (entry.needs_queries or entry.needs_model))
        missing = "queries" if scorer.needs_queries else "model"
        fields = [field for field, on in (("keep_mass=0", chosen.keep_mass),
                                          ("keep_line_breaks=False", chosen.keep_line_breaks)) if on]
        mass = f" (with {' and '.join(fields)}: they act on the re-reading's scores)" if fields else ""
        raise ValueError(f"compress_kv_cache has no {missing} to score tokens with scorer={chosen.scorer!r}; pass "
                         f"{usable}{mass} or eviction_ratio=0, or let an optimized model compress during its prefill")
    if chosen.relax_key_kl:
        raise ValueError(f"compress_kv_cache has no queries to measure relax_key_kl={chosen.relax_key_kl} with; pass "
                         "relax_key_kl=0 (every layer keeps key_bits), or let an optimized model compress during its "
                         "prefill")
    out = NexusCache(config, chosen, max_cache_len=max_cache_len)
    if len(cache.layers) != len(out.layers):
        raise ValueError(f"cache has {len(cache.layers)} layers, the config {len(out.layers)}")
    for src, dst in zip(cache.layers, out.layers):
        keys, values = src.keys, src.values
        if keys is None or keys.numel() == 0:
            raise ValueError("compress_kv_cache needs a cache filled by a prefill")
        mask = torch.ones(keys.shape[0], cache.get_seq_length(), dtype=torch.bool, device=keys.device) \
            if attention_mask is None else attention_mask.to(device=keys.device, dtype=torch.bool)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        if hasattr(dst, "ingest"):  # a sliding-window layer holds the last keys.shape[2] tokens only
            dst.ingest(keys, values, real=mask[:, -keys.shape[2]:], positions=positions[:, -keys.shape[2]:])
        else:
            dst.update(keys, values)
    return out
