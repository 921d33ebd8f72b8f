"""Where the time of one forward+backward of our Triton kernels goes, per launch or on the host.

Without ``--host``: CUDA time per kernel launch. With it: the CPU time to enqueue one pass, and
where it goes by function (cProfile).

    python benchmarks/profile_attention.py --pattern fixed --n 16384
    python benchmarks/profile_attention.py --pattern fixed --n 4096 --host

Same shapes and seeded inputs as ``benchmarks/attention.py`` (bf16, H = 8, D = 64, B = tokens // N).
Prints the profiler's table, sorted by CUDA time, for ``--repeats`` forward+backward passes after a
warm-up, then each launch of one pass in launch order (the table adds up launches of the same
kernel: strided's row and column parts are two launches of each).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch

from sparse_transformer.attention.triton_sparse import KernelConfig, triton_attention
from sparse_transformer.benchmark.attention import PATTERNS, inputs_for, pattern_of


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pattern", default="fixed", help=f"one of {sorted(PATTERNS)} or a pattern spec")
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--host", action="store_true",
                        help="time the CPU's enqueue of each pass (GPU idle before it) and profile it by function")
    parser.add_argument("--config", default=None, help="a kernel config string, as benchmarks/attention.py --configs")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise ValueError("profiling the kernels needs a CUDA GPU")
    pattern = pattern_of(args.pattern)
    config = KernelConfig.from_spec(args.config) if args.config else KernelConfig()
    q, k, v, grad = inputs_for(args.n, args.tokens, args.heads, args.head_dim)
    batch = q.shape[0]

    def step():
        q.grad = k.grad = v.grad = None
        triton_attention(q, k, v, pattern, args.head_dim ** -0.5, config).backward(grad)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    if args.host:
        return profile_host(step, args)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.repeats):
            step()
        torch.cuda.synchronize()
    print(f"{pattern.name}, N = {args.n:,}, B = {batch}, {args.config or 'default config'}, "
          f"{args.repeats} forward+backward passes")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
    launches = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    per_pass = len(launches) // args.repeats
    print(f"per launch, average of {args.repeats} passes ({per_pass} launches a pass):")
    for i in range(per_pass):
        us = sum(e.device_time for e in launches[i::per_pass]) / args.repeats
        print(f"  {i:2d} {launches[i].name[:48]:48s} {us:9.1f} us")
    return 0


def profile_host(step, args) -> int:
    """Each pass starts on an idle GPU, so its wall time is the host's enqueue alone."""
    def enqueue_ms() -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        elapsed = time.perf_counter() - start
        torch.cuda.synchronize()
        return elapsed * 1e3

    times = sorted(enqueue_ms() for _ in range(max(args.repeats, 20)))
    print(f"host enqueue of one forward+backward pass: median {statistics.median(times):.3f} ms, "
          f"min {times[0]:.3f}, max {times[-1]:.3f} ({len(times)} passes)")
    profiler = cProfile.Profile()
    for _ in range(args.repeats):
        torch.cuda.synchronize()
        profiler.enable()
        step()
        profiler.disable()
    torch.cuda.synchronize()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
