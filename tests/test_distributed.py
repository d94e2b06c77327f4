"""Distribution: 2 Ray Train workers (gloo, real local Ray) follow the 1-process run; checkpoints
resume; a killed worker's job recovers from its last checkpoint.

One 1-process reference run and two Ray runs are shared by the tests (Ray start-up dominates).
Tolerances: the nets train in float32, and DDP's gradient all-reduce sums the ranks' float32
partial gradients in another order than one process does, so per-epoch statistics agree to ~1e-5
relative, not to float64 rounding; the discrete outcomes (accepted moves, K, assignments) agree
exactly. A wrong distribution (a rank's rows missing or counted twice, different batches per rank,
unsynchronised moves) is off by O(1).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cluster_service.config import FitConfig
from cluster_service.io.shards import write_shards
from cluster_service.runtime.trainer import FaultInjection, fit_distributed, local_rows
from cluster_service.serve.model import load_model
from cluster_service.train.engine import Engine
from cluster_service.train.fit import fit, run_schedule

pytestmark = pytest.mark.ray

# 40 epochs with moves every 4 epochs from epoch 8: the run splits 1 -> 6 at epoch 8, then merges,
# splits and merges again (epochs 12, 16, 20).
CFG = FitConfig().replace(
    **{
        "device": "cpu",
        # A k-means start from one cluster, so that the run must split (k-means and the
        # cell-tree splits train on the same global rows in every layout: Engine._global_rows).
        "init": "kmeans",
        "prior.psi_mode": "data_diag",
        "prior.nu_mode": "fixed",
        "schedule.epochs": 40,
        "schedule.warmup_epochs": 3,
        "schedule.subcluster_start": 3,
        "schedule.first_split": 8,
        "schedule.move_period": 8,
        "schedule.final_epochs": 2,  # moves to epoch 37: splits 8..32, merges 12..36
        "net.batch_size": 512,
        "net.min_steps_per_epoch": 4,
    }
)
RESUME_AT = 14  # inside the freeze after the merge of epoch 12; a split (16) and a merge (20) follow
STAT_TOL = 1e-4  # see the module docstring
TIME_FIELDS = ("time_total", "time_train", "time_stats", "time_reduce", "time_mstep", "time_moves")
# what a process measures of itself: bytes through collectives (0 in one process) and its memory
MEASURED_FIELDS = ("comm_bytes", "grad_bytes", "peak_memory", "peak_device_memory")


class EpochTrace:
    """Rank 0 saves each epoch's reduced statistics and record, and appends the epoch to a log
    (the log shows which epochs ran twice after a restart). Pickled by value into the workers."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def __call__(self, rec, engine) -> None:
        if engine.comm.rank != 0:
            return
        stats, sub = engine.last_stats
        torch.save(
            {"rec": rec.as_dict(), "count": stats.count, "sum": stats.sum, "scatter": stats.scatter,
             "sub_count": sub.count, "sub_sum": sub.sum, "sub_scatter": sub.scatter},
            self.directory / f"epoch-{rec.epoch:03d}.pt",
        )
        with open(self.directory / "epochs.log", "a") as f:
            f.write(f"{rec.epoch}\n")


def _pickle_by_value():
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _discrete(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in TIME_FIELDS + MEASURED_FIELDS and isinstance(v, int | bool)}


@pytest.fixture(scope="module")
def data(tmp_path_factory, mixture_small):
    x, y = mixture_small
    root = tmp_path_factory.mktemp("dist-data")
    write_shards(root / "shards", np.arange(len(x), dtype=np.int64), x, y, rows_per_shard=500)  # 6 shards
    return x, y, root / "shards"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    """The 1-process run, traced, with a snapshot of the engine state after epoch RESUME_AT - 1."""
    x, _, _ = data
    trace = tmp_path_factory.mktemp("trace-1proc")
    snapshot = {}

    def snap(rec, engine):
        if rec.epoch == RESUME_AT - 1:
            path = trace / "state.pt"
            torch.save(engine.state_dict(), path)
            snapshot["path"] = path

    result = fit(x, CFG, callbacks=[EpochTrace(trace), snap])
    return result, trace, snapshot["path"]


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory, data, ray_local):
    _, _, shards = data
    _pickle_by_value()
    root = tmp_path_factory.mktemp("run-2w")
    (root / "trace").mkdir()
    summary = fit_distributed(
        shards, root / "out", CFG, num_workers=2, checkpoint_every=5, callbacks=[EpochTrace(root / "trace")]
    )
    return summary, root


def _assignments(out: Path) -> pq.Table:
    return pq.read_table(out / "assignments.parquet")


