"""This process's rows of the data set, centred on the global mean, and the reducer over all processes.

Every part of a fit that reads rows (the start, the E-step, the moves' k-means cells) reads them
here: the rows and their global positions, hard statistics summed over all ranks, and bounded
samples of rows gathered on rank 0 in global order (so a decision made on rows does not depend
on the worker layout). No collective here grows with the number of rows (DESIGN §5): a sample is
capped per cluster or in total, whatever N is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cluster_service.core.gaussian import add_hard_stats_, chunk_rows, iter_chunks
from cluster_service.core.niw import STAT_DTYPE, SuffStats
from cluster_service.core.truncated import row_hash


@dataclass
class Rows:
    """x: (n_local, d) centred rows in the storage dtype (FitConfig.row_dtype; readers upcast
    chunk by chunk); global_index: (n_local,) their positions
    in the global row order (0..n_global-1); comm: the reducer (train.comm). Nothing here is
    n_global long: a rank holds its own rows and their indices only."""

    x: torch.Tensor
    global_index: torch.Tensor
    n_global: int
    comm: object

    @classmethod
    def centred(cls, x: torch.Tensor, global_index: torch.Tensor | None, n_global: int | None, comm,
                device: torch.device, dtype: torch.dtype) -> tuple[Rows, torch.Tensor, torch.Tensor]:
        """The rows x (n_local, d) centred on the global mean, stored in dtype on device. -> (rows,
        shift (d,) the global mean, data_var (d,) the global per-feature variance), float64.
        Chunk by chunk: no float64 copy of all rows."""
        n_local = x.shape[0]
        n_global = int(n_global if n_global is not None else n_local)
        gi = torch.arange(n_local) if global_index is None else torch.as_tensor(global_index, dtype=torch.long)
        x = torch.as_tensor(x)
        rows = chunk_rows(4 * x.shape[1], n_local)
        total = torch.zeros(x.shape[1], dtype=STAT_DTYPE, device=device)
        for sl in iter_chunks(n_local, rows):
            total += x[sl].to(device, STAT_DTYPE).sum(0)
        moments = comm.all_reduce_sum(torch.cat([torch.tensor([float(n_local)], dtype=STAT_DTYPE, device=device),
                                                 total]))
        shift = (moments[1:] / moments[0]).to(STAT_DTYPE)
        xc_all = torch.empty(x.shape, dtype=dtype, device=device)
        sq = torch.zeros_like(total)
        for sl in iter_chunks(n_local, rows):
            xc = x[sl].to(device, STAT_DTYPE) - shift
            sq += xc.square().sum(0)
            xc_all[sl] = xc.to(dtype)
        data_var = comm.all_reduce_sum(sq) / moments[0]
        return cls(xc_all, gi.to(device), n_global, comm), shift, data_var

    @property
    def n_features(self) -> int:
        return self.x.shape[1]

    @property
    def device(self) -> torch.device:
        return self.x.device

    def reduce_stats(self, stats: SuffStats) -> SuffStats:
        """One all_reduce of the flattened statistics (identity in one process)."""
        if self.comm.world_size == 1:  # nothing to sum: no flatten copy
            return stats
        flat = self.comm.all_reduce_sum(stats.flatten())
        return SuffStats.unflatten(flat, tuple(stats.count.shape), stats.n_features)

    def hard_stats(self, z: torch.Tensor, n_clusters: int) -> SuffStats:
        """Statistics (n_clusters,) of the local rows with hard labels z (n_local,) int64,
        all-reduced (a collective: every rank calls it)."""
        stats = SuffStats.zeros((n_clusters,), self.n_features, device=self.device)
        ones = torch.ones(self.x.shape[0], dtype=STAT_DTYPE, device=self.device)
        # no (rows, d, d) intermediate (add_hard_stats_ sorts rows by bin): large chunks
        for sl in iter_chunks(self.x.shape[0], chunk_rows(8 * self.n_features, self.x.shape[0])):
            add_hard_stats_(stats, self.x[sl], z[sl], ones[sl])
        return self.reduce_stats(stats)

    def on_rank0(self, mask: torch.Tensor, *columns: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Rank 0 gets every rank's rows where mask (n_local,) is set, in global row order, with
        the same rows of each of `columns` ((n_local,) each); other ranks get Nones. In one
        process: the local rows. -> (x, *columns). The caller bounds the mask (a capped sample):
        what it selects crosses the workers."""
        if self.comm.world_size == 1:
            if bool(mask.all()):
                return (self.x, *columns)
            return (self.x[mask], *(c[mask] for c in columns))
        mine = (self.global_index[mask].cpu(), self.x[mask].cpu(), *(c[mask].cpu() for c in columns))
        parts = self.comm.gather_object(mine)
        if self.comm.rank != 0:
            return (None,) * (1 + len(columns))
        order = torch.argsort(torch.cat([p[0] for p in parts]))
        return tuple(torch.cat([p[i] for p in parts])[order].to(self.device) for i in range(1, 2 + len(columns)))

    def sample_per_group(self, z: torch.Tensor, cap: torch.Tensor, salt: int) -> tuple[torch.Tensor | None, ...]:
        """Rank 0 gets, for every group g of the labels z (n_local,) int64, the cap[g] rows of the
        group with the smallest keys row_hash(global index, salt) over all ranks, in global row
        order -> (x (m, d), z (m,), keys (m,)); other ranks get Nones. The keys depend on the
        global index only, so the sample is the same in every worker layout; each rank sends at
        most cap[g] rows of group g (the global cap[g] smallest are among the ranks' cap[g] smallest)."""
        keys = row_hash(self.global_index, salt)
        xs, zs, ks = self.on_rank0(_smallest_per_group(z, keys, cap), z, keys)
        if xs is None:
            return None, None, None
        keep = _smallest_per_group(zs, ks, cap)  # across the ranks' candidates
        return xs[keep], zs[keep], ks[keep]

    def local_positions(self, global_index: torch.Tensor) -> torch.Tensor | None:
        """Where the rows of global_index (m,) sit in this process, when they are exactly this
        process's rows (a checkpoint of the same worker layout); else None."""
        gi = global_index.to(self.device)
        if gi.shape[0] != self.x.shape[0]:
            return None
        mine, where = torch.sort(self.global_index)
        at = torch.searchsorted(mine, gi).clamp_max(mine.shape[0] - 1)
        if not bool((mine[at] == gi).all()):
            return None
        return where[at]


def _smallest_per_group(z: torch.Tensor, keys: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
    """(n,) bool: the rows of each group g of z (n,) with the cap[g] smallest keys (n,) (distinct);
    cap: (n_groups,) int64, or a scalar."""
    by_key = torch.argsort(keys, stable=True)
    order = by_key[torch.argsort(z[by_key], stable=True)]  # grouped by z, by key inside a group
    zs = z[order]
    first = torch.searchsorted(zs, zs, right=False)  # each row's group start in `order`
    mask = torch.zeros_like(z, dtype=torch.bool)
    cap = torch.as_tensor(cap, device=z.device)
    mask[order] = torch.arange(z.shape[0], device=z.device) - first < (cap[zs] if cap.dim() else cap)
    return mask
