"""Kernel configs side by side, one line each: fwd, bwd, fwd+bwd median ms of the triton backend.

    python benchmarks/kernel_sweep.py strided 16384 local:64,64,4,2 dkdv:32,128,4,3/dq:128,32,4,3

Same shapes and timing as ``benchmarks/attention.py`` (bf16, H = 8, D = 64, B = 65,536 // N); the
first line is the default ``KernelConfig``, then one per config string (``--configs`` syntax of
attention.py). ``dense`` also times SDPA flash attention, to compare our kernels' efficiency with
it on the same work. For quick A/B runs on the device; attention.py writes the committed tables.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from sparse_transformer.attention.triton_sparse import KernelConfig, triton_attention
from sparse_transformer.benchmark.attention import PATTERNS, _time, inputs_for, pattern_of


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pattern", help=f"one of {sorted(PATTERNS)} or a pattern spec")
    parser.add_argument("n", type=int)
    parser.add_argument("configs", nargs="*", help="config strings, as benchmarks/attention.py --configs")
    parser.add_argument("--tokens", type=int, default=65536)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise ValueError("the kernel sweep needs a CUDA GPU")
    pattern = pattern_of(args.pattern)
    q, k, v, grad = inputs_for(args.n, args.tokens)
    runs = []
    if args.pattern == "dense":
        runs.append(("sdpa", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)))
    for text in ["default"] + args.configs:
        config = KernelConfig() if text == "default" else KernelConfig.from_spec(text)
        runs.append((text, lambda config=config: triton_attention(q, k, v, pattern, 64 ** -0.5, config)))
    for name, fn in runs:
        t_f, t_b, t_fb = _time(fn, grad, (q, k, v))
        print(f"{args.pattern:8s} {args.n:>8,d} {name:44s} fwd {t_f:7.3f} bwd {t_b:7.3f} fwd+bwd {t_fb:7.3f}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
