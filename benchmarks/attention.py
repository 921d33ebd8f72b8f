"""Attention benchmark (issue 4): ``python benchmarks/attention.py --help``; same as
``sparse-transformer bench attention``. Implementation: sparse_transformer/benchmark/attention.py."""

from sparse_transformer.benchmark.attention import main

if __name__ == "__main__":
    raise SystemExit(main())
