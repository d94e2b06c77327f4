"""Scaling past one machine (DESIGN §5): no collective's size grows with N, each rank writes its
own assignment parts, and the summaries that replace gathered rows (the split step's capped
sample, the novelty histograms) give what the rows would.

The 2-rank test runs the Engine under gloo (torch.multiprocessing, no Ray) on N and 4N rows of
one mixture and compares every epoch's bytes: a collective that carried rows (as the split step's
and the calibration's gathers did) would carry about 4 times as much at 4N."""

from __future__ import annotations

import threading

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cluster_service.config import FitConfig
from cluster_service.datasets import make_mixture
from cluster_service.io import runs
from cluster_service.ops import cost
from cluster_service.serve.novelty import LEVELS, novelty_table
from cluster_service.train.rows import _smallest_per_group

# k-means start at the true K of well-separated clusters (so both sizes hold the same K every
# epoch), a split round at epoch 4 and a merge round at 8; the cap and the cells bind at both
# sizes, and so does min_steps_per_epoch (batches of n / 4 rows).
CFG = FitConfig().replace(**{
    "device": "cpu", "init": "kmeans", "k_init": 6, "prior.psi_mode": "data_diag", "prior.nu_mode": "fixed",
    "schedule.epochs": 12, "schedule.warmup_epochs": 2, "schedule.subcluster_start": 2,
    "schedule.first_split": 4, "schedule.move_period": 8, "schedule.final_epochs": 2,
    "net.batch_size": 4096, "net.min_steps_per_epoch": 4, "moves.split_sample_per_cell": 16, "moves.split_cells": 4,
})
N = 1200


def _data(n: int) -> np.ndarray:
    return make_mixture(n, 8, 6, seed=1, separation=12.0)[0]


