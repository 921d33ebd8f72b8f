"""Training-step benchmark (the model-step issue): ``python benchmarks/train_step.py --help``; same as
``sparse-transformer bench train``. Implementation: sparse_transformer/benchmark/train_step.py."""

import sys

from sparse_transformer.cli import main

if __name__ == "__main__":  # through the CLI: bad arguments get its one-line error, not a traceback
    raise SystemExit(main(["bench", "train", *sys.argv[1:]]))
