"""The run directory: its layout, its one writer (one process and Ray Train alike) and its one reader.

    RUN_DIR/model/               the fitted model (cluster_service.serve.model)
    RUN_DIR/assignments.parquet/ `assignments_table` (id, cluster, log_prob, margin, novelty, ...) as part
                                 files part-<first global row, 12 digits>.parquet, one per contiguous
                                 run of rows, each written by the process that holds those rows; in
                                 file-name order they are the data's row order. pyarrow, pandas
                                 (read_parquet of the directory) and DuckDB (read_parquet('.../*.parquet'))
                                 read them as one table
    RUN_DIR/config.json          the resolved FitConfig
    RUN_DIR/history.json         one record per epoch (EpochRecord.as_dict)
    RUN_DIR/lineage.json         an update's old -> new cluster ids (also in model/)
    RUN_DIR/summary.json         written last: its presence marks the run complete
    RUN_DIR/duplicates.parquet   `cluster-service duplicates` (cluster_service.curate.duplicates)
    RUN_DIR/outliers.parquet     `cluster-service outliers` (cluster_service.curate.outliers)
    RUN_DIR/sample.parquet       `cluster-service sample` (cluster_service.curate.sample)

Every file is written under a temporary name and renamed, so a killed writer never leaves half files
(a temporary name starts with ".", which the readers skip).
Readers name these files through this module only (`model_dir`, `read_assignments`, `read_history`,
`read_summary`, `read_lineage`); loading the model itself is serve.model's.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from cluster_service.config import NOVELTY_FPR
from cluster_service.io.atomic import write_json_atomic, write_parquet_atomic, write_text_atomic

MODEL_DIR = "model"
ASSIGNMENTS = "assignments.parquet"
CONFIG = "config.json"
HISTORY = "history.json"
LINEAGE = "lineage.json"
SUMMARY = "summary.json"
DUPLICATES = "duplicates.parquet"
OUTLIERS = "outliers.parquet"
SAMPLE = "sample.parquet"


def assignments_table(
    ids: np.ndarray, clusters: np.ndarray, log_prob: np.ndarray, margin: np.ndarray, version: str,
    novelty: np.ndarray | None = None, novel: np.ndarray | None = None,
) -> pa.Table:
    """The one assignments schema (DESIGN §3), written by `fit` and by `assign` alike: id, cluster
    int32, log_prob float32 (log pi_k + log N(x; mu_k, Sigma_k) of the chosen cluster), margin
    float32 (best minus second-best score; +inf with one cluster), novelty float32 (1 - the row's
    tail probability in its cluster's training densities; null without a calibration), novel bool,
    model_version."""
    ids = np.asarray(ids)
    n = len(ids)
    novelty = np.full(n, np.nan) if novelty is None else np.asarray(novelty)
    novel = np.zeros(n, bool) if novel is None else np.asarray(novel, bool)
    return pa.table({
        "id": pa.array(ids, pa.string()) if ids.dtype == object else pa.array(ids.astype(np.int64)),
        "cluster": pa.array(np.asarray(clusters).astype(np.int32)),
        "log_prob": pa.array(np.asarray(log_prob).astype(np.float32)),
        "margin": pa.array(np.asarray(margin).astype(np.float32)),
        "novelty": pa.array(novelty.astype(np.float32), mask=np.isnan(novelty)),  # null: no calibration
        "novel": pa.array(novel),
        "model_version": pa.array([version] * len(ids), pa.string()),
    })


def write_run(
    out_dir: str | os.PathLike,
    model,
    ids: np.ndarray,
    clusters: np.ndarray,
    log_prob: np.ndarray,
    margin: np.ndarray,
    config: dict,
    history: list[dict],
) -> Path:
    """Write everything of a finished fit in one process but the summary (see `write_summary`): the
    W = 1 case of `write_run_files` + `write_assignment_parts` + `keep_assignment_parts`.

    model: FittedModel or AEModel (.save(dir), .version); ids, clusters, log_prob, margin: (n,) in
    the data's row order; config: FitConfig.to_dict(); history: EpochRecord dicts."""
    write_run_files(out_dir, model, config, history)
    parts = write_assignment_parts(out_dir, model, np.arange(len(ids)), ids, clusters, log_prob, margin)
    keep_assignment_parts(out_dir, parts)
    return Path(out_dir)


def write_run_files(out_dir: str | os.PathLike, model, config: dict, history: list[dict]) -> Path:
    """The run's model/, config.json and history.json (one process writes them)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save(out_dir / MODEL_DIR)
    write_text_atomic(json.dumps(config, indent=2), out_dir / CONFIG)
    write_text_atomic(json.dumps(history, indent=1), out_dir / HISTORY)
    return out_dir


def write_assignment_parts(out_dir: str | os.PathLike, model, global_index: np.ndarray, ids: np.ndarray,
                           clusters: np.ndarray, log_prob: np.ndarray, margin: np.ndarray) -> list[str]:
    """This process's rows of the assignments: global_index (n_local,) their positions in the data's
    row order; ids, clusters, log_prob, margin (n_local,). One part file per contiguous run of
    positions, named by its first. Returns the file names written."""
    mixture = getattr(model, "mixture", model)  # the latent mixture in autoencoder mode
    novelty, novel = mixture.novelty_of(clusters, log_prob, NOVELTY_FPR)
    gidx = np.asarray(global_index, dtype=np.int64)
    order = np.argsort(gidx, kind="stable")
    gidx = gidx[order]
    table = assignments_table(np.asarray(ids)[order], np.asarray(clusters)[order], np.asarray(log_prob)[order],
                              np.asarray(margin)[order], model.version, novelty[order], novel[order])
    starts = np.flatnonzero(np.diff(gidx, prepend=-2) != 1)  # where a run of consecutive positions begins
    ends = np.append(starts[1:], gidx.size)
    names = []
    try:
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
            names.append(f"part-{int(gidx[a]):012d}.parquet")
            write_parquet_atomic(table.slice(a, b - a), assignments_path(out_dir) / names[-1])
    except BaseException:
        # each part is whole or absent (temp + rename); a directory this failure left empty goes too
        with contextlib.suppress(OSError):
            assignments_path(out_dir).rmdir()
        raise
    return names


def keep_assignment_parts(out_dir: str | os.PathLike, names: list[str]) -> None:
    """After every process wrote its parts: remove the parts of an earlier run in the same directory
    (another worker layout names other parts), and an assignments.parquet file of old."""
    path = assignments_path(out_dir)
    if path.is_file():
        path.unlink()
    keep = set(names)
    for old in path.glob("part-*.parquet"):
        if old.name not in keep:
            old.unlink()


def stop_summary(history: list) -> dict:
    """{"epochs": epochs run, "stopped": why the fit ended} from EpochRecords or their dicts."""
    if not history:
        return {}
    last = history[-1] if isinstance(history[-1], dict) else history[-1].as_dict()
    return {"epochs": len(history), "stopped": last.get("stopped", "")}


def write_summary(out_dir: str | os.PathLike, summary: dict) -> Path:
    """summary.json, last: a run directory with it is complete."""
    return write_text_atomic(json.dumps(summary, indent=2), Path(out_dir) / SUMMARY)


def write_lineage(out_dir: str | os.PathLike, lineage: dict) -> Path:
    """An update's lineage.json, in the run directory and in its model directory (which travels alone)."""
    write_json_atomic(lineage, Path(out_dir) / MODEL_DIR / LINEAGE)
    return write_json_atomic(lineage, Path(out_dir) / LINEAGE)


# ---- reading ------------------------------------------------------------------------------------


def model_dir(run_dir: str | os.PathLike) -> Path:
    """RUN_DIR/model."""
    return Path(run_dir) / MODEL_DIR


def model_dir_of(path: str | os.PathLike) -> Path:
    """The model directory `path` names: RUN_DIR/model when `path` is a run directory holding one,
    else `path` itself (a model directory)."""
    path = Path(path)
    return model_dir(path) if (model_dir(path) / "model.json").is_file() else path


def assignments_path(run_dir: str | os.PathLike) -> Path:
    """RUN_DIR/assignments.parquet, the directory of the part files."""
    return Path(run_dir) / ASSIGNMENTS


def assignment_parts(run_dir: str | os.PathLike) -> list[Path]:
    """The part files of the run's assignments, in row order."""
    path = assignments_path(run_dir)
    return sorted(path.glob("part-*.parquet")) if path.is_dir() else []


def read_assignments(run_dir: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """The run's assignments (row order), every part as one table, only `columns` when given;
    FileNotFoundError naming the directory when it holds none."""
    import pyarrow.parquet as pq

    parts = assignment_parts(run_dir)
    if not parts:
        raise FileNotFoundError(f"{assignments_path(run_dir)}: no assignment parts (is {run_dir} a run directory?)")
    return pa.concat_tables([pq.read_table(p, columns=columns) for p in parts])


def read_history(run_dir: str | os.PathLike) -> list[dict]:
    """The run's epoch records as dicts ([] when history.json is absent)."""
    path = Path(run_dir) / HISTORY
    return json.loads(path.read_text()) if path.is_file() else []


def is_complete(run_dir: str | os.PathLike) -> bool:
    """Whether summary.json, written last, exists."""
    return (Path(run_dir) / SUMMARY).is_file()


def read_summary(run_dir: str | os.PathLike) -> dict:
    """summary.json of a complete run."""
    return json.loads((Path(run_dir) / SUMMARY).read_text())


def read_lineage(run_dir: str | os.PathLike) -> dict | None:
    """An update's lineage.json, or None for a run that is not an update."""
    path = Path(run_dir) / LINEAGE
    return json.loads(path.read_text()) if path.is_file() else None


def read_curated(run_dir: str | os.PathLike, name: str) -> pa.Table | None:
    """RUN_DIR/`name` (DUPLICATES, OUTLIERS or SAMPLE), or None when that command has not run."""
    import pyarrow.parquet as pq

    path = Path(run_dir) / name
    return pq.read_table(path) if path.is_file() else None
