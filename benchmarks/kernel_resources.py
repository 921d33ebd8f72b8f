"""Registers, spilled stack bytes and shared memory of each Triton launch, compiled without a GPU.

    python benchmarks/kernel_resources.py --pattern strided --n 16384 --configs local:64,64,4,3

Records the launches of one forward and one backward pass (``triton_sparse``'s own launch code, run
on meta tensors as if on a Hopper GPU, so nothing executes), compiles each for Hopper (``--arch 90``)
with the installed Triton, specialized as its JIT would specialize the launch (16-byte aligned
pointers and integers divisible by 16 marked so: without that, no load is vectorized or pipelined
and every kernel looks like it spills), and reads ``cuobjdump -res-usage`` (ptxas and cuobjdump ship
in Triton's wheel). ``--sass`` adds instruction counts by kind from ``cuobjdump -sass``, ``--host`` the
Python host time of a pass (kernels recorded, not run). ``loads`` counts the loop loads in the kernel's IR: ``tma`` through descriptors,
``async`` pipelined copies (cp.async); a kernel with neither is not software-pipelined. A kernel at
the 255-register cap with stack bytes is spilling to local memory: read this before spending GPU
time on a tile config. Register allocation changes between Triton versions, so compare configs
with one version.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import tempfile
from unittest import mock

import torch

from sparse_transformer.attention import triton_kernels as tk
from sparse_transformer.attention import triton_sparse as ts
from sparse_transformer.benchmark.attention import PATTERNS, pattern_of

KERNELS = ("_fwd_kernel", "_dkdv_kernel", "_dq_kernel")


class _Recorder:
    """Stands in for a jitted kernel: ``kernel[grid](*args, **kwargs)`` is recorded, not run."""

    def __init__(self, name: str, calls: list):
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.name, grid, args, kwargs))


@contextlib.contextmanager
def recording(calls: list):
    """Inside, ``triton_sparse`` plans and launches as on a Hopper GPU, and every kernel launch is
    appended to ``calls`` instead of run."""
    with mock.patch.multiple(tk, **{name: _Recorder(name, calls) for name in KERNELS}), \
            mock.patch.object(ts, "_has_tma", lambda x: True), mock.patch.object(ts, "_launcher", lambda kernel: kernel):
        yield


def record_launches(pattern, n: int, config: ts.KernelConfig, batch: int = 1, heads: int = 8, head_dim: int = 64,
                    dtype=torch.bfloat16) -> list:
    """``(kernel name, grid, args, kwargs)`` of every launch of one forward and backward pass."""
    q, k, v = (torch.empty(batch, heads, n, head_dim, dtype=dtype, device="meta") for _ in range(3))
    parts = ts.plan(pattern, n)
    calls: list = []
    with recording(calls):
        out, lse = ts._forward(q, k, v, parts, head_dim ** -0.5, config)
        ts._backward(q, k, v, out, lse, torch.empty_like(q), parts, head_dim ** -0.5, config)
    return calls


def host_microseconds(pattern, n: int, config: ts.KernelConfig, batch: int = 1, heads: int = 8, head_dim: int = 64,
                      dtype=torch.bfloat16, repeats: int = 1000) -> tuple[float, float]:
    """Python host time of one forward and one backward pass, in microseconds, with the kernels
    recorded instead of launched (meta tensors): our planning and argument work, without Triton's
    launcher or the GPU. Compare two versions of the code with the same Python."""
    import time

    q, k, v = (torch.empty(batch, heads, n, head_dim, dtype=dtype, device="meta") for _ in range(3))
    parts, scale = ts.plan(pattern, n), head_dim ** -0.5
    with recording([]):
        out, lse = ts._forward(q, k, v, parts, scale, config)
        passes = (lambda: ts._forward(q, k, v, parts, scale, config),
                  lambda: ts._backward(q, k, v, out, lse, torch.empty_like(q), parts, scale, config))
        times = []
        for run_pass in passes:
            run_pass()  # plans are cached after the first call, as in a training loop
            start = time.perf_counter()
            for _ in range(repeats):
                run_pass()
            times.append((time.perf_counter() - start) / repeats * 1e6)
    return times[0], times[1]


def compile_like_jit(kernel, args: tuple, kwargs: dict, arch: int = 90):
    """Compile one launch for ``sm_<arch>`` as ``kernel[grid](*args, **kwargs)`` would on such a GPU:
    the JIT's own binder picks the specialization (constexprs, divisibility by 16, descriptors)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def resources(name: str, args: tuple, kwargs: dict, arch: int = 90) -> dict:
    """Compile one recorded launch for ``sm_<arch>``: registers, stack (spill) bytes, shared memory,
    and the loop loads by kind in its IR."""
    import triton

    compiled = compile_like_jit(getattr(tk, name), args, kwargs, arch)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, f"{name}.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no register count for {name}: {usage[-500:]}")
    ir = compiled.asm["ttgir"]
    return dict(registers=int(found[1]), stack_bytes=int(found[2]), shared_kib=compiled.metadata.shared / 1024,
                warps=kwargs.get("num_warps", 4), stages=kwargs.get("num_stages", 3),
                tma_loads=ir.count("async_tma_copy_global_to_local"), async_loads=ir.count("async_copy_global_to_local"),
                sass=sass_counts(sass))


