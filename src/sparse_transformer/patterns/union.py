"""Unions of parts, attended with one softmax.

``union(a, b, ...)`` (or ``a | b``) flattens nested unions, drops parts another part contains
(dense contains everything), and sorts the rest into a canonical order (global tokens, local,
block, column, summary; then by size). Order matters only for bookkeeping: a key admitted by two
parts belongs to the earlier one, so every backend counts it once. A union of one part is that
part; the paper's two unions come back as :class:`~.paper.Strided` and :class:`~.paper.Fixed`.
"""

from __future__ import annotations

from .base import Part, Pattern


class Union(Pattern):
    """Any union of two or more primitive parts (build it with :func:`union`)."""

    __slots__ = ("_parts",)

    def __init__(self, parts: tuple[Part, ...]):
        object.__setattr__(self, "_parts", tuple(parts))

    def __setattr__(self, name, value):
        raise AttributeError("patterns are immutable")

    @property
    def parts(self) -> tuple[Part, ...]:
        return self._parts

    def __repr__(self) -> str:
        return f"union({', '.join(repr(p) for p in self._parts)})"


def canonical_parts(patterns) -> tuple[Part, ...]:
    """The parts of ``patterns`` (patterns or parts), flattened, deduplicated and sorted; parts
    that another part contains are dropped."""
    found: list[Part] = []
    for index, pattern in enumerate(patterns):
        if not isinstance(pattern, Pattern):
            raise ValueError(f"union argument {index} must be a pattern from st.patterns, got "
                             f"{type(pattern).__name__} {pattern!r}")
        if pattern.spec is None:
            raise ValueError(f"union argument {index} is a custom pattern ({pattern.name}); unions take built-in "
                             f"parts only (write one custom mask function that ORs the rules instead)")
        found.extend(pattern.parts)
    if not found:
        raise ValueError("union needs at least one pattern, got none")
    unique = list(dict.fromkeys(found))  # parts compare by spec
    kept = [p for p in unique if not any(other.contains(p) for other in unique if other != p)]
    return tuple(sorted(kept, key=Part.sort_key))


def union(*patterns: Pattern) -> Pattern:
    """The union of ``patterns`` under one softmax (the paper's "merged" head).

    ``union(local(128), column(128))`` is ``strided(128)``; ``union(local(256), global_tokens(16))``
    is a sliding window plus 16 global tokens. Returns a part when one part remains.
    """
    from .paper import paper_name

    parts = canonical_parts(patterns)
    if len(parts) == 1:
        return parts[0]
    return paper_name(parts) or Union(parts)
