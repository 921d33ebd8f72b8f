"""``summary(stride, summary, distinct=1)``: summary positions of every block, ``j % stride`` in
``[lo, lo + summary)`` with ``lo = stride - (u + 1) * summary`` and ``u = head % distinct`` (the
fixed pattern's summary part; head ``h`` uses the ``u``-th sub-block counted from the end of each
block, as OpenAI's code does).

:meth:`Summary.offset` is the one place that rule is written; the kernels, the cache and the
backends take ``lo`` from it. Portable form: the head group's summary keys gathered into one
buffer. Kernel: ``SUMMARY``, addressing the slots in place; an earlier block of the same stride
is excluded by ``dmin = 1`` (keys before the query's block). Cache: fixed slots at the summary
positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import Part, check_int, covered
from .block import Block
from .column import floor_sum
from .local import capped_triangle
from .plans import SUMMARY, KernelPart, Slots

QUERY_CHUNK = 1024  # query rows per step of the gathered form: bounds temporaries to chunk x keys

MAX_DISTINCT = 4096
"""Most head groups a summary part takes: more than any model has heads (head ``h`` uses group
``h % distinct``, so groups past the head count change nothing), and the kernel plan holds one
offset per group (``distinct = 10**9`` built a billion-entry tuple before the first launch)."""


@dataclass(frozen=True, eq=False)
class Summary(Part):
    """The last ``summary`` positions of every block of ``stride`` (the ``u``-th such sub-block from
    the end for heads ``h`` with ``h % distinct == u``)."""

    stride: int
    summary: int
    distinct: int = 1
    token: ClassVar[str] = "summary"
    rank: ClassVar[int] = 4

    def __post_init__(self):
        check_int("stride", self.stride, 1)
        check_int("summary", self.summary, 1, self.stride)
        check_int("distinct", self.distinct, 1)
        if self.distinct > MAX_DISTINCT:
            raise ValueError(f"distinct must be <= {MAX_DISTINCT:,} (head groups; head h uses group h % distinct), "
                             f"got {self.distinct:,}")
        if self.distinct * self.summary > self.stride:
            raise ValueError(
                f"distinct * summary must be <= stride ({self.stride}), "
                f"got distinct={self.distinct} * summary={self.summary} = {self.distinct * self.summary}")

    @property
    def arguments(self) -> tuple[int, ...]:
        return (self.stride, self.summary) + ((self.distinct,) if self.distinct > 1 else ())

    @property
    def period(self) -> int:
        return self.stride

    def offset(self, head):
        """``lo`` of head ``head`` (an int or a tensor): its summary slots are ``[lo, lo + summary)``."""
        return self.stride - (head % self.distinct + 1) * self.summary

    def summary_range(self, head: int) -> tuple[int, int]:
        """Offsets ``[lo, hi)`` within each block that head ``head`` uses as summary keys."""
        lo = self.offset(head)
        return lo, lo + self.summary

    def slots_before(self, x: int, head: int) -> int:
        """How many summary positions ``j < x`` head ``head`` has."""
        lo = self.offset(head)
        return (x // self.stride) * self.summary + min(max(x % self.stride - lo, 0), self.summary)

    def positions(self, n: int, head: int, device=None) -> Tensor:
        """Sorted summary positions ``j < n`` of head ``head`` (their count is known ahead, so the
        shapes do not depend on data: torch.compile traces this without a graph break)."""
        g = torch.arange(self.slots_before(n, head), device=device)
        return (g // self.summary) * self.stride + self.offset(head) + g % self.summary

    def heads_differ(self) -> bool:
        return self.distinct > 1

    def admits_diagonal(self) -> bool:
        return False

    def allowed(self, b, h, q_idx, kv_idx):
        lo = self.offset(h)
        offset = kv_idx % self.stride
        return (offset >= lo) & (offset < lo + self.summary)

    def keys_per_query(self, i: Tensor, head: int) -> Tensor:
        lo = self.offset(head)
        return (i // self.stride) * self.summary + torch.clamp(i % self.stride + 1 - lo, min=0, max=self.summary)

    def pairs(self, n: int, head: int) -> int:
        lo, (q, r) = self.offset(head), divmod(n, self.stride)
        # Slots of earlier blocks, then those <= i in i's own block (1, 2, ..., summary from lo on).
        return (self.summary * floor_sum(n, self.stride) + q * capped_triangle(self.stride - lo, self.summary)
                + capped_triangle(max(r - lo, 0), self.summary))

    def max_keys(self, n: int, head: int) -> int:
        return int(self.keys_per_query(torch.tensor(n - 1), head))

    def portable(self, q, k, v, scale, earlier):
        from ..attention.portable import attend, by_head_group

        def group(qg: Tensor, kg: Tensor, vg: Tensor, u: int, heads: Tensor) -> tuple[Tensor, Tensor]:
            n = qg.shape[-2]
            pos = self.positions(n, u, q.device)
            ks, vs = kg[:, :, pos], vg[:, :, pos]
            chunk = max(self.stride, QUERY_CHUNK // self.stride * self.stride)
            h = heads[:, None, None] if any(p.heads_differ() for p in earlier) else 0
            outs, lses = [], []
            for start in range(0, n, chunk):
                i = torch.arange(start, min(start + chunk, n), device=q.device)[:, None]
                used = self.slots_before(min(start + chunk, n), u)  # keys <= the chunk's last query
                allowed = pos[None, :used] <= i
                if earlier:
                    allowed = allowed & ~covered(earlier, h, i, pos[None, :used])
                out, lse = attend(qg[:, :, start:start + chunk], ks[:, :, :used], vs[:, :, :used], allowed, scale)
                outs.append(out)
                lses.append(lse)
            return torch.cat(outs, 2), torch.cat(lses, 2)

        return by_head_group(q, k, v, self.distinct, group)

    def kernel(self, n: int, earlier: tuple[Part, ...]) -> KernelPart:
        own_block = Block(self.stride)  # the keys of the query's own block: dmin = 1 drops them
        dmin = int(own_block in earlier)
        exclude = tuple(p.kernel(n, ()) for p in earlier if p != own_block)
        return KernelPart(SUMMARY, "global", dmin=dmin, stride=self.stride, summary=self.summary,
                          offsets=tuple(self.offset(u) for u in range(self.distinct)), exclude=exclude)

    def slots(self, head: int, context: int) -> Slots:
        return Slots(positions=self.positions(context, head))

    def flex(self, q, k, v, scale, earlier):
        from ..attention.flex import flex_gathered
        return flex_gathered(q, k, v, scale, self, earlier)
