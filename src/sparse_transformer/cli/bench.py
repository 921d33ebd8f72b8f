"""``sparse-transformer bench attention | train``: kernel and training-step benchmarks (need a CUDA GPU).

The benchmark modules import Triton; they are imported only when a benchmark runs, so the CLI
works without it."""

from __future__ import annotations

import argparse
import importlib

from .arguments import DefaultsHelpFormatter

# name -> (module under sparse_transformer.benchmark, help)
BENCHMARKS = {
    "attention": ("attention", "Triton kernels vs dense SDPA flash and FlexAttention"),
    "train": ("train_step", "the trainer's step (ours: dense, strided, fixed) vs a plain compiled GPT"),
}


def add_parser(sub) -> None:
    parser = sub.add_parser("bench", help="benchmarks (attention kernels; the training step)")
    which = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, (module, text) in BENCHMARKS.items():
        bench = which.add_parser(name, help=text, formatter_class=DefaultsHelpFormatter)
        bench.set_defaults(func=_runner(module))
        # Arguments are declared by the module, imported only to build this parser's help: argparse
        # needs them before it can parse. Modules import Triton lazily (inside their functions).
        _benchmark(module).add_arguments(bench)


def _benchmark(module: str):
    return importlib.import_module(f"..benchmark.{module}", __package__)


def _runner(module: str):
    def run(args: argparse.Namespace) -> int:
        return _benchmark(module).run_cli(args)
    return run
