"""The batch assignment job: every shard of a directory through a fitted model's assigner, one
assignments Parquet per input shard (DESIGN §3), in this process or on Ray Data actors.

Outputs are stamped in their Parquet footer with the model, method and input bytes, so a re-run skips
finished shards and redoes the rest; a shard that cannot be read is reported (status "failed") and the
others go on. `_run_with_ray` is the only Ray touch point.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cluster_service.io.atomic import write_json_atomic, write_parquet_atomic
from cluster_service.io.checks import dimension_message, nonfinite_rows
from cluster_service.io.runs import assignments_table, model_dir_of
from cluster_service.io.shards import ShardError, iter_feature_batches, load_manifest, manifest_path
from cluster_service.runtime.ray_session import ensure_ray
from cluster_service.serve.assign import DEFAULT_TOP_M, METHODS, Assignment, concat_assignments, make_assigner
from cluster_service.serve.model import FittedModel, ModelError, load_model
from cluster_service.serve.novelty import DEFAULT_FPR, share_drift

REPORT = "_assign_report.json"  # Hive-style sidecar: Parquet readers of the directory skip it
STAMP_KEY = b"cluster_service.assign"  # Parquet footer key: what produced this output shard (kept stable)


def open_model(
    spec: str | os.PathLike, n_features: int | None = None, tracking_uri: str | None = None
) -> FittedModel:
    """A model directory, a run directory holding model/, or an MLflow model URI
    (models:/name/version, runs:/run_id/path); refused if its d differs from n_features."""
    path = Path(spec)
    if path.is_dir():
        return load_model(model_dir_of(path), n_features=n_features)
    if ":/" in str(spec):
        from cluster_service.serve.pyfunc import download_model_dir

        return load_model(download_model_dir(str(spec), tracking_uri), n_features=n_features)
    raise FileNotFoundError(
        f"{spec}: neither a model directory nor an MLflow model URI (models:/name/version, runs:/id/path)"
    )


@dataclass(frozen=True)
class ShardTask:
    index: int  # position in _manifest.json
    name: str
    rows: int
    sha256: str


@dataclass(frozen=True)
class JobSpec:
    """Everything a worker needs besides the model; small and picklable."""

    shard_dir: str
    out_dir: str
    n_shards: int
    method: str
    top_m: int
    device: str
    batch_size: int
    version: str
    n_clusters: int
    novelty_fpr: float = DEFAULT_FPR

    def stamp(self, task: ShardTask) -> bytes:
        """Footer stamp of a finished output: same model, method, novelty rate and input bytes -> skip."""
        top_m = self.top_m if self.method == "shortlist" else 0
        return json.dumps({"model_version": self.version, "method": self.method, "top_m": top_m,
                           "novelty_fpr": self.novelty_fpr, "source": task.name, "source_sha256": task.sha256,
                           "rows": task.rows}).encode()


@dataclass
class ShardOutcome:
    shard: str
    status: str  # "done" | "skipped" | "failed"
    rows: int = 0
    counts: np.ndarray | None = None  # (K,) int64 rows per cluster in this shard
    error: str = ""
    seconds: float = 0.0
    novel: int = 0  # rows flagged novel


@dataclass
class AssignReport:
    outcomes: list[ShardOutcome]
    n_clusters: int
    seconds: float
    same_manifest: bool | None  # shards' manifest == the model's training manifest (None: unknown)
    train_counts: np.ndarray | None = None  # (K,) training rows per cluster (for the share drift)
    novelty_fpr: float = DEFAULT_FPR

    @property
    def failed(self) -> list[ShardOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    def cluster_sizes(self) -> np.ndarray:
        """(K,) int64 rows per cluster over all shards that have an output."""
        sizes = np.zeros(self.n_clusters, np.int64)
        for o in self.outcomes:
            if o.counts is not None:
                sizes += o.counts
        return sizes

    def as_dict(self) -> dict:
        by = {s: [o for o in self.outcomes if o.status == s] for s in ("done", "skipped", "failed")}
        rows_done = sum(o.rows for o in by["done"])
        sizes = self.cluster_sizes()
        drift = None if self.train_counts is None else share_drift(sizes, self.train_counts)
        return {
            "shards": len(self.outcomes), "done": len(by["done"]), "skipped": len(by["skipped"]),
            "failed": len(by["failed"]), "rows": int(sizes.sum()), "rows_assigned_now": rows_done,
            "clusters_used": int((sizes > 0).sum()), "n_clusters": self.n_clusters,
            "seconds": round(self.seconds, 2), "rows_per_s": round(rows_done / max(self.seconds, 1e-9), 1),
            "novel": int(sum(o.novel for o in self.outcomes)), "novelty_fpr": self.novelty_fpr,
            "share_drift_tv": None if drift is None else round(drift, 4),
        }

    def report(self) -> dict:
        """`_assign_report.json`: the summary, rows per cluster, novel rows per shard."""
        return {**self.as_dict(), "rows_per_cluster": self.cluster_sizes().tolist(),
                "novel_by_shard": {o.shard: o.novel for o in self.outcomes if o.status != "failed"},
                "failed_shards": {o.shard: o.error for o in self.outcomes if o.status == "failed"}}


def output_table(ids: np.ndarray, a: Assignment, version: str, stamp: bytes,
                 novelty: np.ndarray | None = None, novel: np.ndarray | None = None) -> pa.Table:
    """The assignments table (io.runs.assignments_table) stamped in its footer with what produced it."""
    table = assignments_table(ids, a.cluster, a.log_prob, a.margin, version, novelty, novel)
    return table.replace_schema_metadata({STAMP_KEY: stamp})


def is_finished(path: Path, stamp: bytes) -> bool:
    """An output that a run with the same model, method and input completed (checked in the footer)."""
    try:
        meta = pq.read_metadata(path)
    except (OSError, pa.ArrowException):
        return False
    return (meta.metadata or {}).get(STAMP_KEY) == stamp and meta.num_rows == json.loads(stamp)["rows"]


class ShardWorker:
    """Holds the model and its assigner (built once) and assigns whole shards."""

    def __init__(self, model: FittedModel, spec: JobSpec):
        self.spec, self.model = spec, model
        self.assign = make_assigner(model, spec.method, spec.top_m, spec.device)

    def run(self, task: ShardTask) -> ShardOutcome:
        t0 = time.perf_counter()
        spec = self.spec
        try:
            ids, parts = [], []
            batches = iter_feature_batches(spec.shard_dir, task.index, spec.n_shards, spec.batch_size)
            for b in batches:
                bad = nonfinite_rows(b.features)
                if bad.size:
                    row = b.first_row + int(bad[0])
                    raise ShardError(f"{task.name} row {row}: feature contains NaN or Inf")
                ids.append(b.ids)
                parts.append(self.assign(b.features))
            a = concat_assignments(parts)
            id_arr = np.concatenate(ids) if ids else np.empty(0, np.int64)
            novelty, novel = self.model.novelty_of(a.cluster, a.log_prob, spec.novelty_fpr)
            write_parquet_atomic(output_table(id_arr, a, spec.version, spec.stamp(task), novelty, novel),
                                 Path(spec.out_dir) / task.name)
        except (ValueError, OSError, pa.ArrowException) as e:  # ShardError, ModelError are ValueErrors
            return ShardOutcome(task.name, "failed", error=str(e), seconds=time.perf_counter() - t0)
        counts = np.bincount(a.cluster, minlength=spec.n_clusters).astype(np.int64)
        return ShardOutcome(task.name, "done", len(id_arr), counts, seconds=time.perf_counter() - t0,
                            novel=int(novel.sum()))


def _skipped(path: Path, task: ShardTask, n_clusters: int) -> ShardOutcome:
    columns = [c for c in ("cluster", "novel") if c in pq.read_schema(path).names]
    table = pq.read_table(path, columns=columns)  # not the ids and scores: only what the report counts
    cluster = table.column("cluster").to_numpy()
    novel = int(table.column("novel").to_numpy(zero_copy_only=False).sum()) if "novel" in table.column_names else 0
    return ShardOutcome(task.name, "skipped", task.rows, np.bincount(cluster, minlength=n_clusters), novel=novel)


def assign_shards(
    model: FittedModel | str | os.PathLike,
    shard_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    method: str = "shortlist",
    top_m: int = DEFAULT_TOP_M,
    device: str = "auto",
    use_ray: bool = True,
    batch_size: int = 65536,
    progress: Callable[[ShardOutcome], None] | None = None,
    novelty_fpr: float = DEFAULT_FPR,
) -> AssignReport:
    """Assign every shard listed in SHARD_DIR/_manifest.json; one output Parquet per shard in out_dir.

    Outputs stamped by the same model, method and input bytes are skipped; anything else (missing,
    partial, stale) is redone. A shard that cannot be read is reported in the result (status
    "failed", with the reason) and the others go on. Raises ModelError when the model's d differs
    from the manifest's.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not 0.0 < novelty_fpr < 1.0:
        raise ValueError(f"novelty_fpr must be in (0, 1), got {novelty_fpr}")
    t0 = time.perf_counter()
    manifest, _ = load_manifest(shard_dir)
    d = manifest["d"]
    if not isinstance(model, FittedModel):
        model = open_model(model, n_features=d)
    elif (why := dimension_message(model.n_features, d, str(manifest_path(shard_dir)))) is not None:
        raise ModelError(why)
    why = model.feature_space_mismatch(manifest)
    if why is not None:
        raise ModelError(
            f"{manifest_path(shard_dir)}: {why}: these features come from another extractor or "
            "preprocessing, and the model's clusters do not apply to them"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.parquet.tmp-*"):  # left by a killed run; never renamed into place
        stale.unlink(missing_ok=True)
    spec = JobSpec(str(shard_dir), str(out), len(manifest["shards"]), method, top_m, device, batch_size,
                   model.version or "unversioned", model.n_clusters, novelty_fpr)
    tasks = [ShardTask(i, s["name"], s["rows"], s["sha256"]) for i, s in enumerate(manifest["shards"])]
    outcomes, todo = [], []
    for task in tasks:
        if is_finished(out / task.name, spec.stamp(task)):
            outcomes.append(_skipped(out / task.name, task, model.n_clusters))
            if progress:
                progress(outcomes[-1])
        else:
            todo.append(task)
    if todo:
        run = _run_with_ray if use_ray else _run_local
        for outcome in run(model, spec, todo):
            outcomes.append(outcome)
            if progress:
                progress(outcome)
    order = {t.name: t.index for t in tasks}
    outcomes.sort(key=lambda o: order[o.shard])
    same = None if model.manifest_hash is None and model.feature_space is None else True
    train_counts = None if model.novelty is None else model.novelty["train_counts"]
    report = AssignReport(outcomes, model.n_clusters, time.perf_counter() - t0, same, train_counts, novelty_fpr)
    write_json_atomic(report.report(), out / REPORT)
    return report


def _run_local(model: FittedModel, spec: JobSpec, tasks: list[ShardTask]) -> Iterator[ShardOutcome]:
    worker = ShardWorker(model, spec)
    for task in tasks:
        yield worker.run(task)


class _RayShardWorker:
    """Ray Data actor: builds the assigner once, then assigns one shard per call."""

    def __init__(self, model_ref: list, spec: JobSpec, n_threads: int):
        import ray

        torch.set_num_threads(n_threads)
        model = copy.deepcopy(ray.get(model_ref[0]))  # RAY: the model comes once per actor (writable copy)
        self.worker = ShardWorker(model, spec)
        self.n_clusters = spec.n_clusters

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = [self.worker.run(ShardTask(int(i), str(n), int(r), str(h))) for i, n, r, h in
                zip(batch["index"], batch["name"], batch["rows"], batch["sha256"], strict=True)]
        return outcome_columns(outs, self.n_clusters)


def outcome_columns(outcomes: list[ShardOutcome], n_clusters: int) -> dict[str, np.ndarray]:
    """ShardOutcomes as a Ray Data batch, one column per field: every field, so none is lost on the
    way back (`outcome_from_row` reverses it). A failed shard's counts travel as zeros."""
    zeros = np.zeros(n_clusters, np.int64)
    rows = [dataclasses.asdict(dataclasses.replace(o, counts=zeros if o.counts is None else o.counts))
            for o in outcomes]
    return {f.name: np.array([r[f.name] for r in rows]) for f in dataclasses.fields(ShardOutcome)}


def outcome_from_row(row: dict) -> ShardOutcome:
    """One row of `outcome_columns` (numpy scalars, as Ray Data yields them) as a ShardOutcome."""
    values = {f.name: row[f.name] for f in dataclasses.fields(ShardOutcome)}
    values = {k: v.item() if isinstance(v, np.generic) else v for k, v in values.items()}
    values["counts"] = np.asarray(values["counts"], np.int64) if values["status"] == "done" else None
    return ShardOutcome(**values)


def _run_with_ray(model: FittedModel, spec: JobSpec, tasks: list[ShardTask]) -> Iterator[ShardOutcome]:
    """Ray Data job: one row per shard, a pool of actors (one per GPU, else one per CPU) that each
    hold the model once; rows come back as shards finish."""
    import ray  # RAY

    ensure_ray()  # RAY: the cluster, or a local one
    ray.data.DataContext.get_current().enable_progress_bars = False  # the caller shows progress
    resources = ray.cluster_resources()
    n_gpus = int(resources.get("GPU", 0))
    use_gpu = n_gpus > 0 and spec.device != "cpu"
    n_cpus = max(1, int(resources.get("CPU", 1)))
    n_actors = max(1, min(len(tasks), n_gpus if use_gpu else n_cpus))
    threads = 1 if use_gpu else max(1, n_cpus // n_actors)
    if not use_gpu and spec.device == "auto":
        spec = dataclasses.replace(spec, device="cpu")
    items = [dataclasses.asdict(t) for t in tasks]
    ds = ray.data.from_items(items, override_num_blocks=len(items))  # RAY
    ds = ds.map_batches(  # RAY
        _RayShardWorker,
        fn_constructor_args=([ray.put(model)], spec, threads),
        batch_size=1,
        concurrency=n_actors,
        num_gpus=1 if use_gpu else 0,
        num_cpus=0 if use_gpu else threads,
    )
    for row in ds.iter_rows():  # RAY: streamed as actors finish shards
        yield outcome_from_row(row)