# SASS opcode groups worth comparing between two versions of a kernel (tensor-core matmuls, the
# special-function unit: exponentials and reciprocals, global loads, integer index arithmetic and
# selects, float arithmetic and the masking selects, branches and barriers).
SASS_GROUPS = {"mma": ("HGMMA", "HMMA"), "mufu": ("MUFU",), "load": ("LDG", "LDGSTS", "UTMALDG"),
               "int": ("IMAD", "IADD3", "VIADD", "ISETP", "LEA", "SHF", "LOP3", "SEL", "UIMAD", "UIADD3", "UISETP",
                       "ULEA", "USHF", "ULOP3", "USEL"),
               "float": ("FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "FSETP"), "control": ("BRA", "BAR", "SYNCS")}


def sass_counts(sass: str) -> dict:
    """Instructions of a ``cuobjdump -sass`` listing, in all and per :data:`SASS_GROUPS` group."""
    ops = re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass, flags=re.M)
    counts = {group: sum(op in names for op in ops) for group, names in SASS_GROUPS.items()}
    return dict(total=len(ops), **counts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pattern", default="strided", help=f"one of {sorted(PATTERNS)} or a pattern spec")
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--tokens", type=int, default=65536, help="B * N, as in benchmarks/attention.py")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    parser.add_argument("--configs", nargs="*", default=[], help="config strings, as benchmarks/attention.py")
    parser.add_argument("--host", action="store_true",
                        help="also time our Python host work per forward and backward pass (launches recorded, not run)")
    parser.add_argument("--sass", action="store_true",
                        help="also count SASS instructions by kind (to compare two versions of the code: run each "
                             "with its own src on PYTHONPATH)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise ValueError("unset TRITON_INTERPRET: the interpreter compiles nothing")
    for text in ["default"] + args.configs:
        config = ts.KernelConfig() if text == "default" else ts.KernelConfig.from_spec(text)
        print(f"{args.pattern}, N = {args.n:,}, {text}, sm_{args.arch}:")
        batch = max(1, args.tokens // args.n)
        if args.host:
            forward, backward = host_microseconds(pattern_of(args.pattern), args.n, config, batch=batch)
            print(f"  host (Python, launches recorded): forward {forward:.1f} us, backward {backward:.1f} us", flush=True)
        launches = record_launches(pattern_of(args.pattern), args.n, config, batch=batch)
        for i, (name, grid, launch_args, kwargs) in enumerate(launches):
            tiles = f"{kwargs.get('BLOCK_M')}x{kwargs['BLOCK_N']}" if "BLOCK_N" in kwargs else f"{kwargs['BLOCK_M']}"
            r = resources(name, launch_args, kwargs, args.arch)
            print(f"  {i} {name:14s} mode {kwargs.get('MODE', '-')!s:2s} tiles {tiles:7s} warps {r['warps']} "
                  f"stages {r['stages']}  registers {r['registers']:3d}  stack {r['stack_bytes']:4d} B  "
                  f"shared {r['shared_kib']:5.1f} KiB  loads tma {r['tma_loads']:2d} async {r['async_loads']:2d}  "
                  f"programs {grid[0]:,}", flush=True)
            if args.sass:
                print("      sass: " + ", ".join(f"{k} {v}" for k, v in r["sass"].items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
