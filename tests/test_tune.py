"""Ray Tune sweep: held-out criterion against scipy, and a real 2-trial sweep on local Ray whose
trials are MLflow child runs of one parent run in the default sqlite store."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from mlflow_helpers import client_for, metric_history
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from cluster_service.config import FitConfig
from cluster_service.datasets import make_mixture
from cluster_service.runtime.tune import METRIC, heldout_log_likelihood, run_sweep, search_space, split_heldout
from cluster_service.serve.model import FittedModel


def test_split_heldout_is_a_seeded_partition():
    train, held = split_heldout(1001, 0.2, seed=4)
    assert len(held) == 200 and len(train) == 801
    assert np.array_equal(np.sort(np.concatenate([train, held])), np.arange(1001))
    assert np.array_equal(held, split_heldout(1001, 0.2, seed=4)[1])
    assert not np.array_equal(held, split_heldout(1001, 0.2, seed=5)[1])
    with pytest.raises(ValueError, match="fraction"):
        split_heldout(100, 1.0, seed=0)


def test_heldout_log_likelihood_matches_scipy_mixture_density():
    rng = np.random.default_rng(0)
    K, d = 3, 4
    means = rng.normal(size=(K, d)) * 3
    a = rng.normal(size=(K, d, d))
    covs = a @ a.transpose(0, 2, 1) + 0.5 * np.eye(d)
    w = np.array([0.5, 0.3, 0.2])
    prior = {"alpha": 1.0, "kappa": 1.0, "nu": d + 2.0, "mean": np.zeros(d), "psi": np.eye(d)}
    model = FittedModel(np.log(w), means, np.linalg.cholesky(covs), prior=prior)
    x = rng.normal(size=(50, d)) * 3
    per_k = [np.log(w[k]) + multivariate_normal(means[k], covs[k]).logpdf(x) for k in range(K)]
    ref = logsumexp(per_k, axis=0)
    assert heldout_log_likelihood(model, x) == pytest.approx(ref.mean(), rel=1e-10)


def test_search_space_keys_are_config_fields():
    flat = FitConfig().flat()
    space = search_space()
    swept = {"prior.alpha", "prior.kappa", "prior.nu_offset", "prior.psi_scale", "k_init", "net.lr"}
    assert swept <= set(space)
    assert set(space) <= set(flat)


@pytest.mark.ray
def test_sweep_of_two_trials_logs_child_runs_under_one_parent(ray_local, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    x, y = make_mixture(1500, 6, 4, seed=7)
    base = FitConfig().replace(**{
        "schedule.epochs": 12, "schedule.warmup_epochs": 2, "schedule.subcluster_start": 3,
        "schedule.first_split": 5, "schedule.move_period": 4, "schedule.freeze_epochs": 1,
        "schedule.final_epochs": 2, "net.min_steps_per_epoch": 3, "net.cluster_hidden": 32,
        "net.sub_hidden": 16,
    })
    res = run_sweep(x, y, base, num_samples=2, max_concurrent=2, out_dir=tmp_path / "out", experiment="sweep")

    assert len(res.trials) == 2 and not res.errors
    assert res.trials[0][METRIC] >= res.trials[1][METRIC]  # best first, by the label-free criterion
    assert all(0 <= t["nmi"] <= 1 and 0 <= t["acc"] <= 1 for t in res.trials)  # labels reported too
    assert res.best_config == base.replace(**res.best_params)
    saved = yaml.safe_load((tmp_path / "out" / "best_config.yaml").read_text())
    assert FitConfig.from_dict(saved["fit"]) == res.best_config

    assert (tmp_path / "mlflow.db").is_file()
    client = client_for()
    exp = client.get_experiment_by_name("sweep")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == res.parent_run_id]
    assert [p.info.run_id for p in parents] == [res.parent_run_id] and len(children) == 2
    assert {c.info.run_id for c in children} == {t["mlflow_run_id"] for t in res.trials}
    for c in children:
        assert c.info.status == "FINISHED"
        assert len(metric_history(client, c.info.run_id, "n_clusters")) == 12
        assert METRIC in c.data.metrics and "nmi" in c.data.metrics
    # the trials sampled different priors, and each child's params say which
    assert children[0].data.params["prior.alpha"] != children[1].data.params["prior.alpha"]
    parent = client.get_run(res.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["tune.best_run_id"] == res.best["mlflow_run_id"]
    assert parent.data.metrics[f"best/{METRIC}"] == pytest.approx(res.best[METRIC])
    assert {"plots/sweep.png", "best_config.yaml", "trials.json"} <= {
        f.path for d in ("", "plots") for f in client.list_artifacts(parent.info.run_id, d or None)}
