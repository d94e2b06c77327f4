"""Distributed fit on Ray Train: every Ray Train call is in this module, marked `# RAY` (Ray Data
runs in runtime/assign_job.py and feature_extraction/extract.py, Ray Tune in runtime/tune.py, job
submission in ops/submit.py; all connect through runtime/ray_session.ensure_ray).

    driver   fit_distributed(data, out, cfg, num_workers)  -> TorchTrainer(...).fit() -> summary
    worker   train_loop_per_worker(job):
               rows of this rank (shards i % world == rank, or a slice of an .npz)
               -> Engine(cfg, rows, global_index, n_global, TorchDistComm)     (DDP, gloo or NCCL)
               -> restore ray.train.get_checkpoint(), or initialise
               -> run_schedule: every epoch ray.train.report(metrics); every `checkpoint_every`
                  epochs rank 0 adds Checkpoint(engine.state_dict(), history)
               -> exact MAP assignment of local rows; every rank writes its assignment parts
                  (RUN_DIR/assignments.parquet/part-*.parquet), rank 0 RUN_DIR/model/

The worker differs from the single-process `cluster_service.train.fit.fit` by the comm it gives the
engine and by the Ray calls marked `# RAY`. A failed worker makes Ray Train restart the whole
group (`FailureConfig`), and every worker resumes from the last reported checkpoint; re-running
the same command on the same RUN_DIR resumes too (Ray Train finds the run's checkpoints under
RUN_DIR/checkpoints/).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cluster_service.config import CHECKPOINT_EVERY, FitConfig, check_train_resources
from cluster_service.runtime.ray_session import ensure_ray
from cluster_service.train.engine import Engine, EpochRecord
from cluster_service.train.fit import EpochCallback, run_schedule

CHECKPOINT_FILE = "engine.pt"
HISTORY_FILE = "history.json"
RUN_NAME = "fit"


# ---- what the driver sends to every worker --------------------------------------------------


@dataclass(frozen=True)
class FaultInjection:
    """Test hook: worker `rank` dies (os._exit) after epoch `epoch`, once: the file `marker` is
    created first, and a worker that finds it does not die again (so the restarted group runs on)."""

    rank: int
    epoch: int
    marker: str


@dataclass(frozen=True)
class TrainJob:
    """Everything a worker needs; pickled into `train_loop_config`."""

    data_path: str
    out_dir: str
    cfg: dict[str, Any]  # FitConfig.to_dict()
    checkpoint_every: int = CHECKPOINT_EVERY
    callbacks: tuple[EpochCallback, ...] = ()  # run on every rank after every epoch
    fault: FaultInjection | None = None


# ---- this rank's rows ----------------------------------------------------------------------


@dataclass
class LocalRows:
    ids: np.ndarray  # (n_local,) int64 or str
    x: np.ndarray  # (n_local, d) float32
    global_index: np.ndarray  # (n_local,) int64 positions in the global row order
    n_global: int
    manifest_hash: str | None
    feature_space: dict | None = None


def local_rows(data_path: str | os.PathLike, rank: int, world_size: int) -> LocalRows:
    """The rows worker `rank` trains on, with their global positions.

    Shard directory: shards i % world_size == rank (cluster_service.io.shards), global order = the
    manifest's shard order. .npy/.npz: contiguous slice `rank` of `world_size` equal slices.
    """
    p = Path(data_path)
    if p.is_dir():
        from cluster_service.io.shards import load_manifest, read_feature_table

        manifest, _ = load_manifest(p)
        rows = np.array([s["rows"] for s in manifest["shards"]], dtype=np.int64)
        if len(rows) < world_size:
            raise ValueError(
                f"{p}: {len(rows)} shard(s) for {world_size} workers; each worker reads whole shards, "
                f"so write at least {world_size} shards (or use fewer workers)"
            )
        offsets = np.concatenate([[0], np.cumsum(rows)])
        table = read_feature_table(p, rank, world_size)
        mine = range(rank, len(rows), world_size)
        gidx = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in mine])
        return LocalRows(table.ids, table.features, gidx, int(offsets[-1]), table.manifest_hash,
                         table.feature_space)
    from cluster_service.io.features import load_features

    feats = load_features(p)
    n = feats.x.shape[0]
    lo, hi = (n * rank) // world_size, (n * (rank + 1)) // world_size
    return LocalRows(feats.ids[lo:hi], feats.x[lo:hi], np.arange(lo, hi, dtype=np.int64), n, None)


def data_shape(data_path: str | os.PathLike) -> tuple[int, int, int | None]:
    """(n_samples, n_features, n_shards or None) without reading feature rows where possible."""
    p = Path(data_path)
    if p.is_dir():
        from cluster_service.io.shards import load_manifest

        manifest, _ = load_manifest(p)
        return sum(s["rows"] for s in manifest["shards"]), int(manifest["d"]), len(manifest["shards"])
    from cluster_service.io.features import load_features

    feats = load_features(p)
    return feats.x.shape[0], feats.x.shape[1], None


# ---- checkpoints: named state ----------------------------------------------------------------


def write_checkpoint(directory: str | os.PathLike, engine: Engine, history: list[dict]) -> None:
    """Engine state (nets, optimizers, parameters, RNG states, epoch, config, schema) + history."""
    directory = Path(directory)
    torch.save(engine.state_dict(), directory / CHECKPOINT_FILE)
    (directory / HISTORY_FILE).write_text(json.dumps(history))


def read_checkpoint(directory: str | os.PathLike) -> tuple[dict, list[dict]]:
    directory = Path(directory)
    state = torch.load(directory / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    return state, json.loads((directory / HISTORY_FILE).read_text())


# ---- the worker -----------------------------------------------------------------------------


def train_loop_per_worker(job: TrainJob) -> None:
    """One Ray Train worker: its rows, the shared Engine loop, checkpoints, its part of the outputs."""
    import ray.train  # RAY
    import ray.train.torch  # RAY

    ctx = ray.train.get_context()  # RAY
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()  # RAY
    if device.type == "cuda":
        torch.cuda.set_device(device)
    from cluster_service.train.comm import TorchDistComm

    cfg = FitConfig.from_dict(job.cfg)
    rows = local_rows(job.data_path, rank, world)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        x = torch.from_numpy(np.ascontiguousarray(rows.x, dtype=rows.x.dtype if rows.x.dtype == np.float32
                                                  else np.float64))  # float32 rows kept as they are
        comm = TorchDistComm(device)
        engine = Engine(cfg, x, torch.from_numpy(rows.global_index), rows.n_global, comm, device)
        del x
        rows.x = None  # the engine keeps its own centred copy (in cfg.row_dtype): not two copies of the rows
        history: list[dict] = []
        checkpoint = ray.train.get_checkpoint()  # RAY
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                state, history = read_checkpoint(d)
            if state["config"] != cfg.to_dict():
                raise ValueError("checkpoint was written by a fit with a different config")
            engine.load_state_dict(state)
        else:
            engine.initialize()

        def after_epoch(rec: EpochRecord, eng: Engine) -> None:
            history.append(rec.as_dict())
            for cb in job.callbacks:
                cb(rec, eng)
            if job.fault is not None:
                _maybe_fail(job.fault, rank, rec.epoch)
            # A report is a barrier through the Ray Train controller (tens of ms): report with
            # the checkpoints only. Per-epoch records stay in `history` (and callbacks).
            if (rec.epoch + 1) % job.checkpoint_every == 0 or rec.stopped:  # stopped: the last epoch
                report_checkpoint({**rec.as_dict(), "world_size": world}, eng, history, rank)

        run_schedule(engine, [after_epoch])
    write_outputs(engine, rows, Path(job.out_dir), history)


def report_checkpoint(metrics: dict, engine: Engine, history: list[dict], rank: int) -> None:
    """Report metrics; rank 0 adds a checkpoint of the engine state (the same on every rank)."""
    import ray.train  # RAY

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            write_checkpoint(tmp, engine, history)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)  # RAY
        ray.train.report(metrics, checkpoint=checkpoint)  # RAY (synchronous upload)


def _maybe_fail(fault: FaultInjection, rank: int, epoch: int) -> None:
    if rank == fault.rank and epoch == fault.epoch and not os.path.exists(fault.marker):
        Path(fault.marker).write_text(f"rank {rank} killed after epoch {epoch}\n")
        os._exit(1)


def write_outputs(engine: Engine, rows: LocalRows, out_dir: Path, history: list[dict]) -> None:
    """Exact MAP assignment on every rank; every rank writes its own assignment parts (ids, clusters,
    log-probabilities, margins: never features; cluster_service.io.runs), rank 0 the model, config and
    history, then, once every rank's part names reached it, removes parts of an earlier run."""
    from cluster_service.io import runs
    from cluster_service.train.export import finish_fit

    model, clusters, log_prob, margin = finish_fit(engine, rows.manifest_hash, rows.feature_space)  # every rank
    names = runs.write_assignment_parts(out_dir, model, rows.global_index, rows.ids, clusters, log_prob, margin)
    names = engine.comm.gather_object(names)  # one name per shard: a barrier, not rows
    if names is None:  # not rank 0
        return
    runs.write_run_files(out_dir, model, engine.cfg.to_dict(), history)
    runs.keep_assignment_parts(out_dir, [n for part in names for n in part])


