"""Assign feature rows to the clusters of a fitted model: exactly, by FAISS shortlist, or by the net.

Final assignment (DESIGN §2): k*(x) = argmax_k log pi_k + log N(x; mu_k, Sigma_k).

Three methods, one output (`Assignment`: cluster, log_prob, margin):

    exact      brute force over all K clusters (`FittedModel.log_joint`): 2 K d^2 flops per row.
    shortlist  FAISS finds the top-M clusters under a cheap surrogate score, then the M candidates
               are rescored with the exact Gaussian log-density: 2 (2d+1) K + 2 M d^2 flops per row.
    net        the clustering net's argmax (its logits give the margin).

The surrogate is a diagonal Gaussian per cluster in one shared basis: rotate by the eigenvectors R
of the weighted mean covariance sum_k pi_k Sigma_k, keep each cluster's marginal variances
v_k = diag(R^T Sigma_k R) there, and score

    s_k(z) = log pi_k - 1/2 sum_j log v_kj - 1/2 sum_j (z_j - nu_kj)^2 / v_kj,    z = R^T (x - c)

which is an inner product <q(z), key_k> with q = [z^2, z, 1] and
key_k = [-1/(2 v_k), nu_k / v_k, log pi_k - 1/2 sum log v_k - 1/2 sum nu_k^2 / v_k]; so the top-M
search is a maximum-inner-product search (FAISS IndexFlatIP; HNSW for large K).

`log_prob` is always the exact log pi_k + log N(x; mu_k, Sigma_k) of the assigned cluster (so it is
comparable across methods); `margin` is the method's best score minus its second best (Gaussian
log-joint for exact/shortlist, logits for net; +inf when K = 1).

The batch job over shards (`assign_shards`) writes one assignments Parquet per input shard (DESIGN
§3), skips shards already done by the same model and method, and reports bad shards instead of
dropping them. The Ray Data variant (`_run_with_ray`) is the only Ray touch point here.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cluster_service import index as faiss_index
from cluster_service.data import write_parquet_atomic
from cluster_service.model import FittedModel, ModelError, load_model
from cluster_service.shards import ShardError, iter_feature_batches, load_manifest

METHODS = ("shortlist", "exact", "net")
DEFAULT_TOP_M = 16


@dataclass
class Assignment:
    cluster: np.ndarray  # (n,) int64
    log_prob: np.ndarray  # (n,) float64 log pi_k + log N(x; mu_k, Sigma_k) of the assigned cluster
    margin: np.ndarray  # (n,) float64 best minus second-best score of the method


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _tensor(a: np.ndarray) -> torch.Tensor:
    """torch view of a numpy array; read-only arrays (Arrow buffers, Ray objects) are copied first."""
    a = np.asarray(a)
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def _best_two(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scores: (n, M) -> argmax (n,), max (n,), max minus second max (n,) (+inf when M = 1)."""
    if scores.shape[1] == 1:
        zeros = torch.zeros(scores.shape[0], dtype=torch.int64, device=scores.device)
        return zeros, scores[:, 0], torch.full_like(scores[:, 0], np.inf)
    top, arg = scores.topk(2, dim=1)
    return arg[:, 0], top[:, 0], top[:, 0] - top[:, 1]


# ---------------------------------------------------------------------------------------- exact math


