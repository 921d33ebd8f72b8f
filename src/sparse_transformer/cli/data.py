"""``sparse-transformer data prepare|info NAME [--from PATH]``: get a dataset into the cache, or describe it."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data import NAMES, load
from .arguments import DefaultsHelpFormatter, positive_int


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="prepare a dataset (download or --from a local copy) or print its splits",
                       formatter_class=DefaultsHelpFormatter)
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (("prepare", "download (or read --from), verify, convert once into the cache"),
                         ("info", "print split sizes (prepares the dataset first if needed)")):
        a = actions.add_parser(action, help=text, formatter_class=DefaultsHelpFormatter)
        a.add_argument("name", choices=NAMES, metavar="NAME", help=f"one of: {', '.join(NAMES)}")
        a.add_argument("--from", dest="source", type=Path, default=None,
                       help="local file or folder instead of downloading (required for imagenet64, audio, "
                            "bytes, images; for gcide/cpython the first time)")
        a.add_argument("--cache", type=Path, default=None,
                       help="cache folder (default: $SPARSE_TRANSFORMER_DATA, else $XDG_CACHE_HOME/sparse-transformer, "
                            "else ~/.cache/sparse-transformer)")
        a.add_argument("--tile", type=positive_int, nargs=2, default=(32, 32), metavar=("H", "W"),
                       help="tile size for 'images'")
        a.add_argument("--sample-rate", type=positive_int, default=12_000, help="resampling rate for 'audio' (Hz)")
        a.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    dataset = load(args.name, args.source, cache=args.cache, tile=tuple(args.tile), sample_rate=args.sample_rate)
    where = getattr(dataset.train, "filename", None)  # a memory-mapped cache file, or the source itself
    if args.action == "prepare":
        shown = Path(where).parent if where and Path(where).name == "train.bin" else where
        print(f"{dataset.name}: ready{f', memory-mapped from {shown}' if shown else ''}")
    print(f"{dataset.name} ({dataset.kind}" + (f", images {'x'.join(map(str, dataset.image_shape))}"
                                              if dataset.image_shape else "") + ")")
    for split in ("train", "validation", "test"):
        n = len(dataset.split(split))
        extra = f" = {n // dataset.example_length:,} images" if dataset.example_length else ""
        print(f"  {split:<10} {n:>15,} bytes{extra}")
    return 0
