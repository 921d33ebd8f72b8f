"""Pattern spec strings: ``parse(pattern.spec) == pattern`` for every built-in pattern.

Grammar: parts joined by ``+``, each a token and its integer arguments joined by ``:`` (spaces
around either are ignored): ``local:W``, ``column:S``, ``block:S``, ``summary:S:C`` or
``summary:S:C:D``, ``global_tokens:N``, ``dense``, and the paper's names ``strided:L``,
``fixed:L:C``, ``fixed:L:C:D`` (a trailing ``:row``, ``:column``, ``:local`` or ``:summary``
picks one of their two parts). Examples: ``local:256+global_tokens:16``, ``fixed:128:32:4``.
The same strings are the CLI's ``--pattern`` and the config's ``model.pattern``.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Optional

from .base import MAX_PARAMETER, Pattern
from .paper import FIXED_PARTS, STRIDED_PARTS, fixed, strided

PAPER = {"strided": strided, "fixed": fixed}


def _form(token: str, cls) -> str:
    """``summary:stride:summary[:distinct]``: how a token is written, from its fields."""
    fields = [f for f in dataclasses.fields(cls) if f.name != "part"]
    return token + "".join(f"[:{f.name}]" if f.default is not dataclasses.MISSING else f":{f.name}" for f in fields)


def forms() -> dict[str, str]:
    """Every token the parser knows and how it is written."""
    from . import PARTS
    from .paper import Fixed, Strided
    known = {part.token: _form(part.token, part) for part in PARTS}
    known.update(strided=_form("strided", Strided), fixed=_form("fixed", Fixed))
    return known


def _term(text: str, spec: str) -> Pattern:
    from . import PARTS
    token, *fields = (x.strip() for x in text.split(":"))
    builders = {part.token: part for part in PARTS} | PAPER
    if token not in builders:
        raise ValueError(f"pattern spec {spec!r}: unknown part {token!r}; known: {', '.join(forms().values())}")
    piece = {}
    if token in PAPER and fields and fields[-1] in STRIDED_PARTS + FIXED_PARTS:  # "strided:8:row" reads too
        piece["part"] = fields.pop()
    if not all(re.fullmatch(r"-?[0-9]+", x) for x in fields):  # int() also takes "4_0", other digits
        raise ValueError(f"pattern spec {spec[:80]!r}: {text.strip()[:40]!r} needs integer arguments, "
                         f"written {forms()[token]}")
    if any(len(x) > 30 for x in fields):  # an integer, but int() of 5000 digits is slow, and no size is that large
        raise ValueError(f"pattern spec {spec[:80]!r}: {text.strip()[:40]!r} needs integer arguments of at most 30 "
                         f"digits (sizes are at most {MAX_PARAMETER:,})")
    args = [int(x) for x in fields]
    try:
        return builders[token](*args, **piece)
    except TypeError:  # too many or too few numbers
        raise ValueError(f"pattern spec {spec!r}: {text.strip()!r} has {len(args)} numbers, "
                         f"expected {forms()[token]}") from None
    except ValueError as err:  # a size out of range: say which part of a longer spec holds it
        raise ValueError(f"pattern spec {spec[:80]!r}: {text.strip()[:40]!r}: {err}") from None


def parse(spec: str) -> Pattern:
    """The built-in pattern written ``spec`` (see the module docstring). Cached: cheap to call
    per forward pass (the triton custom op receives its pattern as this string)."""
    if not isinstance(spec, str):  # checked before the cache, which would fail on an unhashable list
        raise ValueError(f"pattern spec must be a string such as 'local:256+global_tokens:16', got "
                         f"{type(spec).__name__} {spec!r}")
    return _parse(spec)


@functools.lru_cache(maxsize=1024)
def _parse(spec: str) -> Pattern:
    terms = spec.split("+")
    if not spec.strip() or any(not t.strip() for t in terms):
        raise ValueError(f"pattern spec {spec!r} has an empty part; write parts joined by '+', "
                         f"e.g. 'local:256+global_tokens:16'")
    from .union import union
    return union(*(_term(t, spec) for t in terms))


def by_name(name: str, stride: int = 128, summary: int = 32, distinct: int = 1,
            part: Optional[str] = None) -> Pattern:
    """A pattern from a config's or the CLI's fields: ``dense``, ``strided`` or ``fixed`` with
    ``stride``/``summary``/``distinct``/``part``, or any spec string (then ``part`` must be None)."""
    if name == "strided":
        return strided(stride, part)
    if name == "fixed":
        return fixed(stride, summary, distinct, part)
    if part is not None:  # silently drawing the whole pattern would hide the typo
        raise ValueError(f"part must be None for the {name} pattern (part picks a piece of 'strided' or "
                         f"'fixed'), got {part!r}")
    try:
        return parse(name)
    except ValueError as err:
        raise ValueError(f"pattern must be one of 'dense', 'strided', 'fixed' or a spec such as "
                         f"'local:256+global_tokens:16' ({err})") from None


