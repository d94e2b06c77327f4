"""The one-process runs behind `cluster-service fit` (without --workers), `demo` and `update`: data
file or shard directory -> a tracked fit (train.fit, or train.autoencoder in AE mode) or update ->
the run directory (io.runs), ended as every run ends (ops.pipeline.finish_run: summary, MLflow,
report.html)."""

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
    from cluster_service.io.runs import write_run
    from cluster_service.ops.pipeline import finish_run
    from cluster_service.report.evaluate import run_summary, score
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
        scores = None if feats.labels is None else score(feats.labels, result.clusters)
        summary = run_summary(feats.x.shape[0], feats.x.shape[1], result.n_clusters, elapsed, result.history,
                              out_dir, scores, data=str(Path(data_path).resolve()), workers=1)
        return finish_run(out_dir, tracked, tracked_x, feats.labels, summary, tracker, report, announce=False)


def run_update(fitted, model_ref: str, new_data: Path, out_dir: Path, cfg: FitConfig, old_data: Path | None = None,
               tracking: bool = True, tracking_uri: str | None = None, report: bool = True,
               progress: ProgressFactory | None = None) -> dict:
    """`cluster-service update` in this process: the new rows (and the old ones with `old_data`) ->
    a tracked update of `fitted` (loaded from `model_ref`; ops.pipeline.update_step) -> the run
    directory, its summary and report.html, as a fit ends. Returns the summary."""
    from cluster_service.ops.pipeline import read_update_rows, update_step
    from cluster_service.runtime.tracking import Tracker

    x, ids, labels = read_update_rows(new_data, old_data)
    out_dir = Path(out_dir)
    tracker = Tracker(cfg, tracking_uri, None, run_name=f"update {out_dir.name}", enabled=tracking, labels=labels,
                      tags={"data.path": str(new_data), "job": "update", "updated_from": model_ref})
    tracker.start(fitted.manifest_hash, {"data.n_samples": len(x), "data.n_features": x.shape[1]})
    bar = progress(cfg.schedule.epochs) if progress is not None else contextlib.nullcontext()
    with tracker, bar as shown:
        callbacks = [shown] if shown is not None else []
        return update_step(fitted, model_ref, x, ids, labels, cfg, out_dir, tracker, callbacks,
                           data=str(Path(new_data).resolve()), report=report)