class GaussianScorer:
    """Exact log pi_k + log N(x; mu_k, Sigma_k) for chosen (row, cluster) pairs.

    Holds per-cluster whitening W_k = L_k^{-T} (K, d, d), b_k = mu_k W_k (K, d) and
    const_k = log pi_k - d/2 log 2pi - log|L_k| (K,); then log-joint = const_k - 1/2 |x W_k - b_k|^2.
    """

    def __init__(self, model: FittedModel, device: torch.device, dtype: torch.dtype = torch.float64):
        K, d = model.means.shape
        chol = _tensor(model.chol).to(device, torch.float64)
        eye = torch.eye(d, dtype=torch.float64, device=device).expand(K, d, d)
        w = torch.linalg.solve_triangular(chol, eye, upper=False).transpose(-1, -2)  # (K, d, d)
        means = _tensor(model.means).to(device, torch.float64)
        self.weight = w.to(dtype)
        self.bias = torch.einsum("kd,kde->ke", means, w).to(dtype)  # (K, d)
        self.const = (
            _tensor(model.log_weights).to(device, torch.float64)
            - 0.5 * d * np.log(2 * np.pi)
            - torch.log(chol.diagonal(dim1=-2, dim2=-1)).sum(-1)
        ).to(dtype)
        self.n_clusters, self.dtype, self.device = K, dtype, device

    def score_pairs(self, x: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        """x: (n, d); cand: (n, M) int64 cluster ids (-1 = none) -> (n, M) log-joints (-inf for -1).

        Pairs are sorted by cluster and each cluster's rows go through one (rows, d) x (d, d)
        matmul: a Python loop over clusters present in the batch, never over rows.
        """
        n, M = cand.shape
        x = x.to(self.device, self.dtype)
        flat = cand.reshape(-1).to(self.device)
        valid = flat >= 0
        flat = torch.where(valid, flat, torch.zeros_like(flat))
        order = torch.argsort(flat, stable=True)
        rows = order // M  # (n M,) row of each sorted pair
        counts = torch.bincount(flat, minlength=self.n_clusters).cpu()
        present = torch.nonzero(counts).flatten().tolist()
        ends = torch.cumsum(counts, 0).tolist()
        out_sorted = torch.empty(n * M, dtype=self.dtype, device=self.device)
        for k in present:
            seg = slice(ends[k] - int(counts[k]), ends[k])
            y = x.index_select(0, rows[seg]) @ self.weight[k] - self.bias[k]  # (rows_k, d)
            out_sorted[seg] = self.const[k] - 0.5 * y.square().sum(-1)
        out = torch.empty_like(out_sorted)
        out[order] = out_sorted
        out = torch.where(valid, out, torch.full_like(out, -np.inf))
        return out.view(n, M)


def exact_assign(
    model: FittedModel, x: np.ndarray, device: str = "cpu", chunk_rows: int | None = None
) -> Assignment:
    """Brute force over all K clusters with `FittedModel.log_joint` (float64)."""
    x = np.asarray(x)
    model.check_features(x)
    rows = chunk_rows or max(1, (1 << 24) // max(1, model.n_clusters))
    parts = []
    for s in range(0, x.shape[0], rows):
        lj = torch.from_numpy(model.log_joint(x[s : s + rows], device=device))
        parts.append(_best_two(lj))
    if not parts:
        return Assignment(np.empty(0, np.int64), np.empty(0), np.empty(0))
    cluster, best, margin = (torch.cat(t).numpy() for t in zip(*parts, strict=True))
    return Assignment(cluster.astype(np.int64), best, margin)


# ---------------------------------------------------------------------------------------- shortlist


@dataclass
class DiagonalSurrogate:
    """Per-cluster diagonal Gaussians in a shared rotated basis, as MIPS keys (see module docstring)."""

    center: np.ndarray  # (d,) c
    rotation: np.ndarray  # (d, d) R, columns = eigenvectors of sum_k pi_k Sigma_k
    keys: np.ndarray  # (K, 2 d + 1) float32

    @classmethod
    def from_model(cls, model: FittedModel) -> DiagonalSurrogate:
        pi = np.exp(model.log_weights - model.log_weights.max())
        pi /= pi.sum()
        chol = model.chol.astype(np.float64)
        scaled = chol * np.sqrt(pi)[:, None, None]
        pooled = np.tensordot(scaled, scaled, axes=([0, 2], [0, 2]))  # sum_k pi_k L_k L_k^T: (d, d)
        _, rotation = np.linalg.eigh(pooled)
        center = pi @ model.means
        nu = (model.means - center) @ rotation  # (K, d)
        var = np.square(rotation.T[None] @ chol).sum(2)  # diag(R^T L L^T R): (K, d)
        prec = 1.0 / var
        bias = model.log_weights - 0.5 * np.log(var).sum(1) - 0.5 * (nu * nu * prec).sum(1)
        keys = np.concatenate([-0.5 * prec, nu * prec, bias[:, None]], axis=1)
        return cls(center, rotation, keys.astype(np.float32))

    def queries(self, x: np.ndarray) -> np.ndarray:
        """x: (n, d) -> q = [z^2, z, 1]: (n, 2 d + 1) float32."""
        z = (np.asarray(x, dtype=np.float64) - self.center) @ self.rotation
        return np.concatenate([z * z, z, np.ones((z.shape[0], 1))], axis=1).astype(np.float32)


class ShortlistAssigner:
    """FAISS top-M search under the diagonal surrogate, then exact rescoring of the M candidates."""

    def __init__(
        self,
        model: FittedModel,
        top_m: int = DEFAULT_TOP_M,
        device: str = "cpu",
        index_kind: str = "auto",
        dtype: torch.dtype = torch.float64,
    ):
        if top_m < 1:
            raise ValueError(f"top_m must be >= 1, got {top_m}")
        self.model = model
        self.top_m = min(top_m, model.n_clusters)
        self.surrogate = DiagonalSurrogate.from_model(model)
        self.index = faiss_index.MipsIndex(self.surrogate.keys, index_kind)
        self.scorer = GaussianScorer(model, resolve_device(device), dtype)

    def candidates(self, x: np.ndarray) -> np.ndarray:
        """(n, M) int64 candidate clusters, best surrogate score first."""
        return self.index.search(self.surrogate.queries(x), self.top_m)

    def __call__(self, x: np.ndarray) -> Assignment:
        x = np.asarray(x)
        self.model.check_features(x)
        cand = torch.from_numpy(self.candidates(x))
        scores = self.scorer.score_pairs(_tensor(x), cand)
        pos, best, margin = _best_two(scores)
        cluster = cand.gather(1, pos.cpu()[:, None])[:, 0]
        return Assignment(cluster.numpy(), best.cpu().numpy(), margin.cpu().numpy())


class ExactAssigner:
    def __init__(self, model: FittedModel, device: str = "cpu"):
        self.model, self.device = model, str(resolve_device(device))

    def __call__(self, x: np.ndarray) -> Assignment:
        return exact_assign(self.model, x, self.device)


class NetAssigner:
    """The clustering net's argmax; log_prob is the exact log-joint of that cluster."""

    def __init__(self, model: FittedModel, device: str = "cpu"):
        if not model.net:
            raise ModelError("this model has no clustering-net weights; use --method exact or shortlist")
        self.model = model
        self.scorer = GaussianScorer(model, resolve_device(device))

    def __call__(self, x: np.ndarray) -> Assignment:
        logits = torch.from_numpy(self.model.net_logits(x))
        cluster, _, margin = _best_two(logits)
        log_prob = self.scorer.score_pairs(_tensor(x), cluster[:, None])[:, 0]
        return Assignment(cluster.numpy(), log_prob.cpu().numpy(), margin.numpy().astype(np.float64))


def make_assigner(
    model: FittedModel, method: str = "shortlist", top_m: int = DEFAULT_TOP_M, device: str = "cpu"
) -> Callable[[np.ndarray], Assignment]:
    if method == "shortlist":
        return ShortlistAssigner(model, top_m, device)
    if method == "exact":
        return ExactAssigner(model, device)
    if method == "net":
        return NetAssigner(model, device)
    raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")


def concat_assignments(parts: list[Assignment]) -> Assignment:
    if not parts:
        return Assignment(np.empty(0, np.int64), np.empty(0), np.empty(0))
    fields = ("cluster", "log_prob", "margin")
    return Assignment(*(np.concatenate([getattr(p, f) for p in parts]) for f in fields))


def agreement(a: Assignment, b: Assignment) -> float:
    """Fraction of rows given the same cluster by two assignments."""
    return float((a.cluster == b.cluster).mean()) if a.cluster.size else 1.0


# ---------------------------------------------------------------------------------------- shard job

STAMP_KEY = b"cluster_service.assign"  # Parquet footer key: what produced this output shard


def open_model(
    spec: str | os.PathLike, n_features: int | None = None, tracking_uri: str | None = None
) -> FittedModel:
    """A model directory, a run directory holding model/, or an MLflow model URI
    (models:/name/version, runs:/run_id/path); refused if its d differs from n_features."""
    path = Path(spec)
    if path.is_dir():
        model_dir = path / "model" if (path / "model" / "model.json").is_file() else path
        return load_model(model_dir, n_features=n_features)
    if ":/" in str(spec):
        from cluster_service.pyfunc import download_model_dir

        return load_model(download_model_dir(str(spec), tracking_uri), n_features=n_features)
    raise FileNotFoundError(
        f"{spec}: neither a model directory nor an MLflow model URI (models:/name/version, runs:/id/path)"
    )


@dataclass(frozen=True)
class ShardTask:
    index: int  # position in manifest.json
    name: str
    rows: int
    sha256: str


@dataclass(frozen=True)
class JobSpec:
    """Everything a worker needs besides the model; small and picklable."""

    shard_dir: str
    out_dir: str
    n_shards: int
    method: str
    top_m: int
    device: str
    batch_size: int
    version: str
    n_clusters: int

    def stamp(self, task: ShardTask) -> bytes:
        """Footer stamp of a finished output: same model, method and input bytes -> skip on re-run."""
        top_m = self.top_m if self.method == "shortlist" else 0
        return json.dumps({"model_version": self.version, "method": self.method, "top_m": top_m,
                           "source": task.name, "source_sha256": task.sha256, "rows": task.rows}).encode()


@dataclass
class ShardOutcome:
    shard: str
    status: str  # "done" | "skipped" | "failed"
    rows: int = 0
    counts: np.ndarray | None = None  # (K,) int64 rows per cluster in this shard
    error: str = ""
    seconds: float = 0.0


@dataclass
class AssignReport:
    outcomes: list[ShardOutcome]
    n_clusters: int
    seconds: float
    same_manifest: bool | None  # shards' manifest == the model's training manifest (None: unknown)

    @property
    def failed(self) -> list[ShardOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    def cluster_sizes(self) -> np.ndarray:
        """(K,) int64 rows per cluster over all shards that have an output."""
        sizes = np.zeros(self.n_clusters, np.int64)
        for o in self.outcomes:
            if o.counts is not None:
                sizes += o.counts
        return sizes

    def as_dict(self) -> dict:
        by = {s: [o for o in self.outcomes if o.status == s] for s in ("done", "skipped", "failed")}
        rows_done = sum(o.rows for o in by["done"])
        sizes = self.cluster_sizes()
        return {
            "shards": len(self.outcomes), "done": len(by["done"]), "skipped": len(by["skipped"]),
            "failed": len(by["failed"]), "rows": int(sizes.sum()), "rows_assigned_now": rows_done,
            "clusters_used": int((sizes > 0).sum()), "n_clusters": self.n_clusters,
            "seconds": round(self.seconds, 2), "rows_per_s": round(rows_done / max(self.seconds, 1e-9), 1),
        }


def output_table(ids: np.ndarray, a: Assignment, version: str, stamp: bytes) -> pa.Table:
    """Assignments (DESIGN §3): id, cluster int32, log_prob float32, margin float32, model_version."""
    id_arr = pa.array(ids, pa.int64()) if ids.dtype != object else pa.array(ids, pa.string())
    table = pa.table({
        "id": id_arr,
        "cluster": pa.array(a.cluster.astype(np.int32)),
        "log_prob": pa.array(a.log_prob.astype(np.float32)),
        "margin": pa.array(a.margin.astype(np.float32)),
        "model_version": pa.array([version] * len(ids), pa.string()),
    })
    return table.replace_schema_metadata({STAMP_KEY: stamp})


def is_finished(path: Path, stamp: bytes) -> bool:
    """An output that a run with the same model, method and input completed (checked in the footer)."""
    try:
        meta = pq.read_metadata(path)
    except (OSError, pa.ArrowException):
        return False
    return (meta.metadata or {}).get(STAMP_KEY) == stamp and meta.num_rows == json.loads(stamp)["rows"]


class ShardWorker:
    """Holds the model and its assigner (built once) and assigns whole shards."""

    def __init__(self, model: FittedModel, spec: JobSpec):
        self.spec = spec
        self.assign = make_assigner(model, spec.method, spec.top_m, spec.device)

    def run(self, task: ShardTask) -> ShardOutcome:
        t0 = time.perf_counter()
        spec = self.spec
        try:
            ids, parts = [], []
            batches = iter_feature_batches(spec.shard_dir, task.index, spec.n_shards, spec.batch_size)
            for b in batches:
                bad = np.flatnonzero(~np.isfinite(b.features).all(axis=1))
                if bad.size:
                    row = b.first_row + int(bad[0])
                    raise ShardError(f"{task.name} row {row}: feature contains NaN or Inf")
                ids.append(b.ids)
                parts.append(self.assign(b.features))
            a = concat_assignments(parts)
            id_arr = np.concatenate(ids) if ids else np.empty(0, np.int64)
            write_parquet_atomic(output_table(id_arr, a, spec.version, spec.stamp(task)),
                                 Path(spec.out_dir) / task.name)
        except (ValueError, OSError, pa.ArrowException) as e:  # ShardError, ModelError are ValueErrors
            return ShardOutcome(task.name, "failed", error=str(e), seconds=time.perf_counter() - t0)
        counts = np.bincount(a.cluster, minlength=spec.n_clusters).astype(np.int64)
        return ShardOutcome(task.name, "done", len(id_arr), counts, seconds=time.perf_counter() - t0)


def _skipped(path: Path, task: ShardTask, n_clusters: int) -> ShardOutcome:
    cluster = pq.read_table(path, columns=["cluster"]).column("cluster").to_numpy()
    return ShardOutcome(task.name, "skipped", task.rows, np.bincount(cluster, minlength=n_clusters))


def assign_shards(
    model: FittedModel | str | os.PathLike,
    shard_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    method: str = "shortlist",
    top_m: int = DEFAULT_TOP_M,
    device: str = "auto",
    use_ray: bool = True,
    batch_size: int = 65536,
    progress: Callable[[ShardOutcome], None] | None = None,
) -> AssignReport:
    """Assign every shard listed in SHARD_DIR/manifest.json; one output Parquet per shard in out_dir.

    Outputs stamped by the same model, method and input bytes are skipped; anything else (missing,
    partial, stale) is redone. A shard that cannot be read is reported in the result (status
    "failed", with the reason) and the others go on. Raises ModelError when the model's d differs
    from the manifest's.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    t0 = time.perf_counter()
    manifest, _ = load_manifest(shard_dir)
    d = manifest["d"]
    if not isinstance(model, FittedModel):
        model = open_model(model, n_features=d)
    elif model.n_features != d:
        raise ModelError(f"model has feature dimension d={model.n_features}, "
                         f"{Path(shard_dir) / 'manifest.json'} says the shards have d={d}")
    why = model.feature_space_mismatch(manifest)
    if why is not None:
        raise ModelError(
            f"{Path(shard_dir) / 'manifest.json'}: {why}: these features come from another extractor or "
            "preprocessing, and the model's clusters do not apply to them"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.parquet.tmp-*"):  # left by a killed run; never renamed into place
        stale.unlink(missing_ok=True)
    spec = JobSpec(str(shard_dir), str(out), len(manifest["shards"]), method, top_m, device, batch_size,
                   model.version or "unversioned", model.n_clusters)
    tasks = [ShardTask(i, s["name"], s["rows"], s["sha256"]) for i, s in enumerate(manifest["shards"])]
    outcomes, todo = [], []
    for task in tasks:
        if is_finished(out / task.name, spec.stamp(task)):
            outcomes.append(_skipped(out / task.name, task, model.n_clusters))
            if progress:
                progress(outcomes[-1])
        else:
            todo.append(task)
    if todo:
        run = _run_with_ray if use_ray else _run_local
        for outcome in run(model, spec, todo):
            outcomes.append(outcome)
            if progress:
                progress(outcome)
    order = {t.name: t.index for t in tasks}
    outcomes.sort(key=lambda o: order[o.shard])
    same = None if model.manifest_hash is None and model.feature_space is None else True
    return AssignReport(outcomes, model.n_clusters, time.perf_counter() - t0, same)


def _run_local(model: FittedModel, spec: JobSpec, tasks: list[ShardTask]) -> Iterator[ShardOutcome]:
    worker = ShardWorker(model, spec)
    for task in tasks:
        yield worker.run(task)


class _RayShardWorker:
    """Ray Data actor: builds the assigner once, then assigns one shard per call."""

    def __init__(self, model_ref: list, spec: JobSpec, n_threads: int):
        import ray

        torch.set_num_threads(n_threads)
        model = copy.deepcopy(ray.get(model_ref[0]))  # RAY: the model comes once per actor (writable copy)
        self.worker = ShardWorker(model, spec)
        self.n_clusters = spec.n_clusters

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = [self.worker.run(ShardTask(int(i), str(n), int(r), str(h))) for i, n, r, h in
                zip(batch["index"], batch["name"], batch["rows"], batch["sha256"], strict=True)]
        zeros = np.zeros(self.n_clusters, np.int64)
        return {
            "shard": np.array([o.shard for o in outs]),
            "status": np.array([o.status for o in outs]),
            "rows": np.array([o.rows for o in outs], np.int64),
            "counts": np.stack([zeros if o.counts is None else o.counts for o in outs]),
            "error": np.array([o.error for o in outs]),
            "seconds": np.array([o.seconds for o in outs]),
        }


def _run_with_ray(model: FittedModel, spec: JobSpec, tasks: list[ShardTask]) -> Iterator[ShardOutcome]:
    """Ray Data job: one row per shard, a pool of actors (one per GPU, else one per CPU) that each
    hold the model once; rows come back as shards finish."""
    import ray  # RAY

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None)  # RAY: the cluster, or a local one
    ray.data.DataContext.get_current().enable_progress_bars = False  # the caller shows progress
    resources = ray.cluster_resources()
    n_gpus = int(resources.get("GPU", 0))
    use_gpu = n_gpus > 0 and spec.device != "cpu"
    n_cpus = max(1, int(resources.get("CPU", 1)))
    n_actors = max(1, min(len(tasks), n_gpus if use_gpu else n_cpus))
    threads = 1 if use_gpu else max(1, n_cpus // n_actors)
    if not use_gpu and spec.device == "auto":
        spec = dataclasses.replace(spec, device="cpu")
    items = [dataclasses.asdict(t) for t in tasks]
    ds = ray.data.from_items(items, override_num_blocks=len(items))  # RAY
    ds = ds.map_batches(  # RAY
        _RayShardWorker,
        fn_constructor_args=([ray.put(model)], spec, threads),
        batch_size=1,
        concurrency=n_actors,
        num_gpus=1 if use_gpu else 0,
        num_cpus=0 if use_gpu else threads,
    )
    for row in ds.iter_rows():  # RAY: streamed as actors finish shards
        counts = np.asarray(row["counts"], np.int64) if row["status"] == "done" else None
        yield ShardOutcome(str(row["shard"]), str(row["status"]), int(row["rows"]), counts,
                           str(row["error"]), float(row["seconds"]))


# ---------------------------------------------------------------------------------------- benchmark


def synthetic_model(
    n_clusters: int,
    n_features: int,
    seed: int = 0,
    separation: float = 1.0,
    individuality: float = 0.5,
    version: str = "synthetic",
) -> FittedModel:
    """A FittedModel with known parameters (no training).

    Means ~ N(0, separation^2 I); covariance of cluster k = s_k ((1 - rho) S + rho W_k) scaled to
    trace ~d, where S is one shared anisotropic covariance (decaying spectrum, as real features
    have), W_k a cluster's own random Wishart shape, rho = `individuality` (1: shapes unrelated
    across clusters, the hard case for a shared-basis surrogate) and s_k log-normal; Dirichlet weights.
    """
    rng = np.random.default_rng(seed)
    K, d = n_clusters, n_features
    means = rng.normal(0.0, separation, size=(K, d))
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    shared = (q * (1.0 / np.sqrt(np.arange(1, d + 1)))) @ q.T
    a = rng.normal(size=(K, d, d)) / np.sqrt(d)
    own = a @ np.swapaxes(a, 1, 2) + 0.3 * np.eye(d)
    own /= np.trace(own, axis1=1, axis2=2)[:, None, None]
    cov = (1.0 - individuality) * shared / np.trace(shared) + individuality * own
    cov *= (np.exp(rng.normal(0.0, 0.3, size=K)) * d / np.trace(cov, axis1=1, axis2=2))[:, None, None]
    weights = rng.dirichlet(np.full(K, 5.0))
    prior = {"alpha": 10.0, "kappa": 1e-4, "nu": d + 2.0, "mean": np.zeros(d), "psi": np.eye(d)}
    return FittedModel(np.log(weights), means, np.linalg.cholesky(cov), prior, version=version)


def sample_model(model: FittedModel, n_samples: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Draw points from the model's mixture: X (n, d) float32 and the component of each (n,) int64."""
    rng = np.random.default_rng(seed)
    z = rng.choice(model.n_clusters, size=n_samples, p=np.exp(model.log_weights))
    x = np.empty((n_samples, model.n_features), np.float32)
    for k in np.unique(z):
        rows = np.flatnonzero(z == k)
        x[rows] = model.means[k] + rng.normal(size=(rows.size, model.n_features)) @ model.chol[k].T
    return x, z.astype(np.int64)


def bench_assign(
    n_features: int = 128,
    n_clusters: int = 1000,
    n_rows: int = 20000,
    exact_rows: int = 2000,
    top_m: int = DEFAULT_TOP_M,
    device: str = "cpu",
    batch_size: int = 65536,
    seed: int = 0,
    separation: float = 0.5,
    individuality: float = 0.5,
) -> dict:
    """Rows/s of brute-force exact assignment vs FAISS shortlist + exact rescoring, and their agreement.

    Exact runs on the first `exact_rows` rows (it costs 2 K d^2 flops per row); the shortlist on all
    `n_rows`; agreement is measured on the rows both assigned. Returns a flat dict of figures."""
    model = synthetic_model(n_clusters, n_features, seed, separation, individuality)
    x, z = sample_model(model, n_rows, seed + 1)
    exact_rows = min(exact_rows, n_rows)
    dev = str(resolve_device(device))

    t0 = time.perf_counter()
    shortlist = ShortlistAssigner(model, top_m, dev)
    t_build = time.perf_counter() - t0
    shortlist(x[:256])  # warm-up
    t0 = time.perf_counter()
    fast = concat_assignments([shortlist(x[s : s + batch_size]) for s in range(0, n_rows, batch_size)])
    t_short = time.perf_counter() - t0

    exact_assign(model, x[:256], dev)  # warm-up
    t0 = time.perf_counter()
    exact = exact_assign(model, x[:exact_rows], dev)
    t_exact = time.perf_counter() - t0

    head = Assignment(fast.cluster[:exact_rows], fast.log_prob[:exact_rows], fast.margin[:exact_rows])
    return {
        "n_features": n_features, "n_clusters": n_clusters, "top_m": top_m, "device": dev,
        "separation": separation, "individuality": individuality,
        "torch_threads": torch.get_num_threads(), "index": shortlist.index.kind,
        "rows_exact": exact_rows, "rows_shortlist": n_rows,
        "exact_rows_per_s": exact_rows / t_exact, "shortlist_rows_per_s": n_rows / t_short,
        "speedup": (n_rows / t_short) / (exact_rows / t_exact),
        "shortlist_build_s": t_build,
        "agreement": agreement(head, exact),
        "exact_matches_truth": float((exact.cluster == z[:exact_rows]).mean()),
    }
