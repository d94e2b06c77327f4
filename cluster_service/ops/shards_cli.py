"""`cluster-service shards ...`: import an array file or table as a shard directory, and check one.
Registered on `ops.cli_app.app`; `ops.cli` imports this module."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cluster_service.ops.cli_app import app, console, out

shards_app = typer.Typer(no_args_is_help=True, help="Feature-shard directories (Parquet + _manifest.json).")
app.add_typer(shards_app, name="shards")


@shards_app.command("import")
def shards_import(
    src: Annotated[Path, typer.Argument(help=".npy / .npz (X, optional y) or a .parquet / .csv table")],
    out_dir: Annotated[Path, typer.Option("--out", help="shard directory to write (must be empty)")],
    rows_per_shard: Annotated[int | None, typer.Option(help="rows per shard (default 65536)")] = None,
) -> None:
    """Turn an array file or a table into a shard directory (what `fit --workers`, `assign` and the
    jobs read). Tables: a `feature` list column or numeric columns; optional `id` and `label`."""
    from cluster_service.io.features import import_features

    manifest = import_features(src, out_dir, rows_per_shard)
    out.print(f"{out_dir}: {manifest['rows']} rows in {len(manifest['shards'])} shard(s), d={manifest['d']}",
              soft_wrap=True)


@shards_app.command("validate")
def shards_validate(
    shard_dir: Annotated[Path, typer.Argument(help="directory of Parquet feature shards (with _manifest.json)")],
) -> None:
    """Check a shard directory completely; print every problem (file, row, what), exit 1 if any."""
    from cluster_service.io.shard_validation import validate_shards

    problems = validate_shards(shard_dir)
    for p in problems:
        out.print(str(p), markup=False, highlight=False, soft_wrap=True)
    if problems:
        console.print(f"[bold red]{len(problems)} problem(s)[/] in {shard_dir}")
        raise typer.Exit(1)
    from cluster_service.io.shards import load_manifest

    manifest, _ = load_manifest(shard_dir)
    out.print(f"{shard_dir}: valid — {manifest.get('rows')} rows in {len(manifest['shards'])} shard(s), "
              f"d={manifest['d']}", soft_wrap=True)
