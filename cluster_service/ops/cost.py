"""Cost model of a fit: memory and time per worker, and bytes between workers, against the rows N,
dimension d, clusters K, workers W, candidates C, device and row storage dtype
(`cluster-service plan --rows N --workers W --device cuda`).

What a worker holds and does, per epoch (train.engine, train.estep, train.comm):

    memory  = base + N/W * row_bytes + stats_copies * 3K * (1 + d + d^2) * 8 + nets
              row_bytes = d * dtype + 8 (global index) + 16 (epoch order, train.shuffle)
                          + C' * 16 (candidate table: int64 cluster, float64 log r) + 40 (top-2, margin)
    flops   = N/W * (4 C' d^2      scoring (whitened solve) and statistics (one outer product a pair)
                     + 6 B_net)    the nets' forward and backward per row
              + 3K * d^3 / 3       Cholesky of every cluster and subcluster (every rank: the M-step)
    bytes   = 2 * 3K * (1 + d + d^2) * 8       the statistics' all-reduce (sent and received)
              + 2 * 4 * (P_cl * S + P_sub * S / s)    DDP's gradient all-reduce: the clustering net's
                                               every step (S = ceil(N / B) steps of the global batch
                                               B), the subnets' every s = ceil(8 K / B) steps;
                                               B is smaller on small data: min_steps steps
    seconds = flops / device.flops + bytes / device.bandwidth + S * device.step_overhead
              + device.epoch_overhead

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

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


@dataclass(frozen=True)
class Device:
    """flops: effective float32 flop/s of the epoch's work on one worker; bandwidth: all-reduce
    bytes/s between workers; step_overhead: seconds a mini-batch step costs beyond its flops (the
    optimizer, launches, the gradient all-reduce's latency); epoch_overhead: seconds an epoch
    costs beyond both (the M-step's Python, the moves' bookkeeping); base_memory: bytes a worker
    holds with no rows (interpreter, torch, FAISS, Ray's worker, buffers); memory_cap: bytes one
    worker may use."""

    name: str
    flops: float
    bandwidth: float
    step_overhead: float
    epoch_overhead: float
    base_memory: float
    memory_cap: float
    source: str


DEVICES = {
    # fitted with fit_device() to the measured points of bench.distributed.bench_workers_scaling
    "cpu": Device("cpu (1 thread a worker, this 2-core box)", flops=30e9, bandwidth=1.0e9, step_overhead=2e-3,
                  epoch_overhead=0.3,
                  base_memory=1.4e9, memory_cap=24e9, source="fitted to BENCHMARKS.md, Workers"),
    # assumptions: H100 SXM float32 at ~30 % of its 67 Tflop/s peak for these batched solves and
    # outer products; NVLink within one 8-GPU node, ring all-reduce at ~100 GB/s a GPU; 80 GB
    "cuda": Device("cuda (H100-class, assumed)", flops=20e12, bandwidth=100e9, step_overhead=3e-4,
                   epoch_overhead=0.5,
                   base_memory=3e9, memory_cap=80e9, source="assumed: 30 % of H100 float32 peak, NVLink"),
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
        """The global batch (train.engine: smaller on small data, for min_steps steps an epoch)."""
        return max(1, min(self.batch_size, math.ceil(self.rows / self.min_steps)))

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

    def as_dict(self) -> dict:
        return asdict(self)


STATS_COPIES = 4  # local sums, the reduced sums, the posterior, the M-step's covariances


def estimate(w: Workload, device: Device) -> Estimate:
    """Per-worker memory and epoch time of workload `w` on `device` (module docstring)."""
    n_w = math.ceil(w.rows / max(1, w.workers))
    c = w.scored
    row_bytes = w.dim * DTYPE_BYTES[w.row_dtype] + 8 + 16 + 40 + (16 * c if c < w.clusters else 0)
    stats_set = 3 * w.clusters * (1 + w.dim + w.dim**2) * 8
    nets = 4 * 4 * (w.cluster_net_params + w.subnet_params)  # parameters, gradients, Adam's two moments
    memory = device.base_memory + n_w * row_bytes + STATS_COPIES * stats_set + nets
    per_row = 4 * c * w.dim**2 + 6 * (w.dim * w.cluster_hidden + w.cluster_hidden**2 + w.cluster_hidden * w.clusters
                                      + w.dim * w.sub_hidden * 2)
    flops = n_w * per_row + w.clusters * w.dim**3
    stats_comm = 2 * stats_set * (w.workers > 1)
    sub_every = max(1, math.ceil(8 * w.clusters / w.batch))  # train.engine.SUB_ROWS_PER_NET
    grad_comm = 2 * 4 * (w.cluster_net_params * w.steps + w.subnet_params * math.ceil(w.steps / sub_every))
    grad_comm *= w.workers > 1
    compute = flops / device.flops
    comm = (stats_comm + grad_comm) / device.bandwidth
    overhead = w.steps * device.step_overhead + device.epoch_overhead
    return Estimate(memory, n_w * row_bytes, STATS_COPIES * stats_set, compute + comm + overhead,
                    compute, comm, stats_comm, grad_comm)


def fit_device(points: list[tuple[Workload, float, float]], base: Device) -> Device:
    """`base` with flops, step_overhead, epoch_overhead and base_memory fitted to measured points
    (workload, epoch seconds, peak bytes per worker): epoch seconds less the modelled
    communication against flops, steps and 1 (non-negative least squares: 1 / flops, the step
    overhead, the epoch overhead), and peak bytes against the model's bytes without the base
    (their mean difference). The bandwidth stays as in `base`."""
    import numpy as np
    from scipy.optimize import nnls

    zero = Device(base.name, 1.0, base.bandwidth, 0.0, 0.0, 0.0, base.memory_cap, base.source)
    rows = [(w, estimate(w, zero), secs, mem) for w, secs, mem in points]
    a = np.array([[e.compute_seconds, w.steps, 1.0] for w, e, _, _ in rows])  # compute_seconds = flops here
    t = np.array([s - e.comm_seconds for _, e, s, _ in rows])
    (inv_rate, step, epoch), _ = nnls(a, t)
    base_mem = float(np.mean([m - e.memory_bytes for _, e, _, m in rows]))
    return Device(base.name, 1.0 / max(float(inv_rate), 1e-15), base.bandwidth, float(step), float(epoch),
                  max(0.0, base_mem), base.memory_cap, "fitted")
