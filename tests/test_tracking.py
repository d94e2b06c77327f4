"""MLflow tracking against a real `mlflow server` (sqlite backend, local artifact dir) and the
default local sqlite store; faults are injected only to check that tracking never kills a fit."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow_helpers import client_for, metric_history

from cluster_service.config import FitConfig
from cluster_service.datasets import make_mixture
from cluster_service.io import runs
from cluster_service.ops.local_fit import run_fit
from cluster_service.report import plots
from cluster_service.report.evaluate import cluster_accuracy
from cluster_service.runtime import tracking
from cluster_service.train.engine import EpochRecord

EPOCHS = 30
# A short schedule with several split and merge rounds, so K changes within 30 epochs.
SMALL = {"schedule.epochs": EPOCHS, "schedule.warmup_epochs": 2, "schedule.subcluster_start": 3,
         "schedule.first_split": 6, "schedule.move_period": 6, "schedule.freeze_epochs": 2,
         "schedule.final_epochs": 4, "net.min_steps_per_epoch": 5, "net.cluster_hidden": 32,
         "net.sub_hidden": 16}
PLOTS = {"k_over_epochs.png", "cluster_sizes.png", "projection.png", "confusion_matrix.png", "merge_tree.png"}


@pytest.fixture(scope="module")
def mixture_file(tmp_path_factory) -> Path:
    x, y = make_mixture(1500, 6, 5, seed=3)
    path = tmp_path_factory.mktemp("data") / "mix.npz"
    np.savez(path, X=x, y=y)
    return path


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real tracking server on a free loopback port; killed at teardown."""
    root = tmp_path_factory.mktemp("mlflow-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
           "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    log_file = open(root / "server.log", "wb")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=1) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
        time.sleep(0.3)
    yield uri
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log_file.close()


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in tmp_path with no MLFLOW_TRACKING_URI, so the default store lands there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def _artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for f in client.list_artifacts(run_id, path):
        out |= _artifact_paths(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def test_fit_run_on_server_has_params_epoch_metrics_and_artifacts(mlflow_server, mixture_file, tmp_path):
    cfg = FitConfig().replace(**SMALL)
    summary = run_fit(mixture_file, tmp_path / "run", cfg, tracking_uri=mlflow_server,
                      experiment="server-test", eval_every=10)
    client = client_for(mlflow_server)
    run = client.get_run(summary["mlflow_run"])
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied through the server

    # every config field is a param, with its value
    params = run.data.params
    for key, value in cfg.flat().items():
        assert params[key] == str(value), key
    assert params["data.n_samples"] == "1500" and params["data.n_features"] == "6"

    # a value at every epoch, equal to the engine's records
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    for field, name in [("n_clusters", "n_clusters"), ("log_marginal", "log_marginal"),
                        ("loss_cluster", "loss/cluster"), ("splits_accepted", "moves/splits_accepted"),
                        ("time_total", "time/epoch"), ("peak_memory", "memory/peak_rss"),
                        ("comm_bytes", "comm/bytes")]:
        series = metric_history(client, run.info.run_id, name)
        assert [s for s, _ in series] == list(range(EPOCHS)), name
        np.testing.assert_allclose([v for _, v in series], [h[field] for h in history], rtol=1e-6)
    assert len({h["n_clusters"] for h in history}) > 1  # K moved, so the K series is informative
    # label scores every 10 epochs and at the last one; final scores equal the run summary
    assert [s for s, _ in metric_history(client, run.info.run_id, "eval/nmi")] == [0, 10, 20, 29]
    for k in ("nmi", "ari", "acc"):
        assert run.data.metrics[k] == pytest.approx(summary[k])

    # tags: manifest hash, commit, versions, device
    tags = run.data.tags
    assert tags["data.manifest_hash"] == "none"  # an .npz has no shard manifest
    assert tags["device"] == "cpu" and tags["versions.torch"] and tags["versions.mlflow"]
    assert len(tags.get("git.commit", "0" * 40)) == 40

    # artifacts: model dir, resolved config, schedule plan, plots
    files = _artifact_paths(client, run.info.run_id)
    assert {"model/model.json", "model/arrays.npz", "config.yaml", "schedule_plan.txt"} <= files
    assert {f"plots/{p}" for p in PLOTS} <= files
    local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "dl")))
    assert FitConfig.from_dict(yaml.safe_load((local / "config.yaml").read_text())["fit"]) == cfg
    assert "splits at        6, 12, 18" in (local / "schedule_plan.txt").read_text()
    for p in PLOTS:
        png = (local / "plots" / p).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000, p
    from cluster_service.serve.model import load_model

    model = load_model(local / "model")
    assert model.n_clusters == summary["k_found"]


