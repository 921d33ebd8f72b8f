"""``dense()``: every key ``j <= i``, full causal attention (the baseline the factorized
patterns approximate). It contains every other part, so a union with it is dense alone.

Portable form: PyTorch's own causal SDPA (already memory-efficient). Kernel: ``BAND`` of width N.
Cache: every position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Part
from .plans import BAND, KernelPart, Slots


@dataclass(frozen=True, eq=False)
class Dense(Part):
    """Full causal attention."""

    token: ClassVar[str] = "dense"
    rank: ClassVar[int] = -1

    def contains(self, other: Part) -> bool:
        return True

    def allowed(self, b, h, q_idx, kv_idx):
        return torch.ones_like(q_idx - kv_idx, dtype=torch.bool)

    def keys_per_query(self, i: Tensor, head: int) -> Tensor:
        return i + 1

    def pairs(self, n: int, head: int) -> int:
        return n * (n + 1) // 2

    def max_keys(self, n: int, head: int) -> int:
        return n

    def portable(self, q, k, v, scale, earlier):
        """``(out, None)``: SDPA gives no log-sum-exp, and dense is never merged with another part."""
        assert not earlier, "a union holding dense is dense"
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale), None

    def kernel(self, n: int, earlier: tuple[Part, ...]) -> KernelPart:
        return KernelPart(BAND, "global", width=n)

    def slots(self, head: int, context: int) -> Slots:
        return Slots(positions=torch.arange(context))

    def flex(self, q, k, v, scale, earlier):
        from ..attention.flex import flex_part
        return flex_part(q, k, v, scale, self, earlier)
