"""Attention benchmark: our Triton kernels against dense SDPA flash attention and FlexAttention.

Forward, backward and forward+backward median milliseconds (``triton.testing.do_bench``), achieved
TFLOP/s on the pattern's real work (admissible pairs from ``layout.cost``: 4 D FLOPs per pair
forward, 10 D backward), and peak GPU memory; each complete Flex form's JSON row also holds its
largest relative error against ours (output and the three gradients). ``B = tokens // N`` (at least 1). Dense is SDPA on each
of its fused backends (flash, cuDNN, memory-efficient) and its own choice. Flex is timed in every
form of ``flex_forms``: as-is, per part in each of the part's forms (the fastest summed:
"decomposed"), the parts with their merge as one function, and concatenated. Writes
``<out>/<gpu-name>.json`` and ``.md``. Run: ``sparse-transformer bench attention`` or
``python benchmarks/attention.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn.functional as F

from .. import patterns as P
from ..attention import fa4, sparse_attention
from ..attention.concatenated import concatenated_supported
from ..layout import cost
from . import ResultsFile, allow_recompiles, fa4_forms, file_stem, flex_forms

if TYPE_CHECKING:  # Triton is optional: the kernels' module is imported where they run
    from ..attention.triton_sparse import KernelConfig

# The patterns the kernel benchmarks time, name -> pattern: issue 4's settings, then issue 27's unions
# (a sliding window with global tokens; a window, a dilated column and global tokens).
PATTERNS = {"strided": P.strided(128), "fixed": P.fixed(128, 32), "dense": P.dense(),
            "window_global": P.local(512) | P.global_tokens(64),
            "window_column_global": P.local(128) | P.column(128) | P.global_tokens(16)}
DEFAULT_PATTERNS = ("strided", "fixed", "window_global", "window_column_global")


def pattern_of(name: str) -> P.Pattern:
    """A pattern of :data:`PATTERNS` by name, or any pattern spec (``local:512+global_tokens:64``)."""
    return PATTERNS[name] if name in PATTERNS else P.parse(name)


@dataclass
class Row:
    pattern: str
    n: int
    batch: int
    method: str
    fwd_ms: Optional[float]
    bwd_ms: Optional[float]
    fwdbwd_ms: Optional[float]
    tflops: Optional[float]  # forward+backward, on the pattern's real pairs
    peak_gib: Optional[float]
    note: str = ""
    error: Optional[float] = None  # a complete Flex form's largest relative error against ours (see relative_error)


def _time(fn: Callable[[], torch.Tensor], grad: torch.Tensor, inputs) -> tuple[float, float, float]:
    from triton.testing import do_bench

    def fwd():
        with torch.no_grad():
            fn()

    def fwdbwd():
        fn().backward(grad)

    t_f = do_bench(fwd, warmup=25, rep=100, return_mode="median")
    t_fb = do_bench(fwdbwd, warmup=25, rep=100, grad_to_none=list(inputs), return_mode="median")
    return t_f, t_fb - t_f, t_fb


def _peak(fn, grad, inputs) -> float:
    for x in inputs:
        x.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn().backward(grad)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2 ** 30


def relative_error(fn, reference, q, k, v, grad) -> float:
    """Largest relative norm of the difference, over the output and the three gradients."""
    results = []
    for f in (fn, reference):
        out = f()
        results.append([out, *torch.autograd.grad(out, (q, k, v), grad)])
    return max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(*results))


def measure(label: str, method: str, fn, n, batch, pairs_per_head, heads, d, grad, inputs, note="",
            reference: Optional[Callable[[], torch.Tensor]] = None) -> Row:
    """Times ``fn`` (forward, forward+backward) and its peak memory; with ``reference`` (ours) also its
    :func:`relative_error` against it. A failure is recorded in the row, not raised."""
    try:
        out = fn()
        if not torch.isfinite(out).all() and "column" not in method:
            raise RuntimeError("non-finite output")
        del out
        t_f, t_b, t_fb = _time(fn, grad, inputs)
        peak = _peak(fn, grad, inputs)
    except Exception as err:  # record and keep going (out of memory, a form a library refuses, ...)
        torch.cuda.empty_cache()
        return Row(label, n, batch, method, None, None, None, None, None, f"failed: {str(err)[:120]}")
    flops = 14 * d * pairs_per_head * heads * batch
    row = Row(label, n, batch, method, t_f, t_b, t_fb, flops / (t_fb * 1e-3) / 1e12, peak, note)
    if reference is not None:
        check_error(row, fn, reference, inputs, grad)
    return row


def check_error(row: Row, fn, reference, inputs, grad) -> None:
    """Set ``row.error`` to ``fn``'s :func:`relative_error` against ``reference``; a check that fails
    is said in ``row.note`` instead of raised."""
    try:
        row.error = relative_error(fn, reference, *inputs, grad)
    except Exception as err:  # FlashAttention-4's own checks raise ValueError and AssertionError
        row.note = f"{row.note} error check failed: {str(err)[:100]}".strip()


def inputs_for(n: int, tokens: int = 65536, heads: int = 8, head_dim: int = 64, dtype=torch.bfloat16):
    """The timed call's q, k, v (requiring grad) and output gradient: ``[tokens // N (at least 1),
    heads, N, head_dim]`` on CUDA, seeded by N so every script times the same numbers."""
    shape = (max(1, tokens // n), heads, n, head_dim)
    g = torch.Generator(device="cuda").manual_seed(n)
    q, k, v = (torch.randn(shape, device="cuda", dtype=dtype, generator=g).requires_grad_() for _ in range(3))
    return q, k, v, torch.randn(shape, device="cuda", dtype=dtype, generator=g)


def run(ns, tokens=65536, heads=8, head_dim=64, dtype=torch.bfloat16, pattern_names=("strided", "fixed"),
        baseline_max_n=65536, configs=None, log=print) -> list[Row]:
    """Rows for every N and pattern; ``configs`` (default: the default ``KernelConfig``) are timed for ours."""
    from ..attention.triton_sparse import KernelConfig  # Triton is optional: imported only to run kernels

    configs = configs or (KernelConfig(),)
    allow_recompiles()
    rows = []
    for n in ns:
        q, k, v, grad = inputs_for(n, tokens, heads, head_dim, dtype)
        batch = q.shape[0]
        inputs = (q, k, v)
        scale = head_dim ** -0.5
        if n <= baseline_max_n:
            rows += dense_rows(q, k, v, grad, scale, n, log)
        for name in pattern_names:
            pattern = pattern_of(name)
            pairs = cost(pattern, n).pairs
            for i, config in enumerate(configs):
                method = "triton" if len(configs) == 1 else f"triton_cfg{i}"
                rows.append(measure(pattern.name, method,
                                    lambda: sparse_attention(q, k, v, pattern, scale, backend="triton")
                                    if config == KernelConfig() else _triton_with(q, k, v, pattern, scale, config),
                                    n, batch, pairs, heads, head_dim, grad, inputs, note=str(config)))
                log(rows[-1])
            if n > baseline_max_n:
                continue
            ours = lambda pattern=pattern: sparse_attention(q, k, v, pattern, scale, backend="triton")  # noqa: E731
            rows += flex_rows(pattern, n, q, k, v, grad, scale, log, ours)
        del q, k, v, grad, inputs
        torch.cuda.empty_cache()
    return rows


# SDPA's fused backends, each timed on its own (a row fails where this GPU or build lacks it), and the
# dispatcher's own choice ("default"). The table's dense column is the fastest, named.
SDPA_BACKENDS = ("default", "flash", "cudnn", "efficient")


def dense_rows(q, k, v, grad, scale, n, log) -> list[Row]:
    """Dense causal attention through PyTorch's scaled_dot_product_attention, per backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
              "efficient": SDPBackend.EFFICIENT_ATTENTION}
    batch, heads, _, head_dim = q.shape
    rows = []
    for name in SDPA_BACKENDS:
        def dense(name=name):
            with sdpa_kernel(chosen[name]) if name in chosen else contextlib.nullcontext():
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        rows.append(measure("dense", f"sdpa_{name}", dense, n, batch, n * (n + 1) // 2, heads, head_dim, grad,
                            (q, k, v)))
        log(rows[-1])
    return rows


