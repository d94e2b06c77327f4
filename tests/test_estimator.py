"""The scikit-learn estimator `cluster_service.DeepDPM`: sklearn's own estimator checks, save/load,
agreement with the CLI fit, Pipeline / clone / GridSearchCV, and torch / pandas inputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from cluster_service import DeepDPM
from cluster_service.datasets import make_mixture

# A short schedule that still splits and merges (sklearn's checks fit dozens of times on ~50 rows).
FAST = {"net.min_steps_per_epoch": 2, "schedule.warmup_epochs": 2, "schedule.subcluster_start": 2,
        "schedule.first_split": 4, "schedule.move_period": 4, "schedule.freeze_epochs": 1,
        "schedule.final_epochs": 3}


def fast(**kw) -> DeepDPM:
    return DeepDPM(epochs=24, random_state=0, device="cpu", config=FAST, **kw)


def default_schedule(**kw) -> DeepDPM:
    """The default schedule (moves until epoch 110) with few optimizer steps per epoch: K is right."""
    return DeepDPM(random_state=0, device="cpu", config={"net.min_steps_per_epoch": 2}, **kw)


@parametrize_with_checks([fast()])
def test_sklearn_estimator_checks(estimator, check):
    """Every check of sklearn.utils.estimator_checks that applies to a clusterer; none is skipped."""
    check(estimator)


@pytest.fixture(scope="module")
def mixture():
    return make_mixture(600, 4, 3, seed=2, separation=8.0)


@pytest.fixture(scope="module")
def fitted(mixture):
    return default_schedule().fit(mixture[0])


def test_fit_infers_k_and_exposes_sklearn_attributes(fitted, mixture):
    x, y = mixture
    from sklearn.metrics import normalized_mutual_info_score

    assert fitted.n_clusters_ == 3 and normalized_mutual_info_score(y, fitted.labels_) > 0.95
    k, d = fitted.n_clusters_, x.shape[1]
    assert fitted.means_.shape == (k, d) and fitted.covariances_.shape == (k, d, d)
    assert fitted.weights_.sum() == pytest.approx(1.0) and fitted.n_features_in_ == d
    assert len(fitted.history_) <= 120 and {"epoch", "n_clusters", "stopped"} <= set(fitted.history_[0])
    assert fitted.history_[-1]["stopped"] and not fitted.history_[0]["stopped"]  # why the fit ended, once
    np.testing.assert_array_equal(fitted.predict(x), fitted.labels_)
    proba = fitted.predict_proba(x)
    np.testing.assert_allclose(proba.sum(1), 1.0)
    np.testing.assert_array_equal(proba.argmax(1), fitted.labels_)
    # score_samples is the mixture's log-density: compare with scipy on the fitted parameters
    from scipy.stats import multivariate_normal

    dens = sum(w * multivariate_normal(m, c).pdf(x[:20])
               for w, m, c in zip(fitted.weights_, fitted.means_, fitted.covariances_, strict=True))
    np.testing.assert_allclose(fitted.score_samples(x[:20]), np.log(dens), rtol=1e-6)


def test_save_load_round_trip_gives_identical_predictions(fitted, mixture, tmp_path):
    x, _ = mixture
    fitted.save(tmp_path / "model")
    loaded = DeepDPM.load(tmp_path / "model")
    np.testing.assert_array_equal(loaded.predict(x), fitted.predict(x))
    np.testing.assert_allclose(loaded.score_samples(x), fitted.score_samples(x))
    assert loaded.n_clusters_ == fitted.n_clusters_ and loaded.get_params()["epochs"] == 120


def test_estimator_and_cli_agree(fitted, mixture, tmp_path):
    """Same data, seed and settings: the CLI's fit and the estimator's find the same K and assignments."""
    from cluster_service.ops.local_fit import run_fit

    x, y = mixture
    np.savez(tmp_path / "data.npz", X=x)
    run_fit(tmp_path / "data.npz", tmp_path / "run", default_schedule().fit_config(), tracking=False)
    cli_clusters = pq.read_table(tmp_path / "run" / "assignments.parquet").column("cluster").to_numpy()
    np.testing.assert_array_equal(cli_clusters, fitted.labels_)
    # and the CLI's run directory loads into the estimator
    assert DeepDPM.load(tmp_path / "run").n_clusters_ == fitted.n_clusters_


def test_torch_and_pandas_inputs_give_the_numpy_result(fitted, mixture):
    x, _ = mixture
    np.testing.assert_array_equal(fitted.predict(torch.from_numpy(x)), fitted.labels_)
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(x.shape[1])])
    est = default_schedule().fit(frame)
    np.testing.assert_array_equal(est.labels_, fitted.labels_)
    assert list(est.feature_names_in_) == list(frame.columns)


def test_pipeline_clone_and_grid_search(mixture):
    x, y = mixture
    pipe = make_pipeline(StandardScaler(), default_schedule())
    labels = pipe.fit_predict(x)
    assert len(np.unique(labels)) == 3
    twin = clone(pipe)
    assert twin.get_params()["deepdpm__config"] == {"net.min_steps_per_epoch": 2} and not hasattr(twin[-1], "model_")
    search = GridSearchCV(fast(), {"alpha": [1.0, 10.0]}, scoring="adjusted_rand_score", cv=2)
    search.fit(x, y)  # the short schedule: K may be off by one, the search still ranks and refits
    assert search.best_score_ > 0.5 and search.best_params_["alpha"] in (1.0, 10.0)
    assert hasattr(search.best_estimator_, "model_") and search.cv_results_["mean_test_score"].shape == (2,)


def test_bad_parameters_and_inputs_are_refused_clearly(mixture):
    from cluster_service.config import ConfigError

    x, _ = mixture
    with pytest.raises(ConfigError, match="prior.alpha must be > 0"):
        DeepDPM(alpha=-1.0).fit(x)
    bad = x.copy()
    bad[5, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fast().fit(bad)


def test_quickstart_example_runs(tmp_path):
    """examples/quickstart.py, as a user runs it, and the README's Python snippet."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "examples" / "quickstart.py")], capture_output=True,
                       text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "K found: 5" in r.stdout and "saved to" in r.stdout
    readme = (root / "README.md").read_text()
    snippet = re.search(r"## From Python\n\n```python\n(.*?)```", readme, re.S).group(1)
    r = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    k, _ = r.stdout.split(" ", 1)
    assert int(k) == 5
