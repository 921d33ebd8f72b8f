"""Plot several runs' ``metrics.jsonl`` on one figure: bits per byte against training time or tokens.

    python experiments/plot_runs.py --out curves.png dense=runs/a/metrics.jsonl fixed=runs/b/metrics.jsonl
    python experiments/plot_runs.py --panels validation-tokens validation-time --tokens-per-step 73728 \\
        --out table2.png dense=... strided=... fixed=...

Panels: ``train-time`` (training loss in bits per byte, as logged), ``validation-time`` and
``validation-tokens``. Time is training time in seconds (evaluation and checkpoints excluded), as
the trainer logs it; tokens are optimizer steps times ``--tokens-per-step`` (batch x context).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from matplotlib.figure import Figure

from sparse_transformer.train.metrics import read_metrics

PANELS = {  # name -> (metrics split, x axis, title)
    "train-time": ("train", "time", "training loss"),
    "validation-time": ("validation", "time", "validation"),
    "validation-tokens": ("validation", "tokens", "validation"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="LABEL=METRICS", help="a label and a metrics.jsonl path")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--panels", nargs="+", choices=list(PANELS), default=["train-time", "validation-time"])
    parser.add_argument("--tokens-per-step", type=int, default=None,
                        help="batch x context, for the validation-tokens panel")
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    if "validation-tokens" in args.panels and not args.tokens_per_step:
        parser.error("the validation-tokens panel needs --tokens-per-step (batch x context)")
    runs = []
    for item in args.runs:
        label, sep, path = item.partition("=")
        if not sep:
            parser.error(f"expected LABEL=METRICS, got {item!r}")
        runs.append((label, read_metrics(path)))
    fig = Figure(figsize=(5.5 * len(args.panels), 4))  # no pyplot: no global backend or figure state
    axes = fig.subplots(1, len(args.panels), sharey=True, squeeze=False)[0]
    for ax, panel in zip(axes, args.panels):
        split, x, title = PANELS[panel]
        for label, records in runs:
            rows = [r for r in records if r.get("split") == split]
            xs = [r["time"] if x == "time" else r["step"] * args.tokens_per_step / 1e6 for r in rows]
            ax.plot(xs, [r["bits_per_byte"] for r in rows], label=label,
                    marker="o" if split == "validation" else None, markersize=3)
        ax.set_xlabel("training time (s)" if x == "time" else "training tokens (millions)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("bits per byte")
    if "train-time" in args.panels:
        axes[0].set_ylim(top=8.5)
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
