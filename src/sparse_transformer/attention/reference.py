"""The oracle: dense masked attention in float64, built from ``pattern.mask``.

O(N^2) time and memory: for tests and small N only. Every other backend is tested against it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..patterns import Pattern
from .nonfinite import guarded


def head_masks(pattern: Pattern, n: int, heads: int, device=None) -> Tensor:
    """``[H or 1, n, n]`` bool: one mask per head when heads differ, else one shared mask."""
    if pattern.heads_differ():
        return torch.stack([pattern.mask(n, head=h, device=device) for h in range(heads)])
    return pattern.mask(n, device=device)[None]


@guarded
def reference_attention(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, scale: float) -> Tensor:
    """softmax(q k^T * scale, masked) v in float64; a query with no admissible key outputs 0.

    q, k, v: ``[B, H, N, D]``. Returns ``[B, H, N, D]`` in q's dtype.
    """
    _, heads, n, _ = q.shape
    mask = head_masks(pattern, n, heads, q.device)  # (H|1, N, N)
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    # Shifting by the (detached) row max changes nothing mathematically but keeps exp finite;
    # rows with no key get shift 0, so their weights are exp(-inf) = 0 and their output 0.
    row_max = scores.amax(-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    total = weights.sum(-1, keepdim=True)
    out = (weights @ v.double()) / torch.where(total > 0, total, torch.ones_like(total))
    return out.to(q.dtype)
