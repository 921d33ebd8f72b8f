"""What a pattern costs: keys per query and density, exactly, for any sequence length.

- one part, and the paper's two unions: closed forms (``pattern.pairs``, Python ints, O(1) memory);
- a union of parts: exact at any length from the parts' ``structure()``. Past ``i0 = prefix + reach``
  the keys of query ``i + P`` (``P`` the lcm of the parts' periods) are those of query ``i`` plus a
  number that depends on ``i % P`` only, so counting the first ``i0 + 2P`` queries (from the mask
  function) gives every later one as an arithmetic series; memory O(i0 + P), never O(n);
- a custom pattern: its mask function, evaluated in query chunks (O(n^2) work; n bounded).

Tests check every count against ``pattern.mask(n).sum(-1)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .patterns import MAX_LENGTH, Pattern
from .patterns.base import check_int, check_pattern

EXACT_WINDOW = 16_384
"""The most queries counted from the mask function (their keys alone: O(window^2) work)."""


def _counts(pattern: Pattern, start: int, stop: int, head: int, chunk: int = 512) -> Tensor:
    """Keys per query for queries ``[start, stop)``, from the mask function, LongTensor."""
    zero = torch.zeros((), dtype=torch.long)
    counts = []
    for lo in range(start, stop, chunk):
        q = torch.arange(lo, min(lo + chunk, stop))[:, None]
        keys = torch.arange(int(q[-1]) + 1)[None, :]
        counts.append(pattern.mask_mod(zero, zero + head, q, keys).expand(q.shape[0], keys.shape[1]).sum(-1))
    return torch.cat(counts) if counts else torch.zeros(0, dtype=torch.long)


def keys_per_query(pattern: Pattern, n: int, head: int = 0, chunk: int = 1024) -> Tensor:
    """Number of admissible keys for each query position, LongTensor ``[n]`` (O(n) memory)."""
    check_int("n", n, 0, MAX_LENGTH)
    closed = pattern.keys_per_query(torch.arange(n), head)
    if closed is not None:
        return closed
    if not pattern.parts:  # custom
        return _counts(pattern, 0, n, head, chunk)
    return _union_counts(pattern, n, head)


def _union_counts(pattern: Pattern, n: int, head: int) -> Tensor:
    i0, period = _settle(pattern)
    if n <= i0 + 2 * period:
        return _counts(pattern, 0, n, head)
    base = _counts(pattern, 0, i0 + period, head)
    step = _counts(pattern, i0 + period, i0 + 2 * period, head) - base[i0:]  # per residue
    i = torch.arange(i0, n)
    k = (i - i0) // period
    return torch.cat([base[:i0], base[i0 + (i - i0) % period] + k * step[(i - i0) % period]])


def _settle(pattern: Pattern) -> tuple[int, int]:
    """``(i0, P)`` of the module docstring for a union of parts."""
    period, reach, prefix = 1, 0, 0
    for part in pattern.parts:
        p, r, g = part.structure()
        period, reach, prefix = math.lcm(period, p), max(reach, r), max(prefix, g)
    return prefix + reach, period


@dataclass(frozen=True)
class Cost:
    """Summary of a pattern's work at length ``n`` for one head."""

    n: int
    pairs: int  # admissible (query, key) pairs
    mean_keys_per_query: float
    max_keys_per_query: int

    @property
    def density(self) -> float:
        """Fraction of the n x n score matrix that is computed."""
        return self.pairs / max(self.n * self.n, 1)

    @property
    def causal_density(self) -> float:
        """Fraction of dense causal attention's n(n+1)/2 pairs that is computed."""
        return self.pairs / max(self.n * (self.n + 1) // 2, 1)


def cost(pattern: Pattern, n: int, head: int = 0) -> Cost:
    """Exact keys-per-query statistics and density of ``pattern`` at length ``n`` (up to
    :data:`~sparse_transformer.patterns.MAX_LENGTH` for built-in patterns), without O(n) memory."""
    check_pattern(pattern)
    check_int("n", n, 0, MAX_LENGTH)
    check_int("head", head, 0)
    if n == 0:
        return Cost(0, 0, 0.0, 0)
    if pattern.pairs(n, head) is not None:
        pairs, most = pattern.pairs(n, head), pattern.max_keys(n, head)
    elif not pattern.parts:
        if n > EXACT_WINDOW:
            raise ValueError(f"the cost of custom pattern {pattern.name!r} is counted from its mask function, "
                             f"O(n^2): n must be <= {EXACT_WINDOW:,}, got {n:,}")
        counts = _counts(pattern, 0, n, head)
        pairs, most = int(counts.sum()), int(counts.max())
    else:
        pairs, most = _union_cost(pattern, n, head)
    return Cost(n=n, pairs=pairs, mean_keys_per_query=pairs / n, max_keys_per_query=most)


def _union_cost(pattern: Pattern, n: int, head: int) -> tuple[int, int]:
    i0, period = _settle(pattern)
    if i0 + 2 * period > EXACT_WINDOW and n > EXACT_WINDOW:
        raise ValueError(f"the exact cost of {pattern.name} at n > {EXACT_WINDOW:,} needs its first "
                         f"{i0 + 2 * period:,} queries counted (the lcm of its parts' periods plus their reach), "
                         f"more than {EXACT_WINDOW:,}; got n = {n:,}")
    if n <= i0 + 2 * period:
        counts = _counts(pattern, 0, n, head)
        return int(counts.sum()), int(counts.max())
    base = _counts(pattern, 0, i0 + period, head)
    step = (_counts(pattern, i0 + period, i0 + 2 * period, head) - base[i0:]).tolist()
    first = base[i0:].tolist()
    pairs, most = int(base[:i0].sum()), int(base[:i0].max()) if i0 else 0
    for r in range(period):  # queries i0 + r + k * period, k = 0 .. terms - 1
        terms = (n - i0 - r + period - 1) // period
        pairs += terms * first[r] + step[r] * terms * (terms - 1) // 2
        most = max(most, first[r] + step[r] * (terms - 1))
    return pairs, most


def block_layout(pattern: Pattern, n: int, block: int, head: int = 0) -> Tensor:
    """Block layout ``[ceil(n/block), ceil(n/block)]`` bool: True where a query block has any
    admissible key in a key block. Derived from the mask function, one query block at a time."""
    nb = -(-n // block)
    layout = torch.zeros(nb, nb, dtype=torch.bool)
    keys = torch.arange(n)
    zero = torch.zeros((), dtype=torch.long)
    for qb in range(nb):
        q = torch.arange(qb * block, min((qb + 1) * block, n))[:, None]
        m = pattern.mask_mod(zero, zero + head, q, keys[None, :]).expand(q.shape[0], n)
        hit = m.any(0)
        hit = torch.nn.functional.pad(hit, (0, nb * block - n))
        layout[qb] = hit.view(nb, block).any(-1)
    return layout
