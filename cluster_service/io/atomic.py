"""The one way this project writes files: under a temporary name in the target's directory, then
renamed into place, so a reader (or a re-run after a crash) sees the old file or the new one,
never half of one.

    with atomic_path(path) as tmp:      write anything to `tmp` (a file path), then it is renamed
    with atomic_dir(path) as tmp:       fill the directory `tmp`, then it replaces `path` whole
    write_text_atomic / write_bytes_atomic / write_parquet_atomic / write_json_atomic
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq

TMP_MARK = ".tmp-"  # temporary names: .NAME.tmp-PID; a killed writer's leftovers match ".*.tmp-*"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file path beside `path`; renamed to `path` when the block ends without an error,
    removed when it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling directory; when the block ends without an error it replaces `path` (an old
    directory there is moved aside first and removed after), else it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{TMP_MARK}", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_bytes_atomic(data: bytes, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    return write_bytes_atomic(text.encode(), path)


def write_json_atomic(obj, path: str | os.PathLike, indent: int | None = 2) -> Path:
    return write_text_atomic(json.dumps(obj, indent=indent, default=str) + "\n", path)


def write_parquet_atomic(table, path: str | os.PathLike, **kwargs) -> Path:
    """A pyarrow Table as Parquet (zstd unless `compression` is given)."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **{"compression": "zstd", **kwargs})
    return Path(path)
