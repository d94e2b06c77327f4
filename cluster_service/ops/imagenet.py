"""The ImageNet job (`python -m jobs.imagenet`): ImageFolder train split -> MoCo features -> distributed
fit (or a fit on the first classes, then an update with all) -> assign the val split -> NMI/ARI/ACC
against the val labels, one MLflow run for all of it. Every stage is an ops.pipeline step; this
module only chains them under WORK_DIR and times them."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
from pathlib import Path

from cluster_service.io.atomic import write_json_atomic
from cluster_service.ops.jobconfig import ImagenetJob, resolve_path
from cluster_service.ops.pipeline import (
    assign_step,
    data_params,
    extract_step,
    fit_step,
    read_update_rows,
    score_assignments,
    start_tracker,
    update_step,
)
from cluster_service.ops.progress import epoch_printer


@contextlib.contextmanager
def stage_timer(seconds: dict[str, float], name: str):
    """Record the wall time of a pipeline stage in `seconds[name]` and print it."""
    t0 = time.perf_counter()
    yield
    seconds[name] = round(time.perf_counter() - t0, 2)
    print(f"imagenet: stage {name} took {seconds[name]} s", flush=True)


def imagenet_paths(work_dir: str, initial_classes: int | None = None) -> dict[str, str]:
    w = Path(resolve_path(work_dir))
    paths = {"train_features": str(w / "features" / "train"), "val_features": str(w / "features" / "val"),
             "fit": str(w / "fit"), "val_assignments": str(w / "val_assignments"),
             "scores": str(w / "scores.json")}
    if initial_classes is not None:  # fit on the first classes, then update into fit/
        paths["initial_features"] = str(w / "features" / f"train_first_{initial_classes}")
        paths["initial_fit"] = str(w / f"fit_first_{initial_classes}")
    return paths


def class_subset(shard_dir: str | os.PathLike, out_dir: str | os.PathLike, n_classes: int, workers: int = 1,
                 reuse: bool = True) -> int:
    """The rows of `shard_dir` whose label is below `n_classes`, written as shards into `out_dir`
    (same extractor block, so the same feature space for `assign`; shards no larger than the
    source's and at least one per worker). Returns the row count; an existing complete `out_dir`
    is reused when `reuse`."""
    from cluster_service.io.shards import load_manifest, manifest_path, read_feature_table, write_shards

    if reuse and manifest_path(out_dir).is_file():
        return int(load_manifest(out_dir)[0]["rows"])
    table = read_feature_table(shard_dir)
    if table.labels is None:
        raise ValueError(f"{shard_dir}: no label column; imagenet.initial_classes needs the class of each row")
    keep = (table.labels >= 0) & (table.labels < n_classes)
    if not keep.any():
        raise ValueError(f"{shard_dir}: no row of the first {n_classes} classes")
    if Path(out_dir).exists():
        shutil.rmtree(out_dir)  # an interrupted earlier attempt (no manifest): start over
    rows = int(keep.sum())
    per_shard = min(max(e["rows"] for e in table.manifest["shards"]), -(-rows // workers))
    write_shards(out_dir, table.ids[keep], table.features[keep], table.labels[keep], rows_per_shard=per_shard,
                 extractor=table.manifest.get("extractor"))
    return rows


def initial_fit_then_update(job: ImagenetJob, paths: dict[str, str], tracker, seconds: dict[str, float]) -> dict:
    """imagenet.initial_classes: fit on the first classes' train rows (untracked, its own run dir),
    then update that model with the whole train split into fit/ (tracked: the job's MLflow run holds
    the final model). A re-run reuses a finished update of the same first fit."""
    from cluster_service.io import runs
    from cluster_service.serve.model import load_model

    n = job.imagenet.initial_classes
    rows = class_subset(paths["train_features"], paths["initial_features"], n, job.train.workers,
                        job.imagenet.reuse_features)
    print(f"imagenet: first fit on {rows} train rows of the first {n} classes", flush=True)
    train = dataclasses.replace(job.train, data=paths["initial_features"], out=paths["initial_fit"])
    with stage_timer(seconds, "fit"):
        first = fit_step(train, job.fit, None)
    fitted = load_model(runs.model_dir(paths["initial_fit"]))
    lineage = runs.read_lineage(paths["fit"])
    if (first.get("reused") and runs.is_complete(paths["fit"]) and lineage is not None
            and lineage.get("previous_version") == fitted.version):
        print(f"update: {paths['fit']} already holds the update of this fit; reusing it", flush=True)
        return {**runs.read_summary(paths["fit"]), "reused": True}
    x, ids, labels = read_update_rows(paths["train_features"])
    show = epoch_printer(job.fit.schedule.epochs)
    with stage_timer(seconds, "update"):
        summary = update_step(fitted, paths["initial_fit"], x, ids, labels, job.fit, paths["fit"], tracker,
                              [lambda rec, _engine: show(rec.as_dict())], data=paths["train_features"],
                              report=job.train.report)
    print(f"update: K {summary['k_before']} -> {summary['k_found']} ({summary['kept_ids']} ids kept) "
          f"in {summary['seconds']} s; model {paths['fit']}/model", flush=True)
    return summary


def run_imagenet(job: ImagenetJob) -> dict:
    """ImageFolder train split -> 128-d MoCo features -> distributed fit -> assign the val split ->
    NMI/ARI/ACC against the val labels; one MLflow run holds the fit and the val scores.
    Writes WORK_DIR/scores.json and returns it."""
    paths = imagenet_paths(job.imagenet.work_dir, job.imagenet.initial_classes)
    reuse = job.imagenet.reuse_features
    print(f"imagenet: work dir {Path(paths['fit']).parent}", flush=True)
    seconds: dict[str, float] = {}
    with stage_timer(seconds, "extract_train"):
        extract_step(job.extract, job.imagenet.train, paths["train_features"], reuse)
    with stage_timer(seconds, "extract_val"):
        extract_step(job.extract, job.imagenet.val, paths["val_features"], reuse)

    train = dataclasses.replace(job.train, data=paths["train_features"], out=paths["fit"])
    params, manifest_hash = data_params(paths["train_features"])
    tags = {"data.path": job.imagenet.train, "job": "imagenet"}
    tracker = start_tracker(job.fit, job.tracking, "imagenet", tags, params, manifest_hash)
    with tracker:
        if job.imagenet.initial_classes is None:
            with stage_timer(seconds, "fit"):
                summary = fit_step(train, job.fit, tracker)
        else:
            summary = initial_fit_then_update(job, paths, tracker, seconds)
        with stage_timer(seconds, "assign"):
            report = assign_step(job.assign, job.tracking, model=paths["fit"], shards=paths["val_features"],
                                 out=paths["val_assignments"])
        if report.failed:
            raise ValueError(f"{len(report.failed)} val shard(s) could not be assigned: "
                             + "; ".join(f"{o.shard}: {o.error}" for o in report.failed))
        with stage_timer(seconds, "score"):
            val = score_assignments(paths["val_assignments"], paths["val_features"])
        tracker.log_metrics({f"val/{k}": float(v) for k, v in val.as_dict().items()},
                            step=max(0, job.fit.schedule.epochs - 1))
        tracker.log_metrics({f"time/stage_{k}": v for k, v in seconds.items()})
    scores = {"train": {k: summary[k] for k in ("k_found", "nmi", "ari", "acc") if k in summary},
              "val": val.as_dict(), "assign": report.as_dict(), "paths": paths,
              "mlflow_run": tracker.run_id, "seconds": seconds}
    write_json_atomic(scores, paths["scores"])
    print(f"imagenet: val {val}", flush=True)
    return scores

