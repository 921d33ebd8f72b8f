"""Turning sampled bytes into files: text, PNG image grids and mu-law WAV audio.

Bytes are what the model sees (PAPER.md, "The model"): text bytes, image sub-pixels in raster
order with channels innermost, 8-bit mu-law audio samples.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

IMAGE_DATASETS = ("cifar10", "imagenet64", "images")
AUDIO_DATASETS = ("audio",)
from .data.audio import SAMPLE_RATE, mu_law_decode


def data_kind(dataset: str, axes: Sequence[int], context: int) -> tuple[str, Optional[tuple[int, int, int]]]:
    """``(kind, image_shape)`` of what a model generates: images when its training data were
    images (or it has three position axes H, W, C covering its context exactly), audio for the
    audio dataset, text otherwise."""
    if dataset in IMAGE_DATASETS or (len(axes) == 3 and math.prod(axes) == context):
        if len(axes) != 3 or math.prod(axes) != context:
            raise ValueError(f"an image model needs position axes (H, W, C) with H*W*C = context {context}, "
                             f"got {tuple(axes)}")
        return "image", (int(axes[0]), int(axes[1]), int(axes[2]))
    if dataset in AUDIO_DATASETS:
        return "audio", None
    return "text", None


def printable(data: bytes) -> str:
    """``data`` as UTF-8 for a terminal: newlines and tabs kept, every other character that does not
    print (control characters such as ESC, which a terminal would obey) and every byte that is not
    UTF-8 written as an escape (``\\x1b``, ``\\x9f``, ``\\u202e``). Files keep the raw bytes."""
    text = data.decode("utf-8", errors="backslashreplace")
    return "".join(c if c in "\n\t" or c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def write_text(samples: Sequence[bytes], path: Path) -> Path:
    """All samples into one file, each after a ``==== sample i ====`` line (raw bytes kept)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for i, sample in enumerate(samples):
            f.write(f"==== sample {i} ====\n".encode())
            f.write(sample + b"\n")
    return path


def image_grid(images: np.ndarray, columns: int, pad: int = 2, scale: int = 1) -> np.ndarray:
    """``images [N, H, W, C]`` uint8 -> one ``[rows*(H*s+pad)+pad, columns*(W*s+pad)+pad, C]``
    picture on a white background, images in row-major order, each enlarged ``scale`` times."""
    n, h, w, c = images.shape
    images = images.repeat(scale, 1).repeat(scale, 2)
    h, w = h * scale, w * scale
    rows = max(1, math.ceil(n / columns))
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = image
    return grid


def write_png(grid: np.ndarray, path: Path) -> Path:
    """Save an image grid ``[H, W, C]`` (C = 1 grey, 3 RGB) as PNG with matplotlib."""
    import matplotlib.image as mpimg  # writes files without pyplot or a display
    path.parent.mkdir(parents=True, exist_ok=True)
    if grid.shape[-1] == 1:
        mpimg.imsave(path, grid[..., 0], cmap="gray", vmin=0, vmax=255)
    else:
        mpimg.imsave(path, grid)
    return path


def image_scale(height: int) -> int:
    """Enlargement so a small image is at least 64 pixels high in the PNG."""
    return max(1, 64 // height)


def write_wav(codes: np.ndarray, path: Path, sample_rate: int = SAMPLE_RATE) -> Path:
    """8-bit mu-law codes -> 16-bit PCM WAV at ``sample_rate`` Hz (soundfile)."""
    import soundfile
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), mu_law_decode(np.asarray(codes, dtype=np.uint8)), sample_rate, subtype="PCM_16")
    return path
