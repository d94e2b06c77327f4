"""`cluster-service` command line (typer: typed options and help text without argparse plumbing;
rich: progress bars and tables). Commands parse arguments and call library functions only."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cluster_service.config import (
    CHECKPOINT_EVERY,
    NOVELTY_FPR,
    TOP_M,
    ConfigError,
    FitConfig,
    check_device,
    check_train_resources,
)
from cluster_service.io import runs
from cluster_service.ops.cli_app import _log_line, _rate_lines, app, console, out, readable
from cluster_service.ops.jobconfig import load_fit_config
from cluster_service.ops.local_fit import run_fit
from cluster_service.runtime.ray_session import VERBOSE_ENV


def main() -> None:
    try:
        app()
    except (ConfigError, ValueError, FileNotFoundError) as e:  # clear message, non-zero exit
        # No markup in the message ("[schema]" is text) and no wrapping (paths stay copyable).
        console.print("[bold red]error:[/]", escape(str(e)), soft_wrap=True)
        sys.exit(2)


class FitProgress:
    """A rich progress bar fed by the per-epoch records; where stderr is not a terminal (nohup, a Ray
    job's driver log, Kubernetes) a plain line per epoch instead (ops.progress.epoch_line)."""

    def __init__(self, epochs: int, quiet: bool = False):
        from cluster_service.ops.progress import epoch_printer

        self.lines = None if quiet or console.is_terminal else epoch_printer(epochs, _log_line)
        self.progress = Progress(
            TextColumn("[bold]fit"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TextColumn("K={task.fields[k]} loss={task.fields[loss]:.3f}"), TimeElapsedColumn(),
            console=console, disable=quiet or self.lines is not None,
        )
        self.task = self.progress.add_task("fit", total=epochs, k="?", loss=0.0)

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def __call__(self, rec, engine) -> None:
        self.record(rec.as_dict())

    def record(self, rec: dict) -> None:
        """Update from a record dict (also rank 0's records of a distributed fit, via progress.jsonl).
        An early stop ends the bar at the epochs run (the planned epochs are a cap)."""
        if self.lines is not None:
            self.lines(rec)
            return
        done = rec["epoch"] + 1
        total = done if rec.get("stopped") else None
        self.progress.update(self.task, completed=done, k=rec["n_clusters"], loss=rec["loss_cluster"],
                             **({"total": total} if total else {}))


def print_summary(summary: dict, title: str) -> None:
    table = Table(title=title, show_header=False)
    for k, v in summary.items():
        table.add_row(k, readable(k, v))
    out.print(table)


@app.command()
def fit(
    data: Annotated[Path, typer.Argument(help=".npy/.npz file (X, optional y) or a directory of Parquet shards")],
    out_dir: Annotated[Path, typer.Option("--out", help="run directory to write")] = Path("runs/fit"),
    k_init: Annotated[int | None, typer.Option(help="initial number of clusters (k-means)")] = None,
    epochs: Annotated[int | None, typer.Option(help="training epochs")] = None,
    seed: Annotated[int | None, typer.Option(help="random seed")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda | cuda:N")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML config file")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. --set prior.alpha=5")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
    tracking_uri: Annotated[str | None, typer.Option(
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")] = None,
    experiment: Annotated[str | None, typer.Option(help="MLflow experiment name")] = None,
    no_tracking: Annotated[bool, typer.Option("--no-tracking", help="do not log to MLflow")] = False,
    eval_every: Annotated[int, typer.Option(
        help="with labels: log NMI/ARI/ACC every N epochs (0: only at the end)")] = 5,
    autoencoder: Annotated[bool, typer.Option("--autoencoder", help=(
        "cluster an MLP autoencoder's latent codes, alternating AE training and clustering "
        "(settings under autoencoder.*); the model dir then also holds the encoder"))] = False,
    loss: Annotated[str | None, typer.Option(help="clustering loss: kl (DeepDPM) | ajs (alpha-JS)")] = None,
    workers: Annotated[int, typer.Option(help=(
        "Ray Train DDP workers (0: fit in this process). Local Ray unless RAY_ADDRESS is set; "
        "re-running on the same --out resumes from the last checkpoint"))] = 0,
    gpus_per_worker: Annotated[float, typer.Option(help="GPUs per worker (0: CPU workers, gloo)")] = 0.0,
    checkpoint_every: Annotated[int, typer.Option(
        help="with --workers: epochs between checkpoints")] = CHECKPOINT_EVERY,
    verbose: Annotated[bool, typer.Option(help="with --workers: also show Ray's own worker lines")] = False,
    no_report: Annotated[bool, typer.Option("--no-report", help="do not write RUN_DIR/report.html")] = False,
) -> None:
    """Fit DeepDPM on DATA (in this process, or on Ray Train workers); K is inferred. The run is
    logged to MLflow."""
    cfg = load_fit_config(config, set_, k_init=k_init, seed=seed, device=device, **{
        "schedule.epochs": epochs, "net.loss": loss, "autoencoder.enabled": True if autoencoder else None})
    if workers != 0:  # 0: this process; otherwise Ray Train workers (config.check_train_resources)
        check_train_resources("--", workers, checkpoint_every, gpus_per_worker=gpus_per_worker or 1.0)
        from cluster_service.ops.jobconfig import TrackingSection, TrainSection
        from cluster_service.ops.pipeline import fit_job

        if cfg.autoencoder.enabled:
            raise ValueError("--autoencoder runs in one process; leave out --workers")
        train = TrainSection(data=str(data), out=str(out_dir), workers=workers, use_gpu=gpus_per_worker > 0,
                             gpus_per_worker=gpus_per_worker or 1.0, checkpoint_every=checkpoint_every,
                             report=not no_report)
        tracking = TrackingSection(enabled=not no_tracking, uri=tracking_uri,
                                   **({"experiment": experiment} if experiment else {}))
        if verbose:
            os.environ[VERBOSE_ENV] = "1"  # Ray's own worker lines on this terminal too
        with FitProgress(cfg.schedule.epochs, quiet) as bar:
            summary = fit_job(train, cfg, tracking, progress=bar.record)
        print_summary(summary, f"fit {data} on {workers} worker(s)")
        out.print(f"model: {runs.model_dir(out_dir)}\nassignments: {runs.assignments_path(out_dir)}")
        return
    summary = run_fit(data, out_dir, cfg, tracking=not no_tracking, tracking_uri=tracking_uri,
                      experiment=experiment, eval_every=eval_every, report=not no_report,
                      progress=lambda epochs: FitProgress(epochs, quiet))
    print_summary(summary, f"fit {data}")
    out.print(f"model: {runs.model_dir(out_dir)}\nassignments: {runs.assignments_path(out_dir)}")
    if (out_dir / "report.html").is_file():
        out.print(f"report: {out_dir / 'report.html'} (open it in a browser; also in the MLflow run)")


@app.command()
def tune(
    data: Annotated[Path, typer.Argument(help=".npy/.npz file (X, optional y) or a Parquet shard dir")],
    num_samples: Annotated[int, typer.Option(help="number of trials")] = 8,
    max_concurrent: Annotated[int | None, typer.Option(help="trials at once (default: CPUs allow)")] = None,
    cpus_per_trial: Annotated[int, typer.Option(help="CPUs (torch threads) per trial")] = 1,
    heldout: Annotated[float, typer.Option(help="fraction of rows held out to score trials")] = 0.2,
    out_dir: Annotated[Path, typer.Option("--out", help="trials.json, best_config.yaml")] = Path("runs/tune"),
    epochs: Annotated[int | None, typer.Option(help="training epochs per trial")] = None,
    seed: Annotated[int | None, typer.Option(help="random seed (fits, held-out split, search)")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML base config (swept keys overridden)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="base-config override: --set a.b=1")] = None,
    tracking_uri: Annotated[str | None, typer.Option(
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")] = None,
    experiment: Annotated[str | None, typer.Option(help="MLflow experiment name")] = None,
    no_tracking: Annotated[bool, typer.Option("--no-tracking", help="do not log to MLflow")] = False,
) -> None:
    """Ray Tune sweep of priors and learning rates (search space: cluster_service/runtime/tune.py); each trial
    is an MLflow child run of one parent run; the best trial has the highest held-out log-likelihood."""
    from cluster_service.io.features import load_features
    from cluster_service.runtime.tune import METRIC, run_sweep

    cfg = load_fit_config(config, set_, seed=seed, **{"schedule.epochs": epochs})
    if num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {num_samples}")
    feats = load_features(data)
    res = run_sweep(feats.x, feats.labels, cfg, num_samples=num_samples, max_concurrent=max_concurrent,
                    cpus_per_trial=cpus_per_trial, heldout_frac=heldout, seed=cfg.seed, out_dir=out_dir,
                    tracking=not no_tracking, tracking_uri=tracking_uri, experiment=experiment,
                    manifest_hash=feats.manifest_hash)
    keys = list(res.best_params)
    table = Table(title=f"tune {data}: {len(res.trials)} trial(s), best first")
    for col in ["held-out LL", "K", *(["NMI", "ACC"] if feats.labels is not None else []), *keys]:
        table.add_column(col.split(".")[-1], justify="right")
    for t in res.trials:
        row = [f"{t[METRIC]:.3f}", str(t["n_clusters"])]
        if feats.labels is not None:
            row += [f"{t.get('nmi', float('nan')):.3f}", f"{t.get('acc', float('nan')):.3f}"]
        row += [f"{t[k]:.3g}" if isinstance(t[k], float) else str(t[k]) for k in keys]
        table.add_row(*row)
    out.print(table)
    if res.errors:
        console.print(f"[yellow]{len(res.errors)} trial(s) failed[/] (see {out_dir / 'ray_results'})")
    best_file = out_dir / "best_config.yaml"
    out.print(f"best config: {best_file} (refit: cluster-service fit {data} --config {best_file})")
    if res.parent_run_id:
        out.print(f"MLflow parent run: {res.parent_run_id}")


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="a run directory written by `fit`")],
    labels: Annotated[Path, typer.Option(help=".npy labels, .npz with y, or the shard dir with a label column")],
) -> None:
    """NMI / ARI / ACC / K of a run's assignments against ground-truth labels (report.evaluate.score:
    rows whose label is unknown, null or -1, are left out; k_true counts the known classes)."""
    from cluster_service.io.features import load_features
    from cluster_service.report.evaluate import score

    clusters = runs.read_assignments(run_dir, ["cluster"]).column("cluster").to_numpy()
    if labels.suffix == ".npy":
        y = np.load(labels, allow_pickle=False)
    else:
        y = load_features(labels).labels
        if y is None:
            raise ValueError(f"{labels}: contains no labels")
    if len(y) != len(clusters):
        raise ValueError(f"{labels}: {len(y)} labels but {runs.assignments_path(run_dir)} has {len(clusters)} rows")
    s = score(np.asarray(y), clusters)
    print_summary(s.as_dict(), f"evaluate {run_dir}")


@app.command()
def plan(
    config: Annotated[Path | None, typer.Option(help="YAML config file")] = None,
    epochs: Annotated[int | None, typer.Option(help="training epochs")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. --set schedule.epochs=60")] = None,
    rows: Annotated[int | None, typer.Option(help="rows to fit: also print the cost model's memory and time")] = None,
    dim: Annotated[int, typer.Option(help="feature dimension")] = 128,
    clusters: Annotated[int, typer.Option(help="clusters K expected (the moves' range)")] = 1000,
    workers: Annotated[int, typer.Option(help="Ray Train workers")] = 1,
    device: Annotated[str, typer.Option(help="cpu | cuda (cost model constants: ops.cost.DEVICES)")] = "cpu",
) -> None:
    """Print the training schedule (warm-up, subclusters, split and merge epochs); with --rows, the
    cost model's memory per worker, bytes between workers and time (ops.cost)."""
    from cluster_service.core.schedule import build_plan, format_plan
    from cluster_service.ops import cost

    cfg = load_fit_config(config, set_, **{"schedule.epochs": epochs})
    schedule = build_plan(cfg.schedule)
    out.print(format_plan(schedule, cfg.schedule))
    if rows is None:
        return
    if device not in cost.DEVICES:
        raise typer.BadParameter(f"--device must be one of {', '.join(cost.DEVICES)}, got {device!r}")
    for name, value in (("--rows", rows), ("--dim", dim), ("--clusters", clusters), ("--workers", workers)):
        if value < 1:
            raise typer.BadParameter(f"{name} must be at least 1, got {value}")
    dev = cost.DEVICES[device]
    w = cost.Workload.from_config(cfg, rows, dim, clusters, workers)
    e = cost.estimate(w, dev)
    gb = 1e9
    out.print(f"\nCost model ({dev.name}; {dev.source}): {rows:,} x {dim}, K {clusters:,}, {workers} worker(s), "
              f"{w.scored} clusters scored a row, rows as {cfg.row_dtype}")
    out.print(f"  memory per worker  {e.memory_bytes / gb:,.2f} GB (rows and their indices "
              f"{e.rows_bytes / gb:,.2f}, statistics {e.stats_bytes / gb:,.2f}, a split round's cells "
              f"{e.cells_bytes / gb:,.2f}, base {dev.base_memory / gb:,.2f}"
              f"{f', process group {dev.dist_memory / gb:,.2f}' if workers > 1 else ''})")
    out.print(f"  bytes per epoch    statistics {e.stats_comm_bytes / gb:,.3f} GB (a split round "
              f"+{e.split_comm_bytes / gb:,.3f}), gradients "
              f"{e.grad_comm_bytes / gb:,.3f} GB a worker")
    hours = len(schedule) * e.epoch_seconds / 3600
    out.print(f"  epoch              {e.epoch_seconds:,.1f} s (compute {e.compute_seconds:,.1f}, comm "
              f"{e.comm_seconds:,.1f}); {len(schedule)} epochs at most: {hours:,.2f} h")
    if e.memory_bytes > dev.memory_cap:
        out.print(f"  [bold red]over the {dev.memory_cap / gb:,.0f} GB a worker has: add workers or use "
                  f"--set row_dtype=bfloat16[/]")


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="where to write the demo runs")] = Path("runs/demo"),
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
) -> None:
    """Cluster a generated 12-cluster mixture and sklearn's digits, starting from K=1; then find their
    near-duplicates and outliers, draw a balanced sample, and write the report with its map."""
    from cluster_service.datasets import load_digits_pca, make_mixture

    out_dir.mkdir(parents=True, exist_ok=True)
    data_dir = out_dir / "data"
    data_dir.mkdir(exist_ok=True)
    x, y = make_mixture(20000, 16, 12, seed=seed)
    np.savez(data_dir / "mixture.npz", X=x, y=y)
    xd, yd = load_digits_pca(16, seed=seed)
    np.savez(data_dir / "digits.npz", X=xd, y=yd)
    cfg = FitConfig().replace(seed=seed)
    for name in ("mixture", "digits"):
        console.print(f"[bold]{name}[/]: {data_dir / (name + '.npz')}")
        summary = run_fit(data_dir / f"{name}.npz", out_dir / name, cfg, progress=lambda epochs: FitProgress(epochs))
        print_summary(summary, f"demo: {name}")
        run_dir = str(out_dir / name)
        from cluster_service.ops.curate_cli import duplicates, outliers, sample

        # 16-d data: a cosine of .95 is common between rows that are merely close (the default is
        # measured on 128-d embeddings), so the demo asks for near-exact copies
        duplicates(run_dir, threshold=0.999, neighbours=3, data=None, no_report=True, quiet=True)
        outliers(run_dir, per_cluster=10, top=100, no_report=True)
        sample(run_dir, n=500, level=None, drop_outliers=True, keep_duplicates=False, seed=seed, no_report=False)
        out.print(f"export skipped: the demo's data ({data_dir / (name + '.npz')}) has no image paths", soft_wrap=True)
    out.print(f"outputs under {out_dir}/<mixture|digits>/: {runs.MODEL_DIR}/, {runs.ASSIGNMENTS}, {runs.HISTORY}, "
              f"{runs.SUMMARY}, {runs.DUPLICATES}, {runs.OUTLIERS}, {runs.SAMPLE}, report.html "
              "(its map, galleries and a section per command)", soft_wrap=True)
    out.print("MLflow runs (params, per-epoch metrics, plots): `make mlflow-ui`, then http://127.0.0.1:5000")


