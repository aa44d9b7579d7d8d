"""``NexusCache``: a ``transformers.Cache`` whose layers hold packed E8 codes instead of float keys/values.

The per-layer storage, the life of a token (sinks, compressed past, warm tier, exact window) and the
compression at chunk ends are in :mod:`nqcompile.cache.layer`; this module builds one
:class:`~nqcompile.cache.layer.NexusLayer` per attention layer from a model config and a preset, and accounts
for every byte the cache holds (:class:`CacheMemoryReport`).
"""

from __future__ import annotations

import contextlib

import torch
from transformers.cache_utils import Cache, DynamicSlidingWindowLayer

from ..models.features import WINDOW_FIELDS, plan_layers
from .layer import NexusLayer
from .sliding import SlidingLayer
from .memory import CacheMemoryReport, memory_report
from ..models.compat import cache_kwarg_name
from ..policy import layer_eviction_ratios
from ..policy.reconstruction import REREAD_TOKENS, allocate_across_layers
from ..presets import Preset, get_preset

__all__ = ["NexusCache", "ContiguousSlidingWindowLayer"]


class ContiguousSlidingWindowLayer(DynamicSlidingWindowLayer):
    """transformers' ``DynamicSlidingWindowLayer`` (the layer a sliding-window layer of a hybrid model keeps
    with ``compress_layers="global_only"``), holding its last ``sliding_window - 1`` keys and values as tensors of
    their own.

    transformers' layer keeps a view of the last states it concatenated: after a prefill, a view into the whole
    prompt's ``[B, H, L, D]`` keys and values (which stay allocated), after a decode step a view into the
    ``sliding_window`` tokens of that step, with other strides, so a compiled decode step met both and compiled
    twice. A contiguous copy of the window (``sliding_window - 1`` tokens per sequence and head, copied at every
    update) holds only the window and has the same strides after either.
    """

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """``DynamicSlidingWindowLayer.update``: ``[B, H, n, D]`` new keys and values in, the ``[B, H, kv, D]`` keys
        and values to attend over out; then the kept window is made contiguous."""
        out = super().update(key_states, value_states, *args, **kwargs)
        self.keys, self.values = self.keys.contiguous(), self.values.contiguous()
        return out


