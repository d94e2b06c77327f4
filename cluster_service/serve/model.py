"""The fitted model: one directory, loadable without training code and without Ray.

    MODEL_DIR/model.json   schema version, dimensions, config, priors (scalars), feature manifest
                           hash, creation time, package version
    MODEL_DIR/arrays.npz   log_weights (K,), means (K, d), chol (K, d, d) lower Cholesky factors
                           of the covariances, prior_mean (d,), prior_psi (d, d), and the
                           clustering net's weights (net.<name>)

Everything here is numpy + torch tensors; the clustering net's forward pass is re-implemented
in `FittedModel.net_logits` (Linear-ReLU-Linear-ReLU-Linear) so no training module is needed.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cluster_service.core.gaussian import WhitenedGaussians, chunk_rows, iter_chunks
from cluster_service.core.nets import mlp_forward
from cluster_service.core.niw import GaussianParams, logdet_from_cholesky
from cluster_service.io.atomic import atomic_dir
from cluster_service.io.checks import check_model_features, dimension_message

MODEL_SCHEMA_VERSION = 1
# Why `cut` cannot run; the CLI prefixes the model directory.
NO_HIERARCHY = ("this model has no merge hierarchy: its arrays.npz holds no tree_linkage (older --autoencoder "
                "fits did not store one); refit it with this version to get one")
NET_KEYS = ("body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias", "head.weight", "head.bias")


class ModelError(ValueError):
    """A model directory that cannot be loaded or does not match the data."""


@dataclass
class FittedModel:
    log_weights: np.ndarray  # (K,)
    means: np.ndarray  # (K, d)
    chol: np.ndarray  # (K, d, d)
    prior: dict[str, Any]  # alpha, kappa, nu, mean (d,), psi (d, d), family ("full" or "diag")
    net: dict[str, np.ndarray] = field(default_factory=dict)  # clustering-net weights
    net_input_scale: float = 1.0
    net_input_shift: np.ndarray | None = None  # (d,) the net sees (x - shift) / scale
    config: dict[str, Any] = field(default_factory=dict)
    manifest_hash: str | None = None
    version: str = ""  # model version string written into assignments
    # Merge hierarchy over the clusters (hierarchy.merge_tree): scipy linkage rows (K-1, 4) and
    # the log merge ratio of each merge (K-1,); None for models saved without one.
    tree_linkage: np.ndarray | None = None
    tree_log_ratios: np.ndarray | None = None
    # The feature space the model was fitted in (io.feature_space): d and the extractor fields
    # that define the features. None for models fitted on arrays and for models written before it
    # existed (those carry only a version-1 hash, see io.feature_space).
    feature_space: dict[str, Any] | None = None
    # Novelty calibration from the training rows (serve.novelty.novelty_table): levels (L,),
    # quantiles (K, L), train_counts (K,). None for models written before it.
    novelty: dict[str, np.ndarray] | None = None

    def __post_init__(self) -> None:
        # the covariance family (core/niw.py); models written before families are full-covariance
        self.prior = {"family": "full", **self.prior}

    def feature_space_mismatch(self, manifest: dict) -> str | None:
        """Why shards with this manifest are not in the model's feature space, or None."""
        from cluster_service.io.feature_space import feature_space_mismatch

        return feature_space_mismatch(self.feature_space, self.manifest_hash, manifest)

    @property
    def n_clusters(self) -> int:
        return int(self.means.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.means.shape[1])

    @property
    def covariances(self) -> np.ndarray:
        return self.chol @ np.swapaxes(self.chol, -1, -2)

    # ---- scoring -------------------------------------------------------------------------

    def check_features(self, x: np.ndarray, source: str = "features") -> None:
        check_model_features(x, self.n_features, source, ModelError)

    @torch.no_grad()
    def log_joint(self, x, chunk_size: int = 65536, device: str | torch.device = "cpu") -> np.ndarray:
        """log pi_k + log N(x_i; mu_k, Sigma_k): (n, K) float64 numpy."""
        x = np.asarray(x)
        out = np.empty((x.shape[0], self.n_clusters), dtype=np.float64)
        for sl, lj in self._log_joint_blocks(x, chunk_size, device):
            out[sl] = lj
        return out

    def _log_joint_blocks(self, x: np.ndarray, chunk_size: int = 65536, device: str | torch.device = "cpu"):
        """(row slice, (rows, K) float64 log-joint) block by block: x (n, d) is checked and the
        Gaussians whitened once; predict never holds the whole (n, K) matrix."""
        self.check_features(x)
        dev = torch.device(device)
        g = WhitenedGaussians(GaussianParams(*(torch.from_numpy(a).to(dev, torch.float64)
                                               for a in (self.log_weights, self.means, self.chol))), torch.float64)
        for sl in iter_chunks(x.shape[0], chunk_rows(g.n_clusters * g.n_features, chunk_size)):
            xb = torch.from_numpy(np.ascontiguousarray(x[sl])).to(dev, torch.float64)
            yield sl, g.log_joint(xb).cpu().numpy()

    def cut(self, n_clusters: int) -> np.ndarray:
        """Coarser level of the merge hierarchy: (K,) int64 group in 0..n_clusters-1 of every
        cluster, so `model.cut(k)[model.predict(x)[0]]` labels rows at level k."""
        from cluster_service.core.hierarchy import MergeTree, cut_tree

        if self.tree_linkage is None:
            raise ModelError(NO_HIERARCHY)
        return cut_tree(MergeTree(self.tree_linkage, self.tree_log_ratios, self.n_clusters), n_clusters)

    def cut_level(self, k: int | None = None, threshold: float | None = None) -> int:
        """The level of the merge hierarchy to cut at: `k` groups as given, or, with `threshold`, the
        level reached by merging (in tree order) every pair whose log merge ratio is above it.
        Raises ModelError without a tree, ValueError for a k outside 1..K."""
        if self.tree_log_ratios is None:
            raise ModelError(NO_HIERARCHY)
        if threshold is not None:
            below = np.flatnonzero(np.asarray(self.tree_log_ratios) <= threshold)  # merges run in tree order
            k = self.n_clusters - (int(below[0]) if below.size else len(self.tree_log_ratios))
        if not 1 <= k <= self.n_clusters:
            raise ValueError(f"--k must be in 1..{self.n_clusters} (the model's K), got {k}")
        return k

    def predict(self, x) -> tuple[np.ndarray, np.ndarray]:
        """Exact MAP cluster and its log pi_k + log N: ((n,) int64, (n,) float64)."""
        x = np.asarray(x)
        cluster, best = np.empty(x.shape[0], dtype=np.int64), np.empty(x.shape[0], dtype=np.float64)
        for sl, lj in self._log_joint_blocks(x):
            cluster[sl] = lj.argmax(1)
            best[sl] = lj[np.arange(lj.shape[0]), cluster[sl]]
        return cluster, best

    def calibrate_novelty(self, clusters: np.ndarray, log_prob: np.ndarray, reduce_sum=None, reduce_max=None) -> None:
        """Store the novelty calibration: clusters (n,) and log_prob (n,) = log pi_k + log N(x; mu_k,
        Sigma_k) of the training rows' assigned clusters, each row scored as held out
        (serve.novelty.leave_one_out_log_density). With the rows spread over processes, every
        process calls it on its rows with reduce_sum / reduce_max (numpy array -> the array summed
        / maximised over processes) and gets the same calibration (serve.novelty.novelty_table)."""
        from cluster_service.serve.novelty import leave_one_out_log_density, novelty_table

        reduce_sum, reduce_max = reduce_sum or (lambda a: a), reduce_max or (lambda a: a)
        clusters = np.asarray(clusters)
        counts = reduce_sum(np.bincount(clusters, minlength=self.n_clusters).astype(np.float64))
        logdet = logdet_from_cholesky(torch.from_numpy(self.chol)).numpy()  # (K,) log |Sigma_k|
        held_out = leave_one_out_log_density(np.asarray(log_prob) - self.log_weights[clusters], counts[clusters],
                                             logdet[clusters], float(self.prior["kappa"]),
                                             float(self.prior["nu"]), self.n_features, self.prior["family"])
        self.novelty = novelty_table(clusters, held_out, self.n_clusters, reduce_sum=reduce_sum,
                                     reduce_max=reduce_max)

    def novelty_of(self, clusters: np.ndarray, log_prob: np.ndarray, fpr: float) -> tuple[np.ndarray, np.ndarray]:
        """(novelty (n,) in [0, 1], novel (n,) bool) of rows with these assignments (see serve.novelty);
        NaN / False when the model has no calibration."""
        from cluster_service.serve.novelty import tail_probability

        clusters = np.asarray(clusters)
        if self.novelty is None:
            return np.full(len(clusters), np.nan), np.zeros(len(clusters), bool)
        tail = tail_probability(self.novelty, clusters, np.asarray(log_prob) - self.log_weights[clusters])
        return 1.0 - tail, tail < fpr

    @torch.no_grad()
    def net_logits(self, x) -> np.ndarray:
        """The clustering net's logits (n, K) from the stored weights."""
        if not self.net:
            raise ModelError("this model has no clustering-net weights")
        x = np.asarray(x, dtype=np.float32)
        self.check_features(x)
        t = {k: torch.from_numpy(v) for k, v in self.net.items()}
        layers = [(t[f"{name}.weight"], t[f"{name}.bias"]) for name in ("body.0", "body.2", "head")]
        shift = 0.0 if self.net_input_shift is None else torch.from_numpy(self.net_input_shift.astype(np.float32))
        return mlp_forward((torch.from_numpy(x) - shift) / self.net_input_scale, layers).numpy()

    # ---- persistence -----------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: a temporary sibling directory renamed into place."""
        path = Path(path)
        with atomic_dir(path) as tmp:
            self.write_into(tmp)
        return path

    def write_into(self, directory: Path) -> None:
        """model.json and arrays.npz into an existing (temporary) directory; `save` is the atomic face."""
        tmp = directory
        meta = {
            "schema_version": MODEL_SCHEMA_VERSION,
            "n_clusters": self.n_clusters,
            "n_features": self.n_features,
            "prior": {**{k: float(v) for k, v in self.prior.items() if k in ("alpha", "kappa", "nu")},
                      "family": self.prior.get("family", "full")},
            "net_input_scale": self.net_input_scale,
            "config": self.config,
            "manifest_hash": self.manifest_hash,
            "feature_space": self.feature_space,
            # 2: feature_space holds the identity fields; 1 (older models): a hash of d + the
            # whole extractor block, accepted alongside the new hash
            "feature_space_version": 2 if self.feature_space is not None else 1,
            "version": self.version,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "package_version": _package_version(),
        }
        arrays = {
            "log_weights": self.log_weights,
            "means": self.means,
            "chol": self.chol,
            "prior_mean": np.asarray(self.prior["mean"]),
            "prior_psi": np.asarray(self.prior["psi"]),
        }
        arrays.update({f"net.{k}": v for k, v in self.net.items()})
        if self.net_input_shift is not None:
            arrays["net_input_shift"] = self.net_input_shift
        for k, v in (self.novelty or {}).items():
            arrays[f"novelty.{k}"] = v
        if self.tree_linkage is not None:
            arrays["tree_linkage"] = self.tree_linkage
            arrays["tree_log_ratios"] = self.tree_log_ratios
        np.savez(tmp / "arrays.npz", **arrays)
        (tmp / "model.json").write_text(json.dumps(meta, indent=2, default=str))


