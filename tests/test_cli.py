"""The `cluster-service` command line as a user runs it: one real subprocess for the whole
fit -> evaluate path, in-process `main()` (same exit codes, no interpreter start-up) for errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cluster_service.datasets import make_mixture

CLI = [sys.executable, "-m", "cluster_service.cli"]
FAST = ["--set", "schedule.epochs=30", "--quiet"]


def run(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600)


def run_inprocess(capsys, monkeypatch, *args) -> subprocess.CompletedProcess:
    from cluster_service import cli

    monkeypatch.setattr(sys, "argv", ["cluster-service", *map(str, args)])
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


@pytest.fixture(scope="module")
def npz(tmp_path_factory) -> Path:
    x, y = make_mixture(2000, 6, 4, seed=2, separation=10)
    p = tmp_path_factory.mktemp("data") / "mix.npz"
    np.savez(p, X=x, y=y)
    return p


def test_fit_writes_model_and_assignments_and_evaluate_reads_them(npz, tmp_path):
    from cluster_service.model import load_model

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


def test_plan_prints_the_schedule(capsys, monkeypatch):
    r = run_inprocess(capsys, monkeypatch, "plan", "--epochs", "60")
    assert r.returncode == 0, r.stderr
    # the split at 45 would have no merge round after it (moves end at 50): dropped
    assert "splits at        15, 25, 35\n" in r.stdout and "merges at        20, 30, 40\n" in r.stdout
