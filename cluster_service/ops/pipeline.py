"""The pipeline steps the jobs run (jobs/*.py parse a config and call these):

    extract_step   images -> feature shards (feature_extraction.extract; Ray Data)
    fit_step       feature shards -> model, on Ray Train workers (cluster_service.runtime.trainer), tracked in
                   MLflow from the driver: the run is created first, rank 0 logs every epoch, the driver
                   logs the final metrics, the model directory and the history
    assign_step    shards -> assignment shards (cluster_service.serve.assign; Ray Data or local)
    score_assignments   assignments joined with the shards' labels by id -> NMI / ARI / ACC

The ImageNet pipeline that chains them is ops/imagenet.py; the epoch progress of a distributed fit,
ops/progress.py.

Every job that creates an MLflow run prints one line `MLflow run: LINK (run_id=..., tracking_uri=...)`
as soon as the run exists; `cluster-service submit` finds it in the job's logs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from cluster_service.config import FitConfig
from cluster_service.ops.jobconfig import (
    BASE_DIR_ENV,
    AssignSection,
    ExtractSection,
    TrackingSection,
    TrainSection,
    resolve_path,
)
from cluster_service.ops.progress import ProgressFile, epoch_printer, follow_progress

RUN_LINK_PREFIX = "MLflow run: "
PLOT_ROWS = 20_000  # rows the driver reads for the run's projection plot
RUN_LINK_RE = re.compile(r"MLflow run: (\S+) \(run_id=(\w+), tracking_uri=(\S+)\)")


def run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page for a tracking server; a runs:/ URI for a file or database store."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"runs:/{run_id}"


def announce_run(tracker) -> None:
    """Print the MLflow run line (flushed: the job's log is streamed while it runs)."""
    if tracker.run_id is not None:
        link = run_link(tracker.uri, tracker.experiment_id, tracker.run_id)
        print(f"{RUN_LINK_PREFIX}{link} (run_id={tracker.run_id}, tracking_uri={tracker.uri})", flush=True)


def start_tracker(cfg: FitConfig, tracking: TrackingSection, run_name: str, tags: dict[str, Any],
                  params: dict[str, Any], manifest_hash: str | None = None):
    """An MLflow run for a job (cluster_service.runtime.tracking.Tracker), started and announced. Relative
    sqlite URIs (and the default ./mlflow.db) resolve against $CLUSTER_SERVICE_BASE_DIR."""
    from cluster_service.runtime.tracking import Tracker, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking.uri, workdir=os.environ.get(BASE_DIR_ENV))
    tracker = Tracker(cfg, uri, tracking.experiment, run_name=run_name, enabled=tracking.enabled, tags=tags)
    tracker.start(manifest_hash, params)
    announce_run(tracker)
    return tracker


class RankZero:
    """An epoch callback run on rank 0 only (fit_distributed runs callbacks on every worker)."""

    def __init__(self, callback):
        self.callback = callback

    def __call__(self, record, engine) -> None:
        if engine.comm.rank == 0:
            self.callback(record, engine)


def publish_report(run_dir: str | os.PathLike, tracker=None, announce: bool = True) -> Path | None:
    """Build RUN_DIR/report.html (cluster_service.report.html) and log it to the run's MLflow
    artifacts. A report that cannot be built is a warning, never a failed fit."""
    import warnings

    from cluster_service.report.html import build_report

    try:
        path = build_report(run_dir)
    except Exception as e:  # noqa: BLE001 - the fit's outputs are written; the report is extra
        warnings.warn(f"{run_dir}: report not written ({type(e).__name__}: {e})", stacklevel=2)
        return None
    if tracker is not None and tracker.active:
        tracker.log_texts({"report.html": path.read_text()})
    if announce:  # job logs; the CLI prints its own line
        print(f"report: {path}", flush=True)
    return path


