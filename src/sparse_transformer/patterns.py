"""Attention patterns: each one is a small pure mask function plus its parameters.

A pattern answers one question: may query ``i`` attend to key ``j``? The answer is its
``mask_mod(b, h, q_idx, kv_idx) -> bool`` (the FlexAttention convention), evaluated on
broadcast index tensors. Everything else (dense masks, block layouts, key counts,
pictures, kernel lookup tables) is derived from it or tested equal to it.

All patterns are causal: a key after its query is never admissible (PAPER.md,
"Factorized attention"). Definitions, 0-based, stride ``l``, summary ``c``:

- strided ``row``:      ``0 <= i - j < l``
- strided ``column``:   ``(i - j) % l == 0``
- fixed ``local``:      ``i // l == j // l``
- fixed ``summary``:    ``j % l`` in ``[l - (u+1) c, l - u c)`` with ``u = h % distinct``
- no part: the union of the two parts, attended with one softmax (a "merged" head).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
"""``(b, h, q_idx, kv_idx) -> bool tensor``: True where the query may attend the key."""

STRIDED_PARTS = ("row", "column")
FIXED_PARTS = ("local", "summary")


def _check_int(name: str, value: int, low: int, high: Optional[int] = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {allowed}, got {value}")


@dataclass(frozen=True)
class Pattern:
    """Base class of attention patterns; ``kind`` tells backends which structure to exploit.

    Subclasses define :meth:`allowed`, the pattern without causality; :meth:`mask_mod`
    adds ``j <= i``. Patterns are immutable and hashable, so backends can cache per pattern.
    """

    @property
    def kind(self) -> str:
        raise NotImplementedError

    @property
    def name(self) -> str:
        raise NotImplementedError

    def allowed(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        raise NotImplementedError

    def mask_mod(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        """FlexAttention-style mask function: the pattern, restricted to ``kv_idx <= q_idx``."""
        return (kv_idx <= q_idx) & self.allowed(b, h, q_idx, kv_idx)

    def mask(self, n: int, head: int = 0, device: torch.device | str | None = None) -> Tensor:
        """Dense boolean mask ``[n, n]`` for one head: ``mask[i, j]`` is True if query i may attend key j."""
        _check_int("n", n, 0)
        _check_int("head", head, 0)
        idx = torch.arange(n, device=device)
        zero = torch.zeros((), dtype=torch.long, device=device)
        m = self.mask_mod(zero, zero + head, idx[:, None], idx[None, :])
        return m.expand(n, n).to(torch.bool)

    def heads_differ(self) -> bool:
        """True when heads see different masks (then ``mask(n, head)`` depends on ``head``)."""
        return False

    @property
    def spec(self) -> str:
        """A canonical string that :func:`parse` turns back into an equal pattern (``strided:128``,
        ``fixed:128:32:4``, ``fixed:128:32:1:summary``): how compiled ops and the CLI name a pattern."""
        raise ValueError(f"pattern {self.name!r} has no spec string: only built-in patterns do")

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Dense(Pattern):
    """Full causal attention: every key ``j <= i``."""

    @property
    def kind(self) -> str:
        return "dense"

    @property
    def name(self) -> str:
        return "dense"

    @property
    def spec(self) -> str:
        return "dense"

    def allowed(self, b, h, q_idx, kv_idx):
        return torch.ones_like(q_idx - kv_idx, dtype=torch.bool)


@dataclass(frozen=True)
class Strided(Pattern):
    """Strided factorized attention (images, audio): a row of the previous ``stride``
    positions plus a column of every ``stride``-th position back."""

    stride: int
    part: Optional[str] = None

    def __post_init__(self):
        _check_int("stride", self.stride, 1)
        if self.part not in (None, *STRIDED_PARTS):
            raise ValueError(f"part must be None, 'row' or 'column' for a strided pattern, got {self.part!r}")

    @property
    def kind(self) -> str:
        return "strided"

    @property
    def name(self) -> str:
        return f"strided_l{self.stride}" + (f"_{self.part}" if self.part else "")

    @property
    def spec(self) -> str:
        return f"strided:{self.stride}" + (f":{self.part}" if self.part else "")

    def allowed(self, b, h, q_idx, kv_idx):
        diff = q_idx - kv_idx
        row = diff < self.stride
        column = diff % self.stride == 0
        if self.part == "row":
            return row
        if self.part == "column":
            return column
        return row | column


@dataclass(frozen=True)
class Fixed(Pattern):
    """Fixed factorized attention (text): the query's own block of ``stride`` positions plus
    the last ``summary`` positions of every block; with ``distinct = V > 1`` head ``h`` uses the
    ``(h % V)``-th summary sub-block, counted from the end of each block."""

    stride: int
    summary: int
    distinct: int = 1
    part: Optional[str] = None

    def __post_init__(self):
        _check_int("stride", self.stride, 1)
        _check_int("summary", self.summary, 1, self.stride)
        _check_int("distinct", self.distinct, 1)
        if self.distinct * self.summary > self.stride:
            raise ValueError(
                f"distinct * summary must be <= stride ({self.stride}), "
                f"got distinct={self.distinct} * summary={self.summary} = {self.distinct * self.summary}"
            )
        if self.part not in (None, *FIXED_PARTS):
            raise ValueError(f"part must be None, 'local' or 'summary' for a fixed pattern, got {self.part!r}")

    @property
    def kind(self) -> str:
        return "fixed"

    @property
    def name(self) -> str:
        name = f"fixed_l{self.stride}_c{self.summary}"
        if self.distinct > 1:
            name += f"_v{self.distinct}"
        return name + (f"_{self.part}" if self.part else "")

    @property
    def spec(self) -> str:
        return f"fixed:{self.stride}:{self.summary}:{self.distinct}" + (f":{self.part}" if self.part else "")

    def summary_range(self, head: int) -> tuple[int, int]:
        """Offsets ``[lo, hi)`` within each block that head ``head`` uses as summary keys."""
        u = head % self.distinct
        return self.stride - (u + 1) * self.summary, self.stride - u * self.summary

    def allowed(self, b, h, q_idx, kv_idx):
        local = q_idx // self.stride == kv_idx // self.stride
        u = h % self.distinct
        offset = kv_idx % self.stride
        summary = (offset >= self.stride - (u + 1) * self.summary) & (offset < self.stride - u * self.summary)
        if self.part == "local":
            return local
        if self.part == "summary":
            return summary
        return local | summary

    def heads_differ(self) -> bool:
        return self.distinct > 1 and self.part != "local"


@dataclass(frozen=True, eq=False)
class Custom(Pattern):
    """A user-defined pattern from a ``(b, h, q_idx, kv_idx) -> bool`` function.

    The function must work elementwise on broadcast integer tensors (as FlexAttention's
    ``mask_mod`` does); causality (``kv_idx <= q_idx``) is always added. Compared by identity.
    """

    fn: MaskMod
    label: str = "custom"
    per_head: bool = True

    # eq=False alone inherits Pattern's field-less __eq__/__hash__, which made every custom pattern
    # equal to every other (and collide in per-pattern caches): compare by identity, as documented.
    def __eq__(self, other):
        return self is other

    def __hash__(self):
        return id(self)

    def __post_init__(self):
        if not callable(self.fn):
            raise ValueError(f"custom pattern needs a callable (b, h, q_idx, kv_idx) -> bool, got {self.fn!r}")
        try:
            signature = inspect.signature(self.fn)
        except (TypeError, ValueError):  # some builtins have no signature: checked when first called
            return
        try:
            signature.bind(0, 0, 0, 0)
        except TypeError:
            # Found here rather than as a TypeError deep inside a backend on the first forward pass.
            raise ValueError(f"custom pattern {self.label!r} must take four arguments (b, h, q_idx, kv_idx), "
                             f"got a function with signature {signature}") from None

    @property
    def kind(self) -> str:
        return "custom"

    @property
    def name(self) -> str:
        return self.label

    def allowed(self, b, h, q_idx, kv_idx):
        out = self.fn(b, h, q_idx, kv_idx)
        if not isinstance(out, Tensor) or out.dtype != torch.bool:
            raise ValueError(f"custom pattern {self.label!r} must return a bool tensor, got {type(out).__name__}"
                             + (f" of dtype {out.dtype}" if isinstance(out, Tensor) else ""))
        # An elementwise result broadcasts to the inputs' shape; anything else (a fixed-size mask, a
        # reduction) would fail inside a backend with a bare broadcasting error, or broadcast wrongly.
        expected = torch.broadcast_shapes(b.shape, h.shape, q_idx.shape, kv_idx.shape)
        try:
            fits = torch.broadcast_shapes(out.shape, expected) == expected
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"custom pattern {self.label!r} must work elementwise on its index tensors: for inputs "
                             f"broadcasting to {tuple(expected)} it returned shape {tuple(out.shape)}")
        return out

    def heads_differ(self) -> bool:
        return self.per_head


def dense() -> Dense:
    """Full causal attention (the baseline the factorized patterns approximate)."""
    return Dense()


def strided(stride: int, part: Optional[str] = None) -> Strided:
    """Strided pattern; ``part`` is None (merged row + column), ``"row"`` or ``"column"``."""
    return Strided(stride, part)


def fixed(stride: int, summary: int, distinct: int = 1, part: Optional[str] = None) -> Fixed:
    """Fixed pattern; ``part`` is None (merged local + summary), ``"local"`` or ``"summary"``."""
    return Fixed(stride, summary, distinct, part)


def custom(fn: MaskMod, name: Optional[str] = None, per_head: bool = True) -> Custom:
    """Wrap a FlexAttention-style ``mask_mod`` as a pattern. Set ``per_head=False`` when the
    function ignores ``h``, so backends compute the mask once for all heads."""
    return Custom(fn, name or getattr(fn, "__name__", "custom"), per_head)


def parts(pattern: Pattern) -> tuple[Pattern, ...]:
    """The single-part patterns whose union is ``pattern`` (itself for dense, custom or one part)."""
    if isinstance(pattern, Strided) and pattern.part is None:
        return tuple(Strided(pattern.stride, p) for p in STRIDED_PARTS)
    if isinstance(pattern, Fixed) and pattern.part is None:
        return tuple(Fixed(pattern.stride, pattern.summary, pattern.distinct, p) for p in FIXED_PARTS)
    return (pattern,)


@functools.lru_cache(maxsize=256)
def parse(spec: str) -> Pattern:
    """The built-in pattern a :attr:`Pattern.spec` string names: ``dense``, ``strided:L[:PART]``,
    ``fixed:L:C[:D[:PART]]``. Cached: compiled ops turn the same string into a pattern every call."""
    if not isinstance(spec, str):
        raise ValueError(f"a pattern spec must be a string such as 'strided:128' or 'fixed:128:32', got {spec!r}")
    name, *fields = spec.strip().split(":")
    part = fields.pop() if fields and not fields[-1].lstrip("-").isdigit() else None
    try:
        numbers = [int(f) for f in fields]
    except ValueError:
        numbers = None
    shapes = {"dense": (0, 0), "strided": (1, 1), "fixed": (2, 3)}  # (fewest, most) numbers
    if name not in shapes or numbers is None or not shapes[name][0] <= len(numbers) <= shapes[name][1]:
        raise ValueError(f"cannot read pattern spec {spec!r}; expected dense, strided:L[:row|column] or "
                         f"fixed:L:C[:D[:local|summary]]")
    return by_name(name, *numbers, part=part) if name != "dense" else by_name("dense", part=part)


def by_name(name: str, stride: int = 128, summary: int = 32, distinct: int = 1,
            part: Optional[str] = None) -> Pattern:
    """Build a built-in pattern from its name (``dense``, ``strided``, ``fixed``): for CLIs and configs."""
    if name == "dense":
        if part is not None:  # silently drawing plain dense would hide the typo
            raise ValueError(f"part must be None for the dense pattern (it has no parts), got {part!r}")
        return dense()
    if name == "strided":
        return strided(stride, part)
    if name == "fixed":
        return fixed(stride, summary, distinct, part)
    raise ValueError(f"pattern must be one of 'dense', 'strided', 'fixed', got {name!r}")
