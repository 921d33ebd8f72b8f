"""Attention patterns: unions of primitive parts, each a small pure mask function.

A pattern answers one question: may query ``i`` attend to key ``j``? Its answer is its
``mask_mod(b, h, q_idx, kv_idx) -> bool`` (the FlexAttention convention). All patterns are causal:
``j <= i`` is always added (PAPER.md, "Factorized attention"). Parts, 0-based, ``u = head % distinct``:

- ``local(window)``:                 ``0 <= i - j < window``
- ``column(stride)``:                ``(i - j) % stride == 0``
- ``block(size)``:                   ``i // size == j // size``
- ``summary(stride, summary, distinct=1)``: ``j % stride`` in ``[stride - (u+1) summary, stride - u summary)``
- ``global_tokens(count)``:          ``j < count``
- ``dense()``:                       every ``j <= i``

``union(a, b, ...)`` or ``a | b`` attends to all of them with one softmax, each key once. The
paper's patterns are unions: ``strided(l) = local(l) | column(l)``, ``fixed(l, c, d) =
block(l) | summary(l, c, d)``. ``custom(fn)`` wraps any mask function. Every built-in pattern has
a ``spec`` string, and ``parse(spec)`` gives it back.

A new part is one module here (a frozen dataclass subclassing :class:`Part`, with its mask
function and the forms in ``base.Part``), listed in :data:`PARTS`, plus its tests.
"""

from .base import MAX_LENGTH, MAX_PARAMETER, MaskMod, Part, Pattern
from .block import Block
from .column import Column
from .custom import Custom, custom
from .dense import Dense
from .global_tokens import GlobalTokens, global_tokens
from .local import Local
from .paper import FIXED_PARTS, STRIDED_PARTS, Fixed, Strided, fixed, pieces, strided
from .spec import by_name, parse
from .summary import Summary
from .union import Union, union

PARTS = (Dense, Local, Column, Block, Summary, GlobalTokens)
"""Every primitive part (the spec parser reads their tokens)."""


def dense() -> Dense:
    """Full causal attention (the baseline the factorized patterns approximate)."""
    return Dense()


def local(window: int) -> Local:
    """Sliding window: ``0 <= i - j < window``."""
    return Local(window)


def column(stride: int) -> Column:
    """Every ``stride``-th position back: ``(i - j) % stride == 0``."""
    return Column(stride)


def block(size: int) -> Block:
    """The query's own block: ``i // size == j // size``."""
    return Block(size)


def summary(stride: int, summary: int, distinct: int = 1) -> Summary:
    """The last ``summary`` positions of every block of ``stride`` (head ``h`` uses the
    ``(h % distinct)``-th such sub-block from the end)."""
    return Summary(stride, summary, distinct)


def parts(pattern: Pattern) -> tuple[Pattern, ...]:
    """The one-part patterns whose union is ``pattern`` (the paper's names for strided and fixed;
    itself for dense, custom or one part): what interleaved and split layers use."""
    return pieces(pattern)


__all__ = ["Pattern", "Part", "Union", "MaskMod", "PARTS", "MAX_PARAMETER", "MAX_LENGTH",
           "dense", "local", "column", "block", "summary", "union", "strided", "fixed", "custom",
           "global_tokens", "parse", "by_name", "parts", "Dense", "Local", "Column", "Block", "Summary",
           "GlobalTokens", "Strided", "Fixed",
           "Custom", "STRIDED_PARTS", "FIXED_PARTS"]
