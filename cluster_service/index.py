"""Every FAISS touch point: k-means initialisation, nearest cluster means, index building.

GPU FAISS is used when the installed faiss has GPU support and a GPU is visible
(`faiss.get_num_gpus() > 0`; `index_cpu_to_all_gpus` silently returns an empty index
otherwise), faiss-cpu otherwise.
"""

from __future__ import annotations

import numpy as np
import torch

import faiss


def gpu_available() -> bool:
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def _as_f32(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def kmeans(x, n_clusters: int, seed: int, n_iter: int = 20, max_points: int = 256 * 1024) -> np.ndarray:
    """FAISS k-means centroids (n_clusters, d) float32; at most `max_points` points are sampled.

    Empty clusters are handled by FAISS (it splits large ones); with fewer distinct points than
    clusters the surplus centroids are duplicates, which the first M-step prunes.
    """
    xs = _as_f32(x)
    n, d = xs.shape
    if n_clusters == 1:
        return xs.mean(0, keepdims=True)
    if n > max_points:
        rng = np.random.default_rng(seed)
        xs = xs[np.sort(rng.choice(n, max_points, replace=False))]
    km = faiss.Kmeans(
        d, n_clusters, niter=n_iter, seed=seed, gpu=gpu_available(), verbose=False,
        min_points_per_centroid=1, max_points_per_centroid=max(256, xs.shape[0] // n_clusters + 1),
    )
    km.train(xs)
    return km.centroids.copy()


def flat_index(vectors, metric: str = "l2") -> faiss.Index:
    """Exact index over `vectors` (n, d); on the GPU when one is available."""
    v = _as_f32(vectors)
    index = faiss.IndexFlatL2(v.shape[1]) if metric == "l2" else faiss.IndexFlatIP(v.shape[1])
    if gpu_available():
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(v)
    return index


def nearest_clusters(means, n_neighbors: int) -> torch.Tensor:
    """Each cluster's n_neighbors nearest other cluster means (merge candidates).

    means: (K, d) -> (K, n_neighbors) int64, -1 where fewer clusters exist.
    """
    m = _as_f32(means)
    K = m.shape[0]
    k = min(n_neighbors + 1, K)
    _, idx = flat_index(m).search(m, k)
    out = np.full((K, n_neighbors), -1, dtype=np.int64)
    for i in range(K):
        others = [j for j in idx[i] if j != i and j >= 0][:n_neighbors]
        out[i, : len(others)] = others
    return torch.from_numpy(out)


def assign_nearest(x, centroids) -> np.ndarray:
    """Index of the nearest centroid for every row of x: (n,) int64."""
    _, idx = flat_index(centroids).search(_as_f32(x), 1)
    return idx[:, 0].astype(np.int64)
