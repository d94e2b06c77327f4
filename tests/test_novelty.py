"""Novelty in `assign`: calibrated on the training rows at fit time, flags what no cluster explains,
reported per shard with the drift of cluster shares; the pyfunc returns the same columns."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from cluster_service.config import FitConfig
from cluster_service.datasets import make_mixture
from cluster_service.io.shards import write_shards
from cluster_service.runtime.assign_job import REPORT, assign_shards
from cluster_service.serve.novelty import leave_one_out_log_density, novelty_table, share_drift, tail_probability
from cluster_service.train.fit import fit


def test_tail_probability_reads_the_training_quantiles():
    rng = np.random.default_rng(0)
    dens = rng.normal(size=20_000)
    clusters = (np.arange(20_000) % 2).astype(np.int64)
    dens[clusters == 1] += 10.0  # cluster 1's densities are shifted: its own quantiles apply
    table = novelty_table(clusters, dens, 3)
    assert table["train_counts"].tolist() == [10_000, 10_000, 0]
    probe = np.array([-2.326, 0.0, 7.674, 10.0, -50.0])
    tail = tail_probability(table, np.array([0, 0, 1, 1, 2]), probe)
    np.testing.assert_allclose(tail[:4], [0.01, 0.5, 0.01, 0.5], atol=0.004)  # the normal CDF
    assert tail[4] == 0.0  # cluster 2 had no rows: pooled quantiles, far below every training row
    assert share_drift(np.array([5, 5, 0]), np.array([1, 1, 0])) == 0.0
    assert share_drift(np.array([0, 10, 0]), np.array([1, 1, 0])) == pytest.approx(0.5)


def test_leave_one_out_density_equals_refitting_without_the_row():
    """The closed form (Sherman-Morrison on the NIW posterior scale) against the NIW MAP refitted on
    the other rows and scipy's Gaussian density, for every row of a cluster with few rows per dimension."""
    import torch
    from scipy.stats import multivariate_normal
    from stats_helpers import stats_from_points

    from cluster_service.core.niw import NIWPrior, map_estimate

    rng = np.random.default_rng(0)
    n, d = 30, 12
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 3.0
    prior = NIWPrior(1e-3, d + 2.0, torch.zeros(d, dtype=torch.float64), 0.3 * torch.eye(d, dtype=torch.float64))
    mean, chol = (t.numpy() for t in map_estimate(prior, stats_from_points(torch.from_numpy(x))))
    cov = chol @ chol.T
    full = multivariate_normal(mean, cov).logpdf(x)
    logdet = np.linalg.slogdet(cov)[1]
    got = leave_one_out_log_density(full, np.full(n, n), np.full(n, logdet), prior.kappa, prior.nu, d)
    want = []
    for i in range(n):
        rest = torch.from_numpy(np.delete(x, i, axis=0))
        m_i, c_i = (t.numpy() for t in map_estimate(prior, stats_from_points(rest)))
        want.append(multivariate_normal(m_i, c_i @ c_i.T).logpdf(x[i]))
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-8)
    assert np.all(got < full)  # a row always looks less likely to the fit that did not see it


@pytest.mark.filterwarnings("ignore::cluster_service.config.ScheduleWarning")  # no moves wanted: K 3 given
def test_held_out_rows_of_an_under_determined_cluster_are_not_novel():
    """Three Gaussians in 32-d with 80 training rows each (2.5 per dimension): fresh rows of the same
    Gaussians are flagged at about the nominal 1 %, not at the rate the in-sample fit would give."""
    rng = np.random.default_rng(1)
    d, per = 32, 80
    centres = rng.normal(scale=8.0, size=(3, d))
    mixes = [rng.normal(size=(d, d)) / np.sqrt(d) for _ in range(3)]

    def draw(m):
        return np.concatenate([c + rng.normal(size=(m, d)) @ a for c, a in zip(centres, mixes, strict=True)])

    res = fit(draw(per), FitConfig(seed=0, init="kmeans", k_init=3).replace(**{"schedule.epochs": 20}))
    model = res.model
    assert model.n_clusters == 3
    fresh = draw(2000)
    lj = model.log_joint(fresh)
    _, novel = model.novelty_of(lj.argmax(1), lj.max(1), 0.01)
    assert novel.mean() < 0.05, novel.mean()
    # without the correction the same fit flags most of them: the quantiles of in-sample densities
    plain = novelty_table(res.clusters, res.log_prob - model.log_weights[res.clusters], 3)
    tail = tail_probability(plain, lj.argmax(1), lj.max(1) - model.log_weights[lj.argmax(1)])
    assert (tail < 0.01).mean() > 0.1


