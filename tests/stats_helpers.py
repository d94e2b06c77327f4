"""Statistics of points for tests, accumulated as the engine accumulates them
(core.gaussian.add_weighted_stats_)."""

from __future__ import annotations

import torch

from cluster_service.core.gaussian import add_weighted_stats_
from cluster_service.core.niw import STAT_DTYPE, SuffStats


def stats_from_points(x: torch.Tensor, weights: torch.Tensor | None = None) -> SuffStats:
    """x: (n_samples, d); weights: (n_samples, n_clusters) or None (one set, unit weights).
    Returns batch shape (n_clusters,) (or () when weights is None), float64."""
    x = x.to(STAT_DTYPE)
    w = torch.ones(x.shape[0], 1, dtype=STAT_DTYPE, device=x.device) if weights is None else weights.to(STAT_DTYPE)
    out = SuffStats.zeros((w.shape[1],), x.shape[1], device=x.device)
    add_weighted_stats_(out, x, w)
    return out[0] if weights is None else out