@app.command()
def update(
    model: Annotated[str, typer.Argument(help="model dir, run dir, models:/NAME/VERSION or runs:/ID/PATH")],
    new_data: Annotated[Path, typer.Argument(help="new rows: shard directory or .npz/.npy/.parquet/.csv")],
    out_dir: Annotated[Path, typer.Option("--out", help="run directory to write (the updated model)")],
    old_data: Annotated[Path | None, typer.Option("--old", help="the old rows too: fit on old + new")] = None,
    epochs: Annotated[int | None, typer.Option(help="epochs of the update (default: the model's schedule)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. --set schedule.epochs=60")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI")] = None,
    no_tracking: Annotated[bool, typer.Option("--no-tracking", help="do not log to MLflow")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Continue a fitted model on new data: splits add clusters for what is new, merges join, ids of
    clusters that persist stay; writes RUN_DIR like `fit` plus lineage.json (old -> new ids)."""
    from cluster_service.ops.local_fit import run_update
    from cluster_service.runtime.assign_job import open_model
    from cluster_service.runtime.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri) if ":/" in model else None
    fitted = open_model(model, tracking_uri=uri)
    cfg = load_fit_config(None, set_, base=fitted.config, **{"schedule.epochs": epochs})
    summary = run_update(fitted, model, new_data, out_dir, cfg, old_data, tracking=not no_tracking,
                         tracking_uri=tracking_uri, progress=lambda n: FitProgress(n, quiet))
    print_summary(summary, f"update {model}")
    lineage = runs.read_lineage(out_dir)
    out.print(f"model: {runs.model_dir(out_dir)} (version {lineage['version']})\nlineage: {out_dir / runs.LINEAGE}")


@app.command()
def cut(
    run_dir: Annotated[Path, typer.Argument(help="run directory of a fit (model/, assignments.parquet)")],
    out_file: Annotated[Path, typer.Option("--out", help="Parquet file to write: id, cluster")],
    k: Annotated[int | None, typer.Option("--k", help="number of groups")] = None,
    threshold: Annotated[float | None, typer.Option(
        help="merge every pair whose log merge ratio is above this (instead of --k)")] = None,
) -> None:
    """Label the run's rows at a coarser level of the model's merge hierarchy (K stays what the model
    inferred; the tree groups its clusters): writes (id, cluster) for every row."""
    import pyarrow as pa

    from cluster_service.io.atomic import write_parquet_atomic
    from cluster_service.serve.model import ModelError, load_model

    if (k is None) == (threshold is None):
        raise ValueError("give exactly one of --k and --threshold")
    model = load_model(runs.model_dir(run_dir))
    try:
        k = model.cut_level(k, threshold)
    except ModelError as e:
        raise ValueError(f"{runs.model_dir(run_dir)}: {e}") from None
    groups = model.cut(k)
    table = runs.read_assignments(run_dir, ["id", "cluster"])
    labels = groups[table.column("cluster").to_numpy()]
    write_parquet_atomic(pa.table({"id": table.column("id"), "cluster": pa.array(labels.astype(np.int32))}),
                         out_file)
    out.print(f"{out_file}: {table.num_rows} rows in {len(np.unique(labels))} groups (level k={k} of K="
              f"{model.n_clusters})", soft_wrap=True)


@app.command()
def gallery(
    run_dir: Annotated[Path, typer.Argument(help="run directory of a fit (model/, assignments.parquet, ...)")],
    images: Annotated[Path | None, typer.Option(help="root for relative image paths in the shards")] = None,
    per_cluster: Annotated[int, typer.Option(help="thumbnails per cluster")] = 12,
    clusters: Annotated[str, typer.Option(help="all | largest:N")] = "largest:200",
    out_file: Annotated[Path | None, typer.Option("--out", help="HTML file (default RUN_DIR/report.html)")] = None,
    montages: Annotated[Path | None, typer.Option(help="also write one montage PNG per cluster here")] = None,
) -> None:
    """(Re)build the run report: summary, plots and one panel per cluster with image galleries (most
    typical, least certain, random members) when the data's shards carry image paths; with
    --montages DIR the same galleries as one PNG per cluster (DIR/cluster_00000.png, ...)."""
    from cluster_service.report.html import build_report

    if clusters == "all":
        limit = 1 << 30
    elif clusters.startswith("largest:") and clusters[8:].isdigit():
        limit = int(clusters[8:])
    else:
        raise ValueError(f"--clusters must be 'all' or 'largest:N', got {clusters!r}")
    if per_cluster < 1:
        raise ValueError(f"--per-cluster must be >= 1, got {per_cluster}")
    path = build_report(run_dir, images, per_cluster=per_cluster, max_clusters=limit, out=out_file,
                        montage_dir=montages)
    out.print(f"report: {path}", soft_wrap=True)
    if montages is not None:
        n = len(list(Path(montages).glob("cluster_*.png")))
        out.print(f"montages: {n} PNG(s) in {montages}" if n else
                  "montages: none (the data's shards carry no image paths)", soft_wrap=True)


# ---- curation: what people do with the clusters (cluster_service.curate) ------------------------

@app.command()
def extract(
    images: Annotated[Path, typer.Argument(help="ImageFolder tree (folder = class) or a list of paths")],
    checkpoint: Annotated[Path, typer.Option(help="MoCo v2 checkpoint, or resnet50 weights")],
    out_dir: Annotated[Path, typer.Option("--out", help="shard directory to write (must be empty)")],
    head: Annotated[str | None, typer.Option(help="proj: MoCo head output (128-d, default) | backbone: 2048-d")] = None,
    normalize: Annotated[bool | None, typer.Option(help="L2-normalise the features (default: yes)")] = None,
    batch_size: Annotated[int | None, typer.Option(help="images per encoder call (default 128)")] = None,
    rows_per_shard: Annotated[int | None, typer.Option(help="rows per Parquet shard (default 65536)")] = None,
    pca_dim: Annotated[int | None, typer.Option(help="project to D principal components")] = None,
    image_size: Annotated[int | None, typer.Option(help="center-crop size (default 224, ImageNet models)")] = None,
    num_actors: Annotated[int | None, typer.Option(help="encoder actors (default: 1 per GPU)")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Encode images with a MoCo ResNet-50 on Ray Data; write Parquet feature shards + _manifest.json.
    Options are validated as the extract job's `extract` section is (defaults: ExtractConfig)."""
    from cluster_service.ops.jobconfig import parse_extract_section
    from feature_extraction.extract import REPORT
    from feature_extraction.extract import extract as run_extract

    given = {"head": head, "normalize": normalize, "batch_size": batch_size, "image_size": image_size,
             "rows_per_shard": rows_per_shard, "pca_dim": pca_dim, "num_actors": num_actors}
    section = parse_extract_section({"images": str(images), "out": str(out_dir), "checkpoint": str(checkpoint),
                                     **{k: v for k, v in given.items() if v is not None}})
    cfg = section.extract_config()
    progress = Progress(TextColumn("[bold]extract"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TimeElapsedColumn(), console=console, disable=quiet or not console.is_terminal)
    with progress:
        task = progress.add_task("extract", total=None)

        lines = _rate_lines("extract", "images", quiet)

        def show(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)
            if lines is not None:
                lines(done, total)

        report = run_extract(images, out_dir, cfg, show)
    print_summary({"images": report.n_images, "written": report.n_written, "failed": len(report.failed),
                   "images/s": report.images_per_second, "decode share": report.decode_share,
                   "device": report.device}, f"extract {images}")
    out.print(f"shards: {out_dir}\nreport: {out_dir / REPORT}", soft_wrap=True)


@app.command()
def assign(
    model: Annotated[str, typer.Argument(help="model dir, run dir, models:/NAME/VERSION or runs:/ID/PATH")],
    shard_dir: Annotated[Path, typer.Argument(help="shard directory, or an .npz / .npy / .parquet / .csv file")],
    out_dir: Annotated[Path, typer.Option("--out", help="where assignment shards go (same file names)")],
    method: Annotated[str, typer.Option(help="shortlist (FAISS, exact rescore) | exact | net")] = "shortlist",
    top_m: Annotated[int, typer.Option(help="shortlist size: candidate clusters rescored exactly")] = TOP_M,
    novelty_fpr: Annotated[float, typer.Option(
        help="flag rows as `novel` at this false-positive rate on training data")] = NOVELTY_FPR,
    local: Annotated[bool, typer.Option(help="run in this process instead of a Ray Data job")] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    tracking_uri: Annotated[str | None, typer.Option(
        help="MLflow tracking URI for model URIs (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Assign feature shards (or an .npz / .npy / table file) to a fitted model's clusters; one output
    Parquet per shard, re-runs skip finished shards; exit 1 if any shard could not be assigned."""
    from cluster_service.io.features import shard_dir_for
    from cluster_service.io.shards import load_manifest
    from cluster_service.runtime.assign_job import assign_shards, open_model

    check_device(device, "--device")
    shard_dir = shard_dir_for(shard_dir, out_dir)  # an array or table file: imported beside the outputs
    manifest, _ = load_manifest(shard_dir)
    uri = None
    if ":/" in model:
        from cluster_service.runtime.tracking import resolve_tracking_uri

        uri = resolve_tracking_uri(tracking_uri)
    fitted = open_model(model, n_features=manifest["d"], tracking_uri=uri)
    progress = Progress(TextColumn("[bold]assign"), BarColumn(),
                        TextColumn("{task.completed}/{task.total} shards"),
                        TextColumn("{task.fields[rows]} rows, {task.fields[failed]} failed"),
                        TimeElapsedColumn(), console=console, disable=quiet or not console.is_terminal)
    lines = _rate_lines("assign", "rows", quiet)
    with progress:
        task = progress.add_task("assign", total=len(manifest["shards"]), rows=0, failed=0)
        seen = {"rows": 0, "failed": 0}

        def show(o) -> None:
            seen["rows"] += o.rows
            seen["failed"] += o.status == "failed"
            progress.update(task, advance=1, **seen)
            if lines is not None:
                lines(seen["rows"], manifest.get("rows"))
            if o.status == "failed":
                console.print(f"[red]failed[/] {o.shard}: {o.error}", markup=True, highlight=False)

        report = assign_shards(fitted, shard_dir, out_dir, method, top_m, device,
                               use_ray=not local, progress=show, novelty_fpr=novelty_fpr)
    summary = report.as_dict()
    print_summary(summary, f"assign {shard_dir} ({method})")
    sizes = report.cluster_sizes()
    table = Table(title="largest clusters")
    table.add_column("cluster", justify="right")
    table.add_column("rows", justify="right")
    table.add_column("share", justify="right")
    for k in np.argsort(-sizes, kind="stable")[:10]:
        table.add_row(str(k), str(sizes[k]), f"{sizes[k] / max(1, sizes.sum()):.2%}")
    out.print(table)
    used = sizes[sizes > 0]
    if used.size:
        out.print(f"cluster sizes: min {used.min()}, median {int(np.median(used))}, max {used.max()} "
                  f"over {used.size}/{sizes.size} clusters; empty: {sizes.size - used.size}")
    if report.failed:
        console.print(f"[bold red]{len(report.failed)} shard(s) not assigned[/]: "
                      + ", ".join(o.shard for o in report.failed))
        raise typer.Exit(1)
    out.print(f"assignments: {out_dir}")


@app.command("register-model")
def register_model(
    model_dir: Annotated[Path, typer.Argument(help="model directory (RUN_DIR/model)")],
    name: Annotated[str, typer.Option(help="registered model name")],
    method: Annotated[str, typer.Option(help="the pyfunc's predict: shortlist | exact | net")] = "shortlist",
    tracking_uri: Annotated[str | None, typer.Option(
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")] = None,
) -> None:
    """Log MODEL_DIR as an MLflow pyfunc model and register it (then: assign models:/NAME/VERSION …)."""
    from cluster_service.runtime.tracking import resolve_tracking_uri
    from cluster_service.serve.pyfunc import log_pyfunc_model

    info = log_pyfunc_model(model_dir, registered_name=name, method=method,
                            tracking_uri=resolve_tracking_uri(tracking_uri))
    out.print(f"registered models:/{name}/{info.registered_model_version} ({info.model_uri})")


@app.command()
def submit(
    job: Annotated[str, typer.Argument(help="extract | fit | assign | imagenet (runs python -m jobs.JOB)")],
    config: Annotated[Path, typer.Argument(help="the job's YAML config (validated here before submitting)")],
    address: Annotated[str | None, typer.Option(
        help="Ray job server (dashboard) URL; default $RAY_API_SERVER_ADDRESS, else 127.0.0.1:8265")] = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="submit and return the job id")] = False,
    env: Annotated[list[str] | None, typer.Option(help="job environment variable: --env KEY=VALUE")] = None,
) -> None:
    """Submit a pipeline job to a Ray cluster (Ray Job Submission SDK): validate CONFIG, upload this
    checkout as the working dir, stream the logs, print the status and the MLflow run; exit 1 unless
    the job succeeded."""
    from cluster_service.ops.submit import submit as submit_job

    env_vars = {}
    for item in env or []:
        if "=" not in item:
            raise ValueError(f"--env expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        env_vars[k] = v
    try:
        res = submit_job(job, config, address, wait=not no_wait, env_vars=env_vars,
                         on_log=lambda line: out.print(line, markup=False, highlight=False, soft_wrap=True))
    except ConnectionError as e:
        console.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(2) from None
    console.print(f"job {res.job_id}: [bold]{res.status}[/]" + (f" ({res.message})" if res.message else ""))
    if res.mlflow_link:
        out.print(f"MLflow run: {res.mlflow_link} (tracking URI {res.tracking_uri})", soft_wrap=True)
    if not no_wait and res.status != "SUCCEEDED":
        raise typer.Exit(1)


cluster_app = typer.Typer(no_args_is_help=True, help="A local Ray head and MLflow server on loopback.")
app.add_typer(cluster_app, name="cluster")


@cluster_app.command("up")
def cluster_up(
    state_dir: Annotated[Path, typer.Option("--state", help="pids, logs, MLflow store")] = Path(".cluster"),
    num_cpus: Annotated[int | None, typer.Option(help="CPUs Ray may use (default: all)")] = None,
    dashboard_port: Annotated[int, typer.Option(help="Ray dashboard / job server port")] = 8265,
    mlflow_port: Annotated[int, typer.Option(help="MLflow server port (0: no MLflow server)")] = 5000,
) -> None:
    """Start a Ray head (with the job server) and an MLflow tracking server on 127.0.0.1."""
    from cluster_service.ops.local_cluster import start

    info = start(state_dir, num_cpus, dashboard_port, mlflow_port, mlflow=mlflow_port > 0)
    out.print(f"Ray job server: {info['ray']['dashboard']}  (cluster-service submit JOB CONFIG)")
    if "mlflow" in info:
        out.print(f"MLflow: {info['mlflow']['uri']}  (export MLFLOW_TRACKING_URI={info['mlflow']['uri']})")
    out.print(f"logs: {state_dir}/  stop: make cluster-down")


@cluster_app.command("down")
def cluster_down(
    state_dir: Annotated[Path, typer.Option("--state", help="as given to `cluster up`")] = Path(".cluster"),
) -> None:
    """Stop the Ray head and MLflow server that `cluster up` started (only those)."""
    from cluster_service.ops.local_cluster import stop

    stopped = stop(state_dir)
    out.print(f"stopped: {', '.join(stopped)}" if stopped else f"nothing running under {state_dir}")


if __name__ == "__main__":
    main()


from cluster_service.ops import curate_cli as _curate_cli  # noqa: E402,F401  (registers its commands on app)
from cluster_service.ops import shards_cli as _shards_cli  # noqa: E402,F401