def _gloo_worker(rank: int, world: int, store: str, sizes: list[int], out: str) -> None:
    import torch.distributed as dist

    from cluster_service.train.comm import TorchDistComm
    from cluster_service.train.engine import Engine
    from cluster_service.train.export import finish_fit
    from cluster_service.train.fit import run_schedule

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        for n in sizes:
            x = _data(n)
            rows = np.arange(rank, n, world)
            comm = TorchDistComm(torch.device("cpu"))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(CFG.seed)
                engine = Engine(CFG, torch.from_numpy(x[rows]), torch.from_numpy(rows), n, comm)
                engine.initialize()
                history = run_schedule(engine)
            before = comm.bytes_moved
            finish_fit(engine)
            np.savez(f"{out}/rank{rank}-{n}.npz", comm=[r.comm_bytes for r in history],
                     grad=[r.grad_bytes for r in history], k=[r.n_clusters for r in history],
                     split=[r.splits_proposed > 0 for r in history],
                     merge=[r.merges_proposed > 0 for r in history], finish=comm.bytes_moved - before,
                     rss=[r.peak_memory for r in history])
        dist.barrier()  # both ranks done with collectives before gloo is torn down
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_move_the_same_bytes_at_n_and_4n_rows(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_gloo_worker, args=(2, str(tmp_path / "store"), [N, 4 * N], str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        small, large = (np.load(tmp_path / f"rank{rank}-{n}.npz") for n in (N, 4 * N))
        assert small["k"].tolist() == large["k"].tolist()  # same K: the statistics have the same size
        assert small["split"].any() and small["split"].tolist() == large["split"].tolist()
        assert small["merge"].any() and small["merge"].tolist() == large["merge"].tolist()
        assert (small["comm"] > 0).all() and (small["rss"] > 0).all()
        # statistics, decisions, the capped sample: pickling differs by a few bytes a number, rows by 4x
        np.testing.assert_allclose(large["comm"], small["comm"], rtol=0.1)
        assert abs(int(large["finish"]) - int(small["finish"])) <= 0.1 * int(small["finish"])
        # the nets' gradients: the same steps per epoch (min_steps_per_epoch) at both sizes
        np.testing.assert_array_equal(large["grad"], small["grad"])
        assert (small["grad"] > 0).all()
        # the cost model (ops.cost) of the same workload: the statistics' all-reduce is the bytes of an
        # epoch without moves; the gradients at most its both-nets figure, at least the clustering net's
        for n, rec in ((N, small), (4 * N, large)):
            moves = rec["split"] | rec["merge"]
            ks = rec["k"].tolist()
            for e, (comm, grad, moved) in enumerate(zip(rec["comm"], rec["grad"], moves, strict=True)):
                # the nets and statistics of an epoch have the K it began with or the one it ended with
                est = []
                for k in {ks[max(0, e - 1)], ks[e]}:
                    w = cost.Workload.from_config(CFG, n, 8, int(k), 2)
                    est.append((w, cost.estimate(w, cost.DEVICES["cpu"])))
                if not moved:
                    assert any(abs(comm - x.stats_comm_bytes) <= 0.1 * x.stats_comm_bytes for _, x in est), (e, comm)
                assert min(2 * 4 * w.cluster_net_params * w.steps for w, _ in est) <= grad
                assert grad <= max(x.grad_comm_bytes for _, x in est), (e, grad)


def test_one_process_moves_no_bytes():
    from cluster_service.train.fit import fit

    res = fit(_data(600), CFG.replace(**{"schedule.epochs": 6}))
    assert all(r.comm_bytes == 0 and r.grad_bytes == 0 and r.peak_memory > 0 for r in res.history)


def test_the_split_sample_is_the_same_in_every_worker_layout():
    """Each rank's cap smallest keys per cluster, then the cap smallest of their union, are the cap
    smallest of all rows: the cells' k-means sees the same rows with 1, 2 or 3 workers."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randint(0, 5, (3000,), generator=gen)
    keys = torch.randperm(10**6, generator=gen)[:3000]
    whole = torch.nonzero(_smallest_per_group(z, keys, 40)).flatten()
    assert torch.bincount(z[whole]).tolist() == [40] * 5
    for world in (2, 3):
        sent = torch.cat([r + world * torch.nonzero(_smallest_per_group(z[r::world], keys[r::world], 40)).flatten()
                          for r in range(world)])
        assert sent.numel() <= world * 5 * 40
        again = sent[_smallest_per_group(z[sent], keys[sent], 40)]
        assert sorted(again.tolist()) == sorted(whole.tolist())
    for g in range(5):  # the kept rows of a group are exactly its 40 smallest keys
        members = torch.nonzero(z == g).flatten()
        smallest = members[keys[members].argsort()[:40]]
        assert sorted(smallest.tolist()) == sorted(whole[z[whole] == g].tolist())
    caps = torch.tensor([3, 0, 7, 40, 1000])  # a cap per group (cells x rows per cell)
    assert torch.bincount(z[_smallest_per_group(z, keys, caps)], minlength=5).tolist() == [
        3, 0, 7, 40, int((z == 4).sum())]


def _two_process_table(clusters, dens, n_clusters):
    """novelty_table computed by two threads on halves of the rows, their reductions summing /
    maximising the halves' arrays (as all-reduces would)."""
    barrier, slots, out = threading.Barrier(2), [None, None], [None, None]

    def reducer(i, op):
        def reduce(a):
            slots[i] = a
            barrier.wait()
            merged = op(slots[0], slots[1])
            barrier.wait()
            return merged
        return reduce

    def work(i):
        sel = slice(i, None, 2)
        out[i] = novelty_table(clusters[sel], dens[sel], n_clusters, reduce_sum=reducer(i, np.add),
                               reduce_max=reducer(i, np.maximum))

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_novelty_from_merged_histograms_matches_the_rows_quantiles():
    """Quantiles read off the all-reduced histograms equal the exact ones within the histogram's
    resolution, whatever outliers the range holds; two processes get the one-process table."""
    rng = np.random.default_rng(0)
    clusters = rng.integers(0, 3, 30_000)
    dens = rng.normal(size=30_000) * (1 + clusters) - 20.0 * clusters
    dens[:5] = -3e20  # rows alone on a direction: the leave-one-out density collapses
    one = novelty_table(clusters, dens, 4)
    for k in range(3):
        mine = dens[clusters == k]
        assert one["quantiles"][k][0] == mine.min()
        # the share of the cluster's rows at or below each quantile: its level, up to one row either
        # side (the tail is sparse) and a part of a fine bin's rows (0.3 % in the bulk)
        share = (mine[:, None] <= one["quantiles"][k][None, 1:]).mean(0)
        np.testing.assert_allclose(share, LEVELS[1:], atol=2 / mine.size + 0.003)
    assert (one["quantiles"][3] == one["quantiles"][3][0]).sum() == 1  # cluster 3: pooled, not the outliers
    assert one["train_counts"].tolist() == np.bincount(clusters, minlength=4).tolist()
    for table in _two_process_table(clusters, dens, 4):
        for key in one:
            np.testing.assert_allclose(table[key], one[key], rtol=1e-12)


class _Model:
    version = "v1"

    def novelty_of(self, clusters, log_prob, fpr):
        return np.full(len(clusters), np.nan), np.zeros(len(clusters), bool)


def test_assignment_parts_of_two_ranks_read_as_one_table_in_row_order(tmp_path):
    """Rank 0 holds shards 0 and 2, rank 1 shard 1: each writes its runs of rows; the run reader,
    pyarrow and pandas see one table in the data's row order; parts of an earlier run go."""
    import pandas as pd

    held = {0: np.r_[0:4, 8:12], 1: np.arange(4, 8)}
    (runs.assignments_path(tmp_path)).mkdir(parents=True)
    (runs.assignments_path(tmp_path) / "part-000000000006.parquet").write_bytes(b"an earlier layout's part")
    names = []
    for gidx in held.values():  # each rank's rows, in any order
        g = gidx[::-1]
        names += runs.write_assignment_parts(tmp_path, _Model(), g, 100 + g, g % 3, -g.astype(float), g * 0.5)
    runs.keep_assignment_parts(tmp_path, names)
    assert sorted(names) == ["part-000000000000.parquet", "part-000000000004.parquet", "part-000000000008.parquet"]
    table = runs.read_assignments(tmp_path)
    assert table.column("id").to_pylist() == list(range(100, 112))
    assert table.column("cluster").to_pylist() == [i % 3 for i in range(12)]
    assert table.column_names == ["id", "cluster", "log_prob", "margin", "novelty", "novel", "model_version"]
    assert pq.read_table(runs.assignments_path(tmp_path)).column("id").to_pylist() == list(range(100, 112))
    assert pd.read_parquet(runs.assignments_path(tmp_path))["id"].tolist() == list(range(100, 112))
    with pytest.raises(FileNotFoundError):
        runs.read_assignments(tmp_path / "nothing")


@pytest.mark.filterwarnings("ignore::cluster_service.config.ScheduleWarning")
def test_rows_kept_as_bfloat16_fit_like_float32():
    """row_dtype bfloat16: the engine holds its rows in 2 bytes each, its statistics stay float64,
    and the fit finds the same clusters as with float32 rows (the rounding is 2^-9 of a row)."""
    from cluster_service.train.fit import fit

    x = _data(1500)
    cfg = CFG.replace(**{"schedule.epochs": 10})
    ref, half = fit(x, cfg), fit(x, cfg.replace(row_dtype="bfloat16"))
    assert half.engine.x.dtype == torch.bfloat16 and ref.engine.x.dtype == torch.float32
    assert half.engine.last_stats[0].scatter.dtype == torch.float64
    assert half.n_clusters == ref.n_clusters
    assert (half.clusters == ref.clusters).mean() > 0.99
    assert half.history[-1].log_marginal == pytest.approx(ref.history[-1].log_marginal, rel=1e-3)
