"""Argument types shared by the subcommands: counts checked when parsed, so argparse names the flag."""

from __future__ import annotations

import argparse
import math


def _checked(convert, accepts, expected: str, name: str, unreadable: str = ""):
    """An argparse type: ``convert(text)`` if ``accepts`` it, else "expected EXPECTED, got ..." (an
    int out of range shown as read, anything else as typed; ``unreadable`` replaces ``expected`` for
    text that does not convert). ``name`` is what argparse calls the type in its own messages."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {unreadable or expected}, got {text!r}") from None
        if not accepts(value):
            shown = value if isinstance(value, int) else repr(text)
            raise argparse.ArgumentTypeError(f"expected {expected}, got {shown}")
        return value
    parse.__name__ = name
    return parse


def _int_at_least(low: int):
    return _checked(int, lambda value: value >= low, f"an int >= {low}", f"int >= {low}")


positive_int = _int_at_least(1)
"""An int >= 1 (a count or size where 0 or less has no meaning)."""

nonnegative_int = _int_at_least(0)
"""An int >= 0 (0: none)."""

seed = _checked(int, lambda value: -2 ** 63 <= value < 2 ** 64, "an int in [-2**63, 2**64 - 1]", "seed",
                unreadable="an int")
"""A random seed torch takes (a larger one failed only when the generator was seeded, as "Overflow
when unpacking long long", naming no flag)."""

nonnegative_float = _checked(float, lambda value: math.isfinite(value) and value >= 0, "a finite number >= 0",
                             "number >= 0")
"""A finite float >= 0 (checked when parsed, before a model is loaded or a folder made)."""

probability = _checked(float, lambda value: 0 < value <= 1, "a number in (0, 1]", "number in (0, 1]")
"""A number in (0, 1] (a nucleus mass for top-p); NaN fails too."""

ALL = "all"


def positive_int_or_all(text: str):
    """An int >= 1, or ``all`` (returned as :data:`ALL`): a limit that may be lifted."""
    if text.strip().lower() == ALL:
        return ALL
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1 or 'all', got {text!r}") from None


positive_int_or_all.__name__ = "int >= 1 or 'all'"


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where its help already says it or the default is None
    (``--steps ... (default: fill the context) (default: None)`` read twice)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default:" in text or action.default is None:
            return text
        return super()._get_help_string(action)