@pytest.mark.filterwarnings("ignore::cluster_service.config.ScheduleWarning")  # 6 epochs: no moves, fine here
def test_default_store_is_sqlite_in_working_directory(in_tmp, mixture_file):
    from typer.testing import CliRunner

    from cluster_service.ops.cli import app

    res = CliRunner().invoke(app, ["fit", str(mixture_file), "--out", "runs/a", "--epochs", "6", "--quiet",
                                   "--experiment", "local", "--set", "net.min_steps_per_epoch=2"])
    assert res.exit_code == 0, res.output
    assert (in_tmp / "mlflow.db").is_file()
    client = client_for(f"sqlite:///{in_tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name("local")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "a" and run.data.params["schedule.epochs"] == "6"
    assert len(metric_history(client, run.info.run_id, "n_clusters")) == 6
    art = in_tmp / "mlartifacts" / "local" / run.info.run_id / "artifacts"
    assert (art / "model" / "arrays.npz").is_file() and (art / "plots" / "k_over_epochs.png").is_file()


def test_env_uri_overrides_default(in_tmp, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///other.db")
    assert tracking.resolve_tracking_uri() == f"sqlite:///{in_tmp / 'other.db'}"
    assert tracking.resolve_tracking_uri("http://h:5000") == "http://h:5000"  # explicit beats env
    cfg = FitConfig()
    with tracking.Tracker(cfg, experiment="env") as t:
        t.log_metrics({"m": 1.0}, step=3)
    assert (in_tmp / "other.db").is_file() and not (in_tmp / "mlflow.db").exists()
    run = client_for().get_run(t.run_id)
    assert run.data.metrics["m"] == 1.0 and run.info.status == "FINISHED"


def test_only_rank_zero_logs(in_tmp):
    t = tracking.Tracker(FitConfig(), rank=1)
    assert t.start() is None and not t.active
    t.log_metrics({"m": 1.0})
    t.end()
    assert not (in_tmp / "mlflow.db").exists()


def test_unreachable_server_does_not_crash_fit(in_tmp, mixture_file, caplog):
    cfg = FitConfig().replace(**{**SMALL, "schedule.epochs": 6, "schedule.first_split": 4,
                                 "schedule.final_epochs": 0})
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="cluster_service.runtime.tracking"):
        summary = run_fit(mixture_file, in_tmp / "run", cfg, tracking_uri="http://127.0.0.1:1")
    assert "mlflow_run" not in summary and (in_tmp / "run" / "model" / "arrays.npz").is_file()
    assert any("unreachable" in r.message for r in caplog.records)
    assert time.perf_counter() - t0 < 60


def test_failures_mid_run_are_reported_then_tracking_stops(in_tmp, mixture_file, caplog, monkeypatch):
    """Inject a fault into every MLflow batch call after the run has started."""
    from mlflow import MlflowClient

    cfg = FitConfig().replace(**{**SMALL, "schedule.epochs": 6, "schedule.first_split": 4,
                                 "schedule.final_epochs": 0})
    original = MlflowClient.log_batch
    calls = {"n": 0}

    def flaky(self, run_id, metrics=(), params=(), tags=(), synchronous=None):
        if metrics:  # params at start succeed; every metric batch fails
            calls["n"] += 1
            raise ConnectionError("injected: tracking store went away")
        return original(self, run_id, metrics=metrics, params=params, tags=tags, synchronous=synchronous)

    monkeypatch.setattr(MlflowClient, "log_batch", flaky)
    with caplog.at_level(logging.WARNING, logger="cluster_service.runtime.tracking"):
        summary = run_fit(mixture_file, in_tmp / "run", cfg)
    assert summary["k_found"] >= 1 and runs.assignment_parts(in_tmp / "run")
    failed = [r for r in caplog.records if "failed" in r.message]
    assert calls["n"] == tracking.MAX_CONSECUTIVE_FAILURES == len(failed)  # then it stops trying
    assert any("disabled" in r.message for r in caplog.records)


def test_label_scores_are_logged_at_the_end_of_an_early_stopped_fit(in_tmp):
    """The last record of a fit (its `stopped` set) is scored, also when the fit stops before the cap."""
    from cluster_service.train.fit import fit

    x, y = make_mixture(600, 4, 3, seed=0)
    cfg = FitConfig().replace(**{**SMALL, "schedule.epochs": 200})
    with tracking.Tracker(cfg, experiment="early-stop", labels=y, eval_every=1000) as t:
        result = fit(x, cfg, callbacks=[t])
    last = result.history[-1]
    assert last.stopped.startswith("converged") and last.epoch + 1 < cfg.schedule.epochs
    assert sorted(t.scores) == [0, last.epoch]
    steps = [step for step, _ in metric_history(client_for(), t.run_id, "eval/nmi")]
    assert steps == [0, last.epoch]


# ---- pure pieces ------------------------------------------------------------------------------


def test_epoch_metrics_cover_every_record_field():
    rec = EpochRecord(epoch=4, n_clusters=3, loss_cluster=0.5, loss_sub=0.2, log_marginal=-10.0,
                      size_entropy=1.0, splits_proposed=2, splits_accepted=1, merges_proposed=0,
                      merges_accepted=0, pruned=0, frozen=True, time_total=1.0, time_train=0.5,
                      time_stats=0.2, time_reduce=0.1, time_mstep=0.1, time_moves=0.1)
    m = tracking.epoch_metrics(rec)
    assert len(m) == len(rec.as_dict()) - 2 and "epoch" not in m  # all but the epoch and the `stopped` text
    assert "stopped" not in m and tracking.epoch_metrics({**rec.as_dict(), "stopped": "converged"}) == m
    assert m["n_clusters"] == 3 and m["frozen"] == 1.0 and m["moves/splits_accepted"] == 1


def test_confusion_order_matches_hungarian_accuracy():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, 3000)
    perm = rng.permutation(9)
    clusters = np.where(rng.random(3000) < 0.8, perm[labels], rng.integers(0, 9, 3000))
    counts = np.zeros((7, 9), dtype=np.int64)
    np.add.at(counts, (labels, clusters), 1)
    order, n_matched = plots.matched_order(counts)
    assert sorted(order) == list(range(9))
    assert n_matched / labels.size == pytest.approx(cluster_accuracy(labels, clusters))
    assert list(order[:7]) == list(perm[:7])  # each label's own cluster sits on the diagonal


