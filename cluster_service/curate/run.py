"""A fitted run as the curation commands read it: the model, the assignments in row order, and
the data the run was fitted on (features joined by id; image paths when the shards carry them).

    open_run(RUN_DIR)      -> FittedRun; errors name the run directory or file and say what is missing
    FittedRun.features()   (n, d) float32 rows in assignment order, read once
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cluster_service.io import runs
from cluster_service.io.features import data_column, load_features
from cluster_service.serve.model import FittedModel, load_model

URI_MESSAGE = ("{run}: the curation commands need a run directory (its assignments.parquet and the data "
               "it was fitted on); an MLflow URI holds only the model. Run `cluster-service assign {run} "
               "DATA --out DIR` to score data with it, or pass the fit's run directory")


@dataclass
class FittedRun:
    run_dir: Path
    model: FittedModel
    ids: np.ndarray  # (n,) int64 or object (str ids)
    clusters: np.ndarray  # (n,) int64
    log_prob: np.ndarray  # (n,) float64 log pi_k + log N(x; mu_k, Sigma_k)
    data: str | None  # the data the run was fitted on (summary.json's "data")
    paths: np.ndarray | None  # (n,) object image paths ("" unknown), None when the data has none
    _x: np.ndarray | None = field(default=None, repr=False)

    @property
    def n_rows(self) -> int:
        return int(self.ids.size)

    @property
    def n_clusters(self) -> int:
        return self.model.n_clusters

    def why_no_paths(self) -> str:
        """Why galleries and export have no images: said the same way everywhere."""
        return (f"the data of {self.run_dir} ({self.data}) carries no image paths (only shard directories "
                "written by `cluster-service extract` have a path column)")

    def features(self) -> np.ndarray:
        """(n, d) float32 rows of the run's data in assignment order (joined by id)."""
        if self._x is None:
            if not self.data or not Path(self.data).exists():
                raise FileNotFoundError(f"{self.run_dir}: the data it was fitted on ({self.data}) is not there; "
                                        "pass --data with the same rows")
            feats = load_features(self.data)
            if feats.x.shape[1] != self.model.n_features:
                raise ValueError(f"{self.data}: d = {feats.x.shape[1]}, the model of {self.run_dir} has "
                                 f"d = {self.model.n_features}")
            if feats.ids.shape == self.ids.shape and (feats.ids == self.ids).all():
                self._x = feats.x
            else:
                order = np.argsort(feats.ids, kind="stable")
                pos = np.clip(np.searchsorted(feats.ids[order], self.ids), 0, feats.ids.size - 1)
                found = feats.ids[order][pos] == self.ids
                if not found.all():
                    raise ValueError(f"{self.data}: {int((~found).sum())} of the {self.n_rows} rows of "
                                     f"{runs.assignments_path(self.run_dir)} are not in it (first id "
                                     f"{self.ids[~found][0]!r}); pass --data with the fitted rows")
                self._x = feats.x[order[pos]]
        return self._x


def open_run(run: str | os.PathLike, data: str | os.PathLike | None = None) -> FittedRun:
    """Read a complete local run directory; `data` replaces the data path summary.json names
    (moved files). Raises FileNotFoundError / ValueError naming the directory or file."""
    if ":/" in str(run):
        raise ValueError(URI_MESSAGE.format(run=run))
    run_dir = Path(run)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    if not runs.is_complete(run_dir):
        raise FileNotFoundError(f"{run_dir}: not a complete run directory (no {runs.SUMMARY}; did the fit finish?)")
    model = load_model(runs.model_dir(run_dir))
    table = runs.read_assignments(run_dir, ["id", "cluster", "log_prob"])
    ids = table.column("id").to_numpy(zero_copy_only=False)
    data = str(data) if data is not None else runs.read_summary(run_dir).get("data")
    return FittedRun(
        run_dir=run_dir, model=model, ids=ids,
        clusters=table.column("cluster").to_numpy().astype(np.int64),
        log_prob=table.column("log_prob").to_numpy().astype(np.float64),
        data=data, paths=data_column(data, ids, "path"),
    )


def members(clusters: np.ndarray, n_clusters: int) -> list[np.ndarray]:
    """Row indices of each cluster, ascending: clusters (n,) -> K arrays."""
    order = np.argsort(clusters, kind="stable")
    bounds = np.searchsorted(clusters[order], np.arange(n_clusters + 1))
    return [order[bounds[c]:bounds[c + 1]] for c in range(n_clusters)]


def path_column(paths: np.ndarray | None, rows: np.ndarray):
    """The `path` column of an output table: the rows' image paths, null where unknown."""
    import pyarrow as pa

    if paths is None:
        return pa.nulls(rows.size, pa.string())
    values = paths[rows]
    return pa.array(values.astype(object), pa.string(), mask=values == "")


def id_column(ids: np.ndarray):
    import pyarrow as pa

    return pa.array(ids, pa.string()) if ids.dtype == object else pa.array(ids.astype(np.int64))
