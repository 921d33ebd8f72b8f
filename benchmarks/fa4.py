"""Our kernels against FlashAttention-4 (issue 28), one GPU, one process: forward+backward ms.

    python benchmarks/fa4.py --n 4096 16384 65536 --patterns strided fixed --out benchmarks/results
    python benchmarks/fa4.py --n 16384 --patterns window_global --rounds 3   # forms take turns

Rows per N (bf16, H = 8, D = 64, B = 65,536 // N, the attention benchmark's inputs): dense SDPA on
each fused backend; ours (``backend="triton"``); Flex on the pattern's own block mask with its Triton
backend and with its FLASH backend (FlashAttention-4). For the fixed pattern also the concatenated
layout (sequence keys + gathered summary slots, one softmax) on both Flex backends, and
``flash_attn_func`` called directly with that layout, its block-sparse tiles and a closed-form mask
(``sparse_transformer/benchmark/fa4_forms.py``; the direct call is the ``fa4`` backend, ``attention/fa4.py``). Forms that merge parts by log-sum-exp are not run on
the FLASH backend, whose backward takes no gradient of the log-sum-exp. Each row also gives the
relative error of its output and gradients against ours. The FLASH and direct rows need
flash-attn-4 (``pip install sparse-transformer[fa4]``); without it they say so.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

import torch

import sparse_transformer as st
from sparse_transformer.attention import fa4 as fa4_backend
from sparse_transformer.benchmark import ResultsFile, allow_recompiles, fa4_forms, file_stem, flex_forms
from sparse_transformer.benchmark.attention import Row, check_error, dense_rows, inputs_for, measure, pattern_of
from sparse_transformer.layout import cost

FORMS = {  # method -> fn(q, k, v, pattern, scale)
    "triton": lambda q, k, v, p, s: st.sparse_attention(q, k, v, p, s, backend="triton"),
    "flex_as_is": lambda q, k, v, p, s: st.sparse_attention(q, k, v, p, s, backend="flex"),
    "flex_flash_as_is": fa4_forms.flex_flash_as_is,
    "flex_concatenated": flex_forms.concatenated,
    "flex_flash_concatenated": fa4_forms.flex_flash,
    "fa4_direct": fa4_backend.fa4_attention,
}
NEEDS_FA4 = ("flex_flash_as_is", "flex_flash_concatenated", "fa4_direct")
FIXED_ONLY = ("flex_concatenated", "flex_flash_concatenated", "fa4_direct")


def run(ns, patterns, log=print, rounds: int = 1) -> list[dict]:
    allow_recompiles()
    rows = []
    for n in ns:
        q, k, v, grad = inputs_for(n)
        batch, heads, _, head_dim = q.shape
        scale = head_dim ** -0.5
        for row in dense_rows(q, k, v, grad, scale, n, lambda r: None):
            rows.append(dict(asdict(row), rounds_ms=[row.fwdbwd_ms]))
            log(rows[-1])
        for pattern in patterns:
            rows += pattern_rows(pattern, n, q, k, v, grad, log, rounds)
        del q, k, v, grad
        torch.cuda.empty_cache()
    return rows


def pattern_rows(pattern, n, q, k, v, grad, log, rounds: int = 1) -> list[dict]:
    """Ours and every Flex and FlashAttention-4 form that runs this pattern, with errors against ours.
    With ``rounds`` > 1 each form is timed once a round, the forms taking turns, and its row is its
    median round (every round's fwd+bwd in ``rounds_ms``): a drift of the GPU or host over the run
    reaches every form alike, and one slow round moves no row."""
    batch, heads, _, head_dim = q.shape
    scale = head_dim ** -0.5
    pairs = cost(pattern, n).pairs
    ours = lambda: FORMS["triton"](q, k, v, pattern, scale)  # noqa: E731
    calls, skipped = {}, {}
    for method, form in FORMS.items():
        if method in FIXED_ONLY and not fa4_backend.is_fixed(pattern):
            continue
        if method in NEEDS_FA4 and not fa4_backend.available():
            skipped[method] = Row(pattern.name, n, batch, method, None, None, None, None, None,
                                  f"not run: {fa4_backend.INSTALL}")
        else:
            calls[method] = lambda form=form: form(q, k, v, pattern, scale)
    timed = {method: [] for method in calls}
    for _ in range(rounds):
        for method, call in calls.items():
            timed[method].append(measure(pattern.name, method, call, n, batch, pairs, heads, head_dim, grad, (q, k, v)))
    rows = []
    for method in (m for m in FORMS if m in calls or m in skipped):
        runs = timed.get(method) or [skipped[method]]
        finished = sorted((r for r in runs if r.fwdbwd_ms is not None), key=lambda r: r.fwdbwd_ms)
        row = finished[(len(finished) - 1) // 2] if finished else runs[0]
        if method in calls and method != "triton" and row.fwdbwd_ms is not None:  # once, not every round
            check_error(row, calls[method], ours, (q, k, v), grad)
        rows.append(dict(asdict(row), rounds_ms=[r.fwdbwd_ms for r in runs]))
        log(rows[-1])
    return rows


def markdown(rows: list[dict], device: str) -> str:
    lines = [f"Device: {device}. bf16, H = 8, D = 64, B = 65,536 // N; forward+backward median ms (TFLOP/s of "
             "the pattern's real pairs; relative error of output and gradients against ours). With several "
             "rounds (the forms take turns), each row is its median round and the note lists every round.", "",
             "| pattern | N | method | fwd | bwd | fwd+bwd | TFLOP/s | error vs ours | note |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["pattern"], f"{r['n']:,}", r["method"]] + [
            "—" if r[key] is None else f"{r[key]:.3f}" for key in ("fwd_ms", "bwd_ms", "fwdbwd_ms")] + [
            "—" if r["tflops"] is None else f"{r['tflops']:.0f}", "—" if r["error"] is None else f"{r['error']:.1e}",
            _with_rounds(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _with_rounds(row: dict) -> str:
    rounds = row.get("rounds_ms") or []
    if len(rounds) < 2:
        return row["note"]
    listed = "rounds: " + ", ".join("—" if t is None else f"{t:.3f}" for t in rounds)
    return f"{row['note']}; {listed}" if row["note"] else listed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--patterns", nargs="+", default=["strided", "fixed"],
                        help="names of the attention benchmark (strided, fixed, ...) or pattern specs")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--rounds", type=int, default=1,
                        help="time every form this many times, the forms taking turns; each row is its median round")
    args = parser.parse_args(argv)
    # Checked before anything runs or is written: a bad row must not replace a results file halfway.
    if args.rounds < 1:
        parser.exit(2, f"error: --rounds must be >= 1, got {args.rounds}\n")
    if any(n < 1 for n in args.n):
        parser.exit(2, f"error: --n must be >= 1, got {' '.join(map(str, args.n))}\n")
    try:
        patterns = [pattern_of(name) for name in args.patterns]
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
    if not torch.cuda.is_available():
        raise SystemExit("error: this benchmark needs a CUDA GPU")
    device = torch.cuda.get_device_name()
    meta = dict(device=device, torch=torch.__version__, flash_attn_4=fa4_backend.version())
    results = ResultsFile(args.out, "fa4-" + file_stem(device), meta, lambda rows: markdown(rows, device))
    run(args.n, patterns, results.add, args.rounds)
    print(markdown(results.rows, device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
