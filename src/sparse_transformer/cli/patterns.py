"""``sparse-transformer patterns``: draw a pattern and print what it costs."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..layout import cost
from ..patterns import by_name
from .arguments import DefaultsHelpFormatter


MAX_HEADS = 64


def add_parser(sub) -> None:
    p = sub.add_parser("patterns", help="draw an attention pattern and print keys per query and density",
                       formatter_class=DefaultsHelpFormatter)
    p.add_argument("--pattern", default="strided",
                   help="dense | strided | fixed (sized by --stride, --summary, --distinct), or a spec: parts "
                        "joined by '+', e.g. 'local:256+global_tokens:16' or 'block:64+summary:64:8+column:128'")
    p.add_argument("--stride", type=int, default=4, help="l: block / row length")
    p.add_argument("--summary", type=int, default=1, help="c: summary positions per block (fixed)")
    p.add_argument("--distinct", type=int, default=1, help="heads with different summary sub-blocks (fixed)")
    p.add_argument("--part", default=None, help="row | column (strided), local | summary (fixed); default: merged")
    p.add_argument("--n", type=int, default=32, help="sequence length")
    p.add_argument("--heads", type=int, default=None,
                   help=f"heads to report and draw, at most {MAX_HEADS} (default: the distinct ones, at most 4)")
    p.add_argument("--query", type=int, default=None, help="query shown in the 2-D view")
    p.add_argument("--out", default=None, help="PNG to write (default: only print the cost)")
    p.add_argument("--force", action="store_true", help="replace the --out file if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    pattern = by_name(args.pattern, args.stride, args.summary, args.distinct, args.part)
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.heads is not None and not 1 <= args.heads <= MAX_HEADS:  # a row of the figure per head
        raise ValueError(f"--heads must be in [1, {MAX_HEADS}], got {args.heads}")
    out = None
    if args.out is not None:  # checked first: never overwrite a file, never create folders the user did not name
        out = Path(args.out)
        if not args.out or out.suffix.lower() not in ("", ".png"):
            raise ValueError(f"--out must name a PNG file (name.png, or a name without a suffix), got {args.out!r}")
        if out.is_dir() or out.with_suffix(".png").is_dir():
            raise ValueError(f"--out {args.out} is a folder; name a PNG file")
        out = out.with_suffix(".png")  # what is written, so that is what is checked
        if out.exists() and not args.force:
            raise ValueError(f"--out {out} exists; pass --force to replace it")
        if not out.parent.is_dir():
            raise ValueError(f"--out {out}: the folder {out.parent} does not exist")
    distinct = math.lcm(*(getattr(p, "distinct", 1) for p in pattern.parts)) if pattern.heads_differ() else 1
    heads = range(args.heads if args.heads is not None else min(distinct, 4))
    print(f"pattern {pattern.name}, n = {args.n:,}")
    for head in heads if pattern.heads_differ() else [0]:
        c = cost(pattern, args.n, head)
        print(f"  head {head}: keys per query mean {c.mean_keys_per_query:,.1f}, max {c.max_keys_per_query:,}; "
              f"density {c.density:.4%} of n^2, {c.causal_density:.4%} of dense causal")
    if out is not None:
        from ..visualize import draw  # matplotlib only when drawing
        path = draw(pattern, args.n, out, heads=list(heads), query=args.query)
        print(f"wrote {path}")
    return 0
