"""Cost model of a fit: memory and time per worker, and bytes between workers, against the rows N,
dimension d, clusters K, workers W, candidates C, device and row storage dtype
(`cluster-service plan --rows N --workers W --device cuda`).

What a worker holds and does, per epoch (train.engine, train.estep, train.comm):

    memory  = base + [W > 1] dist + N/W * (row_bytes + the reader's peak copies)
              + stats_copies * 3K * (1 + d + d^2) * 8 + nets
              row_bytes = d * dtype + 8 (global index) + 16 (epoch order, train.shuffle)
                          + C' * 16 (candidate table: int64 cluster, float64 log r) + 40 (top-2, margin)
    flops   = N/W * (4 C' d^2      scoring (whitened solve) and statistics (one outer product a pair)
                     + 6 B_net)    the nets' forward and backward per row
              + 3K * d^3 / 3       Cholesky of every cluster and subcluster (every rank: the M-step)
    bytes   = 2 * 3K * (1 + d + d^2) * 8       the statistics' all-reduce (sent and received)
              (a split round: + 2 * K M (1 + d + d^2) * 8, its M k-means cells a cluster; memory holds
              those cell statistics once, three times when W > 1: local, flattened, reduced)
              + 2 * 4 * (P_cl * S + P_sub * S / s)    DDP's gradient all-reduce: the clustering net's
                                               every step (S = ceil(N / B) steps of the global batch
                                               B), the subnets' every s = ceil(8 K / B) steps;
                                               B is smaller on small data: min_steps steps
    seconds = flops / (device.flops * min(1, device.parallel / W)) + bytes / device.bandwidth
              + S * (device.step_overhead + [W > 1] device.sync_overhead) + device.epoch_overhead

C' is K below 2 x candidates (dense E-step) and the candidates above it. The statistics bytes do
not depend on N (the split sample is capped per cell, train.rows); the gradient bytes do, through
the number of steps, as in any data-parallel SGD with a fixed batch.

CPU constants are fitted to this project's measured points (BENCHMARKS.md, "Workers: per-worker
memory, bytes and epoch time"); the CUDA ones are assumptions stated in DEVICES and in
docs/ARCHITECTURE.md ("Scale"), not measurements.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from cluster_service.train.engine import SUB_ROWS_PER_NET

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


@dataclass(frozen=True)
class Device:
    """flops: effective float32 flop/s of the epoch's work on one worker; bandwidth: all-reduce
    bytes/s between workers; step_overhead: seconds a mini-batch step costs beyond its flops (the
    optimizer, launches, the gradient all-reduce's latency); epoch_overhead: seconds an epoch
    costs beyond both (the M-step's Python, the moves' bookkeeping); base_memory: bytes a worker
    holds with no rows (interpreter, torch, FAISS, Ray's worker, buffers); memory_cap: bytes one
    worker may use; sync_overhead: seconds a step adds when W > 1 (DDP's gradient all-reduce: its
    latency and the wait for the slowest rank); dist_memory: bytes a worker adds when W > 1 (the
    process group's transport buffers, DDP's gradient buckets, the split round's gathered sample);
    parallel: how many workers run at full speed at once (the cores of a CPU box, one worker a
    thread; a GPU each); row_peak_bytes: bytes a row adds at the worker's peak beyond what the fit
    holds (the shard reader's transient copies: Arrow table, NumPy array, tensor)."""

    name: str
    flops: float
    bandwidth: float
    step_overhead: float
    epoch_overhead: float
    base_memory: float
    memory_cap: float
    source: str
    sync_overhead: float = 0.0
    dist_memory: float = 0.0
    parallel: float = math.inf
    row_peak_bytes: float = 0.0


DEVICES = {
    # fitted with fit_device() to the measured points of bench.distributed.bench_workers_scaling
    "cpu": Device("cpu (1 thread a worker, this 2-core box)", flops=46e9, bandwidth=1.0e9, step_overhead=0.0,
                  epoch_overhead=1.17, base_memory=1.44e9, memory_cap=24e9,
                  source="fitted to BENCHMARKS.md, Workers and rows", sync_overhead=6.8e-3, dist_memory=0.14e9,
                  parallel=2, row_peak_bytes=465),
    # assumptions: H100 SXM float32 at ~30 % of its 67 Tflop/s peak for these batched solves and
    # outer products; NVLink within one 8-GPU node, ring all-reduce at ~100 GB/s a GPU; 80 GB
    "cuda": Device("cuda (H100-class, assumed)", flops=20e12, bandwidth=100e9, step_overhead=3e-4,
                   epoch_overhead=0.5,
                   base_memory=3e9, memory_cap=80e9, source="assumed: 30 % of H100 float32 peak, NVLink",
                   sync_overhead=1e-4, dist_memory=1e9),
}


@dataclass(frozen=True)
class Workload:
    rows: int
    dim: int = 128
    clusters: int = 1000
    workers: int = 1
    candidates: int = 16
    row_dtype: str = "float32"
    batch_size: int = 1024
    min_steps: int = 20
    cluster_hidden: int = 128
    sub_hidden: int = 32
    split_cells: int = 32

    @classmethod
    def from_config(cls, cfg, rows: int, dim: int, clusters: int, workers: int) -> Workload:
        """The workload of a fit with FitConfig `cfg` (candidates, row dtype, batch, nets, cells)."""
        return cls(rows, dim, clusters, workers, cfg.candidates, cfg.row_dtype, cfg.net.batch_size,
                   cfg.net.min_steps_per_epoch, cfg.net.cluster_hidden, cfg.net.sub_hidden, cfg.moves.split_cells)

    @property
    def cells(self) -> int:
        """k-means cells a cluster at a split round, for clusters of the mean size."""
        from cluster_service.train.move_steps import split_cells

        return split_cells(self.rows // max(1, self.clusters), self.dim, self.split_cells)

    @property
    def scored(self) -> int:
        """Clusters scored a row: all K below 2 x candidates (or candidates 0), else candidates."""
        c = self.candidates
        return self.clusters if c <= 0 or self.clusters <= 2 * c else c

    @property
    def cluster_net_params(self) -> int:
        d, h, k = self.dim, self.cluster_hidden, self.clusters
        return d * h + h * h + h * k + 2 * h + k

    @property
    def subnet_params(self) -> int:
        return self.clusters * (self.dim * self.sub_hidden + self.sub_hidden + 2 * self.sub_hidden + 2)

    @property
    def batch(self) -> int:
        """The global batch (train.shuffle.global_batch, as the engine takes it)."""
        from cluster_service.train.shuffle import global_batch

        return global_batch(self.rows, self.batch_size, self.min_steps)

    @property
    def steps(self) -> int:
        """Mini-batch steps an epoch: the global batch is shared by the workers."""
        return math.ceil(self.rows / self.batch)


@dataclass(frozen=True)
class Estimate:
    memory_bytes: float
    rows_bytes: float
    stats_bytes: float
    epoch_seconds: float
    compute_seconds: float
    comm_seconds: float
    stats_comm_bytes: float
    grad_comm_bytes: float
    split_comm_bytes: float = 0.0
    cells_bytes: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


STATS_COPIES = 4  # local sums, the reduced sums, the posterior, the M-step's covariances


def estimate(w: Workload, device: Device) -> Estimate:
    """Per-worker memory and epoch time of workload `w` on `device` (module docstring)."""
    n_w = math.ceil(w.rows / max(1, w.workers))
    c = w.scored
    row_bytes = w.dim * DTYPE_BYTES[w.row_dtype] + 8 + 16 + 40 + (16 * c if c < w.clusters else 0)
    stats_set = 3 * w.clusters * (1 + w.dim + w.dim**2) * 8
    cells_set = w.clusters * w.cells * (1 + w.dim + w.dim**2) * 8  # the split round's cell statistics
    nets = 4 * 4 * (w.cluster_net_params + w.subnet_params)  # parameters, gradients, Adam's two moments
    dist = w.workers > 1
    memory = (device.base_memory + dist * device.dist_memory + n_w * (row_bytes + device.row_peak_bytes)
              + STATS_COPIES * stats_set + (1 + 2 * dist) * cells_set + nets)
    per_row = 4 * c * w.dim**2 + 6 * (w.dim * w.cluster_hidden + w.cluster_hidden**2 + w.cluster_hidden * w.clusters
                                      + w.dim * w.sub_hidden * 2)
    flops = n_w * per_row + w.clusters * w.dim**3
    stats_comm = 2 * stats_set * (w.workers > 1)
    split_comm = 2 * cells_set * (w.workers > 1)
    sub_every = max(1, math.ceil(SUB_ROWS_PER_NET * w.clusters / w.batch))
    grad_comm = 2 * 4 * (w.cluster_net_params * w.steps + w.subnet_params * math.ceil(w.steps / sub_every))
    grad_comm *= w.workers > 1
    compute = flops / (device.flops * min(1.0, device.parallel / w.workers))
    comm = (stats_comm + grad_comm) / device.bandwidth
    overhead = w.steps * (device.step_overhead + dist * device.sync_overhead) + device.epoch_overhead
    return Estimate(memory, n_w * (row_bytes + device.row_peak_bytes), STATS_COPIES * stats_set,
                    compute + comm + overhead, compute, comm, stats_comm, grad_comm, split_comm,
                    (1 + 2 * dist) * cells_set)


def fit_device(points: list[tuple[Workload, float, float]], base: Device) -> Device:
    """`base` with its time and memory constants fitted to measured points (workload, epoch
    seconds, peak bytes per worker). Time: epoch seconds less the modelled communication against
    the flops (at the box's parallel speed), the steps, the steps with W > 1 and 1, by non-negative
    least squares (1 / flops, step_overhead, sync_overhead, epoch_overhead). Memory: base_memory
    the mean excess of the W = 1 points over the model's bytes, dist_memory that of the W > 1 points
    over it. The bandwidth and `parallel` stay as in `base`."""
    import numpy as np
    from scipy.optimize import nnls

    zero = Device(base.name, 1.0, base.bandwidth, 0.0, 0.0, 0.0, base.memory_cap, base.source, 0.0, 0.0,
                  base.parallel, 0.0)
    rows = [(w, estimate(w, zero), secs, mem) for w, secs, mem in points]
    a = np.array([[e.compute_seconds, w.steps, w.steps * (w.workers > 1), 1.0] for w, e, _, _ in rows])
    t = np.array([s - e.comm_seconds for _, e, s, _ in rows])
    (inv_rate, step, sync, epoch), _ = nnls(a, t)
    m = np.array([[1.0, w.workers > 1, math.ceil(w.rows / w.workers)] for w, _, _, _ in rows])
    excess = np.array([mem - e.memory_bytes for _, e, _, mem in rows])
    if all(w.workers > 1 for w, _, _, _ in rows) or all(w.workers == 1 for w, _, _, _ in rows):
        m[:, 1] = 0.0  # one kind of point: no separate W > 1 term
    (base_mem, dist_mem, per_row), _ = nnls(m, excess)
    return Device(base.name, 1.0 / max(float(inv_rate), 1e-15), base.bandwidth, float(step), float(epoch),
                  float(base_mem), base.memory_cap, "fitted", float(sync), float(dist_mem), base.parallel,
                  float(per_row))
