"""Update a fitted model with new data (`cluster-service update`): continue the fit from the model's
clusters and prior instead of starting over, so splits add clusters for what is new and merges join
clusters, and keep cluster ids stable across model versions.

    update(model, x)  ->  UpdateResult(model, history, clusters, log_prob, lineage, margin)

x is what the update fits: the new rows, or old + new rows (the CLI takes both directories). Ids: a
new cluster whose mean lies within `match_radius` Mahalanobis units of an old cluster (under the old
cluster's covariance; Hungarian matching, one to one) persists and keeps the old id; the others
(splits, new data) take the ids left free. `lineage` says, for every new cluster, the old cluster
it comes from (the most probable one at its mean) and, for every old cluster, where it went.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from cluster_service.config import FitConfig
from cluster_service.core.gaussian import WhitenedGaussians
from cluster_service.core.niw import GaussianParams
from cluster_service.io.checks import check_features, dimension_message
from cluster_service.serve.model import FittedModel
from cluster_service.train.engine import Engine, EpochRecord
from cluster_service.train.export import finish_fit
from cluster_service.train.fit import EpochCallback, run_schedule


@dataclass
class UpdateResult:
    model: FittedModel
    history: list[EpochRecord]
    clusters: np.ndarray  # (n,) int64, in the updated model's (stable) ids
    log_prob: np.ndarray  # (n,) float64
    lineage: dict  # persisting {old: new}, parent_of_new {new: old}, old_to_new {old: new}
    margin: np.ndarray  # (n,) float64 best minus runner-up log-joint (+inf when K = 1)

    @property
    def n_clusters(self) -> int:
        return self.model.n_clusters


def update(model: FittedModel, x: np.ndarray, cfg: FitConfig | None = None, callbacks: Sequence[EpochCallback] = (),
           match_radius: float = 3.0) -> UpdateResult:
    """Continue `model`'s fit on x (n, d); cfg defaults to the model's own config."""
    cfg = (cfg or FitConfig.from_dict(model.config)).validate()
    x = check_features(np.asarray(x), "features", min_rows=2)
    if (why := dimension_message(model.n_features, x.shape[1], "features")) is not None:
        raise ValueError(why)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        engine = Engine(cfg, torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64)))
        engine.initialize_from(model.means, model.chol, model.prior)
        history = run_schedule(engine, callbacks)
    new, clusters, log_prob, margin = finish_fit(engine, model.manifest_hash, model.feature_space)
    order, lineage = stable_order(model, new, match_radius)
    new = permute_clusters(new, order)
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return UpdateResult(new, history, rank[clusters], log_prob, _renumber(lineage, rank), margin)


def stable_order(old: FittedModel, new: FittedModel, radius: float) -> tuple[np.ndarray, dict]:
    """order (K_new,): new cluster at each position of the updated model, so that persisting clusters
    sit at their old ids; and the lineage in the *unordered* new ids."""
    k_old, k_new = old.n_clusters, new.n_clusters
    # Mahalanobis distance of every new mean under every old cluster (K_old, K_new), from the same
    # whitening as the log-densities: log N = log_norm_k - maha^2 / 2
    g = WhitenedGaussians(GaussianParams(torch.zeros(k_old, dtype=torch.float64), torch.from_numpy(old.means).double(),
                                         torch.from_numpy(old.chol).double()), torch.float64)
    maha2 = -2.0 * (g.log_prob(torch.from_numpy(new.means).double()) - g.log_norm)  # (K_new, K_old)
    dist = maha2.clamp_min(0).sqrt().T.numpy()
    rows, cols = linear_sum_assignment(dist)
    persisting = {int(i): int(j) for i, j in zip(rows, cols, strict=True) if dist[i, j] <= radius}
    parent = {int(j): int(dist[:, j].argmin()) for j in range(k_new)}
    old_to_new = {int(i): persisting.get(int(i), int(dist[i].argmin())) for i in range(k_old)}
    slot = np.full(k_new, -1, dtype=np.int64)
    for i, j in persisting.items():
        if i < k_new:
            slot[i] = j
    free = np.setdiff1d(np.arange(k_new), slot)  # ascending, as before; the set was rebuilt per j
    slot[slot < 0] = free
    return slot, {"persisting": persisting, "parent_of_new": parent, "old_to_new": old_to_new}


def permute_clusters(model: FittedModel, order: np.ndarray) -> FittedModel:
    """The same model with cluster `order[p]` at position p (weights, parameters, the net's head, the
    merge tree's leaves and the novelty calibration's per-cluster rows)."""
    from dataclasses import replace

    net = dict(model.net)
    for key in ("head.weight", "head.bias"):
        if key in net:
            net[key] = net[key][order]
    linkage = model.tree_linkage
    if linkage is not None:
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        linkage = linkage.copy()
        leaf = linkage[:, :2] < order.size
        linkage[:, :2][leaf] = rank[linkage[:, :2][leaf].astype(np.int64)]
    novelty = model.novelty
    if novelty is not None:
        novelty = {**novelty, "quantiles": novelty["quantiles"][order], "train_counts": novelty["train_counts"][order]}
    return replace(model, log_weights=model.log_weights[order], means=model.means[order], chol=model.chol[order],
                   net=net, tree_linkage=linkage, novelty=novelty)


def _renumber(lineage: dict, rank: np.ndarray) -> dict:
    """Lineage with new cluster ids in the updated model's numbering (JSON-ready: str keys)."""
    return {
        "persisting": {str(i): int(rank[j]) for i, j in lineage["persisting"].items()},
        "parent_of_new": {str(int(rank[j])): i for j, i in lineage["parent_of_new"].items()},
        "old_to_new": {str(i): int(rank[j]) for i, j in lineage["old_to_new"].items()},
    }
