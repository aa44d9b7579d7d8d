"""``NexusLayer``: the transformers face of one compressed attention layer of a :class:`~nqcompile.NexusCache`.

What the layer holds is a :class:`~nqcompile.cache.storage.LayerStorage` (sinks, packed codes, warm tier, exact
window, lengths, codec parameters); this class implements transformers' ``CacheLayerMixin`` over it and routes
each attention call:

* a prefill chunk attends exactly to itself and to what the layer holds, then is compressed
  (:mod:`nqcompile.cache.compress`) inside the same attention call, so no extra forward;
* decode tokens (or a chunk replayed as decode steps) enter the exact window, which flushes into the warm tier
  and the codes (:mod:`nqcompile.cache.tiers`);
* with ``scorer="reconstruction"`` a chunk long enough to evict from is held as a
  :class:`~nqcompile.cache.reread.Deferred` until :meth:`NexusCache.reconstruct` has had the model re-read it
  (:mod:`nqcompile.cache.reread`) and has shared the kept-token budget among the layers.

Two lengths are never confused: the logical length (tokens seen, padding included; what
``get_seq_length()``, positions and ``generate``'s input slicing use) and the physical length (tokens
kept; what attention reads).
"""


from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from ..codec.registry import code_for
from ..models.rope_spec import RotarySpec
from ..ops.layout import round_up_to_block
from ..policy import SCORERS, make_scorer
from ..presets import Preset
from .compress import ChunkPolicy, compress_chunk
from .reread import Deferred, candidate_scores, reread_piece
from .storage import LayerStorage
from .tiers import decode_steps

__all__ = ["NexusLayer"]


