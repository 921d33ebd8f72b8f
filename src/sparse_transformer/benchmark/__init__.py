"""Benchmarks that need the library's internals (attention kernels against dense and FlexAttention)."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename: a benchmark killed by its time limit while
    saving leaves the previous complete file, never a truncated one."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)
