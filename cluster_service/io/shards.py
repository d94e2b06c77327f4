"""The feature-shard contract (DESIGN §3): Parquet shards plus _manifest.json, its format, one writer
and the readers. The full check of a directory is io/shard_validation.py; what identifies the
feature space is io/feature_space.py.

A shard directory holds ``part-00000.parquet, part-00001.parquet, ...`` and ``_manifest.json``.
Each shard has the columns

    id       int64 or string           unique across the whole directory
    feature  fixed_size_list<float32>[d]   d identical in every shard
    label    int64, nullable (optional)    ground truth, used by `evaluate` only
    path     string, nullable (optional)   source image

and is written zstd-compressed with one row group per <= 65,536 rows, under a temporary name that is
renamed into place; _manifest.json is written last, the same way, so a directory with a manifest is
complete. The manifest records ``schema_version, d, shards [{name, rows, sha256}], extractor,
created``.

Readers (`read_feature_table`, `iter_feature_batches`) check the manifest against the directory and
the Parquet footers before they read any rows, and refuse the first bad row (`row_defects`, the
row rules `validate_shards` lists in full).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cluster_service.io.atomic import atomic_path, write_bytes_atomic
from cluster_service.io.checks import nonfinite_rows
from cluster_service.io.feature_space import feature_space, feature_space_hash

SCHEMA_VERSION = 1
# Sidecar files are named the Hive way (a leading underscore), so pandas, pyarrow.dataset, DuckDB and
# Spark open a shard directory as a Parquet data set; directories written before keep `manifest.json`,
# which every reader here still accepts (`manifest_path`).
MANIFEST = "_manifest.json"
LEGACY_MANIFEST = "manifest.json"


def manifest_path(shard_dir: str | os.PathLike) -> Path:
    """The manifest of a shard directory: `_manifest.json`, else the older `manifest.json` when only
    that one exists (the new name when neither does)."""
    shard_dir = Path(shard_dir)
    new, old = shard_dir / MANIFEST, shard_dir / LEGACY_MANIFEST
    return old if old.is_file() and not new.is_file() else new
MAX_ROW_GROUP = 65_536
SHARD_GLOB = "*.parquet"
# Float features: no dictionary (it never pays off and is abandoned mid-page), byte-stream-split so zstd
# sees the exponent bytes together: ~10% smaller and ~20% faster to read than the defaults.
FEATURE_ENCODING = {"use_dictionary": ["id", "label", "path"],
                    "use_byte_stream_split": ["feature.list.element"]}


class ShardError(ValueError):
    """A shard directory that breaks the contract; the message names the file (and row) and what was
    expected."""


@dataclass(frozen=True)
class Problem:
    """One violation found by `validate_shards`. ``row`` is the 0-based row within ``file``."""

    file: str
    kind: str  # manifest | missing | unlisted | corrupt | hash | rows | schema | d | id_type | null_id
    #            | duplicate_id | null_feature | nonfinite | empty | label
    message: str
    row: int | None = None

    def __str__(self) -> str:
        where = self.file if self.row is None else f"{self.file} row {self.row}"
        return f"{where}: [{self.kind}] {self.message}"


@dataclass
class FeatureTable:
    """The rows of one rank's shards, in manifest order."""

    ids: np.ndarray  # (n,) int64, or object array of str
    features: np.ndarray  # (n, d) float32, C-contiguous, writable
    labels: np.ndarray | None  # (n,) int64 (-1 where a label is null), None when there are none
    manifest_hash: str  # feature_space_hash(manifest)
    manifest: dict
    shards: list[Path]

    @property
    def feature_space(self) -> dict:
        return feature_space(self.manifest)


@dataclass
class FeatureBatch:
    """One streamed record batch; ``features`` is a zero-copy view of the Arrow buffer (read-only)."""

    ids: np.ndarray  # (b,)
    features: np.ndarray | object  # (b, d) float32 numpy array, or torch tensor with as_torch=True
    labels: np.ndarray | None  # (b,) int64, -1 where null
    shard: str
    first_row: int  # row of ids[0] within its shard


