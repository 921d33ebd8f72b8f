"""A byte dataset: three uint8 splits plus what the model needs to know about their shape."""

from __future__ import annotations

from dataclasses import dataclass
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
    """Split one byte stream into train / validation / test by fractions (enwik8 style, 90/5/5)."""
    n = len(data)
    a = int(n * fractions[0])
    b = a + int(n * fractions[1])
    return ByteDataset(name, kind, data[:a], data[a:b], data[b:])
