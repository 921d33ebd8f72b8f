"""Attention benchmark (issue 4): ``python benchmarks/attention.py --help``; same as
``sparse-transformer bench attention``. Implementation: sparse_transformer/benchmark/attention.py."""

import sys

from sparse_transformer.cli import main

if __name__ == "__main__":  # through the CLI: bad arguments get its one-line error, not a traceback
    raise SystemExit(main(["bench", "attention", *sys.argv[1:]]))