# ---------------------------------------------------------------------------------------- helpers


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def features_to_numpy(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """fixed_size_list<float32>[d] column -> (n, d) float32 without per-row Python.

    A single chunk is a zero-copy, read-only view; several chunks are copied once into a new array.
    Raises ShardError on null rows (they would silently shift every later row)."""
    if isinstance(arr, pa.ChunkedArray):
        if arr.num_chunks == 1:
            return features_to_numpy(arr.chunk(0))
        d = arr.type.list_size
        out = np.empty((len(arr), d), dtype=np.float32)
        pos = 0
        for chunk in arr.chunks:
            out[pos : pos + len(chunk)] = features_to_numpy(chunk)
            pos += len(chunk)
        return out
    if arr.null_count:
        raise ShardError(f"feature column has {arr.null_count} null row(s)")
    d = arr.type.list_size
    flat = arr.flatten().to_numpy(zero_copy_only=True)  # honours the array's offset
    return flat.reshape(len(arr), d)


def ids_to_numpy(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    if pa.types.is_integer(col.type):
        return col.to_numpy().astype(np.int64, copy=False)
    return np.asarray(col.to_numpy(zero_copy_only=False), dtype=object)


def _labels_to_numpy(col: pa.ChunkedArray | pa.Array | None) -> np.ndarray | None:
    if col is None or col.null_count == len(col):
        return None
    if col.null_count:
        col = col.fill_null(-1)
    return col.to_numpy().astype(np.int64, copy=False)


# What a row may not be, in the order a reader reports it (a reader stops at the first; validate_shards
# lists them all).
ROW_RULES = {
    "null_feature": "feature is null",
    "nonfinite": "feature contains NaN or Inf",
    "null_id": "id is null",
    "label": "label {value} is negative; labels are class indices >= 0, or null when unknown",
}


def row_defects(table: pa.Table) -> dict[str, np.ndarray]:
    """kind (a ROW_RULES key) -> rows (m,) of `table` that break that rule, ascending; kinds without a
    bad row are left out. Checks the columns the table has: null or NaN/Inf features, null ids,
    negative labels."""
    out = {}
    names = table.column_names
    if "feature" in names:
        col = table.column("feature")
        is_null = col.is_null().to_numpy(zero_copy_only=False)
        out["null_feature"] = np.flatnonzero(is_null)
        if pa.types.is_fixed_size_list(col.type) and pa.types.is_floating(col.type.value_type):
            valid = col.filter(pa.array(~is_null)) if is_null.any() else col
            out["nonfinite"] = np.flatnonzero(~is_null)[nonfinite_rows(features_to_numpy(valid))]
    if "id" in names and table.column("id").null_count:
        out["null_id"] = np.flatnonzero(table.column("id").is_null().to_numpy(zero_copy_only=False))
    if "label" in names and pa.types.is_integer(table.column("label").type):
        out["label"] = np.flatnonzero(table.column("label").fill_null(0).to_numpy() < 0)
    return {kind: rows for kind, rows in out.items() if rows.size}


def row_defect_message(table: pa.Table, kind: str, row: int) -> str:
    """ROW_RULES[kind] for one row of `table` (a negative label names its value)."""
    value = table.column("label")[row].as_py() if kind == "label" else None
    return ROW_RULES[kind].format(value=value)


# ---------------------------------------------------------------------------------------- writing


class ShardWriter:
    """Stream rows into shards of ``rows_per_shard`` rows; `close` writes _manifest.json.

    Use as a context manager; on an exception the manifest is not written, so the directory is not
    mistaken for a complete one. Refuses a directory that already holds shards or a manifest."""

    def __init__(
        self,
        out_dir: str | os.PathLike,
        d: int,
        rows_per_shard: int = MAX_ROW_GROUP,
        extractor: dict | None = None,
    ):
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
        if d < 1:
            raise ValueError(f"feature dimension d must be >= 1, got {d}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        existing = sorted(p.name for p in self.out_dir.glob(SHARD_GLOB)) + (
            [manifest_path(self.out_dir).name] if manifest_path(self.out_dir).exists() else []
        )
        if existing:
            raise ShardError(
                f"{self.out_dir}: already holds {existing[:3]}{'...' if len(existing) > 3 else ''}; "
                "write shards to an empty directory"
            )
        self.d = d
        self.rows_per_shard = rows_per_shard
        self.extractor = dict(extractor or {})
        self.shards: list[dict] = []
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._id_type: pa.DataType | None = None
        self._has_labels: bool | None = None
        self._has_paths: bool | None = None
        self.manifest: dict | None = None

    def add(self, ids, features, labels=None, paths=None) -> None:
        """Append rows. ids (n,) int or str; features (n, d); labels (n,) int or None; paths (n,) or None.
        Whether labels/paths are given must be the same on every call."""
        features = np.ascontiguousarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[1] != self.d:
            raise ShardError(f"features: expected shape (n, {self.d}), got {features.shape}")
        n = features.shape[0]
        bad = nonfinite_rows(features)
        if bad.size:
            raise ShardError(f"features row {int(bad[0])} (of this batch) contains NaN or Inf")
        ids = np.asarray(ids)
        if ids.shape != (n,):
            raise ShardError(f"ids: expected shape ({n},), got {ids.shape}")
        if np.issubdtype(ids.dtype, np.integer):
            id_arr = pa.array(ids.astype(np.int64))
        else:
            id_arr = pa.array([str(i) for i in ids], pa.string())
        if self._id_type is None:
            self._id_type = id_arr.type
        elif id_arr.type != self._id_type:
            raise ShardError(f"ids: got {id_arr.type} after {self._id_type}; ids must have one type")
        for name, value, seen in (("labels", labels, self._has_labels), ("paths", paths, self._has_paths)):
            if seen is not None and seen != (value is not None):
                raise ShardError(f"{name}: given in some batches and not in others")
        self._has_labels, self._has_paths = labels is not None, paths is not None
        flat = pa.array(features.reshape(-1))
        cols = {"id": id_arr, "feature": pa.FixedSizeListArray.from_arrays(flat, self.d)}
        if labels is not None:
            cols["label"] = _label_array(labels, n)
        if paths is not None:
            if len(paths) != n:
                raise ShardError(f"paths: expected {n} entries, got {len(paths)}")
            cols["path"] = pa.array([None if p is None else str(p) for p in paths], pa.string())
        self._pending.append(pa.table(cols))
        self._pending_rows += n
        while self._pending_rows >= self.rows_per_shard:
            self._flush(self.rows_per_shard)

    def _flush(self, rows: int) -> None:
        table = pa.concat_tables(self._pending).combine_chunks()
        head, rest = table.slice(0, rows), table.slice(rows)
        self._pending = [rest] if len(rest) else []
        self._pending_rows = len(rest)
        name = shard_name(len(self.shards))
        path = self.out_dir / name
        with atomic_path(path) as tmp:
            pq.write_table(head, tmp, compression="zstd", row_group_size=min(rows, MAX_ROW_GROUP),
                           **FEATURE_ENCODING)
            digest = file_sha256(tmp)
        self.shards.append({"name": name, "rows": int(rows), "sha256": digest})

    def close(self) -> dict:
        """Write the last partial shard and _manifest.json; return the manifest."""
        if self._pending_rows:
            self._flush(self._pending_rows)
        self.manifest = {
            "schema_version": SCHEMA_VERSION,
            "d": self.d,
            "rows": int(sum(s["rows"] for s in self.shards)),
            "id_type": str(self._id_type) if self._id_type is not None else None,
            "shards": self.shards,
            "extractor": self.extractor,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_bytes_atomic((json.dumps(self.manifest, indent=2) + "\n").encode(), self.out_dir / MANIFEST)
        return self.manifest

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


def _label_array(labels, n: int) -> pa.Array:
    """labels (n,) as int64 Arrow: a numpy int array, a list with None for unknown labels, or an
    Arrow array (nulls kept: an unknown label stays null, never becomes -1)."""
    if isinstance(labels, pa.ChunkedArray):
        labels = labels.combine_chunks()
    if isinstance(labels, pa.Array):
        arr = labels.cast(pa.int64())
    else:
        values = np.asarray(labels)
        arr = pa.array(values.tolist() if values.dtype == object else values.astype(np.int64), pa.int64())
    if len(arr) != n or (not isinstance(labels, pa.Array) and np.ndim(labels) != 1):
        raise ShardError(f"labels: expected shape ({n},), got {np.shape(labels)}")
    return arr


def write_shards(
    out_dir: str | os.PathLike,
    ids,
    features,
    labels=None,
    paths=None,
    rows_per_shard: int = MAX_ROW_GROUP,
    extractor: dict | None = None,
) -> dict:
    """Write in-memory rows as shards + _manifest.json into an empty ``out_dir``; return the manifest.

    ids (n,) int or str, unique; features (n, d) float; labels (n,) int or None; paths (n,) or None."""
    features = np.asarray(features)
    if features.ndim != 2:
        raise ShardError(f"features: expected a 2-D array (n, d), got shape {features.shape}")
    ids = np.asarray(ids)
    if (dup := first_duplicate(ids)) is not None:
        raise ShardError(f"ids: {dup[0]!r} occurs {dup[1]} times; ids must be unique")
    writer = ShardWriter(out_dir, features.shape[1], rows_per_shard, extractor)
    writer.add(ids, features, labels, paths)
    return writer.close()


# ---------------------------------------------------------------------------------------- reading


def load_manifest(shard_dir: str | os.PathLike) -> tuple[dict, str]:
    """Parse and structurally check _manifest.json; return (manifest, its feature_space_hash).

    The hash identifies the feature space (d + extractor), not the file's bytes: it is what a
    fitted model records and what `assign` compares with new shards."""
    shard_dir = Path(shard_dir)
    mpath = manifest_path(shard_dir)
    if not shard_dir.is_dir():
        raise FileNotFoundError(f"{shard_dir}: no such shard directory")
    if not mpath.is_file():
        raise ShardError(f"{mpath}: missing; a shard directory needs the manifest written with its shards")
    raw = mpath.read_bytes()
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{mpath}: not valid JSON ({e})") from e
    problems = manifest_problems(manifest, mpath.name)
    if problems:
        raise ShardError(f"{mpath}: " + "; ".join(p.message for p in problems))
    return manifest, feature_space_hash(manifest)


def manifest_problems(manifest, name: str) -> list[Problem]:
    if not isinstance(manifest, dict):
        return [Problem(name, "manifest", "expected a JSON object")]
    out = []
    for key in ("schema_version", "d", "shards"):
        if key not in manifest:
            out.append(Problem(name, "manifest", f"missing key {key!r}"))
    if out:
        return out
    if manifest["schema_version"] != SCHEMA_VERSION:
        out.append(Problem(name, "manifest", f"schema_version {manifest['schema_version']!r}, "
                                             f"this reader understands {SCHEMA_VERSION}"))
    d = manifest["d"]
    if not isinstance(d, int) or isinstance(d, bool) or d < 1:
        out.append(Problem(name, "manifest", f"d must be a positive integer, got {d!r}"))
    shards = manifest["shards"]
    if not isinstance(shards, list):
        return out + [Problem(name, "manifest", "'shards' must be a list")]
    seen = set()
    for i, s in enumerate(shards):
        if not (isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("rows"), int)
                and isinstance(s.get("sha256"), str)):
            out.append(Problem(name, "manifest",
                               f"shards[{i}] must be {{name: str, rows: int, sha256: str}}, got {s!r}"))
        elif s["name"] in seen or "/" in s["name"] or os.sep in s["name"]:
            out.append(Problem(name, "manifest", f"shards[{i}] name {s['name']!r} is repeated or not a "
                                                 "plain file name"))
        else:
            seen.add(s["name"])
    return out


def list_shards(shard_dir: str | os.PathLike, rank: int = 0, world_size: int = 1) -> list[Path]:
    """The shard files of worker ``rank``: manifest entry i goes to rank i % world_size."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    manifest, _ = load_manifest(shard_dir)
    return [Path(shard_dir) / s["name"] for s in manifest["shards"][rank::world_size]]


def _check_footer(path: Path, entry: dict, d: int) -> pa.Schema:
    """Cheap pre-read check of one shard: exists, is Parquet, rows and schema match the manifest."""
    if not path.is_file():
        raise ShardError(f"{path}: listed in {MANIFEST} but missing")
    try:
        meta = pq.read_metadata(path)
        schema = meta.schema.to_arrow_schema()
    except (pa.ArrowException, OSError) as e:
        raise ShardError(f"{path}: not a readable Parquet file ({e})") from e
    if meta.num_rows != entry["rows"]:
        raise ShardError(f"{path}: {meta.num_rows} rows, {MANIFEST} says {entry['rows']}")
    for problem in schema_problems(schema, d, path.name):
        raise ShardError(str(problem))
    return schema


def schema_problems(schema: pa.Schema, d: int, name: str) -> list[Problem]:
    out = []
    if "id" not in schema.names:
        out.append(Problem(name, "schema", "no 'id' column"))
    else:
        t = schema.field("id").type
        if not (pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)):
            out.append(Problem(name, "schema", f"column 'id' is {t}, expected int64 or string"))
    if "feature" not in schema.names:
        out.append(Problem(name, "schema", "no 'feature' column"))
    else:
        t = schema.field("feature").type
        if not (pa.types.is_fixed_size_list(t) and t.value_type == pa.float32()):
            expected = f"fixed_size_list<float32>[{d}]"
            out.append(Problem(name, "schema", f"column 'feature' is {t}, expected {expected}"))
        elif t.list_size != d:
            out.append(Problem(name, "d", f"feature dimension {t.list_size}, manifest says d={d}"))
    if "label" in schema.names and not pa.types.is_integer(schema.field("label").type):
        out.append(Problem(name, "schema", f"column 'label' is {schema.field('label').type}, expected int64"))
    if "path" in schema.names:
        t = schema.field("path").type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)):
            out.append(Problem(name, "schema", f"column 'path' is {t}, expected string"))
    return out


def _checked_shards(shard_dir, rank: int, world_size: int) -> tuple[dict, str, list[Path], bool]:
    manifest, mhash = load_manifest(shard_dir)
    paths = list_shards(shard_dir, rank, world_size)
    entries = {s["name"]: s for s in manifest["shards"]}
    has_label = False
    for p in paths:
        schema = _check_footer(p, entries[p.name], manifest["d"])
        has_label |= "label" in schema.names
    return manifest, mhash, paths, has_label


def read_feature_table(shard_dir: str | os.PathLike, rank: int = 0, world_size: int = 1) -> FeatureTable:
    """All rows of rank's shards in memory. Validates the manifest and footers first; raises ShardError
    naming file and row for null features, NaN/Inf, null ids or ids repeated within these shards."""
    manifest, mhash, paths, has_label = _checked_shards(shard_dir, rank, world_size)
    listed = {s["name"] for s in manifest["shards"]}
    unlisted = sorted(p.name for p in Path(shard_dir).glob(SHARD_GLOB) if p.name not in listed)
    if unlisted:  # its rows would silently be left out of the fit
        raise ShardError(f"{Path(shard_dir) / unlisted[0]}: in the directory but not listed in {MANIFEST} "
                         f"({len(unlisted)} such file(s)); list it in the manifest or move it elsewhere")
    d = manifest["d"]
    n = sum(pq.read_metadata(p).num_rows for p in paths)
    features = np.empty((n, d), dtype=np.float32)
    ids, labels = [], []
    pos = 0
    for p in paths:
        cols = ["id", "feature"] + (["label"] if has_label else [])
        try:
            table = pq.read_table(p, columns=[c for c in cols if c in pq.read_schema(p).names])
        except (pa.ArrowException, OSError) as e:
            raise ShardError(f"{p}: not a readable Parquet file ({e})") from e
        if len(table) == 0:
            raise ShardError(f"{p}: 0 rows; every shard must hold at least one row (drop it from {MANIFEST})")
        for kind, rows in row_defects(table).items():  # the first rule broken, at its first row
            raise ShardError(f"{p} row {int(rows[0])}: {row_defect_message(table, kind, int(rows[0]))} "
                             f"({rows.size} such row(s))")
        features[pos : pos + len(table)] = features_to_numpy(table.column("feature"))
        ids.append(ids_to_numpy(table.column("id")))
        if has_label:
            lab = table.column("label") if "label" in table.column_names else pa.nulls(len(table), pa.int64())
            labels.append(lab.fill_null(-1).to_numpy().astype(np.int64) if lab.null_count < len(lab)
                          else np.full(len(table), -1, np.int64))
        pos += len(table)
    ids_arr = np.concatenate(ids) if ids else np.empty(0, np.int64)
    if len(paths) and len({a.dtype for a in ids}) > 1:
        raise ShardError(f"{shard_dir}: ids are int64 in some shards and string in others")
    _raise_on_duplicates(ids_arr, ids, paths)
    label_arr = np.concatenate(labels) if labels else None
    if label_arr is not None and (label_arr == -1).all():
        label_arr = None
    return FeatureTable(ids_arr, features, label_arr, mhash, manifest, paths)


def first_duplicate(ids: np.ndarray) -> tuple[object, int] | None:
    """(the smallest repeated id, how often it occurs), or None when ids (n,) are unique."""
    uniq, counts = np.unique(ids, return_counts=True)
    if not (counts > 1).any():
        return None
    i = np.flatnonzero(counts > 1)[0]
    dup = uniq[i]
    return (dup.item() if isinstance(dup, np.generic) else dup), int(counts[i])  # 12, not np.int64(12)


def _raise_on_duplicates(ids_arr: np.ndarray, per_shard: list[np.ndarray], paths: list[Path]) -> None:
    if (found := first_duplicate(ids_arr)) is None:
        return
    dup = found[0]
    where = [f"{p.name} row {int(r)}"
             for p, a in zip(paths, per_shard, strict=True) for r in np.flatnonzero(a == dup)]
    raise ShardError(f"id {dup!r} occurs more than once ({', '.join(where[:4])}); ids must be unique")


def read_id_column(shard_dir: str | os.PathLike, column: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(ids (n,), values (n,)) of one non-feature column of every shard in manifest order, reading only
    `id` and that column: `label` int64 (-1 where null), `path` object ("" where null). None when a
    shard has no such column."""
    ids, values = [], []
    for p in list_shards(shard_dir):
        if column not in pq.read_schema(p).names:
            return None
        t = pq.read_table(p, columns=["id", column])
        ids.append(t.column("id").to_numpy(zero_copy_only=False))
        col = t.column(column).fill_null(-1 if column == "label" else "")
        values.append(col.to_numpy(zero_copy_only=False))
    if not ids:
        return np.empty(0, np.int64), np.empty(0, np.int64 if column == "label" else object)
    values = np.concatenate(values)
    return np.concatenate(ids), values.astype(np.int64) if column == "label" else values.astype(object)


def iter_feature_batches(
    shard_dir: str | os.PathLike,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = MAX_ROW_GROUP,
    as_torch: bool = False,
    with_labels: bool = False,
) -> Iterator[FeatureBatch]:
    """Stream rank's shards as float32 batches (numpy, or torch with ``as_torch``) of <= batch_size rows.

    No per-row Python: the fixed_size_list column is flattened per record batch and reshaped, a
    zero-copy view of the Arrow buffer. The views are read-only; copy before writing into them."""
    import pyarrow.dataset as ds

    manifest, _, paths, has_label = _checked_shards(shard_dir, rank, world_size)
    cols = ["id", "feature"] + (["label"] if with_labels and has_label else [])
    for p in paths:
        fragment_cols = [c for c in cols if c in pq.read_schema(p).names]
        row = 0
        for rb in ds.dataset(p, format="parquet").to_batches(columns=fragment_cols, batch_size=batch_size):
            try:
                x = features_to_numpy(rb.column("feature"))
            except ShardError as e:
                raise ShardError(f"{p} rows {row}..{row + rb.num_rows - 1}: {e}") from None
            if as_torch:
                import torch

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # read-only buffer; we never write to it
                    x = torch.from_numpy(x)
            labels = _labels_to_numpy(rb.column("label")) if "label" in fragment_cols else None
            yield FeatureBatch(ids_to_numpy(rb.column("id")), x, labels, p.name, row)
            row += rb.num_rows