def flex_rows(pattern, n, q, k, v, grad, scale, log, ours: Optional[Callable[[], torch.Tensor]] = None) -> list[Row]:
    """Flex in every form: as-is; each part on its own structure in each of its forms (the column
    part: its transposed view, and its columns laid end to end), the fastest of each summed
    ("decomposed", merge not counted, a lower bound); the parts with their log-sum-exp merge as one
    function, eager and compiled as a whole ("decomposed + merge", a complete form); concatenated keys
    where the pattern has no column part. Each complete form's row holds its error against ``ours``
    (output and gradients), when given."""
    batch, heads, _, head_dim = q.shape
    inputs = (q, k, v)
    pairs = cost(pattern, n).pairs
    rows = [measure(pattern.name, "flex_as_is", lambda: sparse_attention(q, k, v, pattern, scale, backend="flex"),
                    n, batch, pairs, heads, head_dim, grad, inputs, reference=ours)]
    log(rows[-1])
    fastest, variants = [], []
    for part, earlier in flex_forms.part_forms(pattern):
        # The part's own pairs: those its keys add to the earlier parts'.
        part_pairs = cost(P.union(*earlier, part), n).pairs - (cost(P.union(*earlier), n).pairs if earlier else 0)
        timed = []
        for variant, form in part.flex_forms().items():
            timed.append(measure(pattern.name, f"flex_{part.token}{'_' + variant if variant else ''}_part",
                                 lambda form=form, earlier=earlier: form(q, k, v, scale, earlier)[0],
                                 n, batch, part_pairs, heads, head_dim, grad, inputs))
            log(timed[-1])
        rows += timed
        ok = [(r.fwdbwd_ms, r, variant) for r, variant in zip(timed, part.flex_forms()) if r.fwdbwd_ms is not None]
        if ok:
            _, row, variant = min(ok, key=lambda x: x[0])
            fastest.append(row)
            variants.append(variant)
    parts = flex_forms.part_forms(pattern)
    if len(parts) > 1 and len(fastest) == len(parts):
        total = sum(r.fwdbwd_ms for r in fastest)
        rows.append(Row(pattern.name, n, batch, "flex_decomposed", sum(r.fwd_ms for r in fastest),
                        sum(r.bwd_ms for r in fastest), total, 14 * head_dim * pairs * heads * batch / (total * 1e9),
                        max(r.peak_gib for r in fastest),
                        "fastest form of each part, summed; merge not counted: " + ", ".join(r.method for r in fastest)))
        log(rows[-1])
        chosen = tuple(variants)
        whole = flex_forms.decomposed_compiled()
        for method, fn in (("flex_decomposed_merged", flex_forms.decomposed), ("flex_decomposed_merged_compiled", whole)):
            rows.append(measure(pattern.name, method, lambda fn=fn: fn(q, k, v, pattern, scale, chosen), n, batch, pairs,
                                heads, head_dim, grad, inputs,
                                note="the parts and their log-sum-exp merge" + (", compiled as one function"
                                                                               if fn is whole else ", merge eager"),
                                reference=ours))
            log(rows[-1])
    if concatenated_supported(pattern):
        rows.append(measure(pattern.name, "flex_concatenated",
                            lambda: flex_forms.concatenated(q, k, v, pattern, scale), n, batch,
                            pairs, heads, head_dim, grad, inputs,
                            note="sequence keys + gathered keys, one softmax", reference=ours))
        log(rows[-1])
    if fa4.available():  # Flex on its FlashAttention-4 backend: no merged form (it takes no dLSE)
        forms = {"flex_flash_as_is": fa4_forms.flex_flash_as_is}
        if concatenated_supported(pattern):
            forms["flex_flash_concatenated"] = fa4_forms.flex_flash
        for method, form in forms.items():
            rows.append(measure(pattern.name, method, lambda form=form: form(q, k, v, pattern, scale), n, batch,
                                pairs, heads, head_dim, grad, inputs, note="Flex, FLASH backend (FlashAttention-4)",
                                reference=ours))
            log(rows[-1])
    return rows


