"""Plot several runs' ``metrics.jsonl`` on one figure: bits per byte against training time.

    python experiments/plot_runs.py --out curves.png dense=runs/a/metrics.jsonl fixed=runs/b/metrics.jsonl

Left: training loss (bits per byte, as logged); right: validation bits per byte. Time is training
time in seconds (evaluation and checkpoints excluded), as the trainer logs it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from matplotlib.figure import Figure

from sparse_transformer.train.metrics import read_metrics


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="LABEL=METRICS", help="a label and a metrics.jsonl path")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    fig = Figure(figsize=(11, 4))  # no pyplot: no global backend or figure state
    train_ax, valid_ax = fig.subplots(1, 2, sharey=True)
    for item in args.runs:
        label, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"error: expected LABEL=METRICS, got {item!r}")
        records = read_metrics(path)
        for ax, split in ((train_ax, "train"), (valid_ax, "validation")):
            rows = [r for r in records if r.get("split") == split]
            ax.plot([r["time"] for r in rows], [r["bits_per_byte"] for r in rows], label=label,
                    marker="o" if split == "validation" else None, markersize=3)
    for ax, name in ((train_ax, "training loss"), (valid_ax, "validation")):
        ax.set_xlabel("training time (s)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    train_ax.set_ylabel("bits per byte")
    train_ax.set_ylim(top=8.5)
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
