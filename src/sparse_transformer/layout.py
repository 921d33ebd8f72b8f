"""What a pattern costs: keys per query and density, exactly, for any sequence length.

Built-in patterns have closed forms (O(n) memory, so n = 1M is instant); custom patterns are
counted by evaluating their mask function in query chunks. Tests check every closed form
against ``pattern.mask(n).sum(-1)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .patterns import Dense, Fixed, Pattern, Strided


def keys_per_query(pattern: Pattern, n: int, head: int = 0, chunk: int = 1024) -> Tensor:
    """Number of admissible keys for each query position, LongTensor ``[n]``."""
    i = torch.arange(n)
    if isinstance(pattern, Dense):
        return i + 1
    if isinstance(pattern, Strided):
        row = torch.clamp(i + 1, max=pattern.stride)
        column = i // pattern.stride + 1
        # The two parts share exactly one key, j = i.
        return {"row": row, "column": column, None: row + column - 1}[pattern.part]
    if isinstance(pattern, Fixed):
        lo, hi = pattern.summary_range(head)
        block, offset = i // pattern.stride, i % pattern.stride
        local = offset + 1
        earlier_summary = block * (hi - lo)
        own_summary = torch.clamp(offset + 1 - lo, min=0, max=hi - lo)  # summary slots <= i in i's block
        return {"local": local, "summary": earlier_summary + own_summary, None: local + earlier_summary}[pattern.part]
    counts = []
    for start in range(0, n, chunk):
        q = torch.arange(start, min(start + chunk, n))[:, None]
        zero = torch.zeros((), dtype=torch.long)
        m = pattern.mask_mod(zero, zero + head, q, i[None, :])
        counts.append(m.expand(q.shape[0], n).sum(-1))
    return torch.cat(counts) if counts else torch.zeros(0, dtype=torch.long)


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
    """Exact keys-per-query statistics and density of ``pattern`` at length ``n``."""
    k = keys_per_query(pattern, n, head)
    return Cost(n=n, pairs=int(k.sum()), mean_keys_per_query=int(k.sum()) / n if n else 0.0,
                max_keys_per_query=int(k.max()) if n else 0)


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
