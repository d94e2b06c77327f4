"""Gaussian log-densities and statistics over chunks of points.

One scorer, `WhitenedGaussians`: y = x W - b with W = [L_1^{-T} ... L_K^{-T}] (d, K d), so
log N(x; mu_k, Sigma_k) of all clusters costs one (n, d) x (d, K d) matmul, and given (row,
cluster) pairs cost one (rows, d) x (d, d) matmul per block of a cluster's rows. Statistics are
(R^T X) and (R^T (X ⊗ X)) matmuls accumulated in float64: dense weights (add_weighted_stats_),
sparse (row, bin, weight) triples grouped by bin (add_grouped_stats_, over `blocks`), or hard
float64 labels (add_hard_stats_). Memory per chunk is O(chunk * K * d) for densities and
O(chunk * d^2) for scatters.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import cached_property

import torch

from cluster_service.core.niw import STAT_DTYPE, GaussianParams, SuffStats

# Elements per chunk intermediate (~256 MB in float32); chunks shrink as K * d grows.
_CHUNK_ELEMENTS = 1 << 26


def chunk_rows(n_per_row: int, chunk_size: int) -> int:
    """Rows per chunk so that rows * n_per_row stays under the element budget."""
    return max(1, min(chunk_size, _CHUNK_ELEMENTS // max(1, n_per_row)))


def iter_chunks(n: int, rows: int) -> Iterator[slice]:
    for start in range(0, n, rows):
        yield slice(start, min(n, start + rows))


# Block width of row_argmax: 32 float32 lanes (two AVX-512 registers) per block maximum.
_ARGMAX_BLOCK = 32


def row_argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(1) of a (n, K) matrix, the same index on ties (the first maximum), through block
    maxima on CPU: torch's CPU argmax over the last dimension is a scalar loop, its amax is
    vectorised. The first block holding the row's maximum, then the first maximum inside it.
    Rows with NaN may differ from argmax (which treats NaN as the maximum)."""
    n, K = x.shape
    w = _ARGMAX_BLOCK
    nb = K // w
    if x.device.type != "cpu" or nb < 2 or not x.is_contiguous():
        return x.argmax(1)
    head = x.as_strided((n, nb, w), (K, w, 1))  # the first nb * w columns, no copy
    top, blk = head.amax(2).max(1)
    idx = blk * w + head.gather(1, blk.view(n, 1, 1).expand(n, 1, w))[:, 0].argmax(1)
    if K > nb * w:  # the last K % w columns win only with a strictly larger value (first index)
        tail, t = x[:, nb * w:].max(1)
        idx = torch.where(tail > top, t + nb * w, idx)
    return idx


# The per-cluster loops (scoring pairs, grouped statistics) take a bin's rows this many at a time:
# the gathered block and its matmul output stay in the core's cache between the gather, the matmul
# and the reduction, and a block's matmul still runs at the large-matrix rate.
BLOCK_ROWS = 4096