def finish_run(out_dir: str | os.PathLike, result, x: np.ndarray, labels: np.ndarray | None, summary: dict,
               tracker=None, report: bool = True, announce: bool = True) -> dict:
    """The one end of a run (the one-process fit, the distributed fit, an update), once its directory
    is written and its summary made (report.evaluate.run_summary, the one place the labels are
    scored): the model the evidence chose (report.evaluate.model_choice); the tracker's final
    metrics (those scores, not new ones), model, history and plots when it is active; summary.json,
    with `mlflow_run` when tracked; report.html. result: .model, .history, .clusters (n,) and
    .n_clusters of the run; x (m, d): its first m rows, for the plots; labels (n,) or None. Returns the summary."""
    from cluster_service.io.runs import model_dir, write_summary
    from cluster_service.report.evaluate import Scores, model_choice
    from cluster_service.serve.model import load_model

    model = load_model(model_dir(out_dir))  # the Gaussians' own space (an autoencoder's latent codes)
    summary = {**summary, **model_choice(int(summary["n_samples"]), model.n_features, model.n_clusters, model.prior)}
    if "note" in summary:
        print(f"note: {summary['note']}", flush=True)
    if tracker is not None and tracker.active:
        keys = ("nmi", "ari", "acc", "k_found", "k_true", "n_labelled")
        scores = Scores(**{k: summary[k] for k in keys}) if "nmi" in summary else None
        final = {f"final/{k}": float(v) for k, v in summary.items()
                 if isinstance(v, int | float) and not isinstance(v, bool)}
        tracker.log_result(result, x, labels, model_dir(out_dir), {**final, "fit_seconds": float(summary["seconds"])},
                           scores=scores)
    if tracker is not None and tracker.run_id is not None:
        summary["mlflow_run"] = tracker.run_id
    write_summary(out_dir, summary)
    if report:
        publish_report(out_dir, tracker, announce=announce)
    return summary


# ---- steps --------------------------------------------------------------------------------------------


