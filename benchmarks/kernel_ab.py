"""Variants of ``triton_kernels.py`` interleaved in one process: fwd, bwd, fwd+bwd median ms each.

    python benchmarks/kernel_ab.py --rounds 7 --cases fixed:16384,strided:16384 \\
        A=src/sparse_transformer/attention/triton_kernels.py B=/tmp/variant.py B64=/tmp/variant.py@dq:64,64,4,2

Machines of one kind differ from call to call (the same strided kernels at 16,384 measured 1.01 and
1.34 ms fwd+bwd in two calls on H200s), so numbers from separate runs do not compare. This loads each
variant file as its own module, swaps it into ``triton_sparse`` between timings, round after round,
and prints each variant's median (and the spread of its fwd+bwd). ``@CONFIG`` takes a kernel config
string (``benchmarks/attention.py --configs``). Per case it also checks every variant's output and
gradients against the first variant's (relative norm of the difference), and measures the host's
cost of one fwd+bwd: CPU time to enqueue a pass, without waiting for the GPU. A pass whose CPU time
is near its GPU time measures the host, not the kernels. Same shapes as ``benchmarks/attention.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time

import torch

from sparse_transformer.attention import triton_sparse
from sparse_transformer.attention.triton_sparse import KernelConfig, triton_attention
from sparse_transformer.benchmark.attention import PATTERNS, _time, inputs_for


def load_variant(path: str, name: str):
    """``path`` (a copy of triton_kernels.py) as a module of its own."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # Triton's JIT looks its functions' module up by name
    spec.loader.exec_module(module)
    return module


def parse_variant(text: str, index: int):
    name, _, rest = text.partition("=")
    path, _, config = rest.partition("@")
    if not name or not path:
        raise ValueError(f"expected NAME=PATH[@CONFIG], got {text!r}")
    return name, load_variant(path, f"kernel_variant_{index}"), KernelConfig.from_spec(config) if config else KernelConfig()


def passes(q, k, v, grad, pattern, config):
    """One fwd+bwd of the triton backend, gradients reset first."""
    q.grad = k.grad = v.grad = None
    out = triton_attention(q, k, v, pattern, q.shape[-1] ** -0.5, config)
    out.backward(grad)
    return out


def host_ms(q, k, v, grad, pattern, config, repeats: int = 30) -> float:
    """CPU milliseconds to enqueue one fwd+bwd (the GPU drained before, not waited on after)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        passes(q, k, v, grad, pattern, config)
    spent = time.perf_counter() - start
    torch.cuda.synchronize()
    return 1e3 * spent / repeats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", help="NAME=PATH[@CONFIG]: a copy of triton_kernels.py")
    parser.add_argument("--cases", default="fixed:16384,strided:16384", help="PATTERN:N items joined by commas")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=65536)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise ValueError("the kernel A/B needs a CUDA GPU")
    variants = [parse_variant(text, i) for i, text in enumerate(args.variants)]
    committed = triton_sparse.tk
    try:
        for case in args.cases.split(","):
            name, _, n = case.partition(":")
            if name not in PATTERNS or not n.isdigit():
                raise ValueError(f"--cases: expected PATTERN:N with PATTERN in {sorted(PATTERNS)}, got {case!r}")
            run_case(PATTERNS[name], name, int(n), variants, args.rounds, args.tokens)
    finally:
        triton_sparse.tk = committed
    return 0


def run_case(pattern, label: str, n: int, variants, rounds: int, tokens: int) -> None:
    q, k, v, grad = inputs_for(n, tokens)
    first = None
    for name, module, config in variants:  # agreement with the first variant
        triton_sparse.tk = module
        out = passes(q, k, v, grad, pattern, config)
        got = [out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()]
        if first is None:
            first = got
            continue
        diff = max(float((a - b).norm() / b.norm()) for a, b in zip(got, first))
        print(f"  {label} {n}: {name} differs from {variants[0][0]} by {diff:.3g} (relative norm, worst tensor)")
    times = {name: [] for name, _, _ in variants}
    for _ in range(rounds):
        for name, module, config in variants:
            triton_sparse.tk = module
            times[name].append(_time(lambda: triton_attention(q, k, v, pattern, q.shape[-1] ** -0.5, config), grad,
                                     (q, k, v)))
    for name, module, config in variants:
        fwd, bwd, both = (statistics.median(t[i] for t in times[name]) for i in range(3))
        spread = [t[2] for t in times[name]]
        triton_sparse.tk = module
        host = host_ms(q, k, v, grad, pattern, config)
        print(f"{label:8s} {n:>9,d} {name:16s} fwd {fwd:7.3f} bwd {bwd:7.3f} fwd+bwd {both:7.3f} "
              f"(range {min(spread):.3f}-{max(spread):.3f})  host {host:6.3f} ms/pass", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
