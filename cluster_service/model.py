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
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cluster_service.gaussian import WhitenedGaussians, chunk_rows

MODEL_SCHEMA_VERSION = 1
_NET_KEYS = ("body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias", "head.weight", "head.bias")


class ModelError(ValueError):
    """A model directory that cannot be loaded or does not match the data."""


@dataclass
class FittedModel:
    log_weights: np.ndarray  # (K,)
    means: np.ndarray  # (K, d)
    chol: np.ndarray  # (K, d, d)
    prior: dict[str, Any]  # alpha, kappa, nu, mean (d,), psi (d, d)
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
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ModelError(
                f"{source}: expected an (n, {self.n_features}) array for this model "
                f"(d={self.n_features}), got shape {tuple(x.shape)}"
            )

    @torch.no_grad()
    def log_joint(self, x, chunk_size: int = 65536, device: str | torch.device = "cpu") -> np.ndarray:
        """log pi_k + log N(x_i; mu_k, Sigma_k): (n, K) float64 numpy."""
        x = np.asarray(x)
        self.check_features(x)
        dev = torch.device(device)
        g = WhitenedGaussians(
            torch.from_numpy(self.means).to(dev, torch.float64),
            torch.from_numpy(self.chol).to(dev, torch.float64),
            torch.float64,
        )
        log_w = torch.from_numpy(self.log_weights).to(dev, torch.float64)
        rows = chunk_rows(g.n_clusters * g.n_features, chunk_size)
        out = np.empty((x.shape[0], g.n_clusters), dtype=np.float64)
        for s in range(0, x.shape[0], rows):
            xb = torch.from_numpy(np.ascontiguousarray(x[s : s + rows])).to(dev, torch.float64)
            out[s : s + rows] = (g.log_prob(xb) + log_w).cpu().numpy()
        return out

    def cut(self, n_clusters: int) -> np.ndarray:
        """Coarser level of the merge hierarchy: (K,) int64 group in 0..n_clusters-1 of every
        cluster, so `model.cut(k)[model.predict(x)[0]]` labels rows at level k."""
        from cluster_service.hierarchy import MergeTree, cut_tree

        if self.tree_linkage is None:
            raise ModelError("this model has no merge hierarchy (fitted before hierarchies were stored)")
        return cut_tree(MergeTree(self.tree_linkage, self.tree_log_ratios, self.n_clusters), n_clusters)

    def predict(self, x) -> tuple[np.ndarray, np.ndarray]:
        """Exact MAP cluster and its log pi_k + log N: ((n,) int64, (n,) float64)."""
        lj = self.log_joint(x)
        cluster = lj.argmax(1)
        return cluster, lj[np.arange(lj.shape[0]), cluster]

    @torch.no_grad()
    def net_logits(self, x) -> np.ndarray:
        """The clustering net's logits (n, K) from the stored weights."""
        if not self.net:
            raise ModelError("this model has no clustering-net weights")
        x = np.asarray(x, dtype=np.float32)
        self.check_features(x)
        t = {k: torch.from_numpy(v) for k, v in self.net.items()}
        shift = 0.0 if self.net_input_shift is None else torch.from_numpy(self.net_input_shift.astype(np.float32))
        h = (torch.from_numpy(x) - shift) / self.net_input_scale
        h = torch.relu(h @ t["body.0.weight"].T + t["body.0.bias"])
        h = torch.relu(h @ t["body.2.weight"].T + t["body.2.bias"])
        return (h @ t["head.weight"].T + t["head.bias"]).numpy()

    def net_predict(self, x) -> np.ndarray:
        return self.net_logits(x).argmax(1)

    # ---- persistence -----------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: a temporary sibling directory renamed into place."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            meta = {
                "schema_version": MODEL_SCHEMA_VERSION,
                "n_clusters": self.n_clusters,
                "n_features": self.n_features,
                "prior": {k: float(v) for k, v in self.prior.items() if k in ("alpha", "kappa", "nu")},
                "net_input_scale": self.net_input_scale,
                "config": self.config,
                "manifest_hash": self.manifest_hash,
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
            if self.tree_linkage is not None:
                arrays["tree_linkage"] = self.tree_linkage
                arrays["tree_log_ratios"] = self.tree_log_ratios
            np.savez(tmp / "arrays.npz", **arrays)
            (tmp / "model.json").write_text(json.dumps(meta, indent=2, default=str))
            if path.exists():
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                path.rename(old)
                tmp.rename(path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path


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
        tree_linkage=arrays.get("tree_linkage"),
        tree_log_ratios=arrays.get("tree_log_ratios"),
    )
    if n_features is not None and n_features != model.n_features:
        raise ModelError(
            f"{path}: model has feature dimension d={model.n_features}, the data has d={n_features}"
        )
    if manifest_hash is not None and model.manifest_hash is not None and manifest_hash != model.manifest_hash:
        raise ModelError(
            f"{path}: model was fitted on features with manifest hash {model.manifest_hash}, "
            f"these shards have {manifest_hash} (different extractor or preprocessing?)"
        )
    return model


def model_from_engine(engine, manifest_hash: str | None = None, version: str = "", tree=None) -> FittedModel:
    """Export an Engine's state (original coordinates) as a FittedModel; `tree` is the merge
    hierarchy (hierarchy.MergeTree from Engine.cluster_tree) when one was built."""
    from cluster_service.comm import unwrap

    p = engine.export_params()
    net_state = unwrap(engine.cluster_net).state_dict()
    prior = engine.prior
    return FittedModel(
        log_weights=p.log_weights.cpu().numpy(),
        means=p.means.cpu().numpy(),
        chol=p.chol.cpu().numpy(),
        prior={
            "alpha": engine.cfg.prior.alpha,
            "kappa": prior.kappa,
            "nu": prior.nu,
            "mean": (prior.mean + engine.shift).cpu().numpy(),
            "psi": prior.psi.cpu().numpy(),
        },
        net={k: net_state[k].detach().cpu().numpy() for k in _NET_KEYS},
        net_input_scale=engine.input_scale,
        net_input_shift=engine.shift.cpu().numpy(),
        config=engine.cfg.to_dict(),
        manifest_hash=manifest_hash,
        version=version or time.strftime("%Y%m%dT%H%M%S", time.gmtime()),
        tree_linkage=None if tree is None else tree.linkage,
        tree_log_ratios=None if tree is None else tree.log_ratios,
    )


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("cluster_service")
    except Exception:  # noqa: BLE001 - not installed (running from a checkout)
        return "unknown"