def read_model_files(
    path: Path, json_name: str, npz_name: str, schema_version: int, what: str
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read a model directory's JSON metadata and npz arrays; refuse missing, unreadable or
    wrong-schema files with a message naming the file. Shared by every model format."""
    meta_file, arr_file = path / json_name, path / npz_name
    if not meta_file.is_file() or not arr_file.is_file():
        raise ModelError(f"{path}: not {what} (expected {json_name} and {npz_name})")
    try:
        meta = json.loads(meta_file.read_text())
        arrays = dict(np.load(arr_file))
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: unreadable {json_name} or {npz_name} ({e})") from e
    if meta.get("schema_version") != schema_version:
        raise ModelError(
            f"{meta_file}: schema_version {meta.get('schema_version')!r}, this package reads {schema_version}"
        )
    return meta, arrays


def load_model(
    path: str | os.PathLike, n_features: int | None = None, manifest_hash: str | None = None
) -> FittedModel:
    """Load a model directory; refuse it clearly if it does not match the expected data."""
    path = Path(path)
    meta, arrays = read_model_files(path, "model.json", "arrays.npz", MODEL_SCHEMA_VERSION, "a model directory")
    arr_file = path / "arrays.npz"
    missing = [k for k in ("log_weights", "means", "chol", "prior_mean", "prior_psi") if k not in arrays]
    if missing:
        raise ModelError(f"{arr_file}: missing arrays {missing}")
    model = FittedModel(
        log_weights=arrays["log_weights"],
        means=arrays["means"],
        chol=arrays["chol"],
        prior={**meta.get("prior", {}), "mean": arrays["prior_mean"], "psi": arrays["prior_psi"]},
        net={k[4:]: v for k, v in arrays.items() if k.startswith("net.")},
        net_input_scale=float(meta.get("net_input_scale", 1.0)),
        net_input_shift=arrays.get("net_input_shift"),
        config=meta.get("config", {}),
        manifest_hash=meta.get("manifest_hash"),
        version=meta.get("version", ""),
        feature_space=meta.get("feature_space"),
        novelty={k[8:]: v for k, v in arrays.items() if k.startswith("novelty.")} or None,
        tree_linkage=arrays.get("tree_linkage"),
        tree_log_ratios=arrays.get("tree_log_ratios"),
    )
    if n_features is not None and (why := dimension_message(model.n_features, n_features, str(path))):
        raise ModelError(why)
    if manifest_hash is not None and model.manifest_hash is not None and manifest_hash != model.manifest_hash:
        raise ModelError(
            f"{path}: model was fitted on features with manifest hash {model.manifest_hash}, "
            f"these shards have {manifest_hash} (different extractor or preprocessing?)"
        )
    return model


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("cluster_service")
    except Exception:  # noqa: BLE001 - not installed (running from a checkout)
        return "unknown"
