"""The largest model that trains at one context length on one GPU (issue 8, run 4).

Starts from a preset (default ``audio-65k``: 65,536 bytes, strided l = 256, 48 layers, d = 512,
16 heads of 32, 152M parameters) and tries larger shapes, smallest first. Each shape gets full training steps
in its own subprocess, measured by ``benchmarks/presets.py`` (bf16, the preset's recompute,
batch 1; one warm-up step and ``--steps`` timed ones). The search stops at the first shape that fails (out of memory, or slower than
``--timeout``). Every shape tried goes to the console and to a JSON file.

    python benchmarks/largest_model.py                     # the default ladder, 152M to 14.5B parameters
    python benchmarks/largest_model.py --shapes 48x1024 64x2048 --preset audio-65k
"""

from __future__ import annotations

import json
import re

from presets import describe, measure, parser, results_path

# LxD: n_layer x d_model, heads of --head-width (32, as in audio-65k, whose shape is the first rung).
# With 4d feed-forward, about 12 L D^2 parameters; AdamW with fp32 master weights needs 16 bytes
# per parameter before activations.
# The rungs past 96x2048 are there because on a 139 GiB H200 every rung up to it trained (4.84B
# parameters, 113.8 GiB), so the search ended with the ladder instead of at the memory limit.
LADDER = ["48x512", "48x1024", "64x1536", "48x2048", "64x2048", "72x2048", "96x2048", "96x2560", "128x3072"]


def shape_overrides(shape: str, head_width: int = 32) -> list[str]:
    """``"48x1024"`` -> overrides for 48 layers of width 1,024 in heads of ``head_width``."""
    match = re.fullmatch(r"(\d+)x(\d+)", shape)
    if not match or int(match[2]) % head_width:
        raise ValueError(f"shape must look like LAYERSxWIDTH with a width divisible by the head width "
                         f"{head_width}, e.g. 48x1024; got {shape!r}")
    layers, width = int(match[1]), int(match[2])
    return [f"model.n_layer={layers}", f"model.d_model={width}", f"model.n_head={width // head_width}"]


def main(argv: list[str] | None = None) -> None:
    p = parser()
    p.description = __doc__
    p.set_defaults(presets=["audio-65k"], steps=1, timeout=240)
    p.add_argument("--shapes", nargs="+", default=LADDER, help="LAYERSxWIDTH, smallest first")
    p.add_argument("--head-width", type=int, default=32, help="width of one attention head")
    args = p.parse_args(argv)
    if len(args.presets) != 1:
        p.error(f"--presets takes one preset here (the starting shape), got {args.presets}")
    try:
        ladder = [shape_overrides(s, args.head_width) for s in args.shapes]
    except ValueError as err:
        p.error(str(err))
    results = []
    for shape, sets in zip(args.shapes, ladder):
        record = measure(args.presets[0], args, [*args.set, *sets])
        record["shape"] = shape
        results.append(record)
        print(f"{shape:>8s}  {describe(record)}", flush=True)
        if "error" in record:
            break
    fits = [r for r in results if "error" not in r]
    if fits:
        best = max(fits, key=lambda r: r["parameters"])
        print(f"largest that trained: {best['shape']}, {best['parameters'] / 1e6:,.1f}M parameters at context "
              f"{best['context']:,} ({best['s_per_iter']:.2f} s/step)")
    out = results_path(args, results, f"largest-{args.presets[0]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