def test_local_rows_partition_the_data(data):
    """Shards i % world == rank: together the ranks hold every row once, at its global position."""
    x, _, shards = data
    parts = [local_rows(shards, r, 2) for r in range(2)]
    gidx = np.concatenate([p.global_index for p in parts])
    assert sorted(gidx.tolist()) == list(range(len(x)))
    for p in parts:
        assert p.n_global == len(x)
        np.testing.assert_array_equal(p.x, x[p.global_index])
        np.testing.assert_array_equal(p.ids, p.global_index)
    assert parts[0].global_index[:500].tolist() == list(range(500))  # shard 0
    assert parts[1].global_index[:500].tolist() == list(range(500, 1000))  # shard 1


def test_engine_resume_reproduces_uninterrupted_run(reference, data):
    """save state_dict mid-run -> fresh Engine -> load -> continue == the uninterrupted run."""
    x, _, _ = data
    result, _, state_path = reference
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(CFG.seed + 123)  # the global RNG must not matter after a restore
        engine = Engine(CFG, torch.from_numpy(x.astype(np.float64)))
        engine.load_state_dict(torch.load(state_path, weights_only=False))
        assert engine.epoch == RESUME_AT
        history = run_schedule(engine)
    assert history[0].frozen, "the restored engine must continue the freeze after the last move"
    assert any(r.splits_accepted or r.merges_accepted for r in history), "no move after the resume"
    assert [_discrete(r.as_dict()) for r in history] == [
        _discrete(r.as_dict()) for r in result.history[RESUME_AT:]
    ]
    # Not bit-for-bit: float32 matmuls of restored (re-allocated) tensors may round differently.
    np.testing.assert_allclose(
        [r.log_marginal for r in history], [r.log_marginal for r in result.history[RESUME_AT:]], rtol=1e-7
    )
    engine.settle(CFG.schedule.settle_steps)  # as finish_fit does before the MAP assignment
    clusters, log_prob = engine.assign()
    assert engine.n_clusters == result.n_clusters
    np.testing.assert_array_equal(clusters, result.clusters)
    np.testing.assert_allclose(log_prob, result.log_prob, rtol=1e-6)


def test_two_workers_reproduce_one_process(reference, two_workers, data):
    result, trace_1, _ = reference
    summary, root = two_workers
    x, y, _ = data
    n_epochs = CFG.schedule.epochs
    recs_1 = [r.as_dict() for r in result.history]
    moves = [(r["epoch"], r["splits_accepted"], r["merges_accepted"]) for r in recs_1 if r["splits_accepted"]
             or r["merges_accepted"]]
    assert len(moves) >= 3 and result.n_clusters >= 4, "the reference run must exercise splits and merges"

    # Same statistics every epoch (see the module docstring for the tolerance).
    worst = 0.0
    for e in range(n_epochs):
        a = torch.load(trace_1 / f"epoch-{e:03d}.pt", weights_only=False)
        b = torch.load(root / "trace" / f"epoch-{e:03d}.pt", weights_only=False)
        assert _discrete(a["rec"]) == _discrete(b["rec"]), f"epoch {e}: records differ"
        scale = {"count": len(x), "sum": len(x) * np.abs(x).max(), "scatter": len(x) * np.square(x).max()}
        for key in ("count", "sum", "scatter", "sub_count", "sub_sum", "sub_scatter"):
            assert a[key].shape == b[key].shape, f"epoch {e}: {key} shape"
            err = float((a[key] - b[key]).abs().max()) / scale[key.removeprefix("sub_")]
            assert err < STAT_TOL, f"epoch {e}: {key} differs by {err:.2e} of its scale"
            worst = max(worst, err)
        # summed over ranks (one rank's part alone would be ~half)
        assert b["rec"]["loss_cluster"] == pytest.approx(a["rec"]["loss_cluster"], rel=1e-2, abs=1e-5)
    print(f"largest statistics difference, 2 workers vs 1 process: {worst:.2e} of scale")

    # Same outcome: K, model, assignments in global row order, history.
    out = root / "out"
    assert summary["k_found"] == result.n_clusters
    model = load_model(out / "model")
    assert model.n_clusters == result.n_clusters
    np.testing.assert_allclose(model.means, result.model.means, rtol=1e-4, atol=1e-4)
    table = _assignments(out)
    np.testing.assert_array_equal(table.column("id").to_numpy(), np.arange(len(x)))
    np.testing.assert_array_equal(table.column("cluster").to_numpy(), result.clusters)
    history = json.loads((out / "history.json").read_text())
    assert [_discrete(r) for r in history] == [_discrete(r) for r in recs_1]
    assert summary["nmi"] > 0.9  # the fit is also good, not only equal


