"""Small data sets the project makes itself: generated Gaussian mixtures and sklearn's digits."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def make_mixture(
    n_samples: int = 20000,
    n_features: int = 16,
    n_clusters: int = 12,
    seed: int = 0,
    imbalance: float = 4.0,
    separation: float = 6.0,
    scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian mixture with random full covariances and imbalanced sizes.

    Cluster sizes span a factor `imbalance` (largest / smallest); means are drawn with spread
    `separation` (in units of the within-cluster standard deviation); `scale` multiplies
    everything (to test scale invariance). Returns X (n, d) float32 and labels (n,) int64.
    """
    rng = np.random.default_rng(seed)
    w = np.geomspace(1.0, imbalance, n_clusters)
    rng.shuffle(w)
    sizes = np.floor(w / w.sum() * n_samples).astype(int)
    sizes[: n_samples - sizes.sum()] += 1
    means = rng.normal(0, separation / np.sqrt(2), size=(n_clusters, n_features))
    xs, ys = [], []
    for k, n_k in enumerate(sizes):
        a = rng.normal(size=(n_features, n_features)) / np.sqrt(n_features)
        cov = a @ a.T + 0.3 * np.eye(n_features)
        cov /= np.trace(cov) / n_features
        xs.append(rng.multivariate_normal(means[k], cov, size=n_k))
        ys.append(np.full(n_k, k))
    x = np.concatenate(xs) * scale
    y = np.concatenate(ys)
    perm = rng.permutation(n_samples)
    return x[perm].astype(np.float32), y[perm].astype(np.int64)


def load_digits_pca(n_components: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """sklearn's bundled 8x8 digits (1797 images, 10 classes), PCA to n_components."""
    from sklearn.datasets import load_digits
    from sklearn.decomposition import PCA

    x, y = load_digits(return_X_y=True)
    z = PCA(n_components=n_components, random_state=seed).fit_transform(x / 16.0)
    return z.astype(np.float32), y.astype(np.int64)


def embed_nonlinear(x: np.ndarray, out_dim: int = 64, seed: int = 0, gain: float = 2.0) -> np.ndarray:
    """Push x (n, d) through a fixed random MLP d -> out_dim -> out_dim (tanh, then linear):
    standardise, z = tanh(gain * x W1 / sqrt(d) + b1), return z W2 / sqrt(out_dim). gain > 1
    saturates the tanh, so the clusters stop being Gaussian (or linearly embedded) in 64-d."""
    rng = np.random.default_rng(seed)
    d = x.shape[1]
    xs = (x - x.mean(0)) / x.std(0)
    w1 = rng.normal(size=(d, out_dim)) / math.sqrt(d)
    b1 = rng.normal(size=out_dim) * 0.5
    w2 = rng.normal(size=(out_dim, out_dim)) / math.sqrt(out_dim)
    return (np.tanh(gain * xs @ w1 + b1) @ w2).astype(np.float32)


def make_embedded_mixture(
    n_samples: int = 3000, n_clusters: int = 10, n_features: int = 8, out_dim: int = 64, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A make_mixture data set (n_clusters in n_features-d) non-linearly embedded in out_dim-d."""
    from cluster_service.datasets import make_mixture

    x, y = make_mixture(n_samples, n_features, n_clusters, seed=seed)
    return embed_nonlinear(x, out_dim, seed=1000 + seed), y


# ---- a small ImageNet-like tree for the pipeline's tests, demo and benchmark --------------------

IMAGENET_CLASSES = ("n01000001", "n01000002", "n01000003", "n01000004")


def write_image_folder(root, per_class: int, seed: int) -> dict[str, int]:
    """An ImageFolder tree: one folder per class of IMAGENET_CLASSES, `per_class` JPEGs each. A class
    is a colour and a stripe orientation, plus noise, so even a random encoder tells classes apart.
    Returns {id (path relative to root): class index}."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    base = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]], np.float64)
    yy, xx = np.mgrid[0:48, 0:48]
    stripes = [np.sin(xx / 3.0), np.sin(yy / 3.0), np.sin((xx + yy) / 4.0), np.sin((xx - yy) / 2.0)]
    ids = {}
    for c, name in enumerate(IMAGENET_CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = base[c] + 40 * stripes[c][..., None] + rng.normal(0, 25, (48, 48, 3))
            rel = f"{name}/{name}_{i:04d}.JPEG"
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / rel, quality=90)
            ids[rel] = c
    return ids
