"""``local(window)``: the previous ``window`` positions, ``0 <= i - j < window`` (the strided
pattern's row part, a sliding window).

Portable form: a band; each block of ``w = min(window, N)`` queries sees its own and the previous
key block. Kernel: ``BAND`` of width ``window`` over the sequence. Cache: ``window`` slots that
move with the query (``t - r``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import Part, check_int, covered
from .plans import BAND, KernelPart, Slots


def capped_triangle(n: int, cap: int) -> int:
    """``sum(min(i + 1, cap) for i in range(n))`` in closed form."""
    if n <= cap:
        return n * (n + 1) // 2
    return cap * (cap + 1) // 2 + (n - cap) * cap


@dataclass(frozen=True, eq=False)
class Local(Part):
    """Sliding window: the query and the ``window - 1`` positions before it."""

    window: int
    token: ClassVar[str] = "local"
    rank: ClassVar[int] = 1

    def __post_init__(self):
        check_int("window", self.window, 1)

    def contains(self, other: Part) -> bool:
        from .block import Block  # a block of at most `window` positions lies inside the window
        return (isinstance(other, Local) and other.window <= self.window) or (
            isinstance(other, Block) and other.size <= self.window)

    def allowed(self, b, h, q_idx, kv_idx):
        return q_idx - kv_idx < self.window

    def keys_per_query(self, i: Tensor, head: int) -> Tensor:
        return torch.clamp(i + 1, max=self.window)

    def pairs(self, n: int, head: int) -> int:
        return capped_triangle(n, self.window)

    def max_keys(self, n: int, head: int) -> int:
        return min(n, self.window)

    def structure(self) -> tuple[int, int, int]:
        return 1, self.window, 0

    def portable(self, q, k, v, scale, earlier):
        from ..attention.portable import attend, blocks_of, heads_of

        n = q.shape[-2]
        w = min(self.window, n)
        blocks = -(-n // w)
        qb, kb, vb = (blocks_of(x, w) for x in (q, k, v))  # (B, H, R, w, D)

        def with_previous(x: Tensor) -> Tensor:  # (B, H, R, 2w, D): previous block, then own block
            return torch.cat([torch.nn.functional.pad(x, (0, 0, 0, 0, 1, 0))[:, :, :-1], x], dim=3)

        a = torch.arange(w, device=q.device)[:, None]
        t = torch.arange(2 * w, device=q.device)[None, :]
        diff = w + a - t  # i - j for query slot a and key slot t
        allowed = ((diff >= 0) & (diff < self.window)).expand(blocks, w, 2 * w).clone()
        allowed[0, :, :w] = False  # block 0 has no previous block
        if earlier:
            r = torch.arange(blocks, device=q.device)[:, None, None]
            allowed = allowed & ~covered(earlier, heads_of(q, earlier), r * w + a, (r - 1) * w + t)
        out, lse = attend(qb, with_previous(kb), with_previous(vb), allowed, scale)
        return out.flatten(2, 3)[:, :, :n], lse.flatten(2, 3)[:, :, :n]

    def kernel(self, n: int, earlier: tuple[Part, ...]) -> KernelPart:
        return KernelPart(BAND, "local", width=min(self.window, n),
                          exclude=tuple(p.kernel(n, ()) for p in earlier))

    def slots(self, head: int, context: int) -> Slots:
        return Slots(coef_t=1, offsets=-torch.arange(min(self.window, context)))

    def flex(self, q, k, v, scale, earlier):
        from ..attention.flex import flex_part
        return flex_part(q, k, v, scale, self, earlier)