@pytest.fixture(scope="module")
def seen_and_unseen():
    """A 40-component mixture; the model is fitted on 30 components, 10 are held back."""
    x, y = make_mixture(16_000, 8, 40, seed=3, separation=12.0, imbalance=2.0)
    seen = y < 30
    cfg = FitConfig().replace(**{"init": "kmeans", "k_init": 30, "seed": 0, "device": "cpu", "schedule.epochs": 12,
                                 "schedule.first_split": 6, "schedule.final_epochs": 6,
                                 "net.min_steps_per_epoch": 4})
    train, fresh = np.flatnonzero(seen)[::2], np.flatnonzero(seen)[1::2]
    res = fit(x[train], cfg)
    return res.model, x, y, fresh, np.flatnonzero(~seen)


def test_assign_flags_held_back_components_and_reports_drift(seen_and_unseen, tmp_path):
    model, x, y, fresh, unseen = seen_and_unseen
    assert model.novelty is not None and model.novelty["quantiles"].shape[0] == model.n_clusters
    rows = np.concatenate([fresh, unseen])
    write_shards(tmp_path / "new", rows, x[rows], y[rows], rows_per_shard=3000)
    model.save(tmp_path / "model")
    report = assign_shards(tmp_path / "model", tmp_path / "new", tmp_path / "out", method="exact", use_ray=False)
    table = pq.read_table(sorted((tmp_path / "out").glob("*.parquet")))
    ids, novel = table.column("id").to_numpy(), table.column("novel").to_numpy(zero_copy_only=False)
    from_unseen = np.isin(ids, unseen)
    assert novel[from_unseen].mean() >= 0.95  # what no cluster explains
    assert novel[~from_unseen].mean() <= 0.02  # fresh rows of the seen components: ~ the 1% rate
    nov = table.column("novelty").to_numpy()
    assert ((nov >= 0) & (nov <= 1)).all() and np.array_equal(novel, nov > 0.99)
    on_disk = json.loads((tmp_path / "out" / REPORT).read_text())
    assert on_disk["novel"] == int(novel.sum()) == report.as_dict()["novel"]
    assert sum(on_disk["novel_by_shard"].values()) == on_disk["novel"]
    assert sum(on_disk["rows_per_cluster"]) == len(rows)
    assert 0.1 < on_disk["share_drift_tv"] < 0.9  # a quarter of the rows pile into a few clusters

    # a stricter rate flags fewer rows; the re-run redoes the shards (the rate is part of the stamp)
    strict = assign_shards(tmp_path / "model", tmp_path / "new", tmp_path / "out", method="exact",
                           use_ray=False, novelty_fpr=0.001)
    assert strict.as_dict()["done"] == report.as_dict()["shards"] and strict.as_dict()["novel"] <= on_disk["novel"]
    with pytest.raises(ValueError, match="novelty_fpr must be in"):
        assign_shards(tmp_path / "model", tmp_path / "new", tmp_path / "out", use_ray=False, novelty_fpr=1.5)


def test_pyfunc_returns_the_novelty_columns(seen_and_unseen, tmp_path):
    from types import SimpleNamespace

    from cluster_service.serve.pyfunc import MODEL_DIR_ARTIFACT, ClusterModel

    model, x, _, fresh, unseen = seen_and_unseen
    model.save(tmp_path / "model")
    pyfunc = ClusterModel("exact")
    pyfunc.load_context(SimpleNamespace(artifacts={MODEL_DIR_ARTIFACT: str(tmp_path / "model")}))
    out = pyfunc.predict(None, x[np.concatenate([fresh[:200], unseen[:200]])])
    assert list(out.columns) == ["cluster", "log_prob", "margin", "novelty", "novel"]
    assert out["novel"][:200].mean() <= 0.05 and out["novel"][200:].mean() >= 0.9


@pytest.fixture(scope="module")
def thirty_of_forty(tmp_path_factory):
    """A model fitted (default start, short schedule) on 30 of 40 components; all 40 as an .npz."""
    x, y = make_mixture(12_000, 8, 40, seed=3, separation=12.0, imbalance=2.0)
    root = tmp_path_factory.mktemp("update")
    seen = y < 30
    np.savez(root / "old.npz", X=x[seen], y=y[seen])
    np.savez(root / "all.npz", X=x, y=y)
    cfg = FitConfig().replace(**{"seed": 0, "device": "cpu", "net.min_steps_per_epoch": 4, "schedule.epochs": 60,
                                 "schedule.first_split": 10, "schedule.move_period": 8, "schedule.final_epochs": 6})
    res = fit(x[seen], cfg)
    res.model.save(root / "model")
    return root, res.model, x, y


