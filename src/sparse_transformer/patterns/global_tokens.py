"""``global_tokens(count)``: every query also sees the first ``count`` positions, ``j < count``
(Longformer's and BigBird's global tokens, here on the key side: a query sees the first ``count``
positions that lie before it).

Everything about the part is here, and nothing elsewhere names it. Portable form: the first
``count`` keys, in query chunks. Kernel: a ``BAND`` of width N kept to its first ``count`` key rows
(``KernelPart.keys``); it sorts first in a union, so later parts leave those keys out. Cache:
fixed slots at positions ``0 .. count - 1``. Flex form: the first ``count`` keys, one call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import Part, check_int, covered
from .local import capped_triangle
from .plans import BAND, KernelPart, Slots

QUERY_CHUNK = 1024  # query rows per step of the portable form: bounds the scores to chunk x count


@dataclass(frozen=True, eq=False)
class GlobalTokens(Part):
    """The first ``count`` positions, for every query after them."""

    count: int
    token: ClassVar[str] = "global_tokens"
    rank: ClassVar[int] = 0

    def __post_init__(self):
        check_int("count", self.count, 1)

    def contains(self, other: Part) -> bool:
        return isinstance(other, GlobalTokens) and other.count <= self.count

    def admits_diagonal(self) -> bool:
        return False

    def allowed(self, b, h, q_idx, kv_idx):
        return kv_idx < self.count

    def keys_per_query(self, i: Tensor, head: int) -> Tensor:
        return torch.clamp(i + 1, max=self.count)

    def pairs(self, n: int, head: int) -> int:
        return capped_triangle(n, self.count)

    def max_keys(self, n: int, head: int) -> int:
        return min(n, self.count)

    def structure(self) -> tuple[int, int, int]:
        return 1, 0, self.count

    def portable(self, q, k, v, scale, earlier):
        from ..attention.portable import attend, heads_of

        n = q.shape[-2]
        keys = torch.arange(min(self.count, n), device=q.device)
        h = heads_of(q, earlier)  # [H, 1, 1, 1] or 0
        h = h[..., 0] if isinstance(h, Tensor) else h
        outs, lses = [], []
        for start in range(0, n, QUERY_CHUNK):
            stop = min(start + QUERY_CHUNK, n)
            i = torch.arange(start, stop, device=q.device)[:, None]
            used = min(self.count, stop)  # keys <= the chunk's last query
            allowed = keys[None, :used] <= i
            if earlier:
                allowed = allowed & ~covered(earlier, h, i, keys[None, :used])
            out, lse = attend(q[:, :, start:stop], k[:, :, :used], v[:, :, :used], allowed, scale)
            outs.append(out)
            lses.append(lse)
        return torch.cat(outs, 2), torch.cat(lses, 2)

    def kernel(self, n: int, earlier: tuple[Part, ...]) -> KernelPart:
        return KernelPart(BAND, "global", width=n, keys=min(self.count, n),
                          exclude=tuple(p.kernel(n, ()) for p in earlier))

    def slots(self, head: int, context: int) -> Slots:
        return Slots(positions=torch.arange(min(self.count, context)))

    def flex(self, q, k, v, scale, earlier):
        from ..attention.flex import flex_gathered
        return flex_gathered(q, k, v, scale, self, earlier)


def global_tokens(count: int) -> GlobalTokens:
    """Every query also sees the first ``count`` positions (those before it): ``j < count``."""
    return GlobalTokens(count)
