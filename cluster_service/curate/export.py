"""Export a cluster, or every group of a merge-tree level, for labelling tools: a folder of symlinks
to the images (one sub-folder per cluster or group) or a CSV of paths.

Both are written atomically (a temporary sibling renamed into place) and need image paths in the
data (shard directories written by `cluster-service extract`); without them nothing is written and
the error says why.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np

from cluster_service.curate.run import FittedRun
from cluster_service.io.atomic import atomic_dir, write_text_atomic


def export_rows(run: FittedRun, cluster: int | None = None, level: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(rows (m,), folder label (m,) int64: the cluster, or the group at `level`) to export."""
    if (cluster is None) == (level is None):
        raise ValueError("give exactly one of --cluster K or --level L")
    if run.paths is None:
        raise ValueError(f"nothing to export: {run.why_no_paths()}")
    if cluster is not None:
        if not 0 <= cluster < run.n_clusters:
            raise ValueError(f"--cluster must be in 0..{run.n_clusters - 1} (the clusters of {run.run_dir}), "
                             f"got {cluster}")
        rows = np.flatnonzero(run.clusters == cluster)
        return rows, np.full(rows.size, cluster, np.int64)
    group = run.model.cut(run.model.cut_level(k=level))
    rows = np.arange(run.n_rows)
    return rows, group[run.clusters]


def resolved(path: str, root: str | os.PathLike | None) -> str:
    """An image path as a labelling tool opens it: relative ones under `root` (else the working
    directory), made absolute; "" stays "" (unknown)."""
    if not path:
        return path
    return os.path.abspath(Path(root) / path if root is not None and not Path(path).is_absolute() else path)


def export_csv(run: FittedRun, rows: np.ndarray, label: np.ndarray, out: str | os.PathLike, what: str,
               root: str | os.PathLike | None = None) -> Path:
    """CSV: id, path (absolute), cluster, and `what` (cluster or group) when that is a level's group."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["id", "path", "cluster", *([what] if what != "cluster" else [])])
    for r, g in zip(rows, label, strict=True):
        w.writerow([run.ids[r], resolved(run.paths[r], root), run.clusters[r], *([g] if what != "cluster" else [])])
    return write_text_atomic(buf.getvalue(), out)


def export_links(run: FittedRun, rows: np.ndarray, label: np.ndarray, out: str | os.PathLike, what: str,
                 root: str | os.PathLike | None = None) -> Path:
    """OUT/<what>_NNNNN/<id><suffix> -> the image, one sub-folder per cluster or group; rows without
    a path are left out. OUT is replaced whole."""
    with atomic_dir(out) as tmp:
        for g in np.unique(label):
            (tmp / f"{what}_{int(g):05d}").mkdir()
        for r, g in zip(rows, label, strict=True):
            src = resolved(run.paths[r], root)
            if src:
                os.symlink(src, tmp / f"{what}_{int(g):05d}" / f"{run.ids[r]}{Path(src).suffix}")
    return Path(out)