def test_killed_worker_recovers_from_last_checkpoint(two_workers, data, tmp_path):
    """Rank 1 dies (os._exit) after epoch 21; Ray Train restarts the group, which resumes from the
    last registered checkpoint (epoch 19's, or an earlier one when the controller had not yet taken
    in the latest report) and ends exactly where the uninterrupted 2-worker run ended."""
    _, _, shards = data
    _pickle_by_value()
    (tmp_path / "trace").mkdir()
    marker = tmp_path / "killed.txt"
    summary = fit_distributed(
        shards, tmp_path / "out", CFG, num_workers=2, checkpoint_every=5, max_failures=1,
        callbacks=[EpochTrace(tmp_path / "trace")],
        fault=FaultInjection(rank=1, epoch=21, marker=str(marker)),
    )
    assert marker.is_file(), "the fault was not injected"
    ran = [int(e) for e in (tmp_path / "trace" / "epochs.log").read_text().split()]
    # epochs 0..21 before the kill (rank 0 finished 21 too), then from a checkpoint (not epoch 0) on
    assert ran[:22] == list(range(22))
    restart = ran[22]
    assert restart in (5, 10, 15, 20), f"restarted at epoch {restart}, not after a checkpoint"
    assert ran[22:] == list(range(restart, CFG.schedule.epochs))

    ref_summary, ref_root = two_workers
    assert summary["k_found"] == ref_summary["k_found"]
    model = load_model(tmp_path / "out" / "model")
    assert model.n_clusters == summary["k_found"]
    np.testing.assert_array_equal(
        _assignments(tmp_path / "out").column("cluster").to_numpy(),
        _assignments(ref_root / "out").column("cluster").to_numpy(),
    )
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    assert [r["epoch"] for r in history] == list(range(CFG.schedule.epochs))


def test_cli_refuses_more_workers_than_shards(data, tmp_path, monkeypatch, capsys):
    """`fit --workers N` checks the data before starting Ray: a clear message and exit code 2."""
    from cluster_service.ops import cli

    _, _, shards = data
    argv = ["cluster-service", "fit", str(shards), "--workers", "7", "--no-tracking", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "6 shard(s) for 7 workers" in err and str(shards.name) in err


def test_rerun_with_another_config_is_refused(data, tmp_path):
    """A re-run on the same RUN_DIR resumes the same fit only; another config fails before Ray."""
    from cluster_service.runtime.trainer import _check_resume

    _, _, shards = data
    key = {"data": str(shards.resolve()), "config": CFG.to_dict()}
    _check_resume(tmp_path / "checkpoints", key)
    _check_resume(tmp_path / "checkpoints", key)  # the same fit again: accepted
    with pytest.raises(ValueError, match="different fit .*config"):
        fit_distributed(shards, tmp_path, CFG.replace(seed=7), num_workers=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_one_gpu_worker_fits(data, tmp_path, ray_local):
    """The NCCL path: one GPU worker (float32 dense math) fits the mixture and writes a valid model."""
    _, y, shards = data
    if ray_local.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("the session's Ray instance has no GPU resource")
    summary = fit_distributed(shards, tmp_path / "out", CFG, num_workers=1, use_gpu=True)
    model = load_model(tmp_path / "out" / "model")
    assert model.n_clusters == summary["k_found"] >= 4
    assert len(_assignments(tmp_path / "out")) == len(y)
    assert summary["nmi"] > 0.9


@pytest.mark.ray
def test_cli_fit_with_workers_shows_the_one_process_progress_and_table(data, tmp_path, monkeypatch, capsys,
                                                                        ray_local):
    """`fit --workers 2` prints the same progress bar (epoch, K, loss) and summary table as a one-process
    fit, fed from rank 0's records; Ray's own lines (TrainingReport dicts, checkpoint paths) stay out."""
    from cluster_service.ops import cli

    _, _, shards = data
    own = {k: v for k, v in CFG.flat().items() if k.startswith(("schedule.", "net.min_steps", "seed"))}
    sets = [a for k, v in own.items() for a in ("--set", f"{k}={v}")]
    outputs = {}
    for name, extra in (("one", []), ("two", ["--workers", "2"])):
        argv = ["cluster-service", "fit", str(shards), "--no-tracking", "--out", str(tmp_path / name), *sets, *extra]
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as done:
            cli.main()
        outputs[name] = capsys.readouterr()
        assert done.value.code == 0, outputs[name].err[-2000:]
    for name, cap in outputs.items():
        text = cap.out + cap.err
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        epochs = summary["epochs"]  # an early stop ends the bar at the epochs run (the plan is a cap)
        assert epochs <= CFG.schedule.epochs and summary["stopped"], summary
        assert f"{epochs}/{epochs}" in text and "K=" in text, name  # the bar reached the last epoch
        assert "k_found" in cap.out and "model:" in cap.out and "stopped" in cap.out, name  # the table, paths
    two = outputs["two"].out + outputs["two"].err
    assert "TrainingReport(" not in two and "Checkpoint successfully created" not in two
    assert "on 2 worker(s)" in two
