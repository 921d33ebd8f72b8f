"""``column(stride)``: every ``stride``-th position back, ``(i - j) % stride == 0`` (the strided
pattern's column part, a dilated window of unbounded length).

Column attention is causal attention along the columns of the ``[N/stride, stride]`` view, a
transpose (PAPER.md, "Factorized attention"). Portable form: that transpose. Kernel: ``BAND`` over
the view, addressed with a row step of ``stride`` (no copy); columns of at most
:data:`PACKED_COLUMN_ROWS` rows are packed several to a tile (a ``BLOCK`` over the columns laid
end to end). Cache: one slot per row of the view, ``t - m * stride``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import Part, check_int, covered
from .local import Local
from .plans import BAND, BLOCK, KernelPart, Slots

PACKED_COLUMN_ROWS = 32
"""Columns of at most this many rows (``N / stride``) are packed several to a kernel tile: one
column a program left most of a 64-row tile empty (docs/results.md, "packed columns")."""


def floor_sum(n: int, stride: int) -> int:
    """``sum(i // stride for i in range(n))`` in closed form."""
    q, r = divmod(n, stride)
    return stride * q * (q - 1) // 2 + r * q


@dataclass(frozen=True, eq=False)
class Column(Part):
    """Every ``stride``-th earlier position, the query included."""

    stride: int
    token: ClassVar[str] = "column"
    rank: ClassVar[int] = 3

    def __post_init__(self):
        check_int("stride", self.stride, 1)

    @property
    def period(self) -> int:
        return self.stride

    def contains(self, other: Part) -> bool:  # every (stride * m)-th position is an every-stride-th one
        return isinstance(other, Column) and other.stride % self.stride == 0

    def allowed(self, b, h, q_idx, kv_idx):
        return (q_idx - kv_idx) % self.stride == 0

    def keys_per_query(self, i: Tensor, head: int) -> Tensor:
        return i // self.stride + 1

    def pairs(self, n: int, head: int) -> int:
        return n + floor_sum(n, self.stride)

    def max_keys(self, n: int, head: int) -> int:
        return (n - 1) // self.stride + 1

    def portable(self, q, k, v, scale, earlier):
        from ..attention.portable import attend, heads_of, pad_to

        n = q.shape[-2]
        s = min(self.stride, n)  # with stride >= n only j = i remains, as with stride = n
        rows = -(-n // s)

        def transposed(x: Tensor) -> Tensor:  # (B, H, s, rows, D)
            return pad_to(x, rows * s).view(*x.shape[:2], rows, s, x.shape[-1]).transpose(2, 3)

        r = torch.arange(rows, device=q.device)
        allowed = r[None, :] <= r[:, None]
        if earlier:
            c = torch.arange(s, device=q.device)[:, None, None]
            allowed = allowed & ~covered(earlier, heads_of(q, earlier), c + r[:, None] * s, c + r[None, :] * s)
        out, lse = attend(transposed(q), transposed(k), transposed(v), allowed, scale)
        return out.transpose(2, 3).flatten(2, 3)[:, :, :n], lse.transpose(2, 3).flatten(2, 3)[:, :, :n]

    def kernel(self, n: int, earlier: tuple[Part, ...]) -> KernelPart:
        step = min(self.stride, n)  # stride >= n leaves only j = i in a column, as with stride = n
        rows = -(-n // step)
        # An earlier window of W positions holds the column's first ceil(W / step) rows back.
        windows = [p.window for p in earlier if isinstance(p, Local)]
        dmin = min(-(-max(windows) // step), rows) if windows else 0
        exclude = tuple(p.kernel(n, ()) for p in earlier if not isinstance(p, Local))
        if n % step == 0 and n // step <= PACKED_COLUMN_ROWS:
            return KernelPart(BLOCK, "local", dmin=dmin, width=n // step, step=step, exclude=exclude)
        return KernelPart(BAND, "global", dmin=dmin, width=n, step=step, exclude=exclude)

    def slots(self, head: int, context: int) -> Slots:
        return Slots(coef_t=1, offsets=-self.stride * torch.arange(-(-context // self.stride)))

    def flex(self, q, k, v, scale, earlier):
        from ..attention.flex import flex_part

        b, h, n, d = q.shape
        s = min(self.stride, n)
        if n % s:
            raise ValueError(f"the column part's Flex form needs N divisible by the stride, got N={n}, stride={s}")

        def view(x):  # [B * H, s, N / s, D]: column c of the [N/s, s] matrix as a sequence
            return x.reshape(b * h, n // s, s, d).transpose(1, 2)

        out, lse = flex_part(view(q), view(k), view(v), scale, self, earlier, columns=(s, h))
        return out.transpose(1, 2).reshape(b, h, n, d), lse.transpose(1, 2).reshape(b, h, n)

    def flex_packed(self, q, k, v, scale, earlier):
        """The columns laid end to end (the sequence read column by column): one Flex sequence of N
        rows whose mask keeps each query in its own column, so columns shorter than Flex's 128-row
        tile share tiles instead of each filling one mostly with padding (as the kernel packs them)."""
        from ..attention.flex import flex_part

        b, h, n, d = q.shape
        s = min(self.stride, n)
        if n % s:
            raise ValueError(f"the column part's Flex form needs N divisible by the stride, got N={n}, stride={s}")
        rows = n // s

        def packed(x):  # [B, H, N, D]: row f is position (f % rows) * s + f // rows
            return x.reshape(b, h, rows, s, d).transpose(2, 3).reshape(b, h, n, d)

        out, lse = flex_part(packed(q), packed(k), packed(v), scale, self, earlier, packed=(s, rows))
        return (out.reshape(b, h, s, rows, d).transpose(2, 3).reshape(b, h, n, d),
                lse.reshape(b, h, s, rows).transpose(2, 3).reshape(b, h, n))

    def flex_forms(self) -> dict:
        return {"": self.flex, "packed": self.flex_packed}
