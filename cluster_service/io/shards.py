"""The feature-shard contract (DESIGN §3): Parquet shards plus _manifest.json, one writer, one reader,
one validator.

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
the Parquet footers before they read any rows; `validate_shards` does the full check (hashes, every
row) and reports every problem it finds instead of stopping at the first.
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


def feature_type(d: int) -> pa.DataType:
    return pa.list_(pa.float32(), d)


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


def _ids_to_numpy(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    if pa.types.is_integer(col.type):
        return col.to_numpy().astype(np.int64, copy=False)
    return np.asarray(col.to_numpy(zero_copy_only=False), dtype=object)


def _labels_to_numpy(col: pa.ChunkedArray | pa.Array | None) -> np.ndarray | None:
    if col is None or col.null_count == len(col):
        return None
    if col.null_count:
        col = col.fill_null(-1)
    return col.to_numpy().astype(np.int64, copy=False)


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


# What an extractor record holds only as provenance: recorded in the manifest, never compared.
RECORD_ONLY = frozenset({"source", "checkpoint", "created", "rows", "path", "shards"})
# PCA provenance: the projection itself is identified by `params_sha256` (mean + components).
PCA_RECORD_ONLY = frozenset({"source_manifest_sha256", "params", "fit_rows", "seed", "explained_variance_ratio"})
FEATURE_SPACE_VERSION = 2  # 1: sha256 of d + the whole extractor block (paths included)


def feature_space(manifest: dict) -> dict:
    """The identity of a feature space: d and the extractor fields that define the features
    (method, backbone, head, checkpoint sha256, preprocessing, normalisation, PCA parameters'
    hash). Paths, row counts and dates are provenance: a model fitted on one image folder
    applies to features of another folder made by the same extractor."""
    extractor = dict(manifest.get("extractor") or {})
    space = {k: v for k, v in extractor.items() if k not in RECORD_ONLY}
    pca = space.get("pca")
    if isinstance(pca, dict):
        if "params_sha256" in pca:
            space["pca"] = {k: v for k, v in pca.items() if k not in PCA_RECORD_ONLY}
        else:  # written before the parameters were hashed: everything but the provenance
            space["pca"] = {k: v for k, v in pca.items() if k not in ("source_manifest_sha256", "params")}
    return {"d": manifest.get("d"), **space}


def feature_space_hash(manifest: dict) -> str:
    """sha256 of `feature_space(manifest)`: what a fitted model records and `assign` compares."""
    key = json.dumps(feature_space(manifest), sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()


def legacy_feature_space_hash(manifest: dict) -> str:
    """The version-1 hash (d + the whole extractor block, paths included); models written with it
    keep loading: `feature_space_mismatch` accepts either hash for them."""
    key = json.dumps({"d": manifest.get("d"), "extractor": manifest.get("extractor", {})}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()


def feature_space_mismatch(model_space: dict | None, model_hash: str | None, manifest: dict) -> str | None:
    """Why features described by `manifest` do not belong to a model's feature space, or None.

    A model that stores its feature-space block is compared field by field and the message names
    every differing field; a model that stores only a hash (version 1) matches shards whose new
    or legacy hash equals it. A model with neither (fitted on an array) accepts any shards."""
    space = feature_space(manifest)
    if model_space is not None:
        diff = sorted(k for k in set(space) | set(model_space) if space.get(k) != model_space.get(k))
        if not diff:
            return None
        shown = "; ".join(f"{k}: model {_short(model_space.get(k))}, shards {_short(space.get(k))}" for k in diff)
        return f"feature space differs in {', '.join(diff)} ({shown})"
    if model_hash is None or model_hash in (feature_space_hash(manifest), legacy_feature_space_hash(manifest)):
        return None
    return (f"feature space hash {feature_space_hash(manifest)[:12]} differs from the model's {model_hash[:12]} "
            "(the model predates field-level feature spaces, so the differing field is not known)")


def _short(value, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    problems = _manifest_problems(manifest, mpath.name)
    if problems:
        raise ShardError(f"{mpath}: " + "; ".join(p.message for p in problems))
    return manifest, feature_space_hash(manifest)


def _manifest_problems(manifest, name: str) -> list[Problem]:
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
    for problem in _schema_problems(schema, d, path.name):
        raise ShardError(str(problem))
    return schema


def _schema_problems(schema: pa.Schema, d: int, name: str) -> list[Problem]:
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
        col = table.column("feature")
        if col.null_count:
            row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise ShardError(f"{p} row {row}: feature is null")
        block = features[pos : pos + len(table)]
        block[:] = features_to_numpy(col)
        bad = nonfinite_rows(block)
        if bad.size:
            raise ShardError(f"{p} row {int(bad[0])}: feature contains NaN or Inf ({bad.size} bad row(s))")
        if table.column("id").null_count:
            row = int(np.flatnonzero(table.column("id").is_null().to_numpy(zero_copy_only=False))[0])
            raise ShardError(f"{p} row {row}: id is null")
        ids.append(_ids_to_numpy(table.column("id")))
        if has_label:
            lab = table.column("label") if "label" in table.column_names else pa.nulls(len(table), pa.int64())
            neg = np.flatnonzero(lab.fill_null(0).to_numpy() < 0) if lab.null_count < len(lab) else []
            if len(neg):
                row = int(neg[0])
                raise ShardError(f"{p} row {row}: label {lab[row].as_py()} is negative; labels are class "
                                 f"indices >= 0, or null when unknown ({len(neg)} such row(s))")
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
            yield FeatureBatch(_ids_to_numpy(rb.column("id")), x, labels, p.name, row)
            row += rb.num_rows


# ---------------------------------------------------------------------------------------- validation


def validate_shards(shard_dir: str | os.PathLike, max_rows_reported: int = 20) -> list[Problem]:
    """Check a shard directory completely and return every problem found (empty list: valid).

    Checks: manifest present and well-formed; shards missing from disk or on disk but not listed;
    unreadable (corrupt) files; sha256 and row count against the manifest; column types; d equal to
    the manifest's in every shard; null ids; ids of one type and unique across all shards; null
    features; NaN/Inf values. Row-level problems are listed per row, up to ``max_rows_reported`` per
    file and kind, followed by one problem giving the total."""
    shard_dir = Path(shard_dir)
    if not shard_dir.is_dir():
        return [Problem(str(shard_dir), "missing", "no such directory")]
    problems: list[Problem] = []
    manifest = None
    mpath = manifest_path(shard_dir)
    if not mpath.is_file():
        problems.append(Problem(MANIFEST, "manifest", "missing"))
    else:
        try:
            manifest = json.loads(mpath.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            problems.append(Problem(MANIFEST, "manifest", f"not valid JSON ({e})"))
        else:
            mp = _manifest_problems(manifest, MANIFEST)
            problems += mp
            if mp:
                manifest = None
    entries = {s["name"]: s for s in manifest["shards"]} if manifest else {}
    d = manifest["d"] if manifest else None
    on_disk = sorted(p.name for p in shard_dir.glob(SHARD_GLOB))
    for name in entries:
        if name not in on_disk:
            problems.append(Problem(name, "missing", f"listed in {MANIFEST} but not in the directory"))
    if manifest is not None:
        for name in on_disk:
            if name not in entries:
                problems.append(Problem(name, "unlisted", f"in the directory but not listed in {MANIFEST}"))
    names = [n for n in entries if n in on_disk] + [n for n in on_disk if n not in entries]

    id_types: dict[str, list[str]] = {}
    id_rows: list[tuple[str, np.ndarray, np.ndarray]] = []  # (file, non-null ids, their rows)
    for name in names:
        path = shard_dir / name
        entry = entries.get(name)
        if entry is not None and file_sha256(path) != entry["sha256"]:
            problems.append(Problem(name, "hash", f"sha256 differs from {MANIFEST} (changed after writing)"))
        try:
            pf = pq.ParquetFile(path)
            schema = pf.schema_arrow
            table = pf.read()
        except (pa.ArrowException, OSError) as e:
            problems.append(Problem(name, "corrupt", f"not a readable Parquet file ({e})"))
            continue
        if entry is not None and table.num_rows != entry["rows"]:
            problems.append(Problem(name, "rows", f"{table.num_rows} rows, {MANIFEST} says {entry['rows']}"))
        if table.num_rows == 0:
            problems.append(Problem(name, "empty", "0 rows; every shard must hold at least one row"))
        ref_d = d if d is not None else _feature_dim(schema)  # no manifest: mixed d is checked below
        problems += _schema_problems(schema, ref_d if ref_d is not None else -1, name)
        problems += _row_problems(table, name, max_rows_reported)
        if "id" in schema.names:
            t = schema.field("id").type
            id_types.setdefault("int64" if pa.types.is_integer(t) else "string", []).append(name)
            col = table.column("id")
            rows = np.flatnonzero(~col.is_null().to_numpy(zero_copy_only=False))
            id_rows.append((name, _ids_to_numpy(col.drop_null()), rows))

    if d is None:
        problems += _mixed_d_without_manifest(shard_dir, names)
    if len(id_types) > 1:
        problems.append(Problem(", ".join(id_types["string"][:3]), "id_type",
                                f"string ids here but int64 ids in {', '.join(id_types['int64'][:3])}"))
    else:
        problems += _duplicate_problems(id_rows, max_rows_reported)
    return problems


def _feature_dim(schema: pa.Schema) -> int | None:
    if "feature" in schema.names and pa.types.is_fixed_size_list(schema.field("feature").type):
        return schema.field("feature").type.list_size
    return None


def _mixed_d_without_manifest(shard_dir: Path, names: list[str]) -> list[Problem]:
    """Without a usable manifest there is no reference d; report shards whose d differs from the first."""
    dims = {}
    for name in names:
        try:
            dim = _feature_dim(pq.read_schema(shard_dir / name))
        except (pa.ArrowException, OSError):
            continue
        if dim is not None:
            dims[name] = dim
    if len(set(dims.values())) <= 1:
        return []
    ref_name, ref = next(iter(dims.items()))
    return [Problem(n, "d", f"feature dimension {v}, but {ref_name} has {ref}")
            for n, v in dims.items() if v != ref]


def _capped(rows: np.ndarray, name: str, kind: str, message: str, cap: int) -> list[Problem]:
    out = [Problem(name, kind, message, int(r)) for r in rows[:cap]]
    if rows.size > cap:
        out.append(Problem(name, kind, f"{rows.size} rows in all ({rows.size - cap} more not listed)"))
    return out


def _row_problems(table: pa.Table, name: str, cap: int) -> list[Problem]:
    out = []
    if "id" in table.column_names and table.column("id").null_count:
        rows = np.flatnonzero(table.column("id").is_null().to_numpy(zero_copy_only=False))
        out += _capped(rows, name, "null_id", "id is null (missing)", cap)
    if "label" in table.column_names and pa.types.is_integer(table.column("label").type):
        rows = np.flatnonzero(table.column("label").fill_null(0).to_numpy() < 0)
        out += _capped(rows, name, "label", "label is negative (class indices are >= 0, null if unknown)",
                       cap)
    if "feature" not in table.column_names:
        return out
    col = table.column("feature")
    is_null = col.is_null().to_numpy(zero_copy_only=False)
    if is_null.any():
        out += _capped(np.flatnonzero(is_null), name, "null_feature", "feature is null", cap)
    if pa.types.is_fixed_size_list(col.type) and pa.types.is_floating(col.type.value_type):
        x = features_to_numpy(col.filter(pa.array(~is_null)))  # (n valid, d)
        rows = np.flatnonzero(~is_null)[nonfinite_rows(x)]
        out += _capped(rows, name, "nonfinite", "feature contains NaN or Inf", cap)
    return out


def _duplicate_problems(id_rows: list[tuple[str, np.ndarray, np.ndarray]], cap: int) -> list[Problem]:
    """ids repeated anywhere in the directory; every occurrence reported with its file and row."""
    if not id_rows:
        return []
    v = np.concatenate([ids for _, ids, _ in id_rows])
    if v.size == 0:
        return []
    if v.dtype == object:
        v = v.astype(str)
    rows = np.concatenate([r for _, _, r in id_rows])
    files = np.repeat(np.arange(len(id_rows)), [len(ids) for _, ids, _ in id_rows])
    order = np.argsort(v, kind="stable")
    same = v[order][1:] == v[order][:-1]
    if not same.any():
        return []
    dup = np.zeros(v.size, bool)
    dup[1:] |= same
    dup[:-1] |= same
    idx = order[dup]
    msg = "id {!r} occurs more than once in the directory"
    out = [Problem(id_rows[files[i]][0], "duplicate_id", msg.format(v[i]), int(rows[i])) for i in idx[:cap]]
    if idx.size > cap:
        out.append(Problem("*", "duplicate_id",
                           f"{idx.size} rows with repeated ids in all ({idx.size - cap} more not listed)"))
    return out
