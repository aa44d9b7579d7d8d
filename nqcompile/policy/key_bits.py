"""Attention-aware key bits: a layer whose attention barely moves when its keys lose a bit stores them so.

Measured on SmolLM2-135M (README, Presets): the perplexity cost of 3-bit keys concentrates in a few layers, and
the layers whose queries' attention changes least under 3-bit keys can store them at 3 bits at almost no cost. At
the end of the first prefill chunk a layer codes its keys one bit lower as a trial
(:meth:`nqcompile.cache.storage.LayerStorage.round_trip_keys`), measures the KL divergence between the attention
of the chunk's last ``trial_queries`` queries over the exact keys and over the trial keys, and stores its keys at
the lower width when that divergence is below the preset's ``relax_key_kl``. With the 32 queries of SnapKV's
observation window the trial relaxed a layer whose later queries need its keys (layer 18 of SmolLM2 on source
code); 256 queries rank it among the layers kept at 4 bits (``benchmarks/README.md``, "Why technical text and code
cost more than prose"). Like the observation scorer (SnapKV, Li et al. 2024, arXiv:2404.14469), it uses the
chunk's own queries: no extra forward. KVTuner (Li et al. 2025, arXiv:2502.04420) chooses key/value bits per layer
from attention sensitivity offline, per model; here the choice is made online, per prompt.
"""

from __future__ import annotations

import torch

from .observation import observation_logits

__all__ = ["MIN_TRIAL_TOKENS", "attention_kl", "trial_key_kl"]

#: Fewest coded tokens in a sequence for its trial to count (a short prompt says nothing about the layer).
MIN_TRIAL_TOKENS = 64


def attention_kl(query: torch.Tensor, key: torch.Tensor, key_hat: torch.Tensor, *, query_time: torch.Tensor,
                 key_time: torch.Tensor, key_valid: torch.Tensor, window: int, scaling: float) -> torch.Tensor:
    """Mean KL divergence ``KL(p || p_hat)`` in nats between the attention of the last ``window`` real queries of
    each sequence over ``key`` (``p``) and over ``key_hat`` (``p_hat``).

    Args:
        query: ``[B, Hq, Lq, D]`` post-RoPE queries. key, key_hat: ``[B, Hkv, Lk, D]`` post-RoPE keys (GQA:
            ``Hq`` a multiple of ``Hkv``). query_time, key_time, key_valid, scaling: as for
            :meth:`~nqcompile.policy.base.TokenScorer.score`.
        window: last queries per sequence that are measured.

    Returns:
        ``[B]`` float (float32, float64 for float64 inputs): per sequence, the mean over its real observation
        queries and all query heads (0 for a sequence without real queries).
    """
    kw = dict(query_time=query_time, key_time=key_time, key_valid=key_valid, window=window, scaling=scaling)
    logits, real = observation_logits(query, key, **kw)
    logits_hat, _ = observation_logits(query, key_hat, **kw)
    log_p, log_q = logits.log_softmax(-1), logits_hat.log_softmax(-1)
    p = log_p.exp()
    kl = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)  # [B, Hkv, G, w]
    n = real.sum(-1) * kl.shape[1] * kl.shape[2]
    return (kl * real[:, None, None, :]).sum(dim=(1, 2, 3)) / n.clamp(min=1)


def trial_key_kl(query: torch.Tensor, key: torch.Tensor, key_trial: torch.Tensor, coded: torch.Tensor, *,
                 query_time: torch.Tensor, key_time: torch.Tensor, key_valid: torch.Tensor, window: int,
                 scaling: float) -> torch.Tensor:
    """:func:`attention_kl` (``[B]``) of replacing the ``coded`` keys by their trial coding (the others stay exact).

    Args:
        query: ``[B, Hq, Lq, D]``. key: ``[B, Hkv, Lk, D]`` post-RoPE keys.
        key_trial: ``[B, Hkv, Lk, D]`` the same keys coded at the trial's width and decoded (post-RoPE; any float
            dtype, cast to ``key``'s): :meth:`nqcompile.cache.storage.LayerStorage.round_trip_keys`.
        coded: ``[B, Lk]`` bool, the keys that would be stored as codes (not sinks, window or padding).
        query_time, key_time, key_valid, window, scaling: as for :func:`attention_kl`.
    """
    key_hat = torch.where(coded[:, None, :, None], key_trial.to(key.dtype), key)
    return attention_kl(query, key, key_hat, query_time=query_time, key_time=key_time, key_valid=key_valid,
                        window=window, scaling=scaling)
