"""The alpha-skew Jensen-Shannon clustering loss (nets.ajs_loss) against its definition.

The reference here is a direct, naive implementation in probabilities (softmax, then the
mixture, then sums of p log(p / m)); the loss under test works in log space.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster_service.core.nets import ajs_loss, candidate_logits, kl_loss


def naive_ajs(logits: torch.Tensor, target: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 - a) KL(p || m) + a KL(q || m), m = (1 - a) p + a q, in plain probabilities."""
    p = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
    m = (1 - alpha) * p + alpha * target
    kl_pm = (p * torch.log(p / m)).sum(-1)
    safe_q = torch.where(target > 0, target, torch.ones_like(target))
    kl_qm = torch.where(target > 0, target * torch.log(safe_q / m), torch.zeros_like(target)).sum(-1)
    return (1 - alpha) * kl_pm + alpha * kl_qm


def entropy2(a: float) -> float:
    return -(a * math.log(a) + (1 - a) * math.log(1 - a))


def random_logits(n: int, k: int, seed: int, spread: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g, dtype=torch.float64) * spread


def test_matches_naive_definition_and_scipy_js():
    from scipy.spatial.distance import jensenshannon

    logits = random_logits(64, 7, 0)
    log_q = torch.log_softmax(random_logits(64, 7, 1), -1)
    for alpha in (0.1, 0.5, 0.8):
        got = ajs_loss(logits, log_q, alpha)
        assert torch.allclose(got, naive_ajs(logits, log_q.exp(), alpha), atol=1e-12)
    # alpha = 0.5 is the ordinary JS divergence; scipy returns its square root (natural log).
    p, q = torch.softmax(logits, -1).numpy(), log_q.exp().numpy()
    ref = jensenshannon(p, q, axis=1) ** 2
    np.testing.assert_allclose(ajs_loss(logits, log_q, 0.5).numpy(), ref, rtol=1e-9, atol=1e-12)


def test_symmetric_at_half_and_skew_swaps():
    a, b = random_logits(50, 5, 2), random_logits(50, 5, 3)
    log_pa, log_pb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    assert torch.allclose(ajs_loss(a, log_pb, 0.5), ajs_loss(b, log_pa, 0.5), atol=1e-13)
    # In general JS_a(p || q) = JS_{1-a}(q || p), and JS_a is NOT symmetric for a != 1/2.
    assert torch.allclose(ajs_loss(a, log_pb, 0.2), ajs_loss(b, log_pa, 0.8), atol=1e-13)
    assert (ajs_loss(a, log_pb, 0.2) - ajs_loss(b, log_pa, 0.2)).abs().max() > 1e-3


def test_zero_iff_equal():
    logits = random_logits(40, 6, 4)
    log_p = torch.log_softmax(logits, -1)
    for alpha in (0.05, 0.5, 0.95):
        assert ajs_loss(logits, log_p, alpha).abs().max() < 1e-14
        # Shifting the logits leaves p unchanged: still zero.
        assert ajs_loss(logits + 7.0, log_p, alpha).abs().max() < 1e-12
    # Any difference gives a strictly positive value, even a tiny one.
    other = logits.clone()
    other[:, 0] += 1e-3
    assert (ajs_loss(other, log_p, 0.5) > 0).all()


def test_bounded_by_binary_entropy_and_attains_it_on_disjoint_supports():
    # Disjoint supports: p concentrated on cluster 0, q one-hot on cluster 1 (log q = -inf elsewhere).
    logits = torch.tensor([[60.0, -60.0, -60.0]], dtype=torch.float64)
    log_q = torch.log(torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64))
    for alpha in (0.1, 0.3, 0.5, 0.9):
        val = float(ajs_loss(logits, log_q, alpha))
        assert math.isfinite(val)
        assert val == pytest.approx(entropy2(alpha), abs=1e-12)
    assert float(ajs_loss(logits, log_q, 0.5)) == pytest.approx(math.log(2), abs=1e-12)


