"""`DeepDPM`: the scikit-learn face of the service, for notebooks and pipelines.

    from cluster_service import DeepDPM
    est = DeepDPM(random_state=0).fit(X)          # K is inferred
    est.n_clusters_, est.labels_, est.predict(X_new)

A thin face over the same code as the CLI: `fit` runs `train.fit.fit` (or the autoencoder driver,
or Ray Train workers with `workers >= 1`), the fitted state is the same `serve.model.FittedModel`, and
`save` / `load` use the same model directory as `cluster-service fit` (RUN_DIR/model), so a model
fitted here assigns with `cluster-service assign` and vice versa.

Parameters mirror `cluster_service.config.FitConfig`; None means "the config's default" (every
default is stated once, in config.py). `config` takes any other field as dotted keys, e.g.
`config={"schedule.epochs": 60, "net.batch_size": 512}`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClusterMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from cluster_service.config import FitConfig

# constructor parameter -> FitConfig field (dotted)
_FIELDS = {
    "k_init": "k_init", "alpha": "prior.alpha", "kappa": "prior.kappa", "nu_offset": "prior.nu_offset",
    "psi_scale": "prior.psi_scale", "epochs": "schedule.epochs", "loss": "net.loss",
    "autoencoder": "autoencoder.enabled", "device": "device", "random_state": "seed",
}


def as_array(X) -> Any:
    """numpy arrays and DataFrames as they are (sklearn validates them); torch tensors as numpy."""
    if hasattr(X, "detach") and hasattr(X, "cpu"):  # a torch tensor
        return X.detach().cpu().numpy()
    return X


class DeepDPM(ClusterMixin, BaseEstimator):
    """DeepDPM clustering with K inferred (Dirichlet-process Gaussian mixture; split/merge moves).

    Attributes after `fit`: n_clusters_, labels_ (n,), weights_ (K,), means_ (K, d),
    covariances_ (K, d, d), history_ (one dict per epoch), model_ (serve.model.FittedModel, or
    serve.ae_model.AEModel in autoencoder mode), n_features_in_.
    """

    def __init__(self, *, k_init: int | None = None, alpha: float | None = None, kappa: float | None = None,
                 nu_offset: float | None = None, psi_scale: float | None = None, epochs: int | None = None,
                 loss: str | None = None, autoencoder: bool | None = None, device: str | None = None,
                 workers: int = 0, random_state: int | None = None, config: dict | None = None):
        self.k_init = k_init
        self.alpha = alpha
        self.kappa = kappa
        self.nu_offset = nu_offset
        self.psi_scale = psi_scale
        self.epochs = epochs
        self.loss = loss
        self.autoencoder = autoencoder
        self.device = device
        self.workers = workers
        self.random_state = random_state
        self.config = config

    # ---- configuration ----------------------------------------------------------------------

    def fit_config(self) -> FitConfig:
        """The FitConfig these parameters describe (validated; ConfigError names a bad value)."""
        overrides = dict(self.config or {})
        for param, key in _FIELDS.items():
            value = getattr(self, param)
            if value is not None:
                overrides[key] = value
        return FitConfig().replace(**overrides)

    # ---- fitting ----------------------------------------------------------------------------

    def fit(self, X, y=None):
        """Fit on X (n_samples, n_features): numpy, torch tensor or DataFrame. y is ignored."""
        X = validate_data(self, as_array(X), dtype=[np.float64, np.float32], ensure_min_samples=2)
        cfg = self.fit_config()
        if self.workers and self.workers > 0:
            model, labels, history = _fit_on_ray(X, cfg, self.workers)
        elif cfg.autoencoder.enabled:
            from cluster_service.train.autoencoder import fit_autoencoder

            res = fit_autoencoder(X, cfg)
            model, labels, history = res.model, res.clusters, [r.as_dict() for r in res.history]
        else:
            from cluster_service.train.fit import fit

            res = fit(X, cfg)
            model, labels, history = res.model, res.clusters, [r.as_dict() for r in res.history]
        self._set_model(model)
        self.labels_ = np.asarray(labels, dtype=np.int64)
        self.history_ = history
        return self

    def _set_model(self, model) -> None:
        mixture = getattr(model, "mixture", model)  # the latent mixture in autoencoder mode
        self.model_ = model
        self.n_clusters_ = int(mixture.n_clusters)
        self.weights_ = np.exp(mixture.log_weights)
        self.means_ = mixture.means
        self.covariances_ = mixture.covariances

    # ---- prediction -------------------------------------------------------------------------

    def _log_joint(self, X) -> np.ndarray:
        check_is_fitted(self, "model_")
        X = validate_data(self, as_array(X), dtype=[np.float64, np.float32], reset=False)
        model = self.model_
        if hasattr(model, "encode"):  # autoencoder mode: the mixture lives in the latent space
            return model.mixture.log_joint(model.encode(X))
        return model.log_joint(X)

    def predict(self, X) -> np.ndarray:
        """The most probable cluster (n,) of each row (exact MAP: argmax_k log pi_k + log N(x; mu_k, Sigma_k))."""
        return self._log_joint(X).argmax(1)

    def predict_proba(self, X) -> np.ndarray:
        """Posterior cluster probabilities (n, K); rows sum to 1."""
        lj = self._log_joint(X)
        lj -= lj.max(1, keepdims=True)
        p = np.exp(lj)
        return p / p.sum(1, keepdims=True)

    def score_samples(self, X) -> np.ndarray:
        """log p(x) (n,) under the fitted mixture (in the latent space in autoencoder mode)."""
        lj = self._log_joint(X)
        top = lj.max(1)
        return top + np.log(np.exp(lj - top[:, None]).sum(1))

    def score(self, X, y=None) -> float:
        """Mean log-likelihood of X (higher is better): a label-free model-selection score."""
        return float(self.score_samples(X).mean())

    def cut(self, n_clusters: int, X=None) -> np.ndarray:
        """The merge hierarchy at a coarser level: labels (n,) in 0..n_clusters-1 of X (default: the
        training rows' labels_). K stays what the model inferred; this only groups its clusters."""
        check_is_fitted(self, "model_")
        groups = getattr(self.model_, "mixture", self.model_).cut(n_clusters)
        labels = self.labels_ if X is None else self.predict(X)
        return groups[labels]

    # ---- persistence ------------------------------------------------------------------------

    def save(self, path) -> Path:
        """Write the model directory `cluster-service fit` writes (RUN_DIR/model), atomically."""
        check_is_fitted(self, "model_")
        return self.model_.save(path)

    @classmethod
    def load(cls, path) -> DeepDPM:
        """An estimator around a model directory (from `save` or `cluster-service fit`): predict,
        predict_proba, score_samples work; labels_ and history_ are those of the run when the
        directory is RUN_DIR/model of a run, else absent."""
        from cluster_service.io.runs import model_dir_of
        from cluster_service.runtime.assign_job import open_model
        from cluster_service.serve.ae_model import load_ae_model

        model_dir = model_dir_of(path)
        model = load_ae_model(model_dir) if (model_dir / "encoder.json").is_file() else open_model(model_dir)
        mixture = getattr(model, "mixture", model)
        params = {p: _get(mixture.config, key) for p, key in _FIELDS.items() if p != "autoencoder"}
        est = cls(**params, autoencoder=bool(_get(mixture.config, "autoencoder.enabled")) or None)
        est._set_model(model)
        est.n_features_in_ = int(model.n_features)
        return est

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        tags.non_deterministic = False
        return tags


def _get(config: dict, dotted: str):
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _fit_on_ray(X: np.ndarray, cfg: FitConfig, workers: int):
    """The distributed fit (Ray Train DDP workers) on X, through a temporary .npz and run directory."""
    from cluster_service.io import runs
    from cluster_service.runtime.trainer import fit_distributed
    from cluster_service.serve.model import load_model

    with tempfile.TemporaryDirectory(prefix="deepdpm-") as tmp:
        data, run = Path(tmp) / "data.npz", Path(tmp) / "run"
        np.savez(data, X=X)
        fit_distributed(data, run, cfg, workers)
        model = load_model(runs.model_dir(run))
        labels = runs.read_assignments(run, ["cluster"]).column("cluster")
        history = runs.read_history(run)
    return model, labels.to_numpy(), history
