"""The full check of a shard directory (`cluster-service shards validate`): every problem with its file
and row, instead of a reader's first. The rules are the contract's (io/shards.py: manifest, footer
schema, row rules); this adds what a reader does not re-check on every read (sha256, unlisted files,
ids unique across all shards)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cluster_service.io.shards import (
    MANIFEST,
    SHARD_GLOB,
    Problem,
    file_sha256,
    ids_to_numpy,
    manifest_path,
    manifest_problems,
    row_defect_message,
    row_defects,
    schema_problems,
)


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
            mp = manifest_problems(manifest, MANIFEST)
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
        problems += schema_problems(schema, ref_d if ref_d is not None else -1, name)
        problems += _row_problems(table, name, max_rows_reported)
        if "id" in schema.names:
            t = schema.field("id").type
            id_types.setdefault("int64" if pa.types.is_integer(t) else "string", []).append(name)
            col = table.column("id")
            rows = np.flatnonzero(~col.is_null().to_numpy(zero_copy_only=False))
            id_rows.append((name, ids_to_numpy(col.drop_null()), rows))

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


def _row_problems(table: pa.Table, name: str, cap: int) -> list[Problem]:
    """Every row that breaks a row rule (shards.row_defects, what readers refuse), capped per kind."""
    out = []
    for kind, rows in row_defects(table).items():
        out += [Problem(name, kind, row_defect_message(table, kind, int(r)), int(r)) for r in rows[:cap]]
        if rows.size > cap:
            out.append(Problem(name, kind, f"{rows.size} rows in all ({rows.size - cap} more not listed)"))
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
