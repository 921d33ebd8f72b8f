"""The concatenated key layout: the sequence's keys followed by each head's *gathered* keys (the
key slots of the parts with fixed positions: summary slots, global tokens), attended with one
softmax. Its BlockMask gives each query tile its few key tiles: for the fixed pattern its block's
diagonal tile, the summary tiles of the blocks before it and at most one partial summary tile.

FlexAttention runs it as the benchmark's "concatenated" form, and FlashAttention-4 (``fa4``
backend) runs the fixed pattern on it with the mask's tiles as its block sparsity.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from ..patterns import Part, Pattern
from ..patterns.base import covered
from .flex import make_block_mask, slot_table


def _gathers(part: Part) -> bool:
    """A part whose keys are fixed positions (summary slots, global tokens), not all of them."""
    slots = part.slots(0, 2)
    return slots.offsets is None and part.token != "dense"


def concatenated_supported(pattern: Pattern) -> bool:
    """Whether the pattern has gathered keys and no column part (whose keys are no fixed set)."""
    return bool(pattern.parts) and any(map(_gathers, pattern.parts)) and all(
        p.token != "column" for p in pattern.parts)


@functools.lru_cache(maxsize=32)
def concatenated_layout(pattern: Pattern, heads: int, n: int, device: str):
    """``(key positions [H, n + G], block mask)`` of the concatenated form."""
    parts = pattern.parts
    tables, owners = [], []
    for index, part in enumerate(parts):
        if _gathers(part):
            tables.append(slot_table(part, heads, n))
            owners.append(torch.full((tables[-1].shape[1],), index))
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
