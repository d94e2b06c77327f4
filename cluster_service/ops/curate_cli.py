"""The curation commands of `cluster-service` (duplicates, outliers, sample, export): what people do
with a run's clusters. Registered on `ops.cli_app.app`; `ops.cli` imports this module, so
`cluster-service` has them; each command parses arguments and calls `cluster_service.curate`."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from cluster_service.config import DUPLICATE_THRESHOLD, NOVELTY_FPR
from cluster_service.io import runs
from cluster_service.ops.cli_app import _rate_lines, app, console, out, readable

RunArg = Annotated[str, typer.Argument(help="run directory of a fit (model/, assignments.parquet, summary.json)")]
DataOpt = Annotated[Path | None, typer.Option(
    "--data", help="the fitted rows, where summary.json's data path has moved")]
NoReportOpt = Annotated[bool, typer.Option("--no-report", help="do not rebuild RUN_DIR/report.html")]


@contextlib.contextmanager
def row_progress(what: str, quiet: bool):
    """A `(done, total)` callback: a bar on a terminal, plain lines every 30 s in a log."""
    lines = _rate_lines(what, "rows", quiet)
    progress = Progress(TextColumn(f"[bold]{what}"), BarColumn(), TextColumn("{task.completed}/{task.total} rows"),
                        TimeElapsedColumn(), console=console, disable=quiet or lines is not None)
    with progress:
        task = progress.add_task(what, total=None)

        def show(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)
            if lines is not None:
                lines(done, total)

        yield show


def _refresh_report(run, no_report: bool, without_paths: str) -> None:
    """Say what a run without image paths skipped (`without_paths: why`), then rebuild its report."""
    if run.paths is None:
        out.print(f"{without_paths}: {run.why_no_paths()}", soft_wrap=True)
    if no_report:
        return
    from cluster_service.report.html import build_report

    out.print(f"report: {build_report(run.run_dir)} (its sections show this)", soft_wrap=True)


@app.command()
def duplicates(
    run_dir: RunArg,
    threshold: Annotated[float, typer.Option(help=(
        "cosine similarity (of mean-centred rows) at which two rows are near-duplicates; in (0, 1], "
        "1 = exact copies; the default is measured (BENCHMARKS.md, Near-duplicates)"))] = DUPLICATE_THRESHOLD,
    neighbours: Annotated[int, typer.Option(help="nearest clusters searched beside each row's own")] = 3,
    data: DataOpt = None,
    no_report: NoReportOpt = False,
    quiet: Annotated[bool, typer.Option(help="no progress")] = False,
) -> None:
    """Near-duplicate groups: FAISS search inside each cluster and its nearest clusters; every member
    within the threshold of its group's representative (no chaining). Writes RUN_DIR/duplicates.parquet
    (id, group, representative, similarity, cluster, path)."""
    import time

    from cluster_service.curate.duplicates import check_threshold, duplicates_table, find_duplicates
    from cluster_service.curate.run import open_run
    from cluster_service.io.atomic import write_parquet_atomic

    check_threshold(threshold)
    if neighbours < 0:
        raise ValueError(f"--neighbours must be >= 0, got {neighbours}")
    run = open_run(run_dir, data)
    x = run.features()
    t0 = time.perf_counter()
    with row_progress("duplicates", quiet) as show:
        dup = find_duplicates(x, run.clusters, run.model.means, threshold, neighbours, progress=show)
    seconds = time.perf_counter() - t0
    path = write_parquet_atomic(duplicates_table(run, dup), run.run_dir / runs.DUPLICATES)
    out.print(f"{path}: {dup.n_groups} group(s) holding {dup.n_rows} of {run.n_rows} rows at similarity >= "
              f"{threshold:g}; {int(dup.removable.sum())} could go (all but each group's representative); "
              f"{readable('seconds', seconds)} s", soft_wrap=True)
    if dup.n_rows > run.n_rows / 4:
        console.print(f"note: {dup.n_rows / run.n_rows:.0%} of the rows are in groups: in {x.shape[1]} dimensions a "
                      f"cosine of {threshold:g} is common between rows that are merely close; raise --threshold "
                      "(the default is measured on 128-d embeddings)", markup=False, soft_wrap=True)
    _refresh_report(run, no_report, "no image paths")


@app.command()
def outliers(
    run_dir: RunArg,
    per_cluster: Annotated[int, typer.Option(help="most unusual rows kept per cluster")] = 10,
    top: Annotated[int, typer.Option(help="most unusual rows kept overall")] = 100,
    no_report: NoReportOpt = False,
) -> None:
    """Calibrated outlier scores (the model's novelty: 1 - the row's tail probability among its cluster's
    training rows by log-density). Writes RUN_DIR/outliers.parquet: the top rows per cluster and overall."""
    from cluster_service.curate.outliers import flagged, top_outliers
    from cluster_service.curate.run import open_run
    from cluster_service.io.atomic import write_parquet_atomic

    if per_cluster < 0 or top < 0 or per_cluster + top == 0:
        raise ValueError(f"--per-cluster and --top must be >= 0 and not both 0, got {per_cluster} and {top}")
    run = open_run(run_dir)
    table = top_outliers(run, per_cluster, top)
    path = write_parquet_atomic(table, run.run_dir / runs.OUTLIERS)
    scores = table.column("score").to_numpy()
    out.print(f"{path}: {table.num_rows} rows (top {per_cluster} per cluster, top {top} overall); "
              f"scores {scores.min():.3f}-{scores.max():.3f}; {int(flagged(run).sum())} of {run.n_rows} rows in "
              f"their cluster's {NOVELTY_FPR:.0%} tail", soft_wrap=True)
    _refresh_report(run, no_report, "gallery skipped")


@app.command()
def sample(
    run_dir: RunArg,
    n: Annotated[int, typer.Option("--n", help="rows to draw")],
    level: Annotated[int | None, typer.Option(help="balance over the groups of this merge-tree level first")] = None,
    drop_outliers: Annotated[bool, typer.Option("--drop-outliers", help=(
        "leave out the rows in their cluster's 1% tail (the outliers command's score > .99)"))] = False,
    keep_duplicates: Annotated[bool, typer.Option("--keep-duplicates", help=(
        "draw without duplicates.parquet (by default all but one row of each duplicate group is left out, "
        "so run `duplicates` first)"))] = False,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    no_report: NoReportOpt = False,
) -> None:
    """A sample balanced over the clusters (or over a merge-tree level, then its clusters). Writes
    RUN_DIR/sample.parquet (id, path, cluster[, group])."""
    from cluster_service.curate.outliers import flagged
    from cluster_service.curate.run import open_run
    from cluster_service.curate.sample import draw_sample, rows_of_ids, sample_table
    from cluster_service.io.atomic import write_parquet_atomic

    if n <= 0:
        raise ValueError(f"--n must be > 0, got {n}")
    run = open_run(run_dir)
    if level is not None:
        run.model.cut_level(k=level)  # a level outside 1..K or a model without a tree: its own message
    exclude = np.zeros(run.n_rows, bool)
    if not keep_duplicates:
        dup = runs.read_curated(run.run_dir, runs.DUPLICATES)
        if dup is None:
            raise FileNotFoundError(f"{run.run_dir / runs.DUPLICATES}: not found; run `cluster-service duplicates "
                                    f"{run.run_dir}` first, or pass --keep-duplicates")
        ids, reps = (dup.column(c).to_numpy(zero_copy_only=False) for c in ("id", "representative"))
        exclude[rows_of_ids(run, ids[ids != reps])] = True
    n_dup = int(exclude.sum())
    outlier = flagged(run) if drop_outliers else np.zeros(run.n_rows, bool)
    exclude |= outlier
    rows, group = draw_sample(run, n, level, exclude, seed)
    table = sample_table(run, rows, group)
    path = write_parquet_atomic(table, run.run_dir / runs.SAMPLE)
    counts = np.bincount(run.clusters[rows], minlength=run.n_clusters)
    used = counts[counts > 0]
    out.print(f"{path}: {rows.size} rows from {used.size} of {run.n_clusters} clusters (per cluster {used.min()}-"
              f"{used.max()}); left out: {n_dup} duplicate(s)" + (f", {int(outlier.sum())} outlier(s)"
                                                                  if drop_outliers else ""), soft_wrap=True)
    _refresh_report(run, no_report, "path column empty")


@app.command()
def export(
    run_dir: RunArg,
    out_path: Annotated[Path, typer.Option("--out", help="folder of symlinks, or a .csv file")],
    cluster: Annotated[int | None, typer.Option(help="export this cluster")] = None,
    level: Annotated[int | None, typer.Option(help="export every group of this merge-tree level")] = None,
    images: Annotated[Path | None, typer.Option(help="root for relative image paths in the shards")] = None,
) -> None:
    """Export a cluster, or every group of a merge-tree level, for labelling tools: OUT ending in .csv
    gets id, path, cluster[, group]; any other OUT becomes a folder of symlinks to the images, one
    sub-folder per cluster or group."""
    from cluster_service.curate.export import export_csv, export_links, export_rows
    from cluster_service.curate.run import open_run

    if (cluster is None) == (level is None):
        raise ValueError("give exactly one of --cluster K or --level L")
    run = open_run(run_dir)
    rows, label = export_rows(run, cluster, level)
    what = "cluster" if cluster is not None else "group"
    if out_path.suffix == ".csv":
        path = export_csv(run, rows, label, out_path, what, images)
        out.print(f"{path}: {rows.size} rows", soft_wrap=True)
    else:
        path = export_links(run, rows, label, out_path, what, images)
        out.print(f"{path}/: {int((run.paths[rows] != '').sum())} links in {np.unique(label).size} folder(s)",
                  soft_wrap=True)
