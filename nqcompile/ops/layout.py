"""The storage contract between the cache, the ops and the kernels: block size, buffer shapes, alignment.

Storage layout of one compressed layer (the tensors of :class:`nqcompile.cache.storage.LayerStorage`)::

    k_codes   uint8  [B, Hkv, C, key_bits * D / 8]    packed key codes, token-major per (sequence, KV head)
    v_codes   uint8  [B, Hkv, C, value_bits * D / 8]  packed value codes
    k_scales  uint8  [B, Hkv, C]                      one-byte log2 scale per (token, KV head)
    v_scales  uint8  [B, Hkv, C]
    code_len  int64  [B]                              physical tokens held per sequence

``C`` (capacity in tokens) is a multiple of :data:`BLOCK_TOKENS`, so the codes of a block of 16 tokens are
one contiguous run of ``16 * bits * D / 8`` bytes (a multiple of 16 bytes) inside each (sequence, KV head)
plane, every block starting 16-byte aligned: a decode kernel reads a block with aligned vector loads. Scales
sit in their own contiguous array, one row per (sequence, KV head). For the ``exact`` kind the code tensors
are float tensors ``[B, Hkv, C, D]`` in the model's dtype and the scale tensors are empty.
"""

from __future__ import annotations

import math

__all__ = ["BLOCK_TOKENS", "round_up_to_block"]

#: Tokens per storage block: the unit of flushes from the exact window into codes and of capacity.
BLOCK_TOKENS = 16


def round_up_to_block(tokens: int) -> int:
    """The smallest multiple of :data:`BLOCK_TOKENS` that holds ``tokens`` token slots (``tokens >= 0``)."""
    return math.ceil(tokens / BLOCK_TOKENS) * BLOCK_TOKENS
