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


def bayes_accuracy(
    x: np.ndarray, y: np.ndarray, weights: np.ndarray, means: np.ndarray, covs: np.ndarray
) -> float:
    """Accuracy of the Bayes classifier argmax_k log w_k + log N(x; mu_k, Sigma_k) on (x, y).

    x: (n, d); y: (n,); weights: (K,); means: (K, d); covs: (K, d, d).
    """
    chol = np.linalg.cholesky(covs)  # (K, d, d)
    logdet = 2 * np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(1)
    best = np.full(x.shape[0], -np.inf)
    arg = np.zeros(x.shape[0], dtype=np.int64)
    for k in range(means.shape[0]):
        z = np.linalg.solve(chol[k], (x - means[k]).T)  # (d, n) whitened
        lp = np.log(weights[k]) - 0.5 * logdet[k] - 0.5 * (z * z).sum(0)
        better = lp > best
        best[better], arg[better] = lp[better], k
    return float((arg == y).mean())


def make_overlap_mixture(
    n_samples: int = 60000,
    n_features: int = 32,
    n_clusters: int = 37,
    seed: int = 0,
    bayes_target: float = 0.97,
    imbalance: float = 20.0,
    anisotropy: float = 0.3,
    calib_samples: int = 20000,
) -> tuple[np.ndarray, np.ndarray]:
    """Imbalanced, overlapping Gaussian mixture whose Bayes-optimal accuracy is `bayes_target`.

    Sizes span a factor `imbalance` (geometric); covariances are random and full,
    (1 - anisotropy) I + anisotropy A A^T / d scaled to trace d (eigenvalues about 1 - a to
    1 + 3a: components differ mainly by their means, as in embeddings, not by covariance shape
    alone, which in high d would separate them perfectly); the spread of the means is found by
    bisection so that the Bayes classifier
    (true parameters) reaches `bayes_target` (+- about 0.003) on `calib_samples` points.
    Hard-K benchmark data for K inference (issue 16). Returns X (n, d) float32, y (n,) int64.
    """
    rng = np.random.default_rng(seed)
    K, d = n_clusters, n_features
    w = np.geomspace(1.0, imbalance, K)
    rng.shuffle(w)
    w /= w.sum()
    sizes = np.floor(w * n_samples).astype(int)
    sizes[: n_samples - sizes.sum()] += 1
    directions = rng.normal(size=(K, d))
    covs = np.empty((K, d, d))
    for k in range(K):
        a = rng.normal(size=(d, d)) / np.sqrt(d)
        c = (1 - anisotropy) * np.eye(d) + anisotropy * (a @ a.T)
        covs[k] = c * (d / np.trace(c))
    chol = np.linalg.cholesky(covs)
    # fixed unit draws, re-scaled per candidate spread: accuracy is monotone in the spread
    yc = rng.choice(K, size=calib_samples, p=w)
    zc = _draw_noise(rng, chol, yc)
    lo, hi = 0.0, 20.0
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        acc = bayes_accuracy(zc + mid * directions[yc], yc, w, mid * directions, covs)
        lo, hi = (lo, mid) if acc > bayes_target else (mid, hi)
        if hi - lo < 1e-3:
            break
    means = 0.5 * (lo + hi) * directions
    y = np.repeat(np.arange(K), sizes)
    x = means[y] + _draw_noise(rng, chol, y)
    perm = rng.permutation(n_samples)
    return x[perm].astype(np.float32), y[perm].astype(np.int64)


def _draw_noise(rng: np.random.Generator, chol: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Zero-mean draws with covariance chol[y] chol[y]^T, one cluster at a time. -> (n, d)."""
    z = rng.normal(size=(y.size, chol.shape[-1]))
    for k in np.unique(y):
        rows = y == k
        z[rows] = z[rows] @ chol[k].T
    return z


def make_imagenet_proxy(
    n_samples: int = 1_280_000,
    n_features: int = 128,
    n_clusters: int = 1000,
    seed: int = 0,
    bayes_target: float = 0.97,
    imbalance: float = 5.0,
) -> tuple[np.ndarray, np.ndarray]:
    """An ImageNet-scale stand-in for MoCo features that anyone can make without images:
    `make_overlap_mixture` (full random covariances, sizes spread geometrically over a factor
    `imbalance`, means spread so that the Bayes classifier of the Gaussians reaches `bayes_target`,
    calibrated on 4,000 draws), then every row L2-normalised as MoCo's head does.

    The overlap is set by `bayes_target` before normalisation (the level of the project's other
    overlap mixtures); the normalisation is a monotone radial map per row, so classes keep their
    overlap on the sphere. At .9, one Gaussian had more NIW evidence than the true partition
    (measured at 128k x 128, 100 components: docs/ARCHITECTURE.md), i.e. no cluster structure a
    Gaussian mixture could see. Returns X (n, d) float32 with unit rows, y (n,) int64.
    """
    x, y = make_overlap_mixture(n_samples, n_features, n_clusters, seed=seed, bayes_target=bayes_target,
                                imbalance=imbalance, calib_samples=4000)
    x /= np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
    return x, y