# ---- the driver -----------------------------------------------------------------------------


def completed_run(data_path: str | os.PathLike, out_dir: str | os.PathLike, cfg: FitConfig,
                  storage_path: str | None = None) -> dict | None:
    """The summary of a finished fit of the same data and config in `out_dir`, or None.

    A run is finished when summary.json exists (it is written last); it is the same fit when the
    job key its checkpoints were written under (storage_path, default RUN_DIR/checkpoints)
    matches (see _check_resume). Object-store checkpoints carry no key here: never reused."""
    from cluster_service.io.runs import is_complete, read_summary

    if storage_path and "://" in storage_path:
        return None
    out_dir = Path(out_dir).resolve()
    storage = Path(storage_path).resolve() if storage_path else out_dir / "checkpoints"
    key_file = storage / f"{RUN_NAME}.job.json"
    if not is_complete(out_dir) or not key_file.is_file():
        return None
    job_key = json.loads(json.dumps({"data": str(Path(data_path).resolve()), "config": cfg.to_dict()}))
    if json.loads(key_file.read_text()) != job_key:
        return None
    return read_summary(out_dir)


def _check_resume(storage: Path, job_key: dict) -> None:
    """A re-run on the same RUN_DIR resumes only the same fit; anything else is refused."""
    key_file = storage / f"{RUN_NAME}.job.json"
    job_key = json.loads(json.dumps(job_key))  # compare as stored (tuples become lists)
    if key_file.is_file():
        old = json.loads(key_file.read_text())
        if old != job_key:
            changed = sorted(k for k in set(old) | set(job_key) if old.get(k) != job_key.get(k))
            raise ValueError(
                f"{storage}: holds checkpoints of a different fit (differs in {', '.join(changed)}); "
                "use another --out directory or delete that one"
            )
    storage.mkdir(parents=True, exist_ok=True)
    key_file.write_text(json.dumps(job_key, indent=1))


