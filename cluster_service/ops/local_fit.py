"""The one-process fit behind `cluster-service fit` (without --workers) and `demo`: data file or shard
directory -> a tracked fit (train.fit, or train.autoencoder in AE mode) -> the run directory
(io.runs), its summary (report.evaluate.run_summary) and report.html."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path

from cluster_service.config import FitConfig

# planned epochs -> a context manager yielding an epoch callback (e.g. the CLI's progress bar)
ProgressFactory = Callable[[int], contextlib.AbstractContextManager]


def planned_epochs(cfg: FitConfig) -> int:
    """Epochs the fit's progress counts: the schedule's, or the DPGMM epochs of AE mode."""
    if cfg.autoencoder.enabled:
        from cluster_service.train.autoencoder import dpgmm_epochs

        return dpgmm_epochs(cfg)
    return cfg.schedule.epochs


def run_fit(
    data_path: Path,
    out_dir: Path,
    cfg: FitConfig,
    tracking: bool = True,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    eval_every: int = 5,
    report: bool = True,
    progress: ProgressFactory | None = None,
) -> dict:
    """Fit on a data file or shard directory in this process; write the run directory
    (RUN_DIR/model, assignments.parquet, ..., summary.json) and return the summary. With
    `tracking`, the fit is an MLflow run (default store ./mlflow.db; see runtime/tracking.py)."""
    from cluster_service.io.features import load_features
    from cluster_service.io.runs import model_dir, write_run, write_summary
    from cluster_service.report.evaluate import model_choice, run_summary
    from cluster_service.runtime.tracking import Tracker

    feats = load_features(data_path)
    if feats.x.shape[0] < max(2, cfg.k_init):
        raise ValueError(f"{data_path}: {feats.x.shape[0]} rows; at least {max(2, cfg.k_init)} are needed")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(cfg, tracking_uri, experiment, run_name=out_dir.name, enabled=tracking,
                      labels=feats.labels, eval_every=eval_every, tags={"data.path": str(data_path)})
    tracker.start(feats.manifest_hash, {"data.n_samples": len(feats.x), "data.n_features": feats.x.shape[1]})
    bar = progress(planned_epochs(cfg)) if progress is not None else contextlib.nullcontext()
    with tracker:
        t0 = time.perf_counter()
        with bar as shown:
            callbacks = [tracker, *([shown] if shown is not None else [])]
            if cfg.autoencoder.enabled:  # AE mode: the DPGMM clusters latent codes (autoencoder.py)
                from cluster_service.train.autoencoder import fit_autoencoder

                result = fit_autoencoder(feats.x, cfg, callbacks=callbacks, manifest_hash=feats.manifest_hash,
                                         feature_space=feats.feature_space)
                tracked, tracked_x = result.latent_fit(), result.codes
            else:
                from cluster_service.train.fit import fit

                result = fit(feats.x, cfg, callbacks=callbacks, manifest_hash=feats.manifest_hash,
                             feature_space=feats.feature_space)
                tracked, tracked_x = result, feats.x
        elapsed = time.perf_counter() - t0
        write_run(out_dir, result.model, feats.ids, result.clusters, result.log_prob, result.margin, cfg.to_dict(),
                  [r.as_dict() for r in result.history])
        tracker.log_result(tracked, tracked_x, feats.labels, model_dir(out_dir), {"fit_seconds": elapsed})
        summary = run_summary(feats.x.shape[0], feats.x.shape[1], result.n_clusters, elapsed, result.history,
                              out_dir, feats.labels, result.clusters, data=str(Path(data_path).resolve()),
                              **model_choice(feats.x.shape[0], feats.x.shape[1], result.n_clusters, result.model.prior))
        if tracker.run_id is not None:
            summary["mlflow_run"] = tracker.run_id
        write_summary(out_dir, summary)
        if report:
            from cluster_service.ops.pipeline import publish_report

            publish_report(out_dir, tracker, announce=False)
    return summary
