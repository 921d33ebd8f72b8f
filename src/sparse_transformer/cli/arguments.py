"""Argument types shared by the subcommands: counts checked when parsed, so argparse names the flag."""

from __future__ import annotations

import argparse


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