def test_update_adds_the_new_clusters_and_keeps_the_old_ids(thirty_of_forty, tmp_path, monkeypatch, capsys):
    """`cluster-service update MODEL all.npz`: K goes to 40 +- 2 without restarting from scratch, the
    old clusters keep their ids (same id, same place), lineage.json maps old -> new, assignments carry
    the new model version (its speed against a from-scratch fit is in BENCHMARKS.md, not a timed test)."""
    import sys

    from cluster_service.ops import cli
    from cluster_service.report.evaluate import score
    from cluster_service.serve.model import load_model

    root, old, x, y = thirty_of_forty
    assert 28 <= old.n_clusters <= 32
    args = ["cluster-service", "update", str(root / "model"), str(root / "all.npz"), "--out", str(tmp_path / "run"),
            "--no-tracking", "--quiet", "--epochs", "40", "--set", "schedule.first_split=8",
            "--set", "schedule.move_period=8"]
    monkeypatch.setattr(sys, "argv", args)
    with pytest.raises(SystemExit) as done:
        cli.main()
    assert done.value.code == 0, capsys.readouterr().err[-2000:]
    new = load_model(tmp_path / "run" / "model")
    assert abs(new.n_clusters - 40) <= 2
    moved = np.linalg.norm(new.means[: old.n_clusters] - old.means, axis=1)
    assert (moved < 1.0).sum() >= 28  # ids kept: cluster i is still where old cluster i was
    lineage = json.loads((tmp_path / "run" / "lineage.json").read_text())
    assert len(lineage["persisting"]) >= 28 and lineage["previous_version"] == old.version
    assert all(lineage["persisting"][k] == int(k) for k in lineage["persisting"] if int(k) < new.n_clusters)
    table = pq.read_table(tmp_path / "run" / "assignments.parquet")
    assert set(table.column("model_version").to_pylist()) == {new.version} and new.version
    assert score(y, table.column("cluster").to_numpy()).nmi > 0.95
    # ended as a fit ends: the same summary fields (scored once) and report.html
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert {"n_samples", "k_found", "seconds", "data", "workers", "nmi", "k_before", "kept_ids"} <= summary.keys()
    assert summary["nmi"] > 0.95 and (tmp_path / "run" / "report.html").is_file()


def test_renumbering_a_calibrated_model_renumbers_its_calibration():
    """update calibrates at the end of the fit (train.export.finish_fit), then gives the clusters their
    stable ids: the same calibration as for the renumbered model."""
    from dataclasses import replace

    from cluster_service.bench.assign import sample_model, synthetic_model
    from cluster_service.train.update import permute_clusters

    model = synthetic_model(6, 3, seed=0)
    x, _ = sample_model(model, 2000, seed=1)
    model.calibrate_novelty(*model.predict(x))
    order = np.array([3, 0, 5, 1, 4, 2])
    renumbered = permute_clusters(replace(model, novelty=None), order)
    renumbered.calibrate_novelty(*renumbered.predict(x))
    permuted = permute_clusters(model, order).novelty
    assert permuted.keys() == renumbered.novelty.keys()
    for key, table in renumbered.novelty.items():
        np.testing.assert_allclose(permuted[key], table, rtol=1e-12)


def test_a_directory_with_no_readable_shard_reports_no_share_drift(seen_and_unseen, tmp_path):
    """Shares of zero assigned rows are not a distribution: the drift is null, not a number."""
    model, x, y, fresh, _ = seen_and_unseen
    assert share_drift(np.zeros(3, np.int64), np.array([1, 1, 0])) is None
    write_shards(tmp_path / "new", fresh, x[fresh], y[fresh], rows_per_shard=len(fresh))
    (only,) = (tmp_path / "new").glob("part-*.parquet")
    only.write_bytes(b"PAR1 not a parquet file PAR1")
    report = assign_shards(model, tmp_path / "new", tmp_path / "out", method="exact", use_ray=False)
    on_disk = json.loads((tmp_path / "out" / REPORT).read_text())
    assert on_disk["failed"] == 1 and on_disk["rows"] == 0
    assert on_disk["share_drift_tv"] is None and report.as_dict()["share_drift_tv"] is None
