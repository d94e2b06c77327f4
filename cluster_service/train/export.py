"""From a trained Engine to the fitted-model objects that serving loads (cluster_service.serve).

`finish_fit` is the end of every fit (train.fit, the Ray trainer's workers, train.update and the
autoencoder mode): EM settle steps -> MAP assignment -> merge tree -> FittedModel -> novelty
calibration.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from cluster_service.core.hierarchy import MergeTree, merge_tree
from cluster_service.core.niw import STAT_DTYPE
from cluster_service.serve.model import NET_KEYS, FittedModel
from cluster_service.train.comm import unwrap


def finish_fit(engine, manifest_hash: str | None = None,
               feature_space: dict | None = None) -> tuple[FittedModel, np.ndarray, np.ndarray, np.ndarray]:
    """The fitted model of a trained Engine, with its merge tree and its novelty calibrated on every
    row of the fit (per-cluster histograms, all-reduced); and this process's rows' MAP (cluster
    (n_local,) int64, log_prob (n_local,) float64,
    margin (n_local,) float64: best log-joint minus the runner-up's, +inf when K = 1), all from one
    scoring pass (the engine's: truncated at large K, so the end of a fit costs no (n, K) pass).

    Every rank calls it (the tree's statistics and the calibration histograms are collectives); every rank
    returns the same model."""
    engine.settle(engine.cfg.schedule.settle_steps)
    clusters, log_prob, runner_up, margin = engine.assign_top2()
    tree = cluster_tree(engine, clusters, runner_up)
    model = model_from_engine(engine, manifest_hash, feature_space=feature_space, tree=tree)
    comm = engine.comm  # the calibration's histograms are all-reduced: no row leaves its process
    model.calibrate_novelty(clusters, log_prob, lambda a: comm.all_reduce_sum(torch.from_numpy(a)).cpu().numpy(),
                            lambda a: comm.all_reduce_max(torch.from_numpy(a)).cpu().numpy())
    return model, clusters, log_prob, margin


@torch.no_grad()
def cluster_tree(engine, clusters: np.ndarray, runner_up: np.ndarray | None = None) -> MergeTree:
    """Merge hierarchy over an engine's fitted clusters: hard statistics of the local rows' clusters
    (n_local,) (all-reduced, so every rank calls this), merged greedily by log H_m down to
    one cluster (hierarchy.merge_tree). With the rows' runner-up clusters (assign_top2), only
    clusters that border each other (some row of one has the other as runner-up, counted
    over all ranks) merge while any such pair is left; the number of such rows is the
    border's strength (each cluster is scored against its strongest borders first)."""
    K = engine.n_clusters
    z = torch.from_numpy(np.asarray(clusters, dtype=np.int64)).to(engine.device)
    adjacency = None
    if runner_up is not None:
        second = torch.from_numpy(np.asarray(runner_up, dtype=np.int64)).to(engine.device)
        counts = torch.zeros(K * K, dtype=STAT_DTYPE, device=engine.device)
        counts.index_add_(0, z * K + second, torch.ones(z.shape[0], dtype=STAT_DTYPE, device=engine.device))
        counts = engine.comm.all_reduce_sum(counts).reshape(K, K)
        adjacency = counts + counts.T
    return merge_tree(engine.prior, engine.cfg.prior.alpha, engine.rows.hard_stats(z, K), adjacency=adjacency)


def model_from_engine(engine, manifest_hash: str | None = None, version: str = "",
                      feature_space: dict | None = None, tree=None) -> FittedModel:
    """Export an Engine's state (original coordinates) as a FittedModel; `tree` is the merge
    hierarchy (core.hierarchy.MergeTree from cluster_tree) when one was built."""
    p = engine.export_params()
    net_state = unwrap(engine.cluster_net).state_dict()
    prior = engine.prior
    return FittedModel(
        log_weights=p.log_weights.cpu().numpy(),
        means=p.means.cpu().numpy(),
        chol=p.chol.cpu().numpy(),
        prior={
            "alpha": engine.cfg.prior.alpha,
            "kappa": prior.kappa,
            "nu": prior.nu,
            "mean": (prior.mean + engine.shift).cpu().numpy(),
            "psi": prior.psi.cpu().numpy(),
            "family": prior.family,
        },
        net={k: net_state[k].detach().cpu().numpy() for k in NET_KEYS},
        net_input_scale=engine.input_scale,
        net_input_shift=engine.shift.cpu().numpy(),
        config=engine.cfg.to_dict(),
        manifest_hash=manifest_hash,
        feature_space=feature_space,
        tree_linkage=None if tree is None else tree.linkage,
        tree_log_ratios=None if tree is None else tree.log_ratios,
        version=version or time.strftime("%Y%m%dT%H%M%S", time.gmtime()),
    )