def test_gradient_matches_autograd_of_naive_implementation():
    logits = random_logits(16, 5, 5, spread=2.0).requires_grad_(True)
    target = torch.softmax(random_logits(16, 5, 6), -1)
    target[0] = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)  # zeros in the target
    for alpha in (0.25, 0.5, 0.7):
        (g_fast,) = torch.autograd.grad(ajs_loss(logits, torch.log(target), alpha).sum(), logits)
        (g_ref,) = torch.autograd.grad(naive_ajs(logits, target, alpha).sum(), logits)
        assert torch.isfinite(g_fast).all()
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-10, atol=1e-12)
        # And the closed form of the docstring: dJS/dz_j = (1 - a) p_j (g_j - E_p[g]), g = log(p/m).
        p = torch.softmax(logits.detach(), -1)
        g = torch.log(p / ((1 - alpha) * p + alpha * target))
        closed = (1 - alpha) * p * (g - (p * g).sum(-1, keepdim=True))
        torch.testing.assert_close(g_fast, closed, rtol=1e-10, atol=1e-12)


def test_gradcheck():
    logits = random_logits(6, 4, 7, spread=1.5).requires_grad_(True)
    log_q = torch.log_softmax(random_logits(6, 4, 8), -1)
    assert torch.autograd.gradcheck(lambda z: ajs_loss(z, log_q, 0.3), (logits,))


def test_stationary_point_is_the_target_like_kl():
    """Both clustering losses have zero gradient exactly at p = q (the net matches the E-step)."""
    log_q = torch.log_softmax(random_logits(10, 4, 9), -1)
    z = log_q.clone().requires_grad_(True)
    for fn in (lambda a, b: ajs_loss(a, b, 0.5), kl_loss):
        (g,) = torch.autograd.grad(fn(z, log_q).sum(), z)
        assert g.abs().max() < 1e-12


distributions = st.integers(min_value=2, max_value=8).flatmap(
    lambda k: st.tuples(
        st.lists(st.floats(-20, 20), min_size=k, max_size=k),
        st.lists(st.floats(-30, 30), min_size=k, max_size=k),
        st.floats(0.01, 0.99),
    )
)


@settings(max_examples=150, deadline=None)
@given(distributions)
def test_properties_on_random_distributions(case):
    a_list, b_list, alpha = case
    logits = torch.tensor([a_list], dtype=torch.float64)
    log_q = torch.log_softmax(torch.tensor([b_list], dtype=torch.float64), -1)
    val = float(ajs_loss(logits, log_q, alpha))
    assert -1e-12 <= val <= entropy2(alpha) + 1e-12
    assert entropy2(alpha) <= math.log(2) + 1e-15
    assert val == pytest.approx(float(naive_ajs(logits, log_q.exp(), alpha)), abs=1e-10)
    # Skew swap (exact identity for every alpha).
    back = float(ajs_loss(log_q, torch.log_softmax(logits, -1), 1 - alpha))
    assert val == pytest.approx(back, abs=1e-10)


def _sparse_target(g, n, K, C):
    """Targets on C random clusters a row (and 2 empty slots): (index (n, C + 2), log target over
    them plus the rest's -inf (n, C + 3), the same target dense (n, K))."""
    index = torch.stack([torch.randperm(K, generator=g)[:C] for _ in range(n)])
    index = torch.cat([index, torch.full((n, 2), -1)], 1)  # empty slots
    log_t = torch.randn(n, C + 2, generator=g, dtype=torch.float64).masked_fill(index < 0, -math.inf)
    log_t = log_t - torch.logsumexp(log_t, 1, keepdim=True)
    dense = torch.full((n, K + 1), -math.inf, dtype=torch.float64)
    dense.scatter_(1, torch.where(index < 0, K, index), log_t)
    return index, torch.nn.functional.pad(log_t, (0, 1), value=-math.inf), dense[:, :K]


def _losses(alpha=0.3):
    return {"kl": kl_loss, "ajs": lambda a, b: ajs_loss(a, b, alpha)}


