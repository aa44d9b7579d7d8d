"""Observation-window scorer: attention paid by the chunk's last queries (SnapKV).

Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation" (arXiv:2404.14469):
the last ``window`` queries of a prompt attend to the tokens that later generation will need. The score
of a key is its softmax attention probability averaged over those queries and over the query heads of
its GQA group. It is computed from the chunk's own queries inside the attention op: no extra forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import TokenScorer

__all__ = ["ObservationScorer", "observation_logits"]


def observation_logits(query: torch.Tensor, key: torch.Tensor, *, query_time: torch.Tensor, key_time: torch.Tensor,
                       key_valid: torch.Tensor, window: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention logits of the last ``window`` real queries of each sequence (arguments as for
    :meth:`~nqcompile.policy.base.TokenScorer.score`).

    Returns:
        ``(logits, real)``: float32 (float64 for float64 inputs) ``[B, Hkv, G, w, Lk]`` logits, ``-inf`` where a
        key is padding or later than the query (``G = Hq / Hkv`` query heads per KV head, ``w = min(window, Lq)``),
        and ``[B, w]`` bool, False for an observation slot that holds a padding query (short sequences).
    """
    batch, n_q_heads, q_len, head_dim = query.shape
    n_kv_heads = key.shape[1]
    w = min(window, q_len)
    # The w latest real queries of each sequence (padding queries have time -1 and lose the top-k).
    obs_time, obs_idx = query_time.topk(w, dim=-1)  # [B, w]
    compute = torch.promote_types(query.dtype, torch.float32)
    q = query.gather(2, obs_idx[:, None, :, None].expand(batch, n_q_heads, w, head_dim)).to(compute)
    q = q.view(batch, n_kv_heads, n_q_heads // n_kv_heads, w, head_dim)
    logits = torch.einsum("bhgqd,bhkd->bhgqk", q, key.to(compute)) * scaling
    visible = key_valid[:, None, :] & (key_time[:, None, :] <= obs_time[:, :, None])  # [B, w, Lk]
    return logits.masked_fill(~visible[:, None, None], float("-inf")), obs_time >= 0


@dataclass(frozen=True)
class ObservationScorer(TokenScorer):
    """Mean attention probability from the last ``observation_window`` real queries of each sequence.

    Args:
        observation_window: number of last (non-padding) queries per sequence that vote (the preset field of
            that name sets it).
    """

    observation_window: int = 32

    def score(self, *, query, key, query_time, key_time, key_valid, scaling) -> torch.Tensor:
        logits, obs_real = observation_logits(query, key, query_time=query_time, key_time=key_time,
                                              key_valid=key_valid, window=self.observation_window,
                                              scaling=scaling)
        groups = logits.shape[2]
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # rows with nothing visible -> 0
        probs = probs * obs_real[:, None, None, :, None]
        n_obs = obs_real.sum(-1).clamp(min=1).to(probs.dtype)  # [B]
        return probs.sum(dim=(2, 3)) / (groups * n_obs[:, None, None])
