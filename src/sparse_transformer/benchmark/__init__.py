"""Benchmarks that need the library's internals (attention kernels against dense and FlexAttention)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Callable


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename: a benchmark killed by its time limit while
    saving leaves the previous complete file, never a truncated one."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def file_stem(name: str) -> str:
    """A device name as a results file's stem: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


class ResultsFile:
    """Rows saved as ``<stem>.json`` (``{"meta": ..., "rows": [...]}``) and ``<stem>.md`` after every
    :meth:`add`, each file replaced atomically: a run stopped by a time limit keeps what it measured."""

    def __init__(self, out: Path, stem: str, meta: dict, markdown: Callable[[list], str]):
        out.mkdir(parents=True, exist_ok=True)
        self.json, self.md, self.meta, self.markdown = out / f"{stem}.json", out / f"{stem}.md", meta, markdown
        self.rows: list = []

    def add(self, row: Any) -> None:
        """Print ``row`` (a dataclass or a dict), keep it and rewrite both files."""
        print(row, flush=True)
        self.rows.append(row)
        rows = [asdict(r) if is_dataclass(r) else r for r in self.rows]
        write_atomic(self.json, json.dumps(dict(meta=self.meta, rows=rows), indent=1))
        write_atomic(self.md, self.markdown(self.rows))


def allow_recompiles(limit: int = 256) -> None:
    """Raise Dynamo's recompile limit (default 8) to ``limit``: every (N, mask, grad mode) is a new
    specialization of the compiled ``flex_attention``, and past the limit a form silently falls back
    to the unfused path, which materializes the N x N scores."""
    import torch

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit))