def extract_step(section: ExtractSection, images: str | None = None, out: str | None = None,
                 reuse: bool = False) -> dict:
    """Extract features of `images` (default section.images) into `out`; with `reuse`, a complete
    shard directory already there (_manifest.json present) is kept. Returns the report as a dict."""
    from feature_extraction.extract import extract

    images, out = resolve_path(images or section.images), resolve_path(out or section.out)
    from cluster_service.io.shards import manifest_path

    if reuse and manifest_path(out).is_file():
        print(f"extract: {out} already holds shards; reusing them", flush=True)
        return {"out": out, "reused": True}
    cfg = dataclasses.replace(section.extract_config(), checkpoint=Path(resolve_path(section.checkpoint)))
    last = [0]

    def progress(done: int, total: int) -> None:
        if done - last[0] >= max(1, total // 20) or done == total:  # ~20 lines per run in the job log
            last[0] = done
            print(f"extract {images}: {done}/{total} images", flush=True)

    report = extract(images, out, cfg, progress)
    print(f"extract: {report.n_written} rows written to {out}, {len(report.failed)} failed, "
          f"{report.images_per_second:.1f} images/s", flush=True)
    return report.as_dict()


def fit_step(train: TrainSection, cfg: FitConfig, tracker=None, progress=None) -> dict:
    """Distributed fit of `train.data` into `train.out`; per-epoch metrics go to `tracker` from rank 0,
    then the final metrics, model directory, config and history from the driver; `progress(record dict)`
    is called on the driver as rank 0 finishes each epoch. Returns the summary."""
    from cluster_service.runtime.trainer import completed_run, fit_distributed

    data, out = resolve_path(train.data), resolve_path(train.out)
    active = tracker is not None and tracker.active
    if (done := completed_run(data, out, cfg, resolve_path(train.storage_path))) is not None:
        print(f"fit: {out} already holds this fit (K={done['k_found']}); reusing it", flush=True)
        return {**done, "reused": True}
    callbacks = [RankZero(tracker)] if active else []
    feed = Path(out) / "progress.jsonl"
    feed.unlink(missing_ok=True)
    callbacks.append(ProgressFile(feed))
    with follow_progress(feed, progress or epoch_printer(cfg.schedule.epochs)):
        summary = fit_distributed(
            data, out, cfg, train.workers, use_gpu=train.use_gpu, gpus_per_worker=train.gpus_per_worker,
            cpus_per_worker=train.cpus_per_worker, checkpoint_every=train.checkpoint_every,
            max_failures=train.max_failures, storage_path=resolve_path(train.storage_path),
            callbacks=callbacks,
        )
    print(f"fit: K={summary['k_found']} in {summary['seconds']} s on {train.workers} worker(s); "
          f"model {out}/model", flush=True)
    result = x_head = labels = None
    if active:  # the projection plot needs points: the driver reads a few
        from cluster_service.io.features import head_rows, read_labels

        result, x_head, labels = read_run(out), head_rows(data, PLOT_ROWS), read_labels(data)
    return finish_run(out, result, x_head, labels, summary, tracker, train.report)


@dataclasses.dataclass
class RunResult:
    """A finished run read back from its directory: what Tracker.log_result and the plots consume
    (the attributes of train.fit.FitResult, without the engine)."""

    model: Any  # serve.model.FittedModel
    history: list  # EpochRecords
    clusters: np.ndarray  # (n,) int32, global row order
    log_prob: np.ndarray  # (n,) float32

    @property
    def n_clusters(self) -> int:
        return self.model.n_clusters


def read_run(out_dir: str | os.PathLike) -> RunResult:
    """The run directory (io.runs) as the RunResult the tracker logs."""
    from cluster_service.io import runs
    from cluster_service.serve.model import load_model
    from cluster_service.train.engine import EpochRecord

    table = runs.read_assignments(out_dir, ["cluster", "log_prob"])
    history = [EpochRecord(**r) for r in runs.read_history(out_dir)]
    return RunResult(load_model(runs.model_dir(out_dir)), history, table.column("cluster").to_numpy(),
                     table.column("log_prob").to_numpy())


def data_params(data_path: str) -> tuple[dict[str, Any], str | None]:
    """(data shape params, manifest hash) of a shard directory or .npz, without reading rows."""
    from cluster_service.runtime.trainer import data_shape

    n, d, n_shards = data_shape(data_path)
    manifest_hash = None
    if Path(data_path).is_dir():
        from cluster_service.io.shards import load_manifest

        manifest_hash = load_manifest(data_path)[1]
    return {"data.n_samples": n, "data.n_features": d, "data.n_shards": n_shards}, manifest_hash


def fit_job(train: TrainSection, cfg: FitConfig, tracking: TrackingSection, progress=None) -> dict:
    """The fit job: a tracked distributed fit; the summary gains `mlflow_run` when tracked."""
    data = resolve_path(train.data)
    params, manifest_hash = data_params(data)
    params.update({f"train.{k}": v for k, v in dataclasses.asdict(train).items() if k not in ("data", "out")})
    tracker = start_tracker(cfg, tracking, Path(resolve_path(train.out)).name,
                            {"data.path": data, "job": "fit"}, params, manifest_hash)
    with tracker:
        return fit_step(train, cfg, tracker, progress)


def read_update_rows(new_data: str | os.PathLike, old_data: str | os.PathLike | None = None):
    """The rows an update fits: the new rows, or old + new (ids of two array files that collide,
    e.g. both numbered from 0, get "old:" / "new:" prefixes). -> (x (n, d), ids (n,), labels (n,) or None)."""
    from cluster_service.io.features import load_features

    parts = [load_features(new_data)] if old_data is None else [load_features(old_data), load_features(new_data)]
    x = np.concatenate([f.x for f in parts])
    ids = np.concatenate([f.ids for f in parts])
    # row numbers of two array files collide (a set, not shards.first_duplicate: ids of an array file
    # and of a shard directory may be ints and strings side by side, which np.unique cannot sort)
    if len(parts) > 1 and len(set(ids.tolist())) < len(ids):
        ids = np.concatenate([np.char.add(f"{tag}:", f.ids.astype(str))
                              for tag, f in zip(("old", "new"), parts, strict=True)]).astype(object)
    labels = None if any(f.labels is None for f in parts) else np.concatenate([f.labels for f in parts])
    return x, ids, labels


def update_step(fitted, model_ref: str, x: np.ndarray, ids: np.ndarray, labels: np.ndarray | None,
                cfg: FitConfig, out_dir: str | os.PathLike, tracker=None, callbacks=(), data: str | None = None,
                report: bool = True) -> dict:
    """Continue the fitted model `fitted` (loaded from `model_ref`) on rows x (n, d) (from `data`) in
    this process (cluster_service.train.update: splits add clusters for what is new, ids of clusters
    that persist stay) and write `out_dir` like a fit plus lineage.json (old -> new ids), ending it
    as every run ends (finish_run). Returns the summary (also out_dir/summary.json, written last)."""
    from cluster_service.io.runs import write_lineage, write_run
    from cluster_service.report.evaluate import run_summary, score
    from cluster_service.train.update import update

    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    res = update(fitted, x, cfg, callbacks=[*([tracker] if tracker is not None else []), *callbacks])
    elapsed = time.perf_counter() - t0
    write_run(out_dir, res.model, ids, res.clusters, res.log_prob, res.margin,
              cfg.to_dict(), [r.as_dict() for r in res.history])
    lineage = {"updated_from": str(model_ref), "previous_version": fitted.version, "version": res.model.version,
               **res.lineage}
    write_lineage(out_dir, lineage)
    if tracker is not None and tracker.active:
        tracker.log_texts({"lineage.json": json.dumps(lineage, indent=2)})
    scores = None if labels is None else score(labels, res.clusters)
    summary = run_summary(len(x), x.shape[1], res.n_clusters, elapsed, res.history, out_dir, scores, data=data,
                          workers=1, k_before=fitted.n_clusters, kept_ids=len(res.lineage["persisting"]))
    return finish_run(out_dir, res, x, labels, summary, tracker, report)


def assign_step(section: AssignSection, tracking: TrackingSection, model: str | None = None,
                shards: str | None = None, out: str | None = None):
    """Assign `shards` to `model`'s clusters into `out` (defaults: the section's). Returns the
    AssignReport; failed shards are in report.failed."""
    from cluster_service.io.shards import load_manifest
    from cluster_service.runtime.assign_job import assign_shards, open_model
    from cluster_service.runtime.tracking import resolve_tracking_uri

    model = resolve_path(model or section.model)
    shards, out = resolve_path(shards or section.shards), resolve_path(out or section.out)
    manifest, _ = load_manifest(shards)
    uri = resolve_tracking_uri(tracking.uri, workdir=os.environ.get(BASE_DIR_ENV)) if ":/" in model else None
    fitted = open_model(model, n_features=manifest["d"], tracking_uri=uri)

    def progress(o) -> None:
        why = f" ({o.error})" if o.error else ""
        print(f"assign {o.shard}: {o.status} {o.rows} rows{why}", flush=True)

    report = assign_shards(fitted, shards, out, section.method, section.top_m, section.device,
                           use_ray=not section.local, batch_size=section.batch_size, progress=progress,
                           novelty_fpr=section.novelty_fpr)
    print(f"assign: {json.dumps(report.as_dict())}", flush=True)
    return report


def score_assignments(assign_dir: str | os.PathLike, shard_dir: str | os.PathLike):
    """report.evaluate.score of assignment shards against the label column of the shards they came
    from, joined by id (null labels left out). Raises ValueError when the shards have no label column
    or ids are missing."""
    import pyarrow.parquet as pq

    from cluster_service.io.shards import read_id_column
    from cluster_service.report.evaluate import score

    found = read_id_column(shard_dir, "label")
    if found is None:
        raise ValueError(f"{shard_dir}: a shard has no label column; cannot score the assignments")
    a_ids, clusters = [], []
    for p in sorted(Path(assign_dir).glob("*.parquet")):
        t = pq.read_table(p, columns=["id", "cluster"])
        a_ids.append(t.column("id").to_numpy(zero_copy_only=False))
        clusters.append(t.column("cluster").to_numpy())
    ids_all, y = found
    a_all, c = np.concatenate(a_ids) if a_ids else np.empty(0), np.concatenate(clusters) if clusters else []
    order = np.argsort(a_all, kind="stable")
    pos = np.searchsorted(a_all[order], ids_all)
    found = (pos < len(a_all)) & (a_all[order][np.minimum(pos, len(a_all) - 1)] == ids_all)
    if not found.all():
        missing = ids_all[~found]
        raise ValueError(f"{assign_dir}: no assignment for {missing.size} id(s) of {shard_dir} "
                         f"(first: {missing[0]!r})")
    return score(y, np.asarray(c)[order][pos])
