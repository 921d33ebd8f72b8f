"""Positions for the factorized position embeddings (the paper's n_emb learned tables).

Images get one table per data axis, (row, column, channel) = (H, W, C); text and audio get one table
per attention axis, the row and column of the [n/l, l] view of the sequence for stride l. The model
adds one learned embedding per axis; these helpers only say which index each position has.
"""

from __future__ import annotations

import math

import torch

from .dataset import ByteDataset


def position_axes(dataset: ByteDataset, context: int, stride: int) -> tuple[int, ...]:
    """Sizes of the factorized position axes for sequences of ``context`` bytes.

    Images: ``(H, W, C)`` (the stride is not used). Streams: ``(ceil(context / l), l)`` with
    ``l = min(stride, context)``, as :attr:`ModelConfig.axes` has it.
    """
    if dataset.image_shape:
        if context != dataset.example_length:
            raise ValueError(f"{dataset.name}: image context must be {dataset.example_length:,} "
                             f"(= {'x'.join(map(str, dataset.image_shape))}), got {context:,}")
        return tuple(dataset.image_shape)
    if stride < 1 or context < 1:
        raise ValueError(f"context and stride must be >= 1, got context {context}, stride {stride}")
    width = min(stride, context)  # a stride longer than the context leaves one row
    return (math.ceil(context / width), width)


def positions(axes: tuple[int, ...], n: int) -> torch.Tensor:
    """Index along each axis of positions ``0 .. n-1`` in row-major order: LongTensor ``[n, len(axes)]``.

    E.g. ``positions((32, 32, 3), 3072)[i] == (row, column, channel)`` of sub-pixel ``i``;
    ``positions((n // l, l), n)[i] == (i // l, i % l)``.
    """
    if n > math.prod(axes):
        raise ValueError(f"{n:,} positions do not fit axes {axes} ({math.prod(axes):,} positions)")
    index = torch.arange(n)
    out = torch.empty(n, len(axes), dtype=torch.long)
    for k in reversed(range(len(axes))):  # innermost axis varies fastest
        out[:, k] = index % axes[k]
        index = index // axes[k]
    return out
