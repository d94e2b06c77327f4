"""One global shuffle of the rows each epoch, held by every rank in memory O(its own rows).

Mini-batches are windows of one permutation of all n_global rows, the same in every worker
layout: rank r trains on its members of each window, and the ranks' gradients add up to the
one-process step. The permutation is a keyed bijection of [0, n_global) (a four-round Feistel
network on the next power of four, cycle-walked into range; Black and Rogaway, "Ciphers with
arbitrary finite domains", 2002), so a rank computes the position of each of its own rows and
never holds an index of all rows: at a billion rows an N-long int64 permutation would be 8 GB on
every worker.
"""

from __future__ import annotations

import math

import torch

_M1, _M2 = 0x9E3779B1, 0x85EBCA6B  # odd 32-bit multipliers (golden ratio; murmur3's finaliser)
ROUNDS = 4


def _round_fn(r: torch.Tensor, key: int, mask: int) -> torch.Tensor:
    """A mixing function of the half r (< 2^h <= 2^31) and a round key -> [0, 2^h). Every
    product stays below 2^63: no int64 overflow."""
    t = (r ^ key) & mask
    t = t * _M1
    t = (t ^ (t >> 29)) & 0x7FFFFFFF
    t = t * _M2
    return (t ^ (t >> 31)) & mask


def feistel(x: torch.Tensor, keys: list[int], half_bits: int) -> torch.Tensor:
    """The Feistel permutation of [0, 4^half_bits) with round `keys`, elementwise on x (int64)."""
    mask = (1 << half_bits) - 1
    left, right = x >> half_bits, x & mask
    for k in keys:
        left, right = right, left ^ _round_fn(right, k, mask)
    return (left << half_bits) | right


def permute(x: torch.Tensor, n: int, keys: list[int]) -> torch.Tensor:
    """pi(x) for x (m,) int64 in [0, n): a bijection of [0, n) (cycle walking: apply the Feistel
    permutation of the enclosing [0, 4^h) until the image falls inside [0, n))."""
    h = max(1, (max(n - 1, 1).bit_length() + 1) // 2)
    if h > 31:
        raise ValueError(f"{n} rows: the shuffle covers at most 2^62")
    y = feistel(x, keys, h)
    out = y >= n
    while bool(out.any()):
        y[out] = feistel(y[out], keys, h)
        out = y >= n
    return y


class EpochOrder:
    """This rank's rows in the order of their global positions pi(g) for one epoch.

    rows(lo, hi): the local rows whose global position lies in [lo, hi), in that order; windows
    past n_global wrap around to the start (the last, partial batch is topped up from the first)."""

    def __init__(self, global_index: torch.Tensor, n_global: int, keys: list[int]):
        pos = permute(global_index.long(), n_global, keys)
        self.position, self.order = torch.sort(pos)
        self.n_global = n_global

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        n = self.n_global
        parts = []
        while lo < hi:
            a, b = lo % n, min(hi - lo, n - lo % n) + lo % n
            bounds = torch.searchsorted(self.position, torch.tensor([a, b], device=self.position.device))
            parts.append(self.order[int(bounds[0]):int(bounds[1])])
            lo += b - a
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def global_batch(n_global: int, batch_size: int, min_steps: int) -> int:
    """Rows of one global mini-batch: batch_size, smaller on small data so that an epoch has at least
    min_steps steps."""
    return max(1, min(batch_size, math.ceil(n_global / min_steps)))


def epoch_order(global_index: torch.Tensor, n_global: int, gen: torch.Generator) -> EpochOrder:
    """The next epoch's order: ROUNDS round keys drawn from `gen` (identical on every rank)."""
    keys = torch.randint(0, 2**31 - 1, (ROUNDS,), generator=gen).tolist()
    return EpochOrder(global_index, n_global, keys)
