"""The paper's two factorized patterns, as unions of parts with the paper's names
(PAPER.md, "Factorized attention"):

- ``strided(l)`` is ``union(local(l), column(l))``: a row of the previous ``l`` positions plus a
  column of every ``l``-th position back (images, audio);
- ``fixed(l, c, d)`` is ``union(block(l), summary(l, c, d))``: the query's own block plus the
  summary slots of every block (text).

``part=`` picks one of the two (``"row"``/``"column"``, ``"local"``/``"summary"``), as before the
parts existed. A pattern equals any other with the same parts: ``strided(8, part="row") ==
local(8)``, ``union(local(8), column(8)) == strided(8)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .base import Part, Pattern, check_int, check_pattern
from .block import Block
from .column import Column, floor_sum
from .local import Local
from .summary import Summary

STRIDED_PARTS = ("row", "column")
FIXED_PARTS = ("local", "summary")


@dataclass(frozen=True, eq=False)
class Strided(Pattern):
    """Strided factorized attention: ``local(stride)`` and ``column(stride)``."""

    stride: int
    part: Optional[str] = None

    def __post_init__(self):
        if self.part not in (None, *STRIDED_PARTS):
            raise ValueError(f"part must be None, 'row' or 'column' for a strided pattern, got {self.part!r}")
        check_int("stride", self.stride, 1)
        object.__setattr__(self, "_parts", tuple(p for p, name in zip((Local(self.stride), Column(self.stride)),
                                                                     STRIDED_PARTS) if self.part in (None, name)))

    @property
    def parts(self) -> tuple[Part, ...]:
        return self._parts

    @property
    def spec(self) -> str:
        return f"strided:{self.stride}" if self.part is None else self._parts[0].spec

    @property
    def kind(self) -> str:
        return "strided"

    # Closed forms: the column's keys i - m * stride, m >= 1, lie outside the row; only j = i is shared.
    def keys_per_query(self, i, head):
        row, column = self._parts[0].keys_per_query(i, head), self._parts[-1].keys_per_query(i, head)
        return row + column - 1 if self.part is None else super().keys_per_query(i, head)

    def pairs(self, n, head):
        return sum(p.pairs(n, head) for p in self._parts) - (n if self.part is None else 0)

    def max_keys(self, n, head):  # both counts grow with i
        return int(self.keys_per_query(torch.tensor(n - 1), head)) if self.part is None else super().max_keys(n, head)

    @property
    def name(self) -> str:
        return f"strided_l{self.stride}" + (f"_{self.part}" if self.part else "")


@dataclass(frozen=True, eq=False)
class Fixed(Pattern):
    """Fixed factorized attention: ``block(stride)`` and ``summary(stride, summary, distinct)``."""

    stride: int
    summary: int
    distinct: int = 1
    part: Optional[str] = None

    def __post_init__(self):
        if self.part not in (None, *FIXED_PARTS):
            raise ValueError(f"part must be None, 'local' or 'summary' for a fixed pattern, got {self.part!r}")
        check_int("stride", self.stride, 1)
        local, summary = Block(self.stride), Summary(self.stride, self.summary, self.distinct)
        object.__setattr__(self, "_parts", tuple(p for p, name in zip((local, summary), FIXED_PARTS)
                                                 if self.part in (None, name)))

    @property
    def parts(self) -> tuple[Part, ...]:
        return self._parts

    @property
    def spec(self) -> str:
        if self.part is not None:
            return self._parts[0].spec
        return f"fixed:{self.stride}:{self.summary}" + (f":{self.distinct}" if self.distinct > 1 else "")

    @property
    def kind(self) -> str:
        return "fixed"

    # Closed forms: the block, plus the summary slots of the earlier blocks (i // stride of them).
    def keys_per_query(self, i, head):
        if self.part is not None:
            return super().keys_per_query(i, head)
        return self._parts[0].keys_per_query(i, head) + (i // self.stride) * self.summary

    def pairs(self, n, head):
        if self.part is not None:
            return super().pairs(n, head)
        return self._parts[0].pairs(n, head) + self.summary * floor_sum(n, self.stride)

    def max_keys(self, n, head):  # the most keys: the last query, or the end of the last whole block
        if self.part is not None:
            return super().max_keys(n, head)
        ends = torch.tensor([n - 1, n // self.stride * self.stride - 1])
        return int(self.keys_per_query(ends[ends >= 0], head).max())

    @property
    def name(self) -> str:
        name = f"fixed_l{self.stride}_c{self.summary}"
        if self.distinct > 1:
            name += f"_v{self.distinct}"
        return name + (f"_{self.part}" if self.part else "")

    def summary_range(self, head: int) -> tuple[int, int]:
        """Offsets ``[lo, hi)`` within each block that head ``head`` uses as summary keys."""
        return Summary(self.stride, self.summary, self.distinct).summary_range(head)


def strided(stride: int, part: Optional[str] = None) -> Strided:
    """Strided pattern; ``part`` is None (merged row + column), ``"row"`` or ``"column"``."""
    return Strided(stride, part)


def fixed(stride: int, summary: int, distinct: int = 1, part: Optional[str] = None) -> Fixed:
    """Fixed pattern; ``part`` is None (merged local + summary), ``"local"`` or ``"summary"``."""
    return Fixed(stride, summary, distinct, part)


def paper_name(parts: tuple[Part, ...]) -> Optional[Pattern]:
    """The paper's pattern whose parts are exactly ``parts`` (canonical order), else None."""
    if len(parts) != 2:
        return None
    a, b = parts
    if isinstance(a, Local) and isinstance(b, Column) and a.window == b.stride:
        return Strided(a.window)
    if isinstance(a, Block) and isinstance(b, Summary) and a.size == b.stride:
        return Fixed(b.stride, b.summary, b.distinct)
    return None


def pieces(pattern: Pattern) -> tuple[Pattern, ...]:
    """The one-part patterns whose union is ``pattern``, named as the paper names them for its two
    patterns (``strided(l, "row")``, ...), else the parts themselves; a custom pattern is its own."""
    check_pattern(pattern)
    if isinstance(pattern, Strided) and pattern.part is None:
        return tuple(Strided(pattern.stride, p) for p in STRIDED_PARTS)
    if isinstance(pattern, Fixed) and pattern.part is None:
        return tuple(Fixed(pattern.stride, pattern.summary, pattern.distinct, p) for p in FIXED_PARTS)
    return pattern.parts if pattern.spec is not None else (pattern,)
