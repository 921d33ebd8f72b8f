"""``sparse-transformer bench attention``: kernel benchmark (needs a CUDA GPU)."""

from __future__ import annotations

from .arguments import DefaultsHelpFormatter


def add_parser(sub) -> None:
    parser = sub.add_parser("bench", help="benchmarks (attention kernels vs dense SDPA and FlexAttention)")
    which = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    attention = which.add_parser("attention", help="Triton kernels vs dense SDPA flash and FlexAttention",
                                 formatter_class=DefaultsHelpFormatter)
    from ..benchmark.attention import add_arguments
    add_arguments(attention)
    attention.set_defaults(func=_run_attention)


def _run_attention(args) -> int:
    from ..benchmark.attention import run_cli
    return run_cli(args)
