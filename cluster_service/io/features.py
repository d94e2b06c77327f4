"""Loading feature matrices for `fit` and `evaluate`: .npy / .npz files or Parquet shard dirs."""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cluster_service.io.checks import check_features


class DataError(ValueError):
    """Bad input data; the message names the file (and row or column) and what was expected."""


@dataclass
class FeatureSet:
    ids: np.ndarray  # (n,) int64 or str
    x: np.ndarray  # (n, d) float32
    labels: np.ndarray | None  # (n,) int64
    manifest_hash: str | None = None
    source: str = ""
    feature_space: dict | None = None  # io.feature_space of the manifest; None for arrays


def load_features(path: str | os.PathLike) -> FeatureSet:
    """Read X (and optional labels y) from .npy, .npz (arrays X/x and optional y/labels/label), a
    table (.parquet or .csv: a `feature` list column or the numeric columns; optional `id`, `label`)
    or a directory of Parquet feature shards (DESIGN §3)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or directory")
    if p.is_dir():
        from cluster_service.io.shards import read_feature_table

        t = read_feature_table(p)
        return FeatureSet(t.ids, t.features, t.labels, t.manifest_hash, str(p), t.feature_space)
    if p.stat().st_size == 0:  # numpy raises a bare EOFError, which click takes for Ctrl-D ("Aborted.")
        raise DataError(f"{p}: empty file (0 bytes); expected a .npy, .npz, .parquet or .csv file")
    if p.suffix in (".parquet", ".csv"):
        return _load_table(p)
    if p.suffix == ".npy":
        try:
            x = np.load(p, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise DataError(f"{p}: not a readable .npy array ({e})") from e
        labels = None
    elif p.suffix == ".npz":
        try:
            z = np.load(p, allow_pickle=False)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(f"{p}: not a readable .npz archive ({e})") from e
        key = next((k for k in ("X", "x", "features") if k in z.files), None)
        if key is None:
            raise DataError(f"{p}: expected an array named X (or x, features); found {z.files}")
        x = z[key]
        lk = next((k for k in ("y", "labels", "label") if k in z.files), None)
        labels = z[lk] if lk else None
    else:
        raise DataError(f"{p}: expected a .npy, .npz, .parquet or .csv file or a directory of Parquet shards")
    if x.ndim != 2:
        raise DataError(f"{p}: expected a 2-D array (n_samples, n_features), got shape {x.shape}")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (x.shape[0],):
            raise DataError(f"{p}: labels have shape {labels.shape}, expected ({x.shape[0]},) to match X")
        labels = labels.astype(np.int64)
    check_features(x, str(p), min_rows=1, error=DataError)
    return FeatureSet(np.arange(x.shape[0], dtype=np.int64), x.astype(np.float32), labels, None, str(p))


def read_column(path: str | os.PathLike, column: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(ids (n,), values (n,)) of the data's `label` (int64, -1 where unknown) or `path` (object, ""
    where unknown) for every row: from a shard directory only those two columns are read; array
    files and tables have labels but no paths. None when the data has no such column, or when
    every label is unknown. Evaluation and the report read labels through here; training never does."""
    p = Path(path)
    if p.is_dir():
        from cluster_service.io.shards import read_id_column

        found = read_id_column(p, column)
    elif column == "label":
        feats = load_features(p)
        found = None if feats.labels is None else (feats.ids, feats.labels)
    else:
        found = None
    if found is not None and column == "label" and (found[1] < 0).all():
        return None
    return found


def data_column(data: str | os.PathLike | None, ids: np.ndarray, column: str) -> np.ndarray | None:
    """The data's `path` (object, "" where unknown) or `label` (int64, -1 where unknown) of every
    row of `ids` (n,), joined by id; None when the data is not given, gone, or has no such column
    (`read_column`: paths come from shard directories only, labels also from array files and tables)."""
    missing = "" if column == "path" else -1
    if not data or not Path(data).exists():
        return None
    found = read_column(data, column)
    if found is None:
        return None
    all_ids, values = found
    order = np.argsort(all_ids, kind="stable")
    pos = np.clip(np.searchsorted(all_ids[order], ids), 0, all_ids.size - 1)
    out = values[order][pos]
    out[all_ids[order][pos] != ids] = missing
    return out


def read_labels(path: str | os.PathLike) -> np.ndarray | None:
    """The data's labels (n,) int64 in row order (-1 where unknown), or None (`read_column`)."""
    found = read_column(path, "label")
    return None if found is None else found[1]


def head_rows(path: str | os.PathLike, n: int) -> np.ndarray:
    """The first `n` rows (n, d) float32 of a data file or shard directory, in global row order,
    without reading the rest of a shard directory."""
    p = Path(path)
    if not p.is_dir():
        return load_features(p).x[:n]
    from cluster_service.io.shards import iter_feature_batches

    parts, got = [], 0
    for batch in iter_feature_batches(p):
        parts.append(np.array(batch.features[: n - got]))
        got += len(parts[-1])
        if got >= n:
            break
    return np.concatenate(parts) if parts else np.empty((0, 0), np.float32)


def _load_table(p: Path) -> FeatureSet:
    """A feature table: `id` (optional; default row numbers), `label` (optional), and either one
    `feature` column of fixed-size lists or every other numeric column as a feature."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p) if p.suffix == ".parquet" else pcsv.read_csv(p)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{p}: not a readable {p.suffix[1:]} table ({e})") from e
    names = table.column_names
    if "feature" in names:
        from cluster_service.io.shards import features_to_numpy

        x = features_to_numpy(table.column("feature"))
    else:
        cols = [n for n in names if n not in ("id", "label", "path")]
        bad = [n for n in cols if not pa.types.is_integer(table.schema.field(n).type)
               and not pa.types.is_floating(table.schema.field(n).type)]
        if not cols or bad:
            raise DataError(f"{p}: expected a 'feature' list column or numeric feature columns; "
                            f"non-numeric column(s): {bad or 'none found'}")
        x = np.column_stack([table.column(n).to_numpy(zero_copy_only=False) for n in cols]).astype(np.float64)
    ids = table.column("id").to_numpy(zero_copy_only=False) if "id" in names else np.arange(len(x), dtype=np.int64)
    labels = None
    if "label" in names:
        labels = table.column("label").fill_null(-1).to_numpy().astype(np.int64)
    check_features(x, str(p), min_rows=1, error=DataError)
    return FeatureSet(ids, x.astype(np.float32), labels, None, str(p))


def import_features(src: str | os.PathLike, out_dir: str | os.PathLike, rows_per_shard: int | None = None) -> dict:
    """Write any input `load_features` reads (array file or table) as a shard directory; returns the
    manifest. Labels stay a `label` column; ids are the table's `id` column or the row numbers."""
    import pyarrow as pa

    from cluster_service.io.shards import MAX_ROW_GROUP, write_shards

    feats = load_features(src)
    labels = None if feats.labels is None else pa.array(feats.labels, pa.int64(), mask=feats.labels < 0)
    return write_shards(out_dir, feats.ids, feats.x, labels, rows_per_shard=rows_per_shard or MAX_ROW_GROUP,
                        extractor={"method": "import", "source": str(src)})


def shard_dir_for(src: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """The shard directory of an input: `src` itself when it is one, else the array or table file
    imported as shards into a fresh `.OUT.input-shards` directory beside `out_dir` (what `assign`
    reads)."""
    import shutil

    src, out_dir = Path(src), Path(out_dir)
    if not src.is_file():
        return src
    staged = out_dir.parent / f".{out_dir.name}.input-shards"
    shutil.rmtree(staged, ignore_errors=True)
    import_features(src, staged)
    return staged
