"""Training-step benchmark (the model-step issue): ``python benchmarks/train_step.py --help``; same as
``sparse-transformer bench train``. Implementation: sparse_transformer/benchmark/train_step.py."""

from sparse_transformer.benchmark.train_step import main

if __name__ == "__main__":
    raise SystemExit(main())
