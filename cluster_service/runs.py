"""The run directory: its one writer (one process and Ray Train alike) and its reader.

    RUN_DIR/model/               the fitted model (cluster_service.model)
    RUN_DIR/assignments.parquet  id, cluster, log_prob, model_version (global row order)
    RUN_DIR/config.json          the resolved FitConfig
    RUN_DIR/history.json         one record per epoch (EpochRecord.as_dict)
    RUN_DIR/summary.json         written last: its presence marks the run complete

Every file is written under a temporary name and renamed, so a killed writer never leaves half files.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cluster_service.data import assignments_table, write_parquet_atomic, write_text_atomic

MODEL_DIR = "model"
ASSIGNMENTS = "assignments.parquet"
CONFIG = "config.json"
HISTORY = "history.json"
SUMMARY = "summary.json"


def write_run(
    out_dir: str | os.PathLike,
    model,
    ids: np.ndarray,
    clusters: np.ndarray,
    log_prob: np.ndarray,
    config: dict,
    history: list[dict],
) -> Path:
    """Write everything of a finished fit but the summary (see `write_summary`).

    model: FittedModel or AEModel (.save(dir), .version); ids, clusters, log_prob: (n,) in the
    data's row order; config: FitConfig.to_dict(); history: EpochRecord dicts."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save(out_dir / MODEL_DIR)
    write_parquet_atomic(assignments_table(ids, clusters, log_prob, model.version), out_dir / ASSIGNMENTS)
    write_text_atomic(json.dumps(config, indent=2), out_dir / CONFIG)
    write_text_atomic(json.dumps(history, indent=1), out_dir / HISTORY)
    return out_dir


def write_summary(out_dir: str | os.PathLike, summary: dict) -> Path:
    """summary.json, last: a run directory with it is complete."""
    return write_text_atomic(json.dumps(summary, indent=2), Path(out_dir) / SUMMARY)


@dataclass
class RunResult:
    """A finished run read back from its directory: what trackers and plots consume (the same
    attributes as fit.FitResult, without the engine)."""

    model: object  # FittedModel
    history: list  # EpochRecords
    clusters: np.ndarray  # (n,) int32, global row order
    log_prob: np.ndarray  # (n,) float32

    @property
    def n_clusters(self) -> int:
        return self.model.n_clusters


def read_run(out_dir: str | os.PathLike) -> RunResult:
    import pyarrow.parquet as pq

    from cluster_service.engine import EpochRecord
    from cluster_service.model import load_model

    out_dir = Path(out_dir)
    table = pq.read_table(out_dir / ASSIGNMENTS, columns=["cluster", "log_prob"])
    history = [EpochRecord(**r) for r in json.loads((out_dir / HISTORY).read_text())]
    return RunResult(load_model(out_dir / MODEL_DIR), history, table.column("cluster").to_numpy(),
                     table.column("log_prob").to_numpy())
