"""Registers, spilled stack bytes and shared memory of each Triton launch, compiled without a GPU.

    python benchmarks/kernel_resources.py --pattern strided --n 16384 --configs local:64,64,4,3

Records the launches of one forward and one backward pass (``triton_sparse``'s own launch code, run
on meta tensors, so nothing executes), compiles each for Hopper (``--arch 90``) with the installed
Triton, and reads ``cuobjdump -res-usage`` (ptxas and cuobjdump ship in Triton's wheel). A kernel
at the 255-register cap with stack bytes is spilling to local memory, and its occupancy is two or
three programs per SM: read this before spending GPU time on a tile config. Register allocation
changes between Triton versions, so compare configs with one version.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from unittest import mock

import torch

from sparse_transformer.attention import triton_kernels as tk
from sparse_transformer.attention import triton_sparse as ts
from sparse_transformer.benchmark.attention import PATTERNS, parse_config

KERNELS = ("_fwd_kernel", "_delta_kernel", "_dkdv_kernel", "_dq_kernel")
TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}


class _Recorder:
    """Stands in for a jitted kernel: ``kernel[grid](*args, **kwargs)`` is recorded, not run."""

    def __init__(self, name: str, calls: list):
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.name, grid, args, kwargs))


def record_launches(pattern, n: int, config: ts.KernelConfig, batch: int = 1, heads: int = 8, head_dim: int = 64,
                    dtype=torch.bfloat16) -> list:
    """``(kernel name, grid, args, kwargs)`` of every launch of one forward and backward pass."""
    q, k, v = (torch.empty(batch, heads, n, head_dim, dtype=dtype, device="meta") for _ in range(3))
    parts = ts.plan(pattern, n)
    calls: list = []
    with mock.patch.multiple(tk, **{name: _Recorder(name, calls) for name in KERNELS}):
        out, lse = ts._forward(q, k, v, parts, head_dim ** -0.5, config)
        ts._backward(q, k, v, out, lse, torch.empty_like(q), parts, head_dim ** -0.5, config)
    return calls


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    return "fp32" if isinstance(value, float) else "i32"


def resources(name: str, args: tuple, kwargs: dict, arch: int = 90) -> dict:
    """Compile one recorded launch for ``sm_<arch>``: registers, stack (spill) bytes, shared memory."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(tk, name)
    options = {key: kwargs[key] for key in ("num_warps", "num_stages") if key in kwargs}
    constexprs = {key: value for key, value in kwargs.items() if key not in options}
    runtime = [arg for arg in kernel.arg_names if arg not in constexprs]
    signature = {arg: "constexpr" if arg in constexprs else _arg_type(args[runtime.index(arg)])
                 for arg in kernel.arg_names}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", arch, 32),
                              options=options)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, f"{name}.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no register count for {name}: {usage[-500:]}")
    return dict(registers=int(found[1]), stack_bytes=int(found[2]), shared_kib=compiled.metadata.shared / 1024,
                warps=options.get("num_warps", 4), stages=options.get("num_stages", 3))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pattern", choices=sorted(PATTERNS), default="strided")
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--tokens", type=int, default=65536, help="B * N, as in benchmarks/attention.py")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    parser.add_argument("--configs", nargs="*", default=[], help="config strings, as benchmarks/attention.py")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise ValueError("unset TRITON_INTERPRET: the interpreter compiles nothing")
    for text in ["default"] + args.configs:
        config = ts.KernelConfig() if text == "default" else parse_config(text)
        print(f"{args.pattern}, N = {args.n:,}, {text}, sm_{args.arch}:")
        launches = record_launches(PATTERNS[args.pattern], args.n, config, batch=max(1, args.tokens // args.n))
        for i, (name, grid, launch_args, kwargs) in enumerate(launches):
            tiles = f"{kwargs.get('BLOCK_M')}x{kwargs['BLOCK_N']}" if "BLOCK_N" in kwargs else f"{kwargs['BLOCK_M']}"
            r = resources(name, launch_args, kwargs, args.arch)
            print(f"  {i} {name:14s} mode {kwargs.get('MODE', '-')!s:2s} tiles {tiles:7s} warps {r['warps']} "
                  f"stages {r['stages']}  registers {r['registers']:3d}  stack {r['stack_bytes']:4d} B  "
                  f"shared {r['shared_kib']:5.1f} KiB  programs {grid[0]:,}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
