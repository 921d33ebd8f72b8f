"""``sparse-transformer`` command line: thin subcommands over the library.

Each subcommand lives in its own module with ``add_parser(subparsers)`` that registers it and
sets ``func``; this file only collects them.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import bench as bench_cmd
from . import data as data_cmd
from . import eval as eval_cmd
from . import patterns as patterns_cmd
from . import sample as sample_cmd
from . import train as train_cmd

COMMANDS = (train_cmd, eval_cmd, sample_cmd, data_cmd, patterns_cmd, bench_cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparse-transformer",
        description="Sparse Transformer: factorized attention, training and sampling on byte sequences.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation the CPU or GPU refused (torch raises these as RuntimeError)."""
    text = str(err).lower()
    return isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError" or (
        "can't allocate memory" in text or "out of memory" in text)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    # Bad input, and what the machine refused (no network, disk full, a file in the way): one clear
    # line, no traceback.
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as err:  # what the machine refused: one line, not a traceback
        if not out_of_memory(err):
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        print(f"error: out of memory ({first}); ask for less (a smaller batch, --n, context or model)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside training (which checkpoints and returns 130 itself)
        print("interrupted", file=sys.stderr)
        return 130
