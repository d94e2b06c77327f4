"""A fitted autoencoder-mode model: the encoder's weights and the latent-space FittedModel, loaded
without training code (cluster_service.train.autoencoder writes it)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cluster_service.core.nets import mlp_forward
from cluster_service.io.atomic import atomic_dir
from cluster_service.io.checks import check_model_features, dimension_message
from cluster_service.serve.model import FittedModel, ModelError, load_model, read_model_files

ENCODER_SCHEMA_VERSION = 1


@dataclass
class AEModel:
    """Assigns new data: normalise, encode, then the latent FittedModel.

    encoder: [(weight (out, in), bias (out,)), ...] Linear layers with ReLU between them.
    Stored in the model directory as encoder.npz + encoder.json beside the FittedModel files
    (which `load_model` ignores), so the directory is still a plain latent-space FittedModel.
    """

    encoder: list[tuple[np.ndarray, np.ndarray]]
    input_shift: np.ndarray  # (d,)
    input_scale: float
    mixture: FittedModel

    @property
    def n_features(self) -> int:
        return int(self.encoder[0][0].shape[1])

    @property
    def n_clusters(self) -> int:
        return self.mixture.n_clusters

    @property
    def version(self) -> str:
        return self.mixture.version

    @torch.no_grad()
    def encode(self, x, chunk: int = 65536) -> np.ndarray:
        """Latent codes (n, latent) float64 of raw features x (n, d)."""
        x = np.asarray(x)
        check_model_features(x, self.n_features, "features", ModelError, "this autoencoder model")
        layers = [(torch.from_numpy(w).float(), torch.from_numpy(b).float()) for w, b in self.encoder]
        shift = torch.from_numpy(self.input_shift).float()
        out = []
        for s in range(0, x.shape[0], chunk):
            h = torch.from_numpy(np.ascontiguousarray(x[s : s + chunk], dtype=np.float32))
            out.append(mlp_forward((h - shift) / self.input_scale, layers).double().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.mixture.n_features))

    def predict(self, x) -> tuple[np.ndarray, np.ndarray]:
        """(cluster (n,) int64, log pi_k + log N(z; mu_k, Sigma_k) (n,) float64) of raw features."""
        return self.mixture.predict(self.encode(x))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the FittedModel directory plus the encoder files, atomically (one rename)."""
        path = Path(path)
        with atomic_dir(path) as staged:
            self.mixture.write_into(staged)
            arrays = {"input_shift": self.input_shift, "input_scale": np.float64(self.input_scale)}
            for i, (w, b) in enumerate(self.encoder):
                arrays[f"w{i}"], arrays[f"b{i}"] = w, b
            np.savez(staged / "encoder.npz", **arrays)
            meta = {
                "schema_version": ENCODER_SCHEMA_VERSION,
                "n_features": self.n_features,
                "latent_dim": int(self.encoder[-1][0].shape[0]),
                "n_layers": len(self.encoder),
                "activation": "relu",
            }
            (staged / "encoder.json").write_text(json.dumps(meta, indent=2))
        return path


def load_ae_model(path: str | os.PathLike, n_features: int | None = None) -> AEModel:
    """Load a model directory written by AEModel.save; errors name the file and what is wrong."""
    path = Path(path)
    meta, arrays = read_model_files(path, "encoder.json", "encoder.npz", ENCODER_SCHEMA_VERSION, "an autoencoder model")
    arr_file = path / "encoder.npz"
    n_layers = int(meta.get("n_layers", 0))
    missing = [k for i in range(n_layers) for k in (f"w{i}", f"b{i}") if k not in arrays]
    if n_layers < 1 or missing or "input_shift" not in arrays:
        raise ModelError(f"{arr_file}: incomplete encoder (n_layers={n_layers}, missing {missing})")
    model = AEModel(
        encoder=[(arrays[f"w{i}"], arrays[f"b{i}"]) for i in range(n_layers)],
        input_shift=arrays["input_shift"],
        input_scale=float(arrays["input_scale"]),
        mixture=load_model(path),
    )
    if model.encoder[-1][0].shape[0] != model.mixture.n_features:
        raise ModelError(
            f"{path}: encoder latent dimension {model.encoder[-1][0].shape[0]} != mixture dimension "
            f"{model.mixture.n_features}"
        )
    if n_features is not None and (why := dimension_message(model.n_features, n_features, str(path))):
        raise ModelError(why)
    return model
