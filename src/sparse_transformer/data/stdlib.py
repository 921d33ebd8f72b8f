"""The embedded default: the source of the running interpreter's standard library.

Every Python install has it, so the main job runs on a fresh machine with no download.
Files are read in sorted path order (site-packages excluded) and split 90/5/5. The concatenated
bytes are written once into the cache folder (``cache_dir()/stdlib-<hash>``) and memory-mapped on
later loads; the cache is rebuilt if the standard library changed (paths, sizes or modification
times differ) or if a split file is truncated or corrupted.
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from pathlib import Path
from typing import Optional

import numpy as np

from .dataset import ByteDataset, split_stream
from .download import cache_dir
from .store import files_fingerprint, prepared, write_splits


def stdlib_files() -> list[Path]:
    """The ``.py`` files of the standard library, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts]
    if not files:
        raise ValueError(f"found no .py files under the standard library folder {root}")
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def load_stdlib(cache: Optional[Path] = None) -> ByteDataset:
    """The standard library source as one text stream, split 90/5/5, cached and memory-mapped.

    ``cache``: the cache root (default :func:`~sparse_transformer.data.download.cache_dir`).
    """
    files = stdlib_files()
    fingerprint = files_fingerprint(files)
    tag = hashlib.sha256(f"{sys.version}{files[0].parent}".encode()).hexdigest()[:10]
    folder = Path(cache or cache_dir()) / f"stdlib-{tag}"

    def build(folder: Path) -> None:
        data = np.frombuffer(b"".join(p.read_bytes() for p in files), dtype=np.uint8)
        write_splits(folder, split_stream(data, "stdlib", "text"), fingerprint, files=len(files),
                     source=str(Path(sysconfig.get_paths()["stdlib"])))

    return prepared(folder, fingerprint, build)
