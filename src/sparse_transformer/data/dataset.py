"""A byte dataset: three uint8 splits plus what the model needs to know about their shape."""

from __future__ import annotations

from dataclasses import dataclass
import math
from fractions import Fraction
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class ByteDataset:
    """Train / validation / test splits as flat uint8 arrays (memory-mapped when on disk).

    Streams (text, audio) are one long sequence per split; image datasets are concatenated
    fixed-size examples of ``example_length = H * W * C`` bytes in raster order, channels innermost.
    """

    name: str
    kind: str  # "text" | "image" | "audio"
    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    image_shape: Optional[tuple[int, int, int]] = None  # (H, W, C) for images

    def __post_init__(self):
        if self.kind not in ("text", "image", "audio"):
            raise ValueError(f"kind must be 'text', 'image' or 'audio', got {self.kind!r}")
        for split in ("train", "validation", "test"):
            arr = getattr(self, split)
            if arr.dtype != np.uint8 or arr.ndim != 1:
                raise ValueError(f"{self.name} {split} split must be a 1-D uint8 array, got {arr.dtype} {arr.shape}")
        if self.example_length and any(len(getattr(self, s)) % self.example_length
                                       for s in ("train", "validation", "test")):
            raise ValueError(f"{self.name}: every split must hold whole examples of {self.example_length} bytes")

    @property
    def example_length(self) -> Optional[int]:
        """Bytes per example for images, None for streams."""
        return int(np.prod(self.image_shape)) if self.image_shape else None

    def split(self, name: str) -> np.ndarray:
        if name not in ("train", "validation", "test"):
            raise ValueError(f"split must be 'train', 'validation' or 'test', got {name!r}")
        return getattr(self, name)


def split_stream(data: np.ndarray, name: str, kind: str = "text", fractions=(0.90, 0.05, 0.05)) -> ByteDataset:
    """Split one byte stream into train / validation / test by fractions (enwik8 style, 90/5/5).

    Sizes are floor(n * fraction) in exact rational arithmetic, so 10^8 bytes split into exactly
    90,000,000 / 5,000,000 / 5,000,000 (the test split takes the remainder).
    """
    n = len(data)
    if n == 0:
        raise ValueError(f"{name}: no data to split (empty input)")
    a = int(n * Fraction(str(fractions[0])))
    b = a + int(n * Fraction(str(fractions[1])))
    return ByteDataset(name, kind, data[:a], data[a:b], data[b:])


def check_context(dataset: ByteDataset, context: int) -> None:
    """Raise ``ValueError`` unless every split of ``dataset`` can feed sequences of ``context`` bytes.

    Streams (text, audio) need at least ``context + 1`` bytes per split (inputs plus the next-byte
    target); image datasets are sequences of exactly one image, so ``context`` must equal
    ``example_length`` and every split must hold at least one image.
    """
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    if dataset.example_length:
        if context != dataset.example_length:
            h, w, c = dataset.image_shape
            raise ValueError(f"{dataset.name}: images are sequences of {h}x{w}x{c} = {dataset.example_length:,} "
                             f"bytes, got context {context:,}")
        need, what = dataset.example_length, "one image"
    else:
        need, what = context + 1, f"context + 1 = {context + 1:,} bytes"
    for split in ("train", "validation", "test"):
        have = len(dataset.split(split))
        if have < need:
            raise ValueError(f"{dataset.name}: the {split} split holds {have:,} bytes, fewer than {what}; "
                             f"use a shorter context or more data")


def split_files(files: list, fractions=(0.90, 0.05, 0.05)) -> dict[str, list]:
    """Whole files to train / validation / test: the last ceil(5%) to test, the ceil(5%) before them to
    validation, at least one each (so at least 3 files are needed)."""
    if len(files) < 3:
        raise ValueError(f"need at least 3 files to split by file into train/validation/test, got {len(files)}")
    n_val, n_test = (max(1, math.ceil(round(len(files) * f, 9))) for f in fractions[1:])
    cut = len(files) - n_val - n_test
    if cut < 1:
        raise ValueError(f"{len(files)} files leave none for training")
    return {"train": files[:cut], "validation": files[cut:cut + n_val], "test": files[cut + n_val:]}