def fit_distributed(
    data_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: FitConfig,
    num_workers: int,
    use_gpu: bool = False,
    gpus_per_worker: float = 1.0,
    cpus_per_worker: float = 1.0,
    checkpoint_every: int = CHECKPOINT_EVERY,
    max_failures: int = 2,
    storage_path: str | None = None,
    callbacks: Sequence[EpochCallback] = (),
    fault: FaultInjection | None = None,
    collective_timeout_s: int = 1800,
) -> dict:
    """Fit DeepDPM with `num_workers` Ray Train workers (DDP; gloo on CPU, NCCL on GPU).

    Writes RUN_DIR/model/, assignments.parquet/ (parts, global row order by name), history.json, config.json,
    summary.json; checkpoints go to `storage_path` (default RUN_DIR/checkpoints; use shared storage
    on a multi-node cluster). Returns the summary dict.
    """
    cfg = cfg.validate()
    check_train_resources("", num_workers, checkpoint_every, max_failures, gpus_per_worker, cpus_per_worker)
    data_path, out_dir = Path(data_path).resolve(), Path(out_dir).resolve()
    n, d, n_shards = data_shape(data_path)
    if n < max(2, cfg.k_init, num_workers):
        raise ValueError(f"{data_path}: {n} rows; at least {max(2, cfg.k_init, num_workers)} are needed")
    if n_shards is not None and n_shards < num_workers:
        raise ValueError(
            f"{data_path}: {n_shards} shard(s) for {num_workers} workers; each worker reads whole shards"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    if storage_path and "://" in storage_path:  # object store (s3://, gs://): Ray Train writes it
        storage = storage_path
    else:
        storage = Path(storage_path).resolve() if storage_path else out_dir / "checkpoints"
        _check_resume(storage, {"data": str(data_path), "config": cfg.to_dict()})

    job = TrainJob(str(data_path), str(out_dir), cfg.to_dict(), checkpoint_every, tuple(callbacks), fault)
    ensure_ray()  # RAY: runtime.ray_session's one policy
    trainer = _torch_trainer(job, num_workers, use_gpu, gpus_per_worker, cpus_per_worker, str(storage),
                             max_failures, collective_timeout_s)
    t0 = time.perf_counter()
    result = trainer.fit()  # RAY: raises TrainingFailedError once max_failures is exhausted
    elapsed = time.perf_counter() - t0
    checkpoint = result.checkpoint.path if result.checkpoint is not None else None
    return _write_summary(out_dir, data_path, n, d, elapsed, data=str(data_path), workers=num_workers,
                          use_gpu=use_gpu, checkpoint=checkpoint)


def _torch_trainer(job: TrainJob, num_workers: int, use_gpu: bool, gpus_per_worker: float,
                   cpus_per_worker: float, storage: str, max_failures: int, collective_timeout_s: int):
    """The Ray Train TorchTrainer of a fit: DDP workers (gloo on CPU, NCCL on GPU), checkpoints under
    `storage`, whole-group restarts from the last checkpoint up to `max_failures` times."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig  # RAY
    from ray.train.torch import TorchConfig, TorchTrainer  # RAY

    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if use_gpu else {})}
    return TorchTrainer(  # RAY
        train_loop_per_worker,
        train_loop_config=job,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=collective_timeout_s),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )


def _write_summary(out_dir: Path, data_path: Path, n: int, d: int, seconds: float, **extra) -> dict:
    """report.evaluate.run_summary of the written run (K of its model; NMI/ARI/ACC of its assignments
    when the data has labels), written last as summary.json."""
    from cluster_service.io import runs
    from cluster_service.io.features import read_labels
    from cluster_service.report.evaluate import run_summary, score
    from cluster_service.serve.model import load_model

    labels = read_labels(data_path)
    scores = None if labels is None else score(labels, runs.read_assignments(out_dir, ["cluster"]).column(
        "cluster").to_numpy())
    summary = run_summary(n, d, load_model(runs.model_dir(out_dir)).n_clusters, seconds, runs.read_history(out_dir),
                          out_dir, scores, **extra)
    runs.write_summary(out_dir, summary)
    return summary
