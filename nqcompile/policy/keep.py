"""Keep-set construction: budgets per layer and the top-k selection of kept tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["layer_eviction_ratios", "select_kept"]


def layer_eviction_ratios(ratio: float, n_layers: int, schedule: str = "uniform") -> list[float]:
    """Eviction ratio of each of ``n_layers`` compressed layers, with mean ``ratio``.

    ``"uniform"``: every layer evicts ``ratio``. ``"pyramid"`` (PyramidKV, Cai et al. 2024,
    arXiv:2406.02069): the kept fraction falls linearly from the first to the last layer, from
    ``keep * (1 + s)`` to ``keep * (1 - s)`` with ``keep = 1 - ratio`` and ``s = min(0.5, ratio / keep)``
    so that no layer keeps more than everything.

    Raises:
        ValueError: unknown schedule.
    """
    if schedule == "uniform" or n_layers <= 1 or ratio == 0.0:
        if schedule not in ("uniform", "pyramid"):
            raise ValueError(f"unknown layer budget schedule {schedule!r}; use 'uniform' or 'pyramid'")
        return [float(ratio)] * n_layers
    if schedule != "pyramid":
        raise ValueError(f"unknown layer budget schedule {schedule!r}; use 'uniform' or 'pyramid'")
    keep = 1.0 - ratio
    spread = min(0.5, ratio / keep)
    return [1.0 - keep * (1.0 + spread * (1.0 - 2.0 * i / (n_layers - 1))) for i in range(n_layers)]


def select_kept(scores: torch.Tensor, candidate: torch.Tensor, budget: torch.Tensor, *,
                pooling_kernel: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the ``budget[b]`` best candidate tokens of every (sequence, KV head).

    Args:
        scores: ``[B, H, L]`` float scores, higher is better.
        candidate: ``[B, L]`` bool, tokens that may be kept (others are never selected).
        budget: ``[B]`` int64, tokens to keep per sequence (the same for each head); clamped to the
            number of candidates.
        pooling_kernel: odd width of a max-pool over the token axis applied to the scores first
            (SnapKV clusters kept tokens around hot spots); 1 disables it.

    Returns:
        ``(index, count)``: ``index`` ``[B, H, K]`` int64 token indices in increasing order, with
        ``K = max(count)``; slots ``>= count[b]`` hold 0 and must be ignored. ``count`` ``[B]`` int64.
    """
    raw = scores.float() if scores.dtype != torch.float64 else scores
    raw = raw.masked_fill(~candidate[:, None], float("-inf"))
    pooled = raw
    if pooling_kernel > 1:
        pooled = F.max_pool1d(raw, pooling_kernel, stride=1, padding=pooling_kernel // 2)
        pooled = pooled.masked_fill(~candidate[:, None], float("-inf"))  # pooling spreads into non-candidates
    count = torch.minimum(budget.to(torch.int64), candidate.sum(-1))
    # Max-pooling makes plateaus of equal scores: rank by pooled score, then raw score, then position
    # (two stable sorts), so the choice never depends on where padding put the tokens.
    order = raw.sort(dim=-1, descending=True, stable=True).indices
    order = order.gather(-1, pooled.gather(-1, order).sort(dim=-1, descending=True, stable=True).indices)
    k = int(count.max()) if count.numel() else 0
    slot = torch.arange(k, device=scores.device)
    valid = slot[None, None, :] < count[:, None, None]
    index = torch.where(valid, order[..., :k], torch.full_like(order[..., :k], scores.shape[-1]))
    index = index.sort(dim=-1).values  # valid indices ascending, invalid (== L) last
    index = torch.where(valid, index, torch.zeros_like(index))
    return index, count