@pytest.mark.parametrize("hold", [True, False])
@pytest.mark.parametrize("loss", ["kl", "ajs"])
def test_candidate_losses_are_dense_when_the_candidates_hold_every_cluster(loss, hold):
    """Every cluster a candidate (in a shuffled order, with empty slots): the same loss and
    gradient as on the (n, K) logits and target, whether the rest is held or not."""
    g = torch.Generator().manual_seed(0)
    n, K = 64, 12
    logits = torch.randn(n, K, generator=g, dtype=torch.float64, requires_grad=True)
    index, log_t, dense = _sparse_target(g, n, K, K)
    fn = _losses()[loss]
    a, b = fn(logits, dense), fn(candidate_logits(logits, index, torch.full((n,), hold)), log_t)
    torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    ga, gb = (torch.autograd.grad(v.sum(), logits)[0] for v in (a, b))
    torch.testing.assert_close(gb, ga, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss", ["kl", "ajs"])
def test_candidate_losses_with_the_rest_held_are_the_dense_losses(loss):
    """A few candidates a row, the rest held: the dense loss on all K logits with the target 0 off
    the candidates, value and gradient (the net's mass off the candidates is pushed to 0)."""
    g = torch.Generator().manual_seed(3)
    n, K, C = 64, 50, 6
    logits = torch.randn(n, K, generator=g, dtype=torch.float64, requires_grad=True)
    index, log_t, dense = _sparse_target(g, n, K, C)
    fn = _losses()[loss]
    a, b = fn(logits, dense), fn(candidate_logits(logits, index, torch.ones(n, dtype=torch.bool)), log_t)
    torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    ga, gb = (torch.autograd.grad(v.sum(), logits)[0] for v in (a, b))
    torch.testing.assert_close(gb, ga, rtol=1e-12, atol=1e-12)
    assert torch.all(ga[dense == -math.inf] > 0)  # every off-candidate logit pushed down


def test_candidate_kl_conditions_the_net_on_the_candidates():
    """A few candidates a row, the rest not held: kl_loss against the net's responsibilities
    renormalised over the candidates (scipy); no gradient off the candidates, so raising an
    off-candidate logit changes nothing; below the dense loss with the target 0 off them. Rows
    held and not held in one batch each get their own loss."""
    g = torch.Generator().manual_seed(1)
    n, K, C = 64, 50, 6
    logits = torch.randn(n, K, generator=g, dtype=torch.float64, requires_grad=True)
    index, log_t, dense = _sparse_target(g, n, K, C)
    on = dense > -math.inf
    conditioned = torch.tensor([scipy.stats.entropy(dense[i, on[i]].exp().numpy(),
                                                    scipy.special.softmax(logits[i, on[i]].detach().numpy()))
                                for i in range(n)], dtype=torch.float64)
    free = torch.zeros(n, dtype=torch.bool)
    b = kl_loss(candidate_logits(logits, index, free), log_t)
    torch.testing.assert_close(b, conditioned, rtol=1e-12, atol=1e-12)
    grad = torch.autograd.grad(b.sum(), logits)[0]
    assert torch.all(grad[~on] == 0) and torch.all((grad.abs() * on).sum(1) > 0)
    torch.testing.assert_close(grad.sum(1), torch.zeros(n, dtype=torch.float64), rtol=0, atol=1e-12)
    moved = logits.detach() + 5.0 * (~on)
    torch.testing.assert_close(kl_loss(candidate_logits(moved, index, free), log_t), b.detach(), rtol=1e-12, atol=1e-12)
    dense_loss = kl_loss(logits, dense)
    assert torch.all(dense_loss > b + 1e-3)
    mixed = torch.arange(n) % 2 == 0
    both = kl_loss(candidate_logits(logits, index, mixed), log_t)
    torch.testing.assert_close(both, torch.where(mixed, dense_loss, b), rtol=1e-12, atol=1e-12)


def test_candidate_ajs_is_the_skew_js_of_the_conditioned_net():
    """The alpha-JS loss on candidate logits, the rest not held: naive_ajs of the target and the
    net's softmax over each row's candidates; no gradient off the candidates."""
    g = torch.Generator().manual_seed(2)
    n, K, C, alpha = 32, 40, 5, 0.3
    logits = torch.randn(n, K, generator=g, dtype=torch.float64, requires_grad=True)
    index, log_t, dense = _sparse_target(g, n, K, C)
    on = dense > -math.inf
    b = ajs_loss(candidate_logits(logits, index, torch.zeros(n, dtype=torch.bool)), log_t, alpha)
    for i in range(n):
        ref = naive_ajs(logits[i, on[i]].detach(), dense[i, on[i]].exp(), alpha)
        assert float(b[i].detach()) == pytest.approx(float(ref), abs=1e-12)
    grad = torch.autograd.grad(b.sum(), logits)[0]
    assert torch.all(grad[~on] == 0) and torch.all(torch.isfinite(grad))