def test_pca_2d_matches_sklearn():
    from sklearn.decomposition import PCA

    x = np.random.default_rng(1).normal(size=(500, 5)) * [5, 3, 1, 0.5, 0.1]
    _, axes, ratio = plots.pca_2d(x)
    ref = PCA(2).fit(x)
    np.testing.assert_allclose(np.abs(axes), np.abs(ref.components_), atol=1e-8)
    np.testing.assert_allclose(ratio, ref.explained_variance_ratio_, rtol=1e-8)


def test_plots_render_for_many_clusters(tmp_path):
    """The large-K code paths draw what they say: log-scale sizes, an unannotated confusion matrix,
    more than 20 distinct colours."""
    rng = np.random.default_rng(2)
    clusters = rng.integers(0, 80, 4000)
    labels = clusters % 50
    x = rng.normal(size=(4000, 6))
    history = [{"epoch": e, "n_clusters": 1 + e, "log_marginal": -1000.0 + e, "splits_accepted": e % 2,
                "splits_proposed": 1, "merges_accepted": 0, "merges_proposed": 0, "pruned": 0,
                "frozen": False} for e in range(50)]
    figs = {"k": plots.plot_k_history(history, {0: {"nmi": 0.1, "acc": 0.2}}),
            "sizes": plots.plot_cluster_sizes(clusters, 90),
            "proj": plots.plot_projection(x, clusters, labels, rng.normal(size=(80, 6))),
            "conf": plots.plot_confusion(labels, clusters)}
    k_line = figs["k"].axes[0].lines[0]
    assert k_line.get_ydata().tolist() == list(range(1, 51))  # K per epoch, as recorded
    sizes_ax = figs["sizes"].axes[0]
    assert sizes_ax.get_yscale() == "log" and "K=90" in sizes_ax.get_title()
    curve = sizes_ax.lines[0].get_ydata()  # 90 ranks, largest first; the 10 empty clusters drawn at 0.8
    assert len(curve) == 90 and (np.diff(curve) <= 0).all() and curve[0] == np.bincount(clusters).max()
    assert (curve[-10:] == 0.8).all()
    by_cluster = figs["proj"].axes[0].collections[0]
    assert len(np.unique(by_cluster.to_rgba(by_cluster.get_array()), axis=0)) == 80  # one colour per cluster
    conf_ax = figs["conf"].axes[0]
    assert not conf_ax.texts and conf_ax.images[0].get_array().shape == (50, 80)  # 80 columns: no counts
    for name, fig in figs.items():
        path = plots.save_figure(fig, tmp_path / f"{name}.png")
        assert path.stat().st_size > 10_000, name
