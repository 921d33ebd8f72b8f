"""What a part tells the fast paths: one launch of the Triton kernels (:class:`KernelPart`) and
the key slots a decoded query reads (:class:`Slots`). Plain data, no Triton import.

The kernels (``attention/triton_kernels.py``) know three modes, each over a *view* of the sequence
(rows at positions ``col + r * step``), with query rows ``i`` and key rows ``j`` of that view:

- ``BAND``:    ``dmin <= i - j < width`` (a window; ``width = N`` is causal over the view),
               keys limited to the first ``keys`` rows when ``keys`` is set
- ``BLOCK``:   ``i // width == j // width`` and ``j <= i - dmin``; with ``packed`` (a stepped view)
               the columns of ``[N/step, step]`` laid end to end, ``width`` rows each
- ``SUMMARY``: key row ``g`` is the g-th slot at position ``(g // summary) * stride + lo + g % summary``
               (``lo`` per head from ``offsets``); ``dmin = 1`` keeps only keys before the
               query's block of ``stride``, else keys at positions ``<= i``

A part that needs another mode is a new mode here and in the kernels; one that fits these is a
module of its own and nothing else. ``exclude`` lists earlier parts (as their own kernel parts)
whose keys this launch drops by a test on positions, where ``dmin`` cannot express them.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

BAND, BLOCK, SUMMARY = 0, 1, 2
MODES = {BAND: "band", BLOCK: "block", SUMMARY: "summary"}


@dataclass(frozen=True)
class KernelPart:
    """One launch of the kernels. ``kind`` picks the tile config: ``local`` (a narrow band or
    block, few keys per query) or ``global`` (causal over a whole view or over the summary keys:
    dense-like work). ``keys``: 0 for all rows of the view, else only its first ``keys`` rows."""

    mode: int
    kind: str = "local"
    dmin: int = 0
    width: int = 1
    step: int = 1
    stride: int = 1
    summary: int = 0
    offsets: tuple[int, ...] = (0,)
    keys: int = 0
    exclude: tuple["KernelPart", ...] = ()

    @property
    def packed(self) -> bool:
        """Whether the view is the columns of ``[N/step, step]`` end to end: a BLOCK part over a
        stepped view is the strided column part packed."""
        return self.mode == BLOCK and self.step > 1

    @property
    def short(self) -> bool:
        """Whether each key is seen by few queries: a local part, or a column (stepped) view."""
        return self.kind == "local" or self.step > 1

    def offset(self, head: int) -> int:
        """SUMMARY's ``lo`` for head ``head``."""
        return self.offsets[head % len(self.offsets)]

    def key_rows(self, n: int, head: int) -> int:
        """How many key rows the part has for one column of its view (the longest column)."""
        if self.mode == SUMMARY:
            lo = self.offset(head)
            return (n // self.stride) * self.summary + min(max(n % self.stride - lo, 0), self.summary)
        rows = n if self.packed else -(-n // self.step)
        return min(rows, self.keys) if self.keys else rows

    def covers_every_key(self, n: int) -> bool:
        """Whether some query sees every key row of the sequence (then the first dK/dV launch
        writes every row; else the rows no part reaches must start at zero)."""
        return self.mode != SUMMARY and (not self.keys or self.keys >= n)


@dataclass
class Slots:
    """Key slots of one head for the query at position ``t``: *moving* slots at
    ``coef_t * t + coef_block * (t // block * block) + offset`` (one per entry of ``offsets``), and
    *fixed* slots at absolute ``positions``, valid once ``position <= t``. The cache drops a slot
    whose key an earlier part of the union already admits."""

    coef_t: int = 0
    coef_block: int = 0
    block: int = 1
    offsets: Tensor | None = None
    positions: Tensor | None = None