def gather_rows(buf: torch.Tensor, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[index] written into the first len(index) rows of buf (reused across bins; buf's dtype)
    -> that view."""
    out = buf[: index.numel()]
    if x.dtype == buf.dtype:
        torch.index_select(x, 0, index, out=out)
    else:
        out.copy_(x.index_select(0, index))
    return out


def blocks(keys: torch.Tensor, n_bins: int, block: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Rows grouped by bin: yield (k, positions of keys == k), k ascending, positions ascending,
    at most `block` (default BLOCK_ROWS) positions at a time (a bin with more comes in several
    blocks). keys: (P,) int64 in [0, n_bins)."""
    block = block or BLOCK_ROWS
    # a stable sort of int32 keys is faster than of int64
    order = torch.sort(keys.to(torch.int32) if n_bins < 2**31 else keys, stable=True).indices
    counts = torch.bincount(keys, minlength=n_bins).tolist()
    start = 0
    for k, c in enumerate(counts):
        for s in range(start, start + c, block):
            yield k, order[s : min(start + c, s + block)]
        start += c


class WhitenedGaussians:
    """The one Gaussian scorer: K Gaussians whitened once, y_k = L_k^{-1} (x - mu_k), in a compute
    dtype; log N(x; mu_k, Sigma_k) for all clusters at once (`log_prob`, one (n, d) x (d, K d)
    matmul), log pi_k + log N for all clusters (`log_joint`) or for given (row, cluster) pairs
    (`score_pairs`, one (rows, d) x (d, d) matmul per block of a cluster's rows).

    params: log_weights (K,), means (K, d), chol (K, d, d) lower Cholesky factors (float64).
    """

    def __init__(self, params: GaussianParams, dtype: torch.dtype):
        K, d = params.means.shape
        eye = torch.eye(d, dtype=params.chol.dtype, device=params.chol.device).expand(K, d, d)
        # y = L_k^{-1} (x - mu_k) = x L_k^{-T} - mu_k L_k^{-T}
        w = torch.linalg.solve_triangular(params.chol, eye, upper=False).transpose(-1, -2)  # (K, d, d)
        bias = torch.einsum("kd,kde->ke", params.means, w)  # (K, d)
        log_det = torch.log(params.chol.diagonal(dim1=-2, dim2=-1)).sum(-1)
        self.n_clusters, self.n_features, self.dtype = K, d, dtype
        self.weight = w.to(dtype)  # (K, d, d)
        self.bias = bias.to(dtype)  # (K, d)
        self.log_norm = (-0.5 * d * math.log(2 * math.pi) - log_det).to(dtype)  # (K,) -0.5 d log 2pi - log|L|
        self.log_weights = params.log_weights.to(dtype)  # (K,)
        # log pi_k folded into the constant in float64 (the pairs' scores)
        self.joint_const = (params.log_weights - 0.5 * d * math.log(2 * math.pi) - log_det).to(dtype)  # (K,)

    @cached_property
    def _flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weights as one (d, K d) matrix and the bias as (K d,), for all clusters in one matmul."""
        K, d = self.n_clusters, self.n_features
        return self.weight.permute(1, 0, 2).reshape(d, K * d), self.bias.reshape(K * d)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """x: (n, d) -> log N(x; mu_k, Sigma_k): (n, K). No chunking: callers chunk."""
        weight, bias = self._flat
        y = torch.addmm(-bias, x.to(self.dtype), weight)  # (n, K d)
        maha = y.view(x.shape[0], self.n_clusters, self.n_features).square().sum(-1)
        return self.log_norm - 0.5 * maha

    def log_joint(self, x: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """x: (n, d) -> log pi_k + log N(x; mu_k, Sigma_k): (n, K); with chunk_size, a chunk of rows
        at a time (chunk_rows: the (rows, K d) intermediate stays within the element budget)."""
        if chunk_size is None:
            return self.log_prob(x) + self.log_weights
        out = torch.empty(x.shape[0], self.n_clusters, dtype=self.dtype, device=x.device)
        for sl in iter_chunks(x.shape[0], chunk_rows(self.n_clusters * self.n_features, chunk_size)):
            out[sl] = self.log_prob(x[sl]) + self.log_weights
        return out

    def score_pairs(self, x: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        """x: (n, d); cand: (n, C) int64 cluster ids (-1 = empty slot) -> (n, C) log pi_k +
        log N(x_i; mu_k, Sigma_k) in the compute dtype, -inf at empty slots."""
        n, C = cand.shape
        out = torch.full((n * C,), -math.inf, dtype=self.dtype, device=x.device)
        flat = cand.reshape(-1)
        valid = torch.nonzero(flat >= 0).flatten()
        # one set of buffers for every block: a fresh allocation per cluster faults its pages in again
        rows = min(BLOCK_ROWS, valid.numel())
        xs_buf = torch.empty(rows, x.shape[1], dtype=self.dtype, device=x.device)
        y_buf = torch.empty_like(xs_buf)
        q_buf = torch.empty(rows, dtype=self.dtype, device=x.device)
        neg_bias = -self.bias
        for k, sel in blocks(flat[valid], self.n_clusters):
            pos = valid[sel]
            xs = gather_rows(xs_buf, x, pos // C)
            y = torch.addmm(neg_bias[k], xs, self.weight[k], out=y_buf[: pos.numel()])
            q = torch.sum(y.mul_(y), -1, out=q_buf[: pos.numel()])
            out[pos] = q.mul_(-0.5).add_(self.joint_const[k])
        return out.view(n, C)


def log_joint(x: torch.Tensor, params: GaussianParams, dtype: torch.dtype, chunk_size: int) -> torch.Tensor:
    """log pi_k + log N(x_i; mu_k, Sigma_k) for all points, chunked. x: (n, d) -> (n, K) in dtype."""
    return WhitenedGaussians(params, dtype).log_joint(x, chunk_size)


def stats_chunk_rows(n_features: int, n_clusters: int, chunk_size: int) -> int:
    return chunk_rows(max(n_features * n_features, n_clusters * n_features), chunk_size)


def add_weighted_stats_(out: SuffStats, x: torch.Tensor, r: torch.Tensor) -> None:
    """In place: out += sum_i r_ik (1, x_i, x_i x_i^T). x: (n, d); r: (n, K); out batch (K,)."""
    n, d = x.shape
    r = r.to(x.dtype)
    outer = (x[:, :, None] * x[:, None, :]).reshape(n, d * d)
    out.count.add_(r.sum(0).to(STAT_DTYPE))
    out.sum.add_((r.T @ x).to(STAT_DTYPE))
    out.scatter.add_((r.T @ outer).to(STAT_DTYPE).view(r.shape[1], d, d))


# add_hard_stats_ groups rows by bin (one sort, one matmul per bin) when a bin's rows carry at
# least this many outer-product elements on average; below it (a few rows per bin in low d) the
# per-bin call costs more than forming the (n, d, d) outer products and adding them by index.
_SEGMENT_MIN_ELEMENTS = 2048


def add_hard_stats_(out: SuffStats, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> None:
    """In place: bin index[i] of out += weights[i] (1, x_i, x_i x_i^T). x: (n, d); index, weights: (n,).

    Scatters: rows sorted by bin, each bin's sum of w x x^T one (d, n_b) x (n_b, d) matmul, O(n d^2)
    flops without an (n, d, d) intermediate; in float64 throughout (the hard statistics of the
    start, the moves and the merge tree), where add_grouped_stats_ takes a compute dtype.
    """
    xc = x.to(STAT_DTYPE)
    w = weights.to(STAT_DTYPE)
    wx = w[:, None] * xc
    out.count.index_add_(0, index, w)
    out.sum.index_add_(0, index, wx)
    n, d = xc.shape
    order = torch.argsort(index, stable=True)
    bins, sizes = torch.unique_consecutive(index[order], return_counts=True)
    if n * d * d < _SEGMENT_MIN_ELEMENTS * bins.numel() or xc.is_cuda:  # GPU: one kernel beats 2K launches
        for sl in iter_chunks(n, chunk_rows(2 * d * d, n)):  # (rows, d, d) float64 within the element budget
            out.scatter.index_add_(0, index[sl], wx[sl, :, None] * xc[sl, None, :])
        return
    xs, wxs = xc[order], wx[order]
    start = 0
    for b, size in zip(bins.tolist(), sizes.tolist(), strict=True):
        out.scatter[b].addmm_(wxs[start : start + size].T, xs[start : start + size])
        start += size


def add_grouped_stats_(out: SuffStats, x: torch.Tensor, rows: torch.Tensor, bins: torch.Tensor,
                       weight: torch.Tensor, dtype: torch.dtype = STAT_DTYPE) -> None:
    """The grouped-statistics kernel. In place: out[bins[p], j] += weight[p, j] (1, x_i, x_i x_i^T)
    with i = rows[p], for every pair p and column j. x: (n, d); rows, bins: (P,) int64;
    weight: (P,) (out of batch shape (B,)) or (P, m) (out of batch shape (B, m): a cluster's m
    subclusters, weighted by their responsibilities). One (m d, rows) x (rows, d) matmul per block
    of a bin's pairs in `dtype`, summed into out's float64; no (n, B) matrix and no (P, d, d)
    intermediate."""
    d, B = x.shape[1], out.count.shape[0]
    w_all = weight[:, None] if weight.dim() == 1 else weight
    m = w_all.shape[1]
    count, total, scatter = out.count.view(B, m), out.sum.view(B, m, d), out.scatter.view(B, m, d, d)
    xs_buf = torch.empty(min(BLOCK_ROWS, rows.numel()), d, dtype=dtype, device=x.device)  # reused
    wx_buf = torch.empty(xs_buf.shape[0], m, d, dtype=dtype, device=x.device)
    for k, pos in blocks(bins, B):
        xs = gather_rows(xs_buf, x, rows[pos])
        w = w_all[pos].to(dtype)  # (rows, m)
        wx = torch.mul(w[:, :, None], xs[:, None, :], out=wx_buf[: pos.numel()]).view(-1, m * d)  # [w_1 x | ...]
        count[k] += w.sum(0).to(STAT_DTYPE)
        total[k] += wx.sum(0).view(m, d).to(STAT_DTYPE)
        scatter[k] += (wx.T @ xs).view(m, d, d).to(STAT_DTYPE)
