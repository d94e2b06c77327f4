"""train.shuffle: the epoch's global order is a permutation, the same in every worker layout, and
held in memory proportional to a rank's own rows."""

import numpy as np
import pytest
import torch
from scipy import stats

from cluster_service.train.shuffle import epoch_order, permute


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097, 123_457])
def test_permute_is_a_bijection_of_range(n):
    image = permute(torch.arange(n), n, [5, 6, 7, 8])
    assert torch.equal(torch.sort(image).values, torch.arange(n))


def test_keys_give_unrelated_orders():
    n = 50_000
    a = permute(torch.arange(n), n, [1, 2, 3, 4]).numpy()
    b = permute(torch.arange(n), n, [9, 10, 11, 12]).numpy()
    # a shuffle: position independent of the row and of another epoch's position (Spearman ~ 0)
    assert abs(stats.spearmanr(np.arange(n), a).statistic) < 0.03
    assert abs(stats.spearmanr(a, b).statistic) < 0.03
    # windows of 1,000 positions hold rows from all over [0, n): like a uniform sample
    window = np.argsort(a)[:1000]
    assert stats.kstest(window / n, "uniform").pvalue > 1e-3


def test_windows_are_the_same_in_every_layout():
    n, batch = 1003, 64
    one = epoch_order(torch.arange(n), n, torch.Generator().manual_seed(3))
    owners = np.random.default_rng(0).integers(0, 3, n)  # rows dealt to 3 ranks at random
    ranks = [torch.from_numpy(np.flatnonzero(owners == r)) for r in range(3)]
    orders = [epoch_order(gi, n, torch.Generator().manual_seed(3)) for gi in ranks]
    seen = []
    for lo in range(0, n + batch, batch):  # one window past the end: it wraps to the start
        whole = one.rows(lo, lo + batch)
        parts = torch.cat([gi[o.rows(lo, lo + batch)] for gi, o in zip(ranks, orders, strict=True)])
        assert len(whole) == batch
        assert torch.equal(torch.sort(whole).values, torch.sort(parts).values)
        seen.append(whole)
    # every row once per pass over [0, n), the wrapped window from the start again
    first_pass = torch.cat(seen)[:n]
    assert torch.equal(torch.sort(first_pass).values, torch.arange(n))
    last = (len(seen) - 1) * batch  # past n: the window n earlier
    assert torch.equal(seen[-1], one.rows(last - n, last - n + batch))


def test_memory_is_the_ranks_rows_only():
    n = 10_000_000
    mine = torch.arange(5, n, 1000)  # 10,000 rows of a 10M-row set
    order = epoch_order(mine, n, torch.Generator().manual_seed(0))
    held = order.position.numel() + order.order.numel()
    assert held == 2 * mine.numel()
    got = torch.cat([order.rows(lo, lo + 1_000_000) for lo in range(0, n, 1_000_000)])
    assert torch.equal(torch.sort(got).values, torch.arange(mine.numel()))