def _triton_with(q, k, v, pattern, scale, config):
    from ..attention.triton_sparse import triton_attention
    return triton_attention(q, k, v, pattern, scale, config)


def _fmt(x, digits=2):
    return "—" if x is None else f"{x:.{digits}f}"


def _fastest(rows) -> tuple[Optional[float], str]:
    """The smallest fwd+bwd time among ``rows`` (None where absent or failed) and its method."""
    timed = [(r.fwdbwd_ms, r.method) for r in rows if r is not None and r.fwdbwd_ms is not None]
    return min(timed) if timed else (None, "")


def markdown(rows: list[Row], device: str) -> str:
    """One line per (pattern, N): dense SDPA (its fastest backend, named), the Flex forms, the best
    complete Flex form (merges counted), ours (fwd, bwd, fwd+bwd, TFLOP/s, memory)."""
    lines = [f"Device: {device}. bf16 unless noted; B = 65,536 // N tokens per batch; forward+backward median ms. "
             "Flex decomposed: each part's fastest form summed, merge not counted (a lower bound); + merge: the "
             "parts and their log-sum-exp merge as one function (fastest of eager and compiled). Flex on FA4: its "
             "FLASH backend (FlashAttention-4), as-is or concatenated, the faster; no merged form (that backend "
             "takes no gradient of the log-sum-exp); — where flash-attn-4 is not installed. Best Flex: the "
             "fastest complete form (as-is, decomposed + merge, concatenated, on FA4).", "",
             "| pattern | N | B | dense SDPA (backend) | Flex as-is | Flex decomposed | Flex decomposed + merge | "
             "Flex concatenated | Flex on FA4 | best Flex | ours fwd | ours bwd | ours fwd+bwd | ours TFLOP/s | "
             "ours peak GiB | vs best Flex | vs dense |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by = {(r.pattern, r.n, r.method): r for r in rows}
    for (pat, n, method), r in by.items():
        if pat == "dense" or method != "triton":
            continue
        dense_t, dense_method = _fastest([by.get(("dense", n, f"sdpa_{b}")) for b in SDPA_BACKENDS]
                                         + [by.get(("dense", n, "sdpa_flash_causal"))])  # older results' name
        merged, _ = _fastest([by.get((pat, n, m)) for m in ("flex_decomposed_merged", "flex_decomposed_merged_compiled")])
        flex = [by.get((pat, n, m)) for m in ("flex_as_is", "flex_decomposed", "flex_concatenated")]
        flex_t = [f.fwdbwd_ms if f else None for f in flex]
        on_fa4, _ = _fastest([by.get((pat, n, m)) for m in ("flex_flash_as_is", "flex_flash_concatenated")])
        best = min((t for t in (flex_t[0], merged, flex_t[2], on_fa4) if t is not None), default=None)
        dense_label = f"{_fmt(dense_t)} ({dense_method.replace('sdpa_', '').replace('_causal', '')})" if dense_t else "—"
        lines.append(
            f"| {pat} | {n:,} | {r.batch} | {dense_label} | {_fmt(flex_t[0])} | {_fmt(flex_t[1])} | "
            f"{_fmt(merged)} | {_fmt(flex_t[2])} | {_fmt(on_fa4)} | {_fmt(best)} | "
            f"{_fmt(r.fwd_ms, 3)} | {_fmt(r.bwd_ms, 3)} | {_fmt(r.fwdbwd_ms, 3)} | {_fmt(r.tflops, 1)} | "
            f"{_fmt(r.peak_gib)} | {_fmt(best / r.fwdbwd_ms if best and r.fwdbwd_ms else None, 1)}x | "
            f"{_fmt(dense_t / r.fwdbwd_ms if dense_t and r.fwdbwd_ms else None, 1)}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, nargs="+", default=[4096, 16384, 65536, 262144, 1048576],
                        help="sequence lengths")
    parser.add_argument("--tokens", type=int, default=65536, help="B * N per measurement (B >= 1)")
    parser.add_argument("--heads", type=int, default=8, help="attention heads per call")
    parser.add_argument("--head-dim", type=int, default=64, help="width of each head (16, 32, 64 or 128)")
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--patterns", nargs="+", default=list(DEFAULT_PATTERNS),
                        help=f"names ({', '.join(PATTERNS)}) or pattern specs, e.g. local:512+global_tokens:64")
    parser.add_argument("--baseline-max-n", type=int, default=65536,
                        help="dense SDPA and Flex only up to this N (dense is quadratic)")
    parser.add_argument("--configs", nargs="*", default=[],
                        help="extra kernel configs to compare, each BLOCK_M,BLOCK_N,WARPS,STAGES for every part, "
                             "or KEY:BM,BN,W,S items joined by / with KEY local or global (a kind of part) or "
                             "dkdv or dq (a backward kernel), and tma:0 or tma:1 (pointer loads or tensor descriptors), "
                             "e.g. global:128,64,8,3/dkdv:32,128,4,3/dq:128,32,4,3/tma:0")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for <gpu>.json/.md")
    parser.add_argument("--warm-jobs", type=int, default=0,
                        help="first run each (N, pattern) in this many processes at a time, so that the timed run "
                             "finds every Flex form already compiled in Inductor's and Triton's on-disk caches "
                             "(0: compile in the timed run; the forms compile for minutes per N)")
    parser.add_argument("--warm-timeout", type=float, default=600.0,
                        help="seconds before a warming run is stopped; what it compiled stays in the caches "
                             "and the timed run compiles the rest")


