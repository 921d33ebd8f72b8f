"""The embedded default: the source of the running interpreter's standard library.

Every Python install has it, so the main job runs on a fresh machine with no download.
Files are read in sorted path order (site-packages excluded) and split 90/5/5.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np

from .dataset import ByteDataset, split_stream


def stdlib_files() -> list[Path]:
    """The ``.py`` files of the standard library, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts]
    if not files:
        raise ValueError(f"found no .py files under the standard library folder {root}")
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def load_stdlib() -> ByteDataset:
    """The standard library source as one text stream, split 90/5/5."""
    data = np.frombuffer(b"".join(p.read_bytes() for p in stdlib_files()), dtype=np.uint8)
    return split_stream(data, "stdlib", "text")
