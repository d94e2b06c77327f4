"""The clustering net, the batched subclustering nets, and their losses (DeepDPM §3).

Nets return logits; losses work in log space. A change of K is never done here in place:
`resize_cluster_net` / `resize_subnets` return new modules built from old ones, and the
engine's `rebuild_for_k` swaps modules, optimizers and the DDP wrapper together.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def mlp_forward(x: torch.Tensor, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """A plain MLP from stored weights: Linear layers [(weight (out, in), bias (out,)), ...] with ReLU
    between them (none after the last). x: (n, in) -> (n, out). How a saved ClusterNet or encoder is
    evaluated without its nn.Module."""
    for i, (w, b) in enumerate(layers):
        x = torch.addmm(b, x, w.T)
        if i < len(layers) - 1:
            x = torch.relu(x)
    return x


class ClusterNet(nn.Module):
    """f_cl: x (n, d) -> logits (n, K). Inputs are divided by a fixed data scale."""

    def __init__(self, n_features: int, n_clusters: int, hidden: int, input_scale: float = 1.0):
        super().__init__()
        self.register_buffer("input_scale", torch.tensor(float(input_scale)))
        self.body = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, n_clusters)

    @property
    def n_clusters(self) -> int:
        return self.head.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x / self.input_scale))


class SubclusterNets(nn.Module):
    """All K subclustering nets f_sub^k as one module with a leading cluster axis.

    forward(x (n, d), z (n,)) -> logits (n, 2): point i goes through net z_i.
    Parameters: w1 (K, d, h), b1 (K, h), w2 (K, h, 2), b2 (K, 2).
    """

    def __init__(self, n_features: int, n_clusters: int, hidden: int, input_scale: float = 1.0, generator=None):
        super().__init__()
        self.register_buffer("input_scale", torch.tensor(float(input_scale)))
        self.w1 = nn.Parameter(torch.empty(n_clusters, n_features, hidden))
        self.b1 = nn.Parameter(torch.zeros(n_clusters, hidden))
        self.w2 = nn.Parameter(torch.empty(n_clusters, hidden, 2))
        self.b2 = nn.Parameter(torch.zeros(n_clusters, 2))
        self.reset_clusters(torch.arange(n_clusters), generator)

    @property
    def n_clusters(self) -> int:
        return self.w1.shape[0]

    @torch.no_grad()
    def reset_clusters(self, idx: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Fresh (Kaiming-uniform) weights for the nets of clusters idx (int64)."""
        if idx.numel() == 0:
            return
        d, h = self.w1.shape[1], self.w1.shape[2]
        for w, fan_in in ((self.w1, d), (self.w2, h)):
            bound = 1.0 / math.sqrt(fan_in)
            fresh = torch.rand((idx.numel(), *w.shape[1:]), generator=generator, dtype=w.dtype) * 2 - 1
            w[idx.to(w.device)] = (fresh * bound).to(w.device)
        self.b1[idx.to(self.b1.device)] = 0
        self.b2[idx.to(self.b2.device)] = 0

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        # Rows grouped by cluster into segments of at most ceil(n / K) rows, each segment one
        # slice of a bmm with its cluster's weights: the weights are gathered once per segment
        # (<= 2K segments), not once per row (a (n, d, h) copy, 16 KB a row at d 128, h 32).
        x = x / self.input_scale
        n, d = x.shape
        seg_rows = max(1, -(-n // self.n_clusters))
        flat, seg_cluster = row_segments(z, self.n_clusters, seg_rows)
        n_seg = seg_cluster.numel()
        xp = x.new_zeros(n_seg * seg_rows, d).index_copy_(0, flat, x).view(n_seg, seg_rows, d)
        h = torch.baddbmm(self.b1.index_select(0, seg_cluster)[:, None, :], xp, self.w1.index_select(0, seg_cluster))
        out = torch.baddbmm(self.b2.index_select(0, seg_cluster)[:, None, :], torch.relu(h),
                            self.w2.index_select(0, seg_cluster))  # (segments, seg_rows, 2)
        return out.reshape(n_seg * seg_rows, 2).index_select(0, flat)  # (n, 2); backward is an index_add


def row_segments(z: torch.Tensor, n_clusters: int, seg_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows grouped by cluster into segments of at most seg_rows rows. z: (n,) int64 in [0, K).
    -> flat (n,) int64: row i's slot (segment * seg_rows + position) in the padded layout;
    seg_cluster (segments,) int64: each segment's cluster, ascending."""
    order = torch.argsort(z, stable=True)
    zs = z[order]
    counts = torch.bincount(zs, minlength=n_clusters)
    first = torch.cumsum(counts, 0) - counts  # each cluster's first position in sorted order
    rank = torch.arange(z.numel(), device=z.device) - first[zs]  # position within its cluster
    n_seg = (counts + seg_rows - 1) // seg_rows
    seg = (torch.cumsum(n_seg, 0) - n_seg)[zs] + rank // seg_rows
    flat = torch.empty_like(order)
    flat[order] = seg * seg_rows + rank % seg_rows
    return flat, torch.repeat_interleave(torch.arange(n_clusters, device=z.device), n_seg)


# ---- K changes: new modules from old ones ----------------------------------------------------


@torch.no_grad()
def resize_cluster_net(net: ClusterNet, source: torch.Tensor) -> ClusterNet:
    """A copy of `net` whose head row k is the old row source[k] (source: (K_new,) int64)."""
    new = ClusterNet(net.body[0].in_features, source.numel(), net.head.in_features, float(net.input_scale))
    new = new.to(net.head.weight.device)
    new.body.load_state_dict(net.body.state_dict())
    src = source.to(net.head.weight.device)
    new.head.weight.copy_(net.head.weight[src])
    new.head.bias.copy_(net.head.bias[src])
    # Clusters that share a source row (a split) start as ties; the E-step targets separate them.
    return new


@torch.no_grad()
def resize_subnets(
    nets: SubclusterNets, source: torch.Tensor, fresh: torch.Tensor, generator: torch.Generator | None = None
) -> SubclusterNets:
    """Subnets for the new cluster list: net k is old net source[k], then nets `fresh` re-initialised."""
    K_new = source.numel()
    d, h = nets.w1.shape[1], nets.w1.shape[2]
    new = SubclusterNets(d, K_new, h, float(nets.input_scale), generator).to(nets.w1.device)
    src = source.to(nets.w1.device)
    for name in ("w1", "b1", "w2", "b2"):
        getattr(new, name).copy_(getattr(nets, name)[src])
    new.reset_clusters(fresh, generator)
    return new


# ---- losses -------------------------------------------------------------------------------------


def kl_loss(logits: torch.Tensor, log_target: torch.Tensor) -> torch.Tensor:
    """KL(r^E_i || r_i) per point, r = softmax(logits). logits, log_target: (n, K) -> (n,).

    The direction of the DeepDPM reference code (torch KLDivLoss(log r, r^E)): the E-step
    responsibilities are the target distribution, so the gradient w.r.t. the logits is
    r - r^E (bounded). The reverse direction KL(r || r^E) written in the paper has gradients
    scaled by -log r^E, which is in the hundreds for confident targets, and leaves the net
    unable to separate two freshly split clusters within the freeze window.
    """
    log_r = torch.log_softmax(logits, dim=-1)
    p = log_target.exp()
    return (torch.special.xlogy(p, p) - p * log_r).sum(-1)


# The logit of an empty candidate slot: finite, so that its softmax weight is exactly 0 and no
# 0 * -inf appears in either loss; far below any net's logit.
EMPTY_SLOT_LOGIT = -1e30


def candidate_logits(logits: torch.Tensor, index: torch.Tensor, hold_rest: torch.Tensor) -> torch.Tensor:
    """The logits of each row's candidate clusters and, last, of the rest (every other cluster),
    for a loss against targets given on the candidates only (the truncated E-step's, with a
    target 0 appended for the rest): kl_loss or ajs_loss of (candidate_logits, that target).
    logits: (n, K); index: (n, C) int64 cluster ids, -1 = empty slot; hold_rest: (n,) bool
    -> (n, C + 1), EMPTY_SLOT_LOGIT at empty slots (no gradient there).

    - hold_rest: the rest's logit is log sum_{k not in C_i} exp(logit_k), so the softmax over
      the C + 1 slots is the net's responsibilities over all K and the loss is the dense one
      with the target 0 off C_i (exactly, for both losses: off C_i their terms are linear in r_k).
      The net's mass off the candidates is pushed to 0.
    - otherwise the rest is an empty slot: the loss compares the target with the net's
      responsibilities conditioned on C_i, and the net's mass off C_i is left where it is.

    Which rows (`truncated.tail_held`): the target is 0 off C_i only because the truncated E-step
    does not score those clusters. Where a row's posterior has decayed inside C_i the dense target
    off C_i is smaller still, so it is held; where it has not, the mass off C_i is unknown, and
    holding it would train sharper responsibilities than the dense E-step's (BENCHMARKS.md, the
    truncated fits against dense)."""
    lc = logits.gather(1, index.clamp_min(0)).masked_fill(index < 0, EMPTY_SLOT_LOGIT)
    K = logits.shape[1]
    off = torch.nn.functional.pad(logits, (0, 1), value=EMPTY_SLOT_LOGIT)  # empty slots mask the spare column
    off = off.scatter(1, torch.where(index < 0, K, index), EMPTY_SLOT_LOGIT)  # finite: no NaN gradient
    rest = torch.logsumexp(off, 1, keepdim=True)  # EMPTY_SLOT_LOGIT where the candidates hold all K
    rest = torch.where(hold_rest[:, None], rest, torch.full_like(rest, EMPTY_SLOT_LOGIT))
    return torch.cat([lc, rest], 1)


def ajs_loss(logits: torch.Tensor, log_target: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Alpha-skew Jensen-Shannon divergence JS_a(r_i || r^E_i) per point: (n, K) -> (n,).

    logits: (n, K) the clustering net's; log_target: (n, K) log E-step responsibilities (may
    hold -inf for zero-probability clusters); alpha: the skew a in (0, 1).

    Definition (Nielsen's skew JS). For categorical p = softmax(logits), q = exp(log_target)
    and the a-mixture m = (1 - a) p + a q:

        JS_a(p || q) = (1 - a) KL(p || m) + a KL(q || m)
                     = sum_k (1 - a) p_k (log p_k - log m_k) + a q_k (log q_k - log m_k)

    Closed form in log space: log m_k = logsumexp(log(1 - a) + log p_k, log a + log q_k), and
    q_k log q_k is xlogy(q_k, q_k) so that q_k = 0 contributes 0 (not 0 * -inf = NaN).

    Properties (each pinned by tests/test_ajs.py):
    - Swapping p and q maps a to 1 - a (the mixture is the same), so a = 0.5 is symmetric
      and is the ordinary Jensen-Shannon divergence.
    - 0 iff p = q: both KLs are >= 0 and KL(p || m) = 0 iff p = m iff p = q (for 0 < a < 1).
    - Bounded: m_k >= (1 - a) p_k and m_k >= a q_k, so log(p_k / m_k) <= -log(1 - a) and
      log(q_k / m_k) <= -log a; hence JS_a <= -(1 - a) log(1 - a) - a log a = H(a) <= log 2.
      The terms never need clamping, unlike KL(p || q).
    - Entropy form: since sum_k ((1 - a) p_k + a q_k) log m_k = sum_k m_k log m_k,
      JS_a = H(m) - (1 - a) H(p) - a H(q) (H the Shannon entropy).
    - Gradient: from the entropy form, dJS_a/dp_k = (1 - a)(log p_k + 1) - (1 - a)(log m_k + 1)
      = (1 - a) log(p_k / m_k); through the softmax, dJS_a/dlogit_j = (1 - a) p_j (g_j - E_p[g])
      with g = log(p / m). Every factor log(p_k / m_k) is weighted by p_k, so the gradient stays
      finite even where the target q_k is 0 (where KL(p || q) would be infinite).
    """
    log_p = torch.log_softmax(logits, dim=-1)
    log_q = log_target
    log_m = torch.logsumexp(torch.stack([log_p + math.log(1 - alpha), log_q + math.log(alpha)]), dim=0)
    q = log_q.exp()
    kl_p = (log_p.exp() * (log_p - log_m)).sum(-1)
    kl_q = (torch.special.xlogy(q, q) - q * log_m).sum(-1)
    return (1 - alpha) * kl_p + alpha * kl_q


def subcluster_loss(sub_logits: torch.Tensor, x: torch.Tensor, sub_means: torch.Tensor) -> torch.Tensor:
    """sum_j r~_ij ||x_i - mu~_{z_i, j}||^2 per point (DeepDPM L_sub) -> (n,).

    sub_logits: (n, 2); x: (n, d); sub_means: (n, 2, d) the subcluster means of each point's cluster.
    """
    r = torch.softmax(sub_logits, dim=-1)
    dist = (x[:, None, :] - sub_means).square().sum(-1)  # (n, 2)
    return (r * dist).sum(-1)
