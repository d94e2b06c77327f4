"""The `cluster-service` command line as a user runs it: one real subprocess for the whole
fit -> evaluate path, in-process `main()` (same exit codes, no interpreter start-up) for errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from cli_helpers import run_inprocess

from cluster_service.datasets import make_mixture

CLI = [sys.executable, "-m", "cluster_service.ops.cli"]
FAST = ["--set", "schedule.epochs=30", "--quiet"]


def run(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def npz(tmp_path_factory) -> Path:
    x, y = make_mixture(2000, 6, 4, seed=2, separation=10)
    p = tmp_path_factory.mktemp("data") / "mix.npz"
    np.savez(p, X=x, y=y)
    return p


def test_fit_writes_model_and_assignments_and_evaluate_reads_them(npz, tmp_path):
    from cluster_service.serve.model import load_model

    out = tmp_path / "run"
    r = run("fit", npz, "--out", out, "--no-tracking", *FAST)
    assert r.returncode == 0, r.stderr
    assert "k_found" in r.stdout
    table = pq.read_table(out / "assignments.parquet")
    assert table.column_names[:3] == ["id", "cluster", "log_prob"]
    assert table.num_rows == 2000
    model = load_model(out / "model")
    x = np.load(npz)["X"]
    clusters, _ = model.predict(x)
    np.testing.assert_array_equal(clusters, table.column("cluster").to_numpy())
    r = run("evaluate", out, "--labels", npz)
    assert r.returncode == 0, r.stderr
    assert "nmi" in r.stdout and "k_found" in r.stdout

    # the report: scores as a person reads them (summary.json keeps the full float), and each
    # cluster's label composition, the first thing a user checks
    page = (out / "report.html").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert f"<td>nmi</td><td>{round(summary['nmi'], 3)}</td>" in page
    assert not re.search(r"<td>-?\d+\.\d{4,}</td>", page)  # no score printed with 4+ decimals
    panels = dict(re.findall(r'<section class="cluster" id="c(\d+)">(.*?)</section>', page, re.S))
    assert len(panels) == summary["k_found"]
    y = np.load(npz)["y"]
    for c, body in panels.items():
        counts = np.bincount(y[clusters == int(c)])
        expect = f"majority label {counts.argmax()}, purity {counts.max() / counts.sum():.1%}"
        assert expect in body, (expect, body)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: np.savez(p, X=np.array([[1.0, np.nan], [0.0, 1.0], [2.0, 2.0]])), "row 0 contains NaN"),
        (lambda p: np.savez(p, X=np.zeros((5, 2, 2))), "expected a 2-D array"),
        (lambda p: np.savez(p, Z=np.zeros((5, 2))), "expected an array named X"),
        (lambda p: np.savez(p, X=np.zeros((1, 3))), "at least 2 are needed"),
    ],
)
def test_bad_input_fails_clearly_with_nonzero_exit(tmp_path, capsys, monkeypatch, make, message):
    p = tmp_path / "bad.npz"
    make(p)
    r = run_inprocess(capsys, monkeypatch, "fit", p, "--out", tmp_path / "run", "--no-tracking", *FAST)
    assert r.returncode != 0
    assert message in r.stderr and str(p) in r.stderr.replace("\n", "")
    assert not (tmp_path / "run" / "assignments.parquet").exists()


def test_missing_file_and_bad_config_are_rejected(tmp_path, capsys, monkeypatch):
    r = run_inprocess(capsys, monkeypatch, "fit", tmp_path / "nope.npz", "--out", tmp_path / "run", "--no-tracking")
    assert r.returncode != 0 and "no such file" in r.stderr
    r = run_inprocess(capsys, monkeypatch, "plan", "--set", "prior.alpha=-1")
    assert r.returncode != 0 and "prior.alpha must be > 0" in r.stderr


def test_cut_of_a_model_without_a_merge_tree_names_the_model_and_what_to_do(tmp_path, capsys, monkeypatch):
    from cluster_service.serve.model import FittedModel

    model = FittedModel(log_weights=np.log([0.5, 0.5]), means=np.zeros((2, 2)), chol=np.tile(np.eye(2), (2, 1, 1)),
                        prior={"alpha": 1.0, "kappa": 1.0, "nu": 4.0, "mean": np.zeros(2), "psi": np.eye(2)})
    model.save(tmp_path / "run" / "model")  # no tree_linkage, as older --autoencoder fits wrote them
    for level in (["--k", "1"], ["--threshold", "0"]):
        r = run_inprocess(capsys, monkeypatch, "cut", tmp_path / "run", "--out", tmp_path / "g.parquet", *level)
        err = r.stderr.replace("\n", "")
        assert r.returncode == 2 and str(tmp_path / "run" / "model") in err, err
        assert "holds no tree_linkage" in err and "refit" in err
    assert not (tmp_path / "g.parquet").exists()


def test_plan_prints_the_schedule(capsys, monkeypatch):
    r = run_inprocess(capsys, monkeypatch, "plan", "--epochs", "60")
    assert r.returncode == 0, r.stderr
    # the split at 45 would have no merge round after it (moves end at 50): dropped
    assert "splits at        15, 25, 35\n" in r.stdout and "merges at        20, 30, 40\n" in r.stdout


def test_assign_of_an_npz_reproduces_the_fit_and_shards_import(tmp_path, monkeypatch, capsys):
    """`assign MODEL data.npz` takes the array file as it is and gives the fit's own assignments;
    `shards import` turns the same file (or a table) into a shard directory."""
    import pyarrow.parquet as pq

    from cluster_service.datasets import make_mixture
    from cluster_service.io.shards import read_feature_table

    x, y = make_mixture(800, 4, 3, seed=5, separation=8.0)
    np.savez(tmp_path / "data.npz", X=x, y=y)
    fast = [a for kv in ("schedule.epochs=24", "net.min_steps_per_epoch=2", "schedule.first_split=4",
                         "schedule.move_period=4", "schedule.warmup_epochs=2", "schedule.subcluster_start=2",
                         "schedule.freeze_epochs=1", "schedule.final_epochs=3") for a in ("--set", kv)]
    data, run = tmp_path / "data.npz", tmp_path / "run"
    assert run_cli(capsys, monkeypatch, "fit", data, "--out", run, "--quiet", "--no-tracking", *fast) == 0
    assert run_cli(capsys, monkeypatch, "assign", run, data, "--out", tmp_path / "assigned",
                   "--local", "--method", "exact", "--quiet") == 0
    fit_rows = pq.read_table(tmp_path / "run" / "assignments.parquet")
    assigned = pq.read_table(sorted((tmp_path / "assigned").glob("*.parquet")))
    np.testing.assert_array_equal(assigned.column("id").to_numpy(), fit_rows.column("id").to_numpy())
    np.testing.assert_array_equal(assigned.column("cluster").to_numpy(), fit_rows.column("cluster").to_numpy())
    np.testing.assert_allclose(assigned.column("margin").to_numpy(), fit_rows.column("margin").to_numpy(), rtol=1e-5)

    assert run_cli(capsys, monkeypatch, "shards", "import", tmp_path / "data.npz", "--out", tmp_path / "shards",
                   "--rows-per-shard", "300") == 0
    t = read_feature_table(tmp_path / "shards")
    np.testing.assert_array_equal(t.features, x.astype(np.float32))
    np.testing.assert_array_equal(t.labels, y)
    import pandas as pd

    table = pd.DataFrame({"id": [f"r{i}" for i in range(5)], "a": x[:5, 0], "b": x[:5, 1]})
    table.to_csv(tmp_path / "t.csv", index=False)
    assert run_cli(capsys, monkeypatch, "shards", "import", tmp_path / "t.csv", "--out", tmp_path / "csv_shards") == 0
    t = read_feature_table(tmp_path / "csv_shards")
    assert list(t.ids) == [f"r{i}" for i in range(5)] and t.features.shape == (5, 2)


def run_cli(capsys, monkeypatch, *args) -> int:
    res = run_inprocess(capsys, monkeypatch, *args)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return res.returncode


def test_half_null_labels_score_the_labelled_rows_in_summary_mlflow_and_evaluate(tmp_path, capsys, monkeypatch):
    """Shards whose labels are half null: summary.json, the MLflow run (final and per-epoch
    metrics) and `evaluate` report the NMI of the labelled rows (sklearn on that subset) and
    k_true = the 4 known classes; counting null as a class gave a lower NMI and k_true 5."""
    import pyarrow as pa
    from mlflow_helpers import client_for, metric_history
    from sklearn.metrics import normalized_mutual_info_score

    from cluster_service.io.shards import write_shards

    x, y = make_mixture(1200, 6, 4, seed=3, separation=6)
    unknown = np.random.default_rng(0).permutation(len(y)) < len(y) // 2
    shards = tmp_path / "shards"
    write_shards(shards, np.arange(len(y)), x, pa.array(y, pa.int64(), mask=unknown), rows_per_shard=500)
    out, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    r = run_inprocess(capsys, monkeypatch, "fit", shards, "--out", out, "--tracking-uri", uri, "--no-report",
                      "--eval-every", "10", *FAST)
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    table = pq.read_table(out / "assignments.parquet", columns=["id", "cluster"])
    clusters = table.column("cluster").to_numpy()[np.argsort(table.column("id").to_numpy())]
    want = normalized_mutual_info_score(y[~unknown], clusters[~unknown])
    assert normalized_mutual_info_score(np.where(unknown, -1, y), clusters) < want - 0.05  # the old figure
    assert summary["nmi"] == pytest.approx(want, abs=5e-5)  # summary.json rounds scores to 4 decimals
    assert summary["k_true"] == 4 and summary["n_labelled"] == int((~unknown).sum())

    client = client_for(uri)
    metrics = client.get_run(summary["mlflow_run"]).data.metrics
    assert metrics["nmi"] == pytest.approx(want, abs=5e-5) and metrics["k_true"] == 4
    last_epoch = json.loads((out / "history.json").read_text())[-1]["epoch"]
    step, nmi = metric_history(client, summary["mlflow_run"], "eval/nmi")[-1]
    assert step == last_epoch and nmi == pytest.approx(want, abs=0.01)  # before the settle steps: a few rows apart

    r = run_inprocess(capsys, monkeypatch, "evaluate", out, "--labels", shards)
    assert r.returncode == 0, r.stderr
    printed = dict(re.findall(r"│\s*(\w+)\s*│\s*(\S+)\s*│", r.stdout))
    assert float(printed["nmi"]) == pytest.approx(want, abs=5e-4) and printed["k_true"] == "4", r.stdout


def test_score_with_no_labelled_row_is_null():
    """Every label unknown: the scores are null (None), not 0, and k_true is 0."""
    from cluster_service.report.evaluate import score

    s = score(np.full(6, -1), np.array([0, 0, 1, 1, 2, 2]))
    assert (s.nmi, s.ari, s.acc, s.k_true, s.k_found, s.n_labelled) == (None, None, None, 0, 3, 0)
    assert "n/a" in str(s)
