"""``block(size)``: the query's own block of ``size`` positions, ``i // size == j // size`` (the
fixed pattern's local part).

Portable form: block-diagonal causal attention. Kernel: ``BLOCK`` of width ``size``; an earlier
window of ``W`` positions is the block's last ``W`` keys, so it is excluded by ``dmin = W``. Cache:
``size`` slots from the start of the query's block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import Part, check_int, covered
from .local import Local
from .plans import BLOCK, KernelPart, Slots


@dataclass(frozen=True, eq=False)
class Block(Part):
    """Positions of the query's own block of ``size``, up to the query."""

    size: int
    token: ClassVar[str] = "block"
    rank: ClassVar[int] = 2

    def __post_init__(self):
        check_int("size", self.size, 1)

    @property
    def period(self) -> int:
        return self.size

    def contains(self, other: Part) -> bool:  # blocks of `size` are whole blocks of any divisor
        return isinstance(other, Block) and self.size % other.size == 0

    def allowed(self, b, h, q_idx, kv_idx):
        return q_idx // self.size == kv_idx // self.size

    def keys_per_query(self, i: Tensor, head: int) -> Tensor:
        return i % self.size + 1

    def pairs(self, n: int, head: int) -> int:
        q, r = divmod(n, self.size)
        return q * self.size * (self.size + 1) // 2 + r * (r + 1) // 2

    def max_keys(self, n: int, head: int) -> int:
        return min(n, self.size)

    def structure(self) -> tuple[int, int, int]:
        return self.size, self.size, 0

    def portable(self, q, k, v, scale, earlier):
        from ..attention.portable import attend, blocks_of, heads_of

        n = q.shape[-2]
        w = min(self.size, n)
        blocks = -(-n // w)
        qb, kb, vb = (blocks_of(x, w) for x in (q, k, v))  # (B, H, R, w, D)
        allowed = torch.ones(w, w, dtype=torch.bool, device=q.device).tril()
        if earlier:
            start = torch.arange(blocks, device=q.device)[:, None, None] * w
            a = torch.arange(w, device=q.device)
            allowed = allowed & ~covered(earlier, heads_of(q, earlier), start + a[:, None], start + a[None, :])
        out, lse = attend(qb, kb, vb, allowed, scale)
        return out.flatten(2, 3)[:, :, :n], lse.flatten(2, 3)[:, :, :n]

    def kernel(self, n: int, earlier: tuple[Part, ...]) -> KernelPart:
        windows = [p.window for p in earlier if isinstance(p, Local)]
        exclude = tuple(p.kernel(n, ()) for p in earlier if not isinstance(p, Local))
        return KernelPart(BLOCK, "local", dmin=max(windows, default=0), width=min(self.size, n), exclude=exclude)

    def slots(self, head: int, context: int) -> Slots:
        return Slots(coef_block=1, block=self.size, offsets=torch.arange(min(self.size, context)))

    def flex(self, q, k, v, scale, earlier):
        from ..attention.flex import flex_part
        return flex_part(q, k, v, scale, self, earlier)
