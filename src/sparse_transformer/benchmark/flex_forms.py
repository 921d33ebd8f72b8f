"""FlexAttention formulations of a pattern, for the benchmark's baselines (each part's own form
lives in its module, ``Part.flex``):

- as-is:        one BlockMask from the pattern's mask function (``backend="flex"``)
- per part:     each part on its own structure (a band, the transposed column view or the columns
  laid end to end, a block diagonal, gathered keys), minus the keys of the parts before it; one
  flex call per part. The benchmark sums the fastest form of each part ("decomposed", merge not
  counted) and also times :func:`decomposed`, the parts and their log-sum-exp merge as one
  function, eager and compiled as a whole ("decomposed + merge")
- concatenated: for unions without a column part, the sequence's keys followed by the keys of the
  parts that gather theirs (summary, global tokens), one flex call with one softmax (exact; the
  gather is timed too). This was the fixed pattern's best form.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from ..attention.flex import _flex, make_block_mask
from ..attention.portable import merge
from ..patterns import Part, Pattern
from ..patterns.base import covered


def part_forms(pattern: Pattern) -> list[tuple[Part, tuple[Part, ...]]]:
    """``(part, earlier parts)`` for each part of the pattern's decomposed form."""
    return [(part, pattern.parts[:i]) for i, part in enumerate(pattern.parts)]


def decomposed(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, scale: float,
               variants: tuple[str, ...] = ()) -> Tensor:
    """Every part's own flex form (``variants[i]`` names part i's among ``Part.flex_forms``, default
    ``""``), merged by log-sum-exp: equal to one softmax over the union."""
    results = [part.flex_forms()[variants[i] if i < len(variants) else ""](q, k, v, scale, earlier)
               for i, (part, earlier) in enumerate(part_forms(pattern))]
    return merge([(o.float(), lse.float()) for o, lse in results])[0].to(q.dtype)


@functools.lru_cache(maxsize=1)
def decomposed_compiled():
    """:func:`decomposed` compiled as one function, as a user would run it (static shapes: dynamic
    ones fail on the column view's split); the parts' block masks are built once, outside the graph."""
    return torch.compile(decomposed, dynamic=False)


def _gathers(part: Part) -> bool:
    """A part whose keys are fixed positions (summary slots, global tokens), not all of them."""
    slots = part.slots(0, 2)
    return slots.offsets is None and part.token != "dense"


def concatenated_supported(pattern: Pattern) -> bool:
    return bool(pattern.parts) and any(map(_gathers, pattern.parts)) and all(
        p.token != "column" for p in pattern.parts)


@functools.lru_cache(maxsize=32)
def concatenated_layout(pattern: Pattern, heads: int, n: int, device: str):
    """``(key positions [H, n + G], block mask)`` of the concatenated form."""
    parts = pattern.parts
    tables, owners = [], []
    for index, part in enumerate(parts):
        if _gathers(part):
            rows = [part.slots(h, n).positions for h in range(heads)]
            width = max(len(r) for r in rows)
            table = torch.full((heads, width), n, dtype=torch.long)  # padding at position n: never admitted
            for h, r in enumerate(rows):
                table[h, :len(r)] = r
            tables.append(table)
            owners.append(torch.full((width,), index))
    positions = torch.cat([torch.arange(n).expand(heads, n)] + tables, 1).to(device)
    owner = torch.cat([torch.full((n,), -1)] + owners).to(device)  # -1: a sequence key
    sequence = [i for i, p in enumerate(parts) if not _gathers(p)]

    def admits(index: int, h, i, j):
        mine = (j <= i) & parts[index].allowed(h * 0, h, i, j)
        hit = covered(parts[:index], h, i, j)
        return mine if hit is None else mine & ~hit

    def mask_mod(b, h, q_idx, kv_idx):
        j, who = positions[h, kv_idx], owner[kv_idx]
        ok = torch.zeros_like(j, dtype=torch.bool)
        for index in range(len(parts)):
            if index in sequence:
                ok = ok | ((who == -1) & admits(index, h, q_idx, j))
            else:
                ok = ok | ((who == index) & admits(index, h, q_idx, j))
        return ok

    mask = make_block_mask(mask_mod, None, heads if pattern.heads_differ() else None, n, positions.shape[1], device)
    return positions.clamp(max=n - 1), mask


def concatenated_keys(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, mask: Optional[tuple] = None):
    """``(keys, values, block mask)`` of the concatenated layout for q, k, v ``[B, H, N, D]``
    (``mask``: the layout, when the caller has it); the gather is part of the call."""
    positions, block = mask or concatenated_layout(pattern, q.shape[1], q.shape[2], str(q.device))
    index = positions[None, :, :, None].expand(q.shape[0], -1, -1, q.shape[-1])
    return k.gather(2, index), v.gather(2, index), block


def concatenated(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, scale: float,
                 mask: Optional[tuple] = None) -> Tensor:
    """One flex call over ``[sequence keys | gathered keys]`` (see the module docstring)."""
    keys, values, block = concatenated_keys(q, k, v, pattern, mask)
    return _flex(q, keys, values, block, scale)
