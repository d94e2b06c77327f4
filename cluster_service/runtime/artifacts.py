"""What a tracked run's artifacts hold besides the model directory, rendered into a local directory
(runtime/tracking.py uploads it; nothing here talks to MLflow):

    config.yaml          the resolved FitConfig (loadable with `fit --config`)
    schedule_plan.txt    the epoch plan
    history.json         one record per epoch
    plots/*.png          K over epochs, cluster sizes, a 2-D projection, the merge tree, and the
                         confusion matrix when labels exist
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cluster_service.config import FitConfig


def write_run_files(out: Path, cfg: FitConfig, history: list) -> None:
    """config.yaml, schedule_plan.txt and history.json (EpochRecords) into `out`."""
    import yaml

    from cluster_service.core.schedule import build_plan, format_plan

    (out / "config.yaml").write_text(yaml.safe_dump({"fit": cfg.to_dict()}, sort_keys=False))
    (out / "schedule_plan.txt").write_text(format_plan(build_plan(cfg.schedule), cfg.schedule) + "\n")
    (out / "history.json").write_text(json.dumps([r.as_dict() for r in history], indent=1))


def write_plots(out: Path, result, x: np.ndarray, labels: np.ndarray | None, scores: dict | None = None,
                seed: int = 0) -> None:
    """The run's figures as PNGs into `out`. result: .history, .clusters (n,), .n_clusters, .model;
    x (m, d) its first m <= n rows (a distributed fit's driver reads a sample); labels (n,) or None;
    scores: epoch -> label scores for the K plot."""
    from cluster_service.report import plots
    from cluster_service.report.evaluate import known_labels

    figs = {
        "k_over_epochs": plots.plot_k_history(result.history, scores or None),
        "cluster_sizes": plots.plot_cluster_sizes(result.clusters, result.n_clusters),
        "projection": plots.plot_projection(x, result.clusters[: len(x)],
                                            None if labels is None else labels[: len(x)],
                                            result.model.means, seed=seed),
    }
    known = None if labels is None else known_labels(labels)
    if known is not None and known.any():
        figs["confusion_matrix"] = plots.plot_confusion(labels[known], result.clusters[known])
    if result.model.tree_linkage is not None and len(result.model.tree_linkage):
        figs["merge_tree"] = plots.plot_merge_tree(
            result.model.tree_linkage, result.model.tree_log_ratios,
            np.bincount(result.clusters, minlength=result.n_clusters))
    for name, fig in figs.items():
        plots.save_figure(fig, out / f"{name}.png")
