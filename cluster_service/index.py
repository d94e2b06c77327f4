"""Every FAISS touch point: k-means initialisation, nearest cluster means, index building.

GPU FAISS is used when the installed faiss has GPU support and a GPU is visible
(`faiss.get_num_gpus() > 0`; `index_cpu_to_all_gpus` silently returns an empty index
otherwise), faiss-cpu otherwise.
"""

from __future__ import annotations

import faiss
import numpy as np
import torch


def gpu_available() -> bool:
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def _as_f32(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


# k-means trains on at most this many points (a seeded sample of the rows).
KMEANS_MAX_POINTS = 256 * 1024


def kmeans(x, n_clusters: int, seed: int, n_iter: int = 20, max_points: int = KMEANS_MAX_POINTS,
           keys: np.ndarray | None = None) -> np.ndarray:
    """FAISS k-means centroids (n_clusters, d) float32; at most `max_points` points are sampled.

    Empty clusters are handled by FAISS (it splits large ones); with fewer distinct points than
    clusters the surplus centroids are duplicates, which the first M-step prunes.
    keys: (n,) int, one pseudo-random key per row (truncated.row_hash of its global index).
    Given, the sample and the initial centroids are the rows with the smallest keys instead of
    random positions: a few rows joining or leaving x then move the centroids a little instead
    of redrawing the start (one row more shifts every later position). The split step's cells
    need this: a cluster's rows differ by a few boundary rows between worker layouts.
    """
    xs = _as_f32(x)
    n, d = xs.shape
    if n_clusters == 1:
        return xs.mean(0, keepdims=True)
    init = None
    if keys is not None:
        order = np.argsort(np.asarray(keys), kind="stable")
        init = xs[order[:n_clusters]]
        if n > max_points:
            xs = xs[np.sort(order[:max_points])]
    elif n > max_points:
        rng = np.random.default_rng(seed)
        xs = xs[np.sort(rng.choice(n, max_points, replace=False))]
    km = faiss.Kmeans(
        d, n_clusters, niter=n_iter, seed=seed, gpu=gpu_available(), verbose=False,
        min_points_per_centroid=1, max_points_per_centroid=max(256, xs.shape[0] // n_clusters + 1),
    )
    km.train(xs, init_centroids=init)
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


# Queries are converted to float32 this many rows at a time (rows kept as bfloat16 / float16 are
# never copied whole); a multiple of FAISS's own query block (4096), so the results are the same.
SEARCH_CHUNK = 1 << 16


def _search(index: faiss.Index, x, k: int) -> np.ndarray:
    """index.search of the rows x (n, d), SEARCH_CHUNK rows at a time -> ids (n, k) int64."""
    n = x.shape[0]
    if n <= SEARCH_CHUNK:
        return index.search(_as_f32(x), k)[1].astype(np.int64)
    return np.concatenate([index.search(_as_f32(x[i : i + SEARCH_CHUNK]), k)[1].astype(np.int64)
                           for i in range(0, n, SEARCH_CHUNK)])


def nearest_k(x, centroids, k: int) -> np.ndarray:
    """Each row's k nearest centroids, nearest first: (n, min(k, K)) int64."""
    return _search(flat_index(centroids), x, min(k, _as_f32(centroids).shape[0]))


def assign_nearest(x, centroids) -> np.ndarray:
    """Index of the nearest centroid for every row of x: (n,) int64."""
    return _search(flat_index(centroids), x, 1)[:, 0]


class MipsIndex:
    """Top-k maximum-inner-product search over `keys` (K, D) for assignment shortlists.

    kind: "flat" (exact search, one GEMM; on the GPU when available), "hnsw" (graph search for
    large K, CPU), or "auto" (flat up to `hnsw_above` keys, HNSW beyond). HNSW searches the
    equivalent L2 problem: keys get one more coordinate sqrt(phi^2 - |k|^2) (phi = max |k|) and
    queries a 0, so |q - k|^2 = |q|^2 + phi^2 - 2 <q, k> and the nearest key is the best inner product.
    """

    def __init__(self, keys, kind: str = "auto", hnsw_above: int = 8192):
        k = _as_f32(keys)
        if kind == "auto":
            kind = "flat" if k.shape[0] <= hnsw_above else "hnsw"
        self.kind = kind
        if kind == "flat":
            self.index = faiss.IndexFlatIP(k.shape[1])
            if gpu_available():
                self.index = faiss.index_cpu_to_all_gpus(self.index)
        elif kind == "hnsw":
            norms = np.square(k.astype(np.float64)).sum(1)
            extra = np.sqrt(np.maximum(norms.max() - norms, 0.0)).astype(np.float32)
            k = np.ascontiguousarray(np.concatenate([k, extra[:, None]], axis=1))
            self.index = faiss.IndexHNSWFlat(k.shape[1], 32)
            self.index.hnsw.efConstruction = 80
        else:
            raise ValueError(f"index kind must be auto, flat or hnsw, got {kind!r}")
        self.index.add(k)

    def search(self, queries, k: int) -> np.ndarray:
        """Ids of the k best keys for every query: (n, k) int64, -1 where the index found fewer."""
        q = _as_f32(queries)
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = max(256, 16 * k)  # MIPS-as-L2 needs a wide beam for recall
            q = np.ascontiguousarray(np.concatenate([q, np.zeros((q.shape[0], 1), np.float32)], axis=1))
        _, idx = self.index.search(q, k)
        return idx


def pairs_within(queries, keys, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (query, key) pair whose inner product is at least `threshold`, by exact range search
    (CPU: FAISS range search has no GPU flat index). queries (n, d), keys (m, d) ->
    (query row (p,) int64, key row (p,) int64, inner product (p,) float32), query by query."""
    q, k = _as_f32(queries), _as_f32(keys)
    index = faiss.IndexFlatIP(k.shape[1])
    index.add(k)
    # range search keeps products strictly above the radius; float32 rounding may put an exact copy
    # a hair under 1, so search a little wider and cut at the threshold less that rounding
    lims, sims, idx = index.range_search(q, threshold - 1e-5)
    rows = np.repeat(np.arange(q.shape[0], dtype=np.int64), np.diff(lims.astype(np.int64)))
    keep = sims >= threshold - 1e-6
    return rows[keep], idx[keep].astype(np.int64), sims[keep]
