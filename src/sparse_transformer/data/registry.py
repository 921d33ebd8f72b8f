"""``load(name, path)``: one entry point for every dataset, by name.

| name | what | path |
|---|---|---|
| ``default`` / ``stdlib`` | the running interpreter's standard-library source (embedded default) | not used |
| ``enwik8`` | first 10^8 bytes of Wikipedia, 90M/5M/5M | the zip or unzipped file; else downloaded |
| ``cifar10`` | 48k/2k/10k images of 32x32x3 | ``cifar-10-python.tar.gz``; else downloaded |
| ``imagenet64`` | downsampled ImageNet 64x64 | folder of npz batches (required) |
| ``audio`` | WAV/FLAC, 12 kHz 8-bit mu-law, split by file | file or folder (required) |
| ``gcide``, ``cpython`` | the GCIDE dictionary, CPython 3.11's stdlib (sha256 checked) | the ``.gz`` (first time) |
| ``bytes`` | any file or folder as text-like bytes | file or folder (required) |
| ``images`` | a folder of pictures cut into tiles | folder (required) |
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .dataset import ByteDataset

NAMES = ("default", "stdlib", "enwik8", "cifar10", "imagenet64", "audio", "gcide", "cpython", "bytes", "images")


def load(name: str, path: Optional[Path] = None, *, cache: Optional[Path] = None, tile: tuple[int, int] = (32, 32),
         sample_rate: Optional[int] = None, progress: bool = True) -> ByteDataset:
    """Load (preparing on first use) the dataset ``name`` as a memory-mapped :class:`ByteDataset`.

    ``path``: a local copy (``--from``); ``cache``: the cache root (default: :func:`~.download.cache_dir`); ``tile``: (H, W) for ``images``; ``sample_rate``: for ``audio``
    (default 12 kHz). Raises ``ValueError`` for unknown names, missing paths and bad data.
    """
    from . import audio, images, stdlib, text

    if name not in NAMES:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(NAMES)}")
    if path is not None and not str(path).strip():  # Path("") is the current folder, not "no path"
        raise ValueError(f"dataset {name!r}: the path is an empty string; name a file or folder")
    path = Path(path).expanduser() if path is not None else None
    needs_path = {"imagenet64", "audio", "bytes", "images"}
    if name in needs_path and path is None:
        raise ValueError(f"dataset {name!r} needs a path (--data; --from for data prepare): "
                         + {"imagenet64": "a folder with train_data_batch_*.npz and val_data.npz",
                            "audio": "a WAV/FLAC file or a folder of them",
                            "bytes": "any file or folder", "images": "a folder of pictures"}[name])
    if name in ("default", "stdlib"):
        if path is not None:
            raise ValueError(f"dataset {name!r} is the interpreter's standard library and takes no path")
        return stdlib.load_stdlib(cache)
    if name == "enwik8":
        return text.load_enwik8(path, cache, progress=progress)
    if name in ("gcide", "cpython"):
        return text.load_known(text.GCIDE if name == "gcide" else text.CPYTHON, path, cache)
    if name == "bytes":
        return text.load_bytes(path, cache=cache)
    if name == "cifar10":
        return images.load_cifar10(path, cache, progress=progress)
    if name == "imagenet64":
        return images.load_imagenet64(path, cache)
    if name == "images":
        return images.load_picture_tiles(path, tile, cache)
    return audio.load_audio(path, cache, audio.SAMPLE_RATE if sample_rate is None else sample_rate)
