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
    p.add_argument("--stride", type=int, default=None, help="l: block / row length (strided, fixed; default: 4)")
    p.add_argument("--summary", type=int, default=None, help="c: summary positions per block (fixed; default: 1)")
    p.add_argument("--distinct", type=int, default=None,
                   help="heads with different summary sub-blocks (fixed; default: 1)")
    p.add_argument("--part", default=None, help="row | column (strided), local | summary (fixed); default: merged")
    p.add_argument("--n", type=int, default=32, help="sequence length")
    p.add_argument("--heads", type=int, default=None,
                   help=f"heads to report and draw, at most {MAX_HEADS} (default: the distinct ones, at most 4)")
    p.add_argument("--query", type=int, default=None, help="query shown in the 2-D view")
    p.add_argument("--out", default=None, help="PNG to write (default: only print the cost)")
    p.add_argument("--force", action="store_true", help="replace the --out file if it exists")
    p.set_defaults(func=run)


SIZES = {"stride": 4, "summary": 1, "distinct": 1}  # the sizes --pattern strided / fixed take, and their defaults
USES = {"strided": ("stride",), "fixed": ("stride", "summary", "distinct")}


def _pattern(args: argparse.Namespace):
    """The pattern of ``--pattern``, sized by the flags it uses; a size flag it would ignore (``--stride``
    next to a spec, which carries its own sizes; ``--summary`` for strided) is refused, not dropped."""
    unused = [name for name in SIZES if getattr(args, name) is not None and name not in USES.get(args.pattern, ())]
    if unused:
        flags = " and ".join(f"--{name}" for name in unused)
        why = {"strided": "it takes --stride only", "dense": "dense takes no sizes"}.get(
            args.pattern, "a spec carries its own sizes")
        instead = "strided or fixed" if unused == ["stride"] else "fixed"
        raise ValueError(f"{flags} {'has' if len(unused) == 1 else 'have'} no effect on --pattern {args.pattern} "
                         f"({why}); drop {'it' if len(unused) == 1 else 'them'} or use --pattern {instead}")
    sizes = {name: default if getattr(args, name) is None else getattr(args, name) for name, default in SIZES.items()}
    return by_name(args.pattern, sizes["stride"], sizes["summary"], sizes["distinct"], args.part)


def run(args: argparse.Namespace) -> int:
    pattern = _pattern(args)
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.query is not None and not 0 <= args.query < args.n:
        raise ValueError(f"--query must be in [0, {args.n - 1:,}] (a position of the --n {args.n:,} sequence), "
                         f"got {args.query:,}")
    if args.query is not None and args.out is None:  # was read by nothing, silently
        raise ValueError("--query has no effect without --out (it picks the query the drawing shows); "
                         "drop it, or add --out NAME.png")
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
    costs = [(head, cost(pattern, args.n, head)) for head in (heads if pattern.heads_differ() else [0])]
    print(f"pattern {pattern.name}, n = {args.n:,}")  # after the costs: an n they refuse prints nothing
    for head, c in costs:
        print(f"  head {head}: keys per query mean {c.mean_keys_per_query:,.1f}, max {c.max_keys_per_query:,}; "
              f"density {c.density:.4%} of n^2, {c.causal_density:.4%} of dense causal")
    if out is not None:
        from ..visualize import draw  # matplotlib only when drawing
        path = draw(pattern, args.n, out, heads=list(heads), query=args.query)
        print(f"wrote {path}")
    return 0
