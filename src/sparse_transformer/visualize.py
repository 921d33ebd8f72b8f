"""Pictures of patterns: the connectivity matrix (as in the paper's figure) and a 2-D view of
which positions of the [N/stride, stride] grid one query attends to."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure  # no pyplot: no global backend or figure state, no display needed

from .layout import block_layout
from .patterns import Pattern

# Above this length the matrix is drawn per block of keys, not per key.
MAX_CELLS = 512
# The longest sequence drawn: the block picture still evaluates every pair (about 4 s at this n).
MAX_DRAW = 32_768


def connectivity(pattern: Pattern, n: int, head: int = 0) -> tuple[np.ndarray, int]:
    """``[n, n]`` mask, or its block layout when n > MAX_CELLS; returns (image, cell size)."""
    if n <= MAX_CELLS:
        return pattern.mask(n, head=head).numpy(), 1
    cell = -(-n // MAX_CELLS)
    return block_layout(pattern, n, cell, head).numpy(), cell


def grid_view(pattern: Pattern, n: int, width: int, query: int, head: int = 0) -> np.ndarray:
    """``[ceil(n/width), width]`` int grid: 2 at the query, 1 where it attends, 0 elsewhere, -1 past n."""
    rows = -(-n // width)
    grid = np.full(rows * width, -1, dtype=np.int8)
    zero = torch.zeros((), dtype=torch.long)  # one row of the mask: O(n), never n x n
    row = pattern.mask_mod(zero, zero + head, torch.tensor(query), torch.arange(n))
    grid[:n] = row.expand(n).numpy().astype(np.int8)
    grid[query] = 2
    return grid.reshape(rows, width)


def natural_width(pattern: Pattern, n: int) -> int:
    """Row length of the 2-D view: the paper patterns' stride, else the longest period or window of
    the parts, else about sqrt(n)."""
    if getattr(pattern, "stride", None):
        return pattern.stride
    longest = max((max(p.structure()[:2]) for p in pattern.parts), default=1)
    return longest if longest > 1 else max(1, int(round(n ** 0.5)))


def draw(pattern: Pattern, n: int, out: str | Path, heads: Sequence[int] = (0,), width: int | None = None,
         query: int | None = None) -> Path:
    """Draw the connectivity matrix and the 2-D view for each head into ``out`` (PNG)."""
    if n > MAX_DRAW:
        raise ValueError(f"drawing evaluates the mask at all n^2 pairs: n must be <= {MAX_DRAW:,} to draw, got "
                         f"{n:,} (keys per query and density are computed for any n)")
    width = min(width or natural_width(pattern, n), n)  # stride > n: one row
    query = n - 1 - width // 2 if query is None else query
    if not 0 <= query < n:
        raise ValueError(f"query must be in [0, {n - 1}], got {query}")
    cmap = ListedColormap(["#f7f7f7", "#ffffff", "#3b75af", "#d62728"])
    fig = Figure(figsize=(9, 4.2 * len(heads)))
    axes = fig.subplots(len(heads), 2, squeeze=False)
    for row, head in enumerate(heads):
        image, cell = connectivity(pattern, n, head)
        ax = axes[row, 0]
        ax.imshow(image, cmap="Blues", vmin=0, vmax=1.3, interpolation="nearest")
        unit = "position" if cell == 1 else f"block of {cell}"
        ax.set_title(f"{pattern.name}, head {head}\nquery (row) x key (column), per {unit}", fontsize=9)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        grid = grid_view(pattern, n, width, query, head)
        ax = axes[row, 1]
        ax.imshow(grid + 1, cmap=cmap, vmin=0, vmax=3, interpolation="nearest")
        ax.set_title(f"positions query {query} attends to ([{grid.shape[0]}, {width}] view)", fontsize=9)
        ax.set_xlabel("column (position mod width)")
        ax.set_ylabel("row")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out