class NexusLayer(CacheLayerMixin):
    """One attention layer's compressed key/value cache (see the module docstring for the life of a token).

    Args:
        preset: the cache's :class:`~nqcompile.presets.Preset`.
        bits: ``(key_bits, value_bits)`` for this layer, or ``None`` for exact storage.
        eviction_ratio: fraction of each chunk's tokens evicted in this layer.
        rotary: the layer's :class:`~nqcompile.models.rope_spec.RotarySpec`.
        max_cache_len: logical capacity in tokens per sequence (prompt + new tokens), or ``None`` to let the
            code buffers grow at chunk ends.

    Raises:
        ValueError: ``max_cache_len`` exceeded (the message gives the numbers).
    """

    is_sliding = False
    is_croppable = False
    #: Tokens a query attends back over, itself included (``None``: every token held); a sliding-window layer's
    #: ``sliding_window`` (:class:`~nqcompile.cache.sliding.SlidingLayer`).
    window: int | None = None

    def __init__(self, *, preset: Preset, bits: tuple[int, int] | None, eviction_ratio: float, rotary: RotarySpec,
                 max_cache_len: int | None):
        super().__init__()
        self.preset = preset
        #: ``(key_bits, value_bits)`` the layer was built with (None: exact); ``relax_key_kl`` may lower the keys.
        self.bits = bits
        self.rotary = rotary
        self.max_cache_len = max_cache_len
        #: A decode step has static shapes and reads no length on the host once the logical capacity is known.
        self.is_compileable = max_cache_len is not None
        self.policy = ChunkPolicy(
            preset=preset, eviction_ratio=eviction_ratio, scorer=make_scorer(preset.scorer, **preset.to_dict()),
            relaxable=preset.relax_key_kl > 0 and bits == (preset.key_bits, preset.value_bits))
        #: What the layer holds; built at the first ``update`` (batch, dtype and device are known then).
        self.storage: LayerStorage | None = None
        #: The attention KL measured for ``key_bits - 1`` at the first chunk (nats, the largest over the
        #: sequences measured), or None.
        self.key_kl: float | None = None
        #: Logical tokens seen per sequence: a 0-d int64 device tensor updated in place (what
        #: ``get_seq_length()`` returns, like transformers' static layers), and its host copy while known
        #: (None after a compiled step; :meth:`seen_tokens` reads it back).
        self._length = torch.zeros((), dtype=torch.int64)
        self._host_length: int | None = 0
        self.chunks = 0
        #: A prefill chunk held exactly until its reconstruction pass (scorer="reconstruction"), and the
        #: scores that pass gives its candidates so far.
        self.deferred: Deferred | None = None
        self._recon_scores: torch.Tensor | None = None
        #: Set by NexusCache.reconstruct() while the model re-reads a deferred chunk.
        self.rereading = False
        #: Treat a multi-token input as that many decode steps (see NexusCache.replay_as_decode).
        self.replay_as_decode = False

    @property
    def kind(self) -> str:
        """Codec name, or ``"exact"``."""
        return "exact" if self.bits is None else self.preset.codec

    @property
    def key_bits(self) -> int:
        """Bits per stored key element (0 for exact storage); ``relax_key_kl`` may have lowered it."""
        if self.storage is not None:
            return self.storage.codec.key_bits
        return 0 if self.bits is None else self.bits[0]

    @property
    def value_bits(self) -> int:
        """Bits per stored value element (0 for exact storage)."""
        return 0 if self.bits is None else self.bits[1]

    # ------------------------------------------------------------------ transformers Cache layer API
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        if self.bits is not None:
            code_for(self.kind, self.bits[0])  # fail early on an unsupported combination
        self.storage = LayerStorage(preset=self.preset, bits=self.bits, store_positions=self._store_positions(),
                                    rotary=self.rotary, batch=batch, heads=heads, head_dim=dim,
                                    dtype=key_states.dtype, device=key_states.device,
                                    position_dtype=self._position_dtype())
        self._length = self._length.to(key_states.device)
        self.key_kl = None
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Check the new keys/values ``[B, H, q, D]`` (allocating the storage on the first call); returns them
        unchanged.

        Nothing is stored here: the ``nexusquant`` attention function receives these very tensors and passes them
        to :meth:`attend`, where positions and padding are known.

        Raises:
            ValueError: keys of another batch size or dtype than the layer holds.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        st = self.storage
        if key_states.shape[0] != st.batch or key_states.dtype != st.dtype:
            raise ValueError(
                f"NexusCache layer holds batch {st.batch} in {st.dtype}, got keys of batch {key_states.shape[0]} "
                f"in {key_states.dtype}; use one cache per batch and keep the model's dtype"
            )
        return key_states, value_states

    def get_seq_length(self) -> torch.Tensor | int:
        """Logical tokens seen per sequence: a 0-d int64 tensor on the cache's device (0 before the first update),
        as transformers' static layers return it; :meth:`seen_tokens` gives a Python int."""
        return self._length if self.is_initialized else 0

    def seen_tokens(self) -> int:
        """Logical tokens seen per sequence as a Python int (reads the device length once after compiled steps)."""
        if self._host_length is None:
            self._host_length = int(self._length)
        return self._host_length

    def get_max_length(self) -> int:
        return -1 if self.max_cache_len is None else self.max_cache_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, 0)``: the logical capacity once known (the same for every step, so masks keep one shape),
        else (and while a chunk is re-read past the capacity) the tokens seen plus the new ones."""
        if self.max_cache_len is not None and not self.rereading:
            return self.max_cache_len, 0
        return self.seen_tokens() + query_length, 0

    def reset(self) -> None:
        self.deferred = self._recon_scores = None
        if self.is_initialized:
            st = self.storage
            like = torch.empty(st.batch, st.heads, 0, st.head_dim, dtype=st.dtype, device=st.device)
            self.lazy_initialization(like, like)
        self._length = torch.zeros((), dtype=torch.int64, device=self._length.device)
        self._host_length = self.chunks = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("NexusCache does not support beam search yet; use greedy or sampling")

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("NexusCache cannot be cropped (evicted and quantized tokens cannot be rolled back); "
                                  "assisted/speculative decoding is not supported")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("NexusCache cannot be expanded after prefill; expand the inputs instead")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("NexusCache does not support batch selection (contrastive search)")

    def ingest(self, key: torch.Tensor, value: torch.Tensor, *, real: torch.Tensor, positions: torch.Tensor) -> None:
        """Store a first chunk of keys/values ``[B, H, L, D]`` without attention (used by ``compress_kv_cache``).

        Args:
            real: ``[B, L]`` bool padding flags. positions: ``[B, L]`` int64 RoPE positions.

        Raises:
            ValueError: the layer already holds tokens, or the scorer needs queries.
        """
        if self.chunks:
            raise ValueError("ingest() only fills an empty layer")
        needs = SCORERS[self.preset.scorer]
        if self.policy.evicting and (needs.needs_queries or needs.needs_model):
            raise ValueError(f"ingest() has no queries (nor a model) for scorer={self.preset.scorer!r}: use a scorer "
                             "that needs neither (key_diff, key_norm), or no eviction")
        if self.policy.relaxable:
            raise ValueError("ingest() has no queries to measure relax_key_kl with: pass relax_key_kl=0 "
                             "(every layer then keeps key_bits)")
        if not self.is_initialized:
            self.lazy_initialization(key, value)
        self.check_room(key.shape[2])
        self._advance(key.shape[2])
        self._compress(None, key, value, real, positions, key.shape[-1] ** -0.5)

    # ------------------------------------------------------------------ capacity
    def _store_positions(self) -> bool:
        """Whether each coded token's position is stored (kept tokens are not contiguous when the layer evicts)."""
        return self.policy.evicting

    def bf16_tokens(self) -> int:
        """Tokens per sequence that transformers' bf16 ``DynamicCache`` would hold for this layer: every token seen
        (a full-attention layer)."""
        return self.seen_tokens()

    def _position_dtype(self) -> torch.dtype:
        small = self.max_cache_len is not None and self.max_cache_len <= torch.iinfo(torch.int16).max
        return torch.int16 if small else torch.int32

    def reserve(self, new_tokens: int) -> None:
        """Raise ``max_cache_len`` so that ``new_tokens`` more tokens fit (a new turn); no-op when unbounded."""
        if self.max_cache_len is None:
            return
        self.max_cache_len = max(self.max_cache_len, self.seen_tokens() + new_tokens)
        if self.storage is not None:
            self.storage.widen_positions(self._position_dtype())
            if self.chunks and self.deferred is None:  # the new tokens may all be decoded: plan their code room
                self._plan_decode()
                self._mark_static()

    def _plan_decode(self) -> None:
        """Size the code buffers for the tokens still to come (a plan step: a chunk end or a new turn)."""
        self.storage.reserve_for_decode(self._spare())

    def _spare(self) -> int | None:
        """Logical tokens still to come (code capacity is sized for them), or None when unbounded."""
        return None if self.max_cache_len is None else max(0, self.max_cache_len - self.seen_tokens())

    def _advance(self, new_tokens: int) -> None:
        """Count ``new_tokens`` more logical tokens (on the device; on the host too unless compiling)."""
        self._length.add_(new_tokens)
        self._host_length = None if torch.compiler.is_compiling() else self.seen_tokens() + new_tokens

    def check_room(self, new_tokens: int) -> None:
        """Raise ``ValueError`` if ``new_tokens`` more logical tokens exceed ``max_cache_len`` (host-side; eager)."""
        if self.max_cache_len is not None and self.seen_tokens() + new_tokens > self.max_cache_len:
            raise ValueError(
                f"NexusCache is full: it holds {self.seen_tokens()} tokens and was built with "
                f"max_cache_len={self.max_cache_len}; {new_tokens} more do not fit. Build it with a larger "
                "max_cache_len (prompt length + max_new_tokens)"
            )

    # ------------------------------------------------------------------ attention
    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, real: torch.Tensor,
               positions: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention of the new tokens over what the layer holds and themselves, then storage of them.

        Args:
            query: ``[B, Hq, q, D]`` post-RoPE queries.
            key, value: ``[B, H, q, D]`` the new tokens' post-RoPE keys and values (what :meth:`update` returned).
            real: ``[B, q]`` bool, False for padding tokens of a chunk.
            positions: ``[B, q]`` int64 RoPE positions of the new tokens.
            scaling: softmax scale.

        Returns:
            ``[B, Hq, q, D]`` attention output in the query's dtype.

        Raises:
            RuntimeError: no :meth:`update` before, a chunk awaits its re-reading, or a compiled decode step over a
                cache without ``max_cache_len``.
            ValueError: past ``max_cache_len``.
        """
        if self.storage is None:
            raise RuntimeError("NexusLayer.attend called before update(): the attention module updates the cache first")
        if self.rereading:
            self.rotary.check_length(int(positions.max()) + 1)
            return self._reread_piece(query, key, value, real, positions, scaling)
        if self.deferred is not None:
            raise RuntimeError("a prefill chunk of this NexusCache awaits its reconstruction pass (scorer="
                               "'reconstruction'): call cache.reconstruct(model, input_ids) after the prefill, or "
                               "prepare the model with nqcompile.optimize(), which does it")
        q_len = key.shape[2]
        if self.chunks > 0 and (q_len == 1 or self.replay_as_decode):
            if torch.compiler.is_compiling():
                # No host lengths in a compiled step: the rope check covers the whole capacity, which the last
                # chunk end planned for (reserve_for_decode).
                if self.max_cache_len is None:
                    raise RuntimeError("a compiled decode step needs a NexusCache built with max_cache_len (prompt + "
                                       "new tokens), whose code buffers are sized ahead; generate sizes its own")
                self.rotary.check_length(self.max_cache_len)
            else:
                self.check_room(q_len)
                self.rotary.check_length(self.seen_tokens() + q_len)
            self._advance(q_len)
            return self._decode(query, key, value, positions, scaling)
        self.check_room(q_len)
        self.rotary.check_length(self.seen_tokens() + q_len)
        self._advance(q_len)  # before storing: capacity is sized from the tokens still to come
        return self._chunk(query, key, value, real, positions, scaling)

    def _reread_piece(self, query, key, value, real, positions, scaling) -> torch.Tensor:
        """A piece of a re-reading (:meth:`NexusCache.reconstruct`): attention only, and the deferred chunk's scores."""
        out, scores = reread_piece(self.storage, self.deferred, query, key, value, real, scaling)
        if scores is not None:
            self._recon_scores = scores if self._recon_scores is None else torch.maximum(self._recon_scores, scores)
        return out

    def _decode(self, query, key, value, positions, scaling) -> torch.Tensor:
        """``q`` decode steps (:func:`~nqcompile.cache.tiers.decode_steps`), the lengths already advanced."""
        st = self.storage
        if self.max_cache_len is None and not torch.compiler.is_compiling():
            # unbounded: grow on the host before the static step, which writes round_up(q) slots at the codes' end
            st.ensure_capacity(int(st.code_len.max()) + round_up_to_block(key.shape[2]))
        return decode_steps(st, query, key, value, positions, scaling)

    def _chunk(self, query, key, value, real, positions, scaling) -> torch.Tensor:
        out = self.storage.attend_chunk(query, key, value, real, scaling)[0]
        if self.policy.evicting and self.policy.scorer is None \
                and int(real.sum(1).max()) >= self.preset.min_evict_tokens:
            # Held exactly until NexusCache.reconstruct() has re-read the chunk; the relax trial needs only
            # the last trial_queries queries.
            tail = query[:, :, -self.preset.trial_queries:] if self.policy.relaxable else None
            self.deferred = Deferred(tail, key, value, real, positions, scaling)
            self._recon_scores = None
            return out
        self._compress(query, key, value, real, positions, scaling)
        return out

    def _compress(self, query, key, value, real, positions, scaling, *, scores=None, budget=None) -> None:
        key_kl = compress_chunk(self.storage, self.policy, query, key, value, real, positions, scaling,
                                first_chunk=self.chunks == 0, spare=self._spare(), scores=scores, budget=budget)
        if key_kl is not None:
            self.key_kl = key_kl
        self.chunks += 1
        self._mark_static()

    def _mark_static(self) -> None:
        """After a plan step: the buffers decode steps mutate stay where they are (static addresses for CUDA graphs)."""
        if not torch.compiler.is_compiling():
            self.storage.mark_static()
            torch._dynamo.mark_static_address(self._length)

    # ------------------------------------------------------------------ reconstruction
    def reconstruction_candidates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction scores of the deferred chunk's eviction candidates, ``[B, H, R + L]`` float (``-inf``
        for sinks, window and padding), and their nominal keep budget ``[B]`` int64.

        Raises:
            RuntimeError: no chunk is deferred, or it has not been re-read yet.
        """
        return candidate_scores(self.storage, self.policy, self.deferred, self._rescored_chunk_scores(),
                                first_chunk=self.chunks == 0)

    def keep_first(self, keep: torch.Tensor) -> None:
        """Give the deferred chunk's tokens marked in ``keep`` (``[B, L]`` bool over the chunk's ``L`` tokens) the
        highest reconstruction score, 1.0, so that every budget takes them before any other candidate.

        Raises:
            RuntimeError: no chunk is deferred, or it has not been re-read yet.
            ValueError: ``keep`` is not ``[B, L]``.
        """
        scores = self._rescored_chunk_scores()
        batch, chunk = scores.shape[0], self.deferred.key.shape[2]
        if tuple(keep.shape) != (batch, chunk):
            raise ValueError(f"keep must mark the deferred chunk's tokens, ({batch}, {chunk}), got {tuple(keep.shape)}")
        marked = torch.nn.functional.pad(keep.to(device=scores.device, dtype=torch.bool), (scores.shape[-1] - chunk, 0))
        self._recon_scores = scores.masked_fill(marked[:, None], 1.0)

    def finish_deferred(self, budget: torch.Tensor) -> None:
        """Compress the deferred chunk keeping ``budget[b]`` (``[B]`` int64) tokens per head of sequence ``b``,
        ranked by their reconstruction scores (the compression keeps only candidates).

        Raises:
            RuntimeError: no chunk is deferred, or it has not been re-read yet.
        """
        scores, d = self._rescored_chunk_scores(), self.deferred
        self.deferred = self._recon_scores = None
        self._compress(d.query_tail, d.key, d.value, d.real, d.positions, d.scaling, scores=scores, budget=budget)

    def _rescored_chunk_scores(self) -> torch.Tensor:
        if self.deferred is None or self._recon_scores is None:
            raise RuntimeError("no deferred chunk with reconstruction scores in this layer")
        return self._recon_scores

    # ------------------------------------------------------------------ accounting
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor this layer holds, by name (a deferred chunk's too)."""
        if self.storage is None:
            return {}
        held = self.storage.tensors()
        if self.deferred is not None:  # a chunk waiting for its re-reading is held exactly
            held.update({f"deferred_{k}": v for k, v in self.deferred._asdict().items() if isinstance(v, torch.Tensor)})
        return held

    def physical_tokens(self) -> int:
        """Tokens held, summed over the batch (a deferred chunk's real tokens included)."""
        deferred = int(self.deferred.real.sum()) if self.deferred is not None else 0
        return self.storage.physical_tokens() + deferred
