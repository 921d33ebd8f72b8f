"""Kernels one sampling step launches per layer, counted without a GPU.

    python benchmarks/decode_kernels.py --preset cifar10 enwik8

A CUDA-graph decode step is a chain of small kernels, so its time follows how many there are
(docs/results.md, "Sampling benchmark"). This runs one eager decode step of each preset's model on
the CPU (its context cut to ``--context`` so the cache fits; the count per layer does not depend
on it) under a ``TorchDispatchMode`` and counts the ATen operations that launch a kernel on a GPU:
views, allocations and conversions to the dtype a tensor already has are left out. The attention over the
cached slots is the Triton decode kernel, counted as one launch (its split-merge launch, used when
a layer's slots are split between programs, is not counted). Per layer: a step of L + 1 layers
minus a step of L layers, so the embedding, final norm and head are left out.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sparse_transformer import presets
from sparse_transformer.kvcache import Decoder
from sparse_transformer.model import SparseTransformer


class _Launches(TorchDispatchMode):
    """Counts the ATen operations that would launch a GPU kernel."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        same_dtype = name == "aten::_to_copy" and kwargs.get("dtype", args[0].dtype) == args[0].dtype
        allocation = name.startswith(("aten::empty", "aten::new_empty"))
        if not (func.is_view or same_dtype or allocation):
            self.ops[name.removeprefix("aten::")] += 1
        return func(*args, **kwargs)


def step_launches(preset: str, layers: int, context: int, batch: int = 2) -> Counter:
    """Launches of one decode step of ``preset``'s model with ``layers`` layers (random weights)."""
    if context < 2:
        raise ValueError(f"--context must be >= 2 (a prime and the decoded position), got {context}")
    config = presets.get(preset).model
    config = dataclasses.replace(config, n_layer=layers, context=context, dropout=0.0)
    model = SparseTransformer(config).eval()
    os.environ.setdefault("TRITON_INTERPRET", "1")  # lets the decoder take the Triton path on the CPU
    decoder = Decoder(model, batch, backend="triton")
    mode = _Launches()

    def kernel(*args):  # stands in for the Triton decode kernel: one launch, output left as is
        mode.ops["triton decode kernel"] += 1

    decoder.kernel = kernel
    prime = torch.randint(0, 256, (batch, context // 2))
    decoder.prefill(prime)
    t = torch.tensor(context // 2)
    with torch.no_grad(), mode:
        decoder(prime[:, -1], t)
    return mode.ops


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", nargs="+", default=["cifar10", "enwik8"], help="preset names")
    parser.add_argument("--context", type=int, default=1024, help="context the count runs at (cut for the CPU)")
    args = parser.parse_args(argv)
    try:
        report(args.preset, args.context)
    except ValueError as err:  # bad arguments: one line, as the CLI does
        parser.exit(2, f"error: {err}\n")
    return 0


def report(preset_names: list[str], context: int) -> None:
    for preset in preset_names:
        one, two = step_launches(preset, 1, context), step_launches(preset, 2, context)
        per_layer = two - one
        total = sum(per_layer.values())
        print(f"{preset}: {total} launches per layer and step ({sum(one.values()) - total} outside the layers)")
        print("  " + ", ".join(f"{name} {count}" for name, count in sorted(per_layer.items(), key=lambda x: -x[1])))


if __name__ == "__main__":
    raise SystemExit(main())
