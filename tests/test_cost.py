"""ops.cost: the cost model's structure (memory 1 / W plus a constant, statistics bytes free of N),
its fit to measured points, and `cluster-service plan --rows`."""

import math

import pytest
from cli_helpers import run_inprocess

from cluster_service.ops import cost


def _w(**kw) -> cost.Workload:
    return cost.Workload(**{"rows": 1_280_000, "dim": 128, "clusters": 1000, **kw})


def _plan(capsys, monkeypatch, *args) -> tuple[int, str]:
    r = run_inprocess(capsys, monkeypatch, "plan", *args)
    return r.returncode, " ".join((r.stdout + r.stderr).split())


def test_memory_per_worker_falls_as_one_over_w_plus_a_constant():
    dev = cost.DEVICES["cpu"]
    one, four = cost.estimate(_w(workers=1), dev), cost.estimate(_w(workers=4), dev)
    assert four.rows_bytes == pytest.approx(one.rows_bytes / 4, rel=1e-5)
    constant = one.memory_bytes - one.rows_bytes  # W = 1; with W > 1 the process group's dist_memory too
    # W > 1: the process group and two more copies of the split round's cell statistics (their all-reduce)
    assert four.cells_bytes == pytest.approx(3 * one.cells_bytes) and one.cells_bytes > 0
    assert four.memory_bytes - four.rows_bytes == pytest.approx(
        constant + dev.dist_memory + four.cells_bytes - one.cells_bytes)
    # bfloat16 rows: 2 bytes a value instead of 4, the per-row indices unchanged
    half = cost.estimate(_w(row_dtype="bfloat16"), dev)
    assert one.rows_bytes - half.rows_bytes == pytest.approx(1_280_000 * 128 * 2)


def test_statistics_bytes_do_not_depend_on_rows_and_gradients_follow_the_steps():
    dev = cost.DEVICES["cpu"]
    a, b = cost.estimate(_w(workers=2), dev), cost.estimate(_w(rows=12_800_000, workers=2), dev)
    assert a.stats_comm_bytes == b.stats_comm_bytes == 2 * 3 * 1000 * (1 + 128 + 128**2) * 8
    assert b.grad_comm_bytes == pytest.approx(10 * a.grad_comm_bytes, rel=0.01)  # steps: ceil(N / B)
    assert cost.estimate(_w(workers=1), dev).stats_comm_bytes == 0  # one process sends nothing
    # candidates: the truncated E-step scores C clusters a row, the dense one all K
    assert _w(clusters=30).scored == 30 and _w(clusters=1000).scored == 16 and _w(candidates=0).scored == 1000


def test_fit_device_recovers_the_constants_that_made_the_points():
    true = cost.Device("t", flops=7e9, bandwidth=1e9, step_overhead=3e-3, epoch_overhead=0.4, base_memory=1.2e9,
                       memory_cap=1e12, source="", sync_overhead=1e-3, dist_memory=0.3e9, parallel=2,
                       row_peak_bytes=1500)
    loads = [_w(rows=n, clusters=k, workers=w) for n in (100_000, 400_000, 1_600_000) for k in (50, 400)
             for w in (1, 2, 4)]
    points = [(w, cost.estimate(w, true).epoch_seconds, cost.estimate(w, true).memory_bytes) for w in loads]
    got = cost.fit_device(points, cost.DEVICES["cpu"])
    assert got.flops == pytest.approx(true.flops, rel=1e-6)
    assert got.step_overhead == pytest.approx(true.step_overhead, rel=1e-6)
    assert got.epoch_overhead == pytest.approx(true.epoch_overhead, rel=1e-6)
    assert got.sync_overhead == pytest.approx(true.sync_overhead, rel=1e-6)
    assert got.base_memory == pytest.approx(true.base_memory, rel=1e-6)
    assert got.dist_memory == pytest.approx(true.dist_memory, rel=1e-6)
    assert got.row_peak_bytes == pytest.approx(true.row_peak_bytes, rel=1e-6)


def test_plan_with_rows_prints_the_cost_and_refuses_an_unknown_device(capsys, monkeypatch):
    code, text = _plan(capsys, monkeypatch, "--rows", "14000000", "--clusters", "10000", "--workers", "8",
                       "--device", "cuda")
    assert code == 0, text
    e = cost.estimate(_w(rows=14_000_000, clusters=10_000, workers=8), cost.DEVICES["cuda"])
    assert f"memory per worker {e.memory_bytes / 1e9:,.2f} GB" in text
    assert f"epoch {e.epoch_seconds:,.1f} s" in text
    assert math.isfinite(e.epoch_seconds) and e.epoch_seconds > 0
    code, text = _plan(capsys, monkeypatch, "--rows", "1000", "--device", "tpu")
    assert code != 0 and "--device must be one of cpu, cuda" in text
