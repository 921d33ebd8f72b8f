"""The fixed pattern against FlashAttention-4 (issue 28), one GPU, one process: forward+backward ms.

    python benchmarks/fixed_fa4.py --n 4096 16384 65536 --out benchmarks/results

Rows per N (bf16, H = 8, D = 64, B = 65,536 // N, the attention benchmark's inputs): dense SDPA on
each fused backend; ours (``backend="triton"``); Flex on the concatenated layout (sequence keys +
gathered summary slots, one softmax) with its Triton backend and with its FLASH backend
(FlashAttention-4); and ``flash_attn_func`` called directly with the same layout, the layout's
block-sparse tiles and a closed-form mask (``sparse_transformer/benchmark/fa4_forms.py``). Each row
also gives the relative error of its output and gradients against ours. Needs flash-attn-4
(``pip install flash-attn-4``) for the last two forms; without it those rows say so.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict
from pathlib import Path

import torch

import sparse_transformer as st
from sparse_transformer.benchmark import fa4_forms, flex_forms, write_atomic
from sparse_transformer.benchmark.attention import Row, dense_rows, inputs_for, measure
from sparse_transformer.layout import cost

FORMS = {  # method -> fn(q, k, v, pattern, scale)
    "triton": lambda q, k, v, p, s: st.sparse_attention(q, k, v, p, s, backend="triton"),
    "flex_concatenated": flex_forms.concatenated,
    "flex_flash_concatenated": fa4_forms.flex_flash,
    "fa4_direct": fa4_forms.direct,
}


def relative_error(fn, reference, q, k, v, grad) -> float:
    """Largest relative norm of the difference, over the output and the three gradients."""
    results = []
    for f in (fn, reference):
        out = f()
        results.append([out, *torch.autograd.grad(out, (q, k, v), grad)])
    return max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(*results))


def run(ns, pattern, log=print) -> list[dict]:
    rows = []
    for n in ns:
        q, k, v, grad = inputs_for(n)
        batch, heads, _, head_dim = q.shape
        scale = head_dim ** -0.5
        for row in dense_rows(q, k, v, grad, scale, n, lambda r: None):
            rows.append(dict(asdict(row), error=None))
            log(rows[-1])
        pairs = cost(pattern, n).pairs
        ours = lambda: FORMS["triton"](q, k, v, pattern, scale)  # noqa: E731
        for method, form in FORMS.items():
            if method in ("flex_flash_concatenated", "fa4_direct") and not fa4_forms.available():
                row, error = Row(pattern.name, n, batch, method, None, None, None, None, None,
                                 f"not run: {fa4_forms.INSTALL}"), None
            else:
                call = lambda form=form: form(q, k, v, pattern, scale)  # noqa: E731
                row = measure(pattern.name, method, call, n, batch, pairs, heads, head_dim, grad, (q, k, v))
                try:
                    error = None if method == "triton" or row.fwdbwd_ms is None else relative_error(
                        call, ours, q, k, v, grad)
                except Exception as err:  # FlashAttention-4's own checks raise ValueError and AssertionError
                    error, row.note = None, f"{row.note} error check failed: {str(err)[:100]}"
            rows.append(dict(asdict(row), error=error))
            log(rows[-1])
        del q, k, v, grad
        torch.cuda.empty_cache()
    return rows


def markdown(rows: list[dict], device: str) -> str:
    lines = [f"Device: {device}. bf16, H = 8, D = 64, B = 65,536 // N; forward+backward median ms (TFLOP/s of "
             "the pattern's real pairs; relative error of output and gradients against ours).", "",
             "| pattern | N | method | fwd | bwd | fwd+bwd | TFLOP/s | error vs ours | note |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["pattern"], f"{r['n']:,}", r["method"]] + [
            "—" if r[key] is None else f"{r[key]:.3f}" for key in ("fwd_ms", "bwd_ms", "fwdbwd_ms")] + [
            "—" if r["tflops"] is None else f"{r['tflops']:.0f}", "—" if r["error"] is None else f"{r['error']:.1e}",
            r["note"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--pattern", default="fixed:128:32", help="a fixed pattern spec (fixed:l:c or fixed:l:c:distinct)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("error: this benchmark needs a CUDA GPU")
    pattern = st.patterns.parse(args.pattern)
    fa4_forms.fixed_sizes(pattern)
    device = torch.cuda.get_device_name()
    name = "fixed-fa4-" + re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    args.out.mkdir(parents=True, exist_ok=True)
    done: list[dict] = []

    def save(row: dict) -> None:  # after every row: a run stopped by a time limit keeps what it measured
        print(row, flush=True)
        done.append(row)
        write_atomic(args.out / f"{name}.json", json.dumps(dict(device=device, torch=torch.__version__, rows=done), indent=1))
        write_atomic(args.out / f"{name}.md", markdown(done, device))

    run(args.n, pattern, save)
    print(markdown(done, device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