class NexusCache(Cache):
    """A ``transformers.Cache`` that stores keys and values as packed E8 lattice codes, with token eviction.

    Pass it as ``past_key_values`` to a model prepared by :func:`nqcompile.optimize` (whose attention
    implementation ``"nexusquant"`` reads the codes), or let the optimized model's ``generate`` build one.

    Args:
        config: the model's ``PretrainedConfig`` (a text decoder with rotary attention).
        preset: a preset name from :data:`nqcompile.PRESETS` or a :class:`~nqcompile.Preset`.
        max_cache_len: logical capacity per sequence in tokens (prompt + new tokens), like transformers'
            ``StaticCache``; ``None`` lets the code buffers grow at each chunk end.
        **overrides: any :class:`~nqcompile.Preset` field.

    Which attention features of the config are honoured, and how, is in ``docs/models.md``: full-attention layers
    are compressed (:class:`~nqcompile.cache.layer.NexusLayer`), sliding-window layers hold their window as codes
    (:class:`~nqcompile.cache.sliding.SlidingLayer`: the exact recent tokens and a ring of code blocks, at the
    preset's ``sliding_bits`` when set; never evicted), chunked layers are compressed only when ``max_cache_len``
    is at most their chunk; with ``compress_layers="global_only"`` the sliding-window and chunked layers are left to
    transformers' own cache.

    Raises:
        ValueError: a config feature that a compressed layer cannot honour, named in the message
            (:func:`~nqcompile.models.features.plan_layers`: encoder-decoder, no rotary attention or an unsupported
            rope, ALiBi, multi-head latent attention, ``attn_logit_softcapping``, cross-layer KV sharing,
            bidirectional attention, non-attention ``layer_types``, an ``attention_chunk_size`` shorter than
            ``max_cache_len`` with ``compress_layers="all"``); head_dim not a multiple of 8 for a
            quantized preset; unknown preset or field value.
    """

    def __init__(self, config, preset: "str | Preset" = "balanced", *, max_cache_len: int | None = None, **overrides):
        self.preset = get_preset(preset, **overrides)
        plans = plan_layers(config, self.preset, max_cache_len=max_cache_len)
        #: The smallest chunk among the compressed chunked layers (``max_cache_len`` may not pass it): (field, tokens).
        self._window_limit = min(((WINDOW_FIELDS[p.layer_type], p.window) for p in plans
                                  if p.compressed and p.layer_type == "chunked_attention"),
                                 key=lambda fw: fw[1], default=None)
        compressed = [i for i, plan in enumerate(plans) if plan.compressed]
        nb = self.preset.boundary_layers
        boundary = set(compressed[:nb] + compressed[len(compressed) - nb:]) if nb else set()
        # Sliding-window layers never evict (nqcompile.cache.sliding): the budget is the full-attention layers'.
        evicting = [i for i in compressed if i not in boundary and plans[i].layer_type != "sliding_attention"]
        ratios = dict(zip(evicting, layer_eviction_ratios(self.preset.eviction_ratio, len(evicting),
                                                          self.preset.layer_budget)))
        quant_bits = None if self.preset.exact else (self.preset.key_bits, self.preset.value_bits)
        boundary_bits = None if self.preset.boundary_bits is None else (self.preset.boundary_bits,) * 2
        sliding_bits = quant_bits if self.preset.sliding_bits is None else (self.preset.sliding_bits,) * 2
        layers = []
        for i, plan in enumerate(plans):
            bits = boundary_bits if i in boundary else sliding_bits if plan.layer_type == "sliding_attention" \
                else quant_bits
            if not plan.compressed:
                layers.append(ContiguousSlidingWindowLayer(sliding_window=plan.window))
            elif plan.layer_type == "sliding_attention":
                layers.append(SlidingLayer(preset=self.preset, bits=bits, window=plan.window, rotary=plan.rotary,
                                           max_cache_len=max_cache_len))
            else:
                layers.append(NexusLayer(preset=self.preset, bits=bits, eviction_ratio=ratios.get(i, 0.0),
                                         rotary=plan.rotary, max_cache_len=max_cache_len))
        super().__init__(layers=layers)

    @property
    def max_cache_len(self) -> int | None:
        """Logical capacity per sequence in tokens (raised by :meth:`reserve`), or ``None`` when unbounded.

        A read-only property, as transformers' ``Cache.max_cache_len`` is in 5.17 (the layers hold the value).
        """
        return next((layer.max_cache_len for layer in self.layers if isinstance(layer, NexusLayer)), None)

    @contextlib.contextmanager
    def replay_as_decode(self):
        """Within this context, a multi-token input is processed as that many decode steps.

        ``model(continuation, past_key_values=cache)`` then gives the logits that feeding ``continuation``
        one token at a time would give (same codes, same flushes, each token seeing the cache as it stood
        at its step), in one forward: how the perplexity protocol runs teacher-forced continuations fast.
        """
        layers = [layer for layer in self.layers if isinstance(layer, NexusLayer)]
        for layer in layers:
            layer.replay_as_decode = True
        try:
            yield self
        finally:
            for layer in layers:
                layer.replay_as_decode = False

    def is_plan_step(self, new_tokens: int) -> bool:
        """Whether a forward of ``new_tokens`` tokens per sequence is a plan step rather than static decode steps:
        a prefill chunk (the first, or any multi-token input outside :meth:`replay_as_decode`) or a re-reading.
        A plan step decides on the host what the cache keeps and sizes its buffers; ``torch.compile`` runs it
        eagerly (the forward of :func:`nqcompile.optimize` makes sure of it)."""
        return any(isinstance(layer, NexusLayer) and (layer.rereading or layer.chunks == 0
                                                      or (new_tokens > 1 and not layer.replay_as_decode))
                   for layer in self.layers)

    @property
    def awaiting_reconstruction(self) -> bool:
        """True between a prefill chunk that ``scorer="reconstruction"`` defers and :meth:`reconstruct`."""
        return any(isinstance(layer, NexusLayer) and layer.deferred is not None for layer in self.layers)

    @torch.no_grad()
    def reconstruct(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                    keep: torch.Tensor | None = None) -> None:
        """Re-read the prefill chunk just fed and compress it by reconstruction scores (KVzip).

        The model reads ``input_ids`` again, right after the chunk, in pieces of
        :data:`~nqcompile.policy.reconstruction.REREAD_TOKENS` real tokens (cut per sequence, so a padded row
        is read as it would be alone); the layers attend over what they
        hold but store nothing, and note for each token of the chunk the most attention it receives. Then
        the kept-token budget of all layers together (``1 - eviction_ratio`` of their tokens, or more where
        ``keep_mass`` of the scores needs more) is shared among them
        (:func:`~nqcompile.policy.reconstruction.allocate_across_layers`) and every deferred layer
        compresses its chunk. A model prepared by :func:`nqcompile.optimize` calls this itself after each
        forward that leaves a chunk deferred.

        Args:
            model: the causal LM that filled the cache (``nexusquant`` attention).
            input_ids: ``[B, L]`` int64, the chunk's token ids (left-padded as fed).
            attention_mask: the mask passed with the chunk: 2D ``[B, past + L]`` (1 = real token), the 4D mask
                ``[B, 1, L, kv]`` that ``generate`` builds for a compileable cache (boolean, or additive with 0
                where attended; its last row, a real token under left padding, gives the padding), a dict of such
                masks by layer type (its ``"full_attention"`` one is read), or None.
            keep: ``[B, L]`` bool, chunk tokens every evicting layer keeps first (their score becomes 1.0, the
                highest, and ``keep_mass`` counts it): the line breaks under ``Preset.keep_line_breaks``, which
                the hook of :func:`nqcompile.optimize` marks; None keeps the scores as the re-reading gave them.

        Raises:
            RuntimeError: no chunk is deferred.
            ValueError: ``input_ids``, ``attention_mask`` or ``keep`` does not match the deferred chunk.
            NotImplementedError: ``dynamic`` or ``longrope`` rope whose frequencies would change at the
                re-reading's positions (up to twice the chunk's); use ``scorer="key_diff"`` for such a model.
        """
        if keep is not None and tuple(keep.shape) != tuple(input_ids.shape):
            raise ValueError(f"keep must mark each token of input_ids, {tuple(input_ids.shape)}, got {tuple(keep.shape)}")
        deferred = self._reread(model, input_ids, attention_mask)
        if keep is not None:
            for layer in deferred:
                layer.keep_first(keep)
        candidates = [layer.reconstruction_candidates() for layer in deferred]
        counts = allocate_across_layers([c[0] for c in candidates], sum(c[1] for c in candidates),
                                        keep_mass=self.preset.keep_mass)
        for layer, count in zip(deferred, counts):
            layer.finish_deferred(count)

    def _reread(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[NexusLayer]:
        """The re-reading of :meth:`reconstruct`; returns the layers whose chunk it scored."""
        deferred = [layer for layer in self.layers if isinstance(layer, NexusLayer) and layer.deferred is not None]
        if not deferred:
            raise RuntimeError("no prefill chunk awaits reconstruction in this NexusCache")
        chunk, batch = deferred[0].deferred.key.shape[2], deferred[0].storage.batch
        logical = deferred[0].seen_tokens()
        if input_ids.dim() != 2 or tuple(input_ids.shape) != (batch, chunk):
            raise ValueError(f"the deferred chunk is {batch} x {chunk} tokens, got input_ids of shape "
                             f"{tuple(input_ids.shape)}")
        device = deferred[0].storage.device
        if isinstance(attention_mask, dict):  # generate's masks per layer type, for configs with layer_types
            attention_mask = attention_mask.get("full_attention", next(iter(attention_mask.values())))
        if attention_mask is not None and attention_mask.dim() == 4:  # the chunk's last query sees every real token
            last = attention_mask[:, 0, -1, :logical]
            attention_mask = last if last.dtype == torch.bool else last == 0
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, logical):
            raise ValueError(f"attention_mask must cover every token seen, ({batch}, {logical}), got "
                             f"{tuple(attention_mask.shape)}")
        mask = torch.ones(batch, logical, dtype=torch.long, device=device) if attention_mask is None \
            else attention_mask.to(device=device, dtype=torch.long)
        ids = input_ids.to(device)
        real = mask[:, -chunk:].bool()
        n_real = real.sum(1)
        seen = mask.sum(1, keepdim=True)  # positions are cumsum(mask) - 1: the re-reading continues from here
        # Each row's real tokens in order; pieces are cut at the same offsets a row would have alone.
        order = torch.where(real, torch.arange(chunk, device=device)[None], chunk).sort(1).values.clamp(max=chunk - 1)
        nexus = [layer for layer in self.layers if isinstance(layer, NexusLayer)]
        others = {i: dict(vars(layer)) for i, layer in enumerate(self.layers) if not isinstance(layer, NexusLayer)}
        for layer in nexus:
            layer.rereading = True
        try:
            for start in range(0, int(n_real.max()), REREAD_TOKENS):
                count = (n_real - start).clamp(min=0, max=REREAD_TOKENS)
                k = torch.arange(int(count.max()), device=device)[None] - (count.max() - count)[:, None]
                piece_real = k >= 0  # left-padded piece: the row's real tokens start + k
                src = order.gather(1, (start + k).clamp(min=0))
                try:
                    model(input_ids=torch.where(piece_real, ids.gather(1, src), 0),
                          position_ids=torch.where(piece_real, seen + k, 1),
                          attention_mask=torch.cat([mask, piece_real.long()], 1), use_cache=True, logits_to_keep=1,
                          **{cache_kwarg_name(model): self})
                finally:
                    for i, saved in others.items():  # transformers' own layers (sliding window) stored the piece
                        self.layers[i].__dict__.update(saved)
        finally:
            for layer in nexus:
                layer.rereading = False
        return deferred

    def seen_tokens(self) -> int:
        """Logical tokens seen per sequence (padding included) as a Python int; ``get_seq_length()`` returns the
        same count as a device tensor, which a compiled decode step can read without synchronizing."""
        return next((layer.seen_tokens() for layer in self.layers if isinstance(layer, NexusLayer)),
                    int(self.get_seq_length()))

    def reserve(self, new_tokens: int) -> None:
        """Raise ``max_cache_len`` so that ``new_tokens`` more tokens fit (a new turn); no-op when unbounded.

        Raises:
            ValueError: the new capacity would pass the chunk of a compressed chunked layer
                (:func:`~nqcompile.models.features.plan_layers`), before anything changes.
        """
        needed = self.seen_tokens() + new_tokens
        if self._window_limit is not None and needed > self._window_limit[1]:
            field, window = self._window_limit
            raise ValueError(f"this NexusCache compresses chunked layers with {field}={window}, which it honours only "
                             f"while it holds at most {window} tokens per sequence; {self.seen_tokens()} held + "
                             f"{new_tokens} new = {needed}. Continue with a fresh cache built with "
                             "compress_layers='global_only', or keep the conversation within the window")
        for layer in self.layers:
            if isinstance(layer, NexusLayer):
                layer.reserve(new_tokens)

    def memory_report(self) -> CacheMemoryReport:
        """Bytes actually held, counted from ``nbytes`` of every distinct tensor storage (see :class:`CacheMemoryReport`)."""
        return memory_report(self.layers)
