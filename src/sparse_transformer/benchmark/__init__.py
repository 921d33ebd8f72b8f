"""Benchmarks that need the library's internals (attention kernels against dense and FlexAttention)."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename: a benchmark killed by its time limit while
    saving leaves the previous complete file, never a truncated one."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def allow_recompiles(limit: int = 256) -> None:
    """Raise Dynamo's recompile limit (default 8) to ``limit``: every (N, mask, grad mode) is a new
    specialization of the compiled ``flex_attention``, and past the limit a form silently falls back
    to the unfused path, which materializes the N x N scores."""
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit))