def warm_commands(args, scratch: Path) -> list[list[str]]:
    """One benchmark command per (N, pattern) of ``args``, writing into ``scratch``: run in
    parallel before the timed run, they fill the compile caches (their own timings are discarded)."""
    import sys

    common = ["--tokens", str(args.tokens), "--heads", str(args.heads), "--head-dim", str(args.head_dim),
              "--dtype", args.dtype, "--baseline-max-n", str(args.baseline_max_n)]
    return [[sys.executable, "-m", "sparse_transformer.benchmark.attention", "--n", str(n), "--patterns", pattern,
             *common, "--out", str(scratch / f"warm-{i}")] for i, (n, pattern) in enumerate(
                 (n, pattern) for n in args.n for pattern in args.patterns)]


def warm_caches(args) -> None:
    """Run :func:`warm_commands` ``args.warm_jobs`` at a time (in a scratch folder), each for at most
    ``args.warm_timeout`` seconds, and say how each ended as it ends. A child picks each part's
    fastest Flex form from its own (contended) timings, so the timed run may still compile a merged
    form whose parts it picks differently."""
    import subprocess
    import tempfile
    import time
    from concurrent.futures import ThreadPoolExecutor, as_completed

    with tempfile.TemporaryDirectory() as scratch, ThreadPoolExecutor(args.warm_jobs) as pool:
        commands = warm_commands(args, Path(scratch))
        print(f"warming the compile caches: {len(commands)} runs, {args.warm_jobs} at a time, "
              f"at most {args.warm_timeout:g} s each", flush=True)

        # Each child's compile workers get their share of the CPUs.
        env = dict(os.environ, TORCHINDUCTOR_COMPILE_THREADS=str(max(1, (os.cpu_count() or 1) // args.warm_jobs)))

        def one(command):
            label, start = f"  {' '.join(command[3:7])}", time.monotonic()
            try:
                done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.warm_timeout)
            except subprocess.TimeoutExpired:
                return f"{label}: stopped after {args.warm_timeout:g} s (the timed run compiles what it left)"
            took = f"{time.monotonic() - start:.0f} s"
            if done.returncode != 0:
                lines = [line for line in done.stderr.strip().splitlines() if "Warning" not in line] or [""]
                return f"{label}: failed with exit code {done.returncode} after {took} ({lines[-1][:200]})"
            results = list(Path(command[-1]).glob("*.json"))
            rows = json.loads(results[0].read_text())["rows"] if results else []
            failed = [r["method"] for r in rows if r["fwdbwd_ms"] is None]
            return f"{label}: {len(rows) - len(failed)} forms compiled and ran in {took}" + (
                f", {len(failed)} failed ({', '.join(failed)})" if failed else "")
        for finished in as_completed([pool.submit(one, command) for command in commands]):
            print(finished.result(), flush=True)


def run_cli(args) -> int:
    if args.warm_jobs < 0:
        raise ValueError(f"--warm-jobs must be >= 0, got {args.warm_jobs}")
    if not 0 < args.warm_timeout <= 86400:
        raise ValueError(f"--warm-timeout must be in (0, 86400] seconds, got {args.warm_timeout:g}")
    # Checked before anything runs or is written: a bad row must not replace a results file halfway.
    for flag, values in (("--n", args.n), ("--tokens", [args.tokens]), ("--heads", [args.heads])):
        if any(value < 1 for value in values):
            raise ValueError(f"{flag} must be >= 1, got {' '.join(map(str, values))}")
    if args.head_dim not in (16, 32, 64, 128):
        raise ValueError(f"--head-dim must be one of 16, 32, 64, 128, got {args.head_dim}")
    for name in args.patterns:
        pattern_of(name)  # a ValueError naming the bad spec
    if not torch.cuda.is_available():
        raise ValueError("the attention benchmark needs a CUDA GPU")
    if importlib.util.find_spec("triton") is None:
        raise ValueError("the attention benchmark needs Triton: pip install triton")
    from ..attention.triton_sparse import KernelConfig

    if args.warm_jobs:
        warm_caches(args)
    configs = [KernelConfig()] + [KernelConfig.from_spec(c) for c in args.configs]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    device = torch.cuda.get_device_name()
    meta = dict(device=device, torch=torch.__version__, triton=__import__("triton").__version__,
                flash_attn_4=fa4.version(),
                heads=args.heads, head_dim=args.head_dim, dtype=args.dtype, tokens=args.tokens)
    results = ResultsFile(args.out, file_stem(device), meta, lambda rows: markdown(rows, device))
    run(args.n, args.tokens, args.heads, args.head_dim, dtype, tuple(args.patterns), args.baseline_max_n,
        tuple(configs), log=results.add)
    print(markdown(results.rows, device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
