"""Argument types shared by the subcommands: counts checked when parsed, so argparse names the flag."""

from __future__ import annotations

import argparse
import math


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {value}")
        return value
    parse.__name__ = f"int >= {low}"
    return parse


positive_int = _int_at_least(1)
"""An int >= 1 (a count or size where 0 or less has no meaning)."""

nonnegative_int = _int_at_least(0)
"""An int >= 0 (0: none)."""



def seed(text: str) -> int:
    """A random seed torch takes: an int in [-2**63, 2**64 - 1] (a larger one failed only when the
    generator was seeded, as "Overflow when unpacking long long", naming no flag)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
    if not -2 ** 63 <= value < 2 ** 64:
        raise argparse.ArgumentTypeError(f"expected an int in [-2**63, 2**64 - 1], got {value}")
    return value


def nonnegative_float(text: str) -> float:
    """A finite float >= 0 (checked when parsed, before a model is loaded or a folder made)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


nonnegative_float.__name__ = "number >= 0"


def probability(text: str) -> float:
    """A number in (0, 1] (a nucleus mass for top-p)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


probability.__name__ = "number in (0, 1]"

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
