"""``backend="flex"``: FlexAttention with a BlockMask built from the pattern's mask function.

The general GPU path for custom patterns: any ``mask_mod`` works, and only the key blocks the
mask touches are computed. Block masks are cached per (pattern, N, heads, device); patterns are
hashable (custom ones compare by identity), so the cache key is exact. For built-in patterns the
triton backend is faster: a block mask computes whole 128 x 128 tiles wherever one pair is
admitted, and a strided column or a summary touches almost every key block.

:func:`flex_part` and :func:`flex_gathered` run one part of a union on the part's own structure
(the benchmark's decomposed Flex forms, ``Part.flex``).
"""

from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch
from torch import Tensor

from ..patterns import Part, Pattern
from ..patterns.base import covered
from .nonfinite import guarded

BLOCK_SIZE = 128  # FlexAttention's default tile; masks shorter than this use one partial block
# Mask entries evaluated at once by make_block_mask: its [B, H, rows, KV] band and the mask
# function's intermediates stay a few GiB, where the whole mask at N = 65,536 would not fit.
BAND_ELEMENTS = 2 ** 28


def make_block_mask(mask_mod, batch: Optional[int], heads: Optional[int], q_len: int, kv_len: int, device: str,
                    elements: int = BAND_ELEMENTS):
    """``create_block_mask(mask_mod, batch, heads, q_len, kv_len, device, BLOCK_SIZE)``, with the same
    tiles (full ones kept apart), built a band of query tiles at a time: ``create_block_mask``
    evaluates the whole ``[B, H, q_len, kv_len]`` mask at once."""
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask

    if torch.compiler.is_compiling():  # traced into the caller's graph, which fuses it: nothing is materialized
        return create_block_mask(mask_mod, batch, heads, q_len, kv_len, device=device, BLOCK_SIZE=BLOCK_SIZE)
    b, h = batch or 1, heads or 1
    rows = max(BLOCK_SIZE, elements // (b * h * kv_len) // BLOCK_SIZE * BLOCK_SIZE)
    kv_pad = -kv_len % BLOCK_SIZE
    partial, full = [], []
    for start in range(0, q_len, rows):
        length = min(rows, q_len - start)

        def band(b_, h_, q_idx, kv_idx, start=start):
            return mask_mod(b_, h_, q_idx + start, kv_idx)

        mask = create_mask(band, b, h, length, kv_len, device)
        mask = torch.nn.functional.pad(mask, (0, kv_pad, 0, -length % BLOCK_SIZE))  # padding admits nothing
        counts = mask.view(b, h, mask.shape[2] // BLOCK_SIZE, BLOCK_SIZE, mask.shape[3] // BLOCK_SIZE,
                           BLOCK_SIZE).sum(dim=(3, 5), dtype=torch.int32)
        full.append(counts == BLOCK_SIZE * BLOCK_SIZE)
        partial.append((counts > 0) & ~full[-1])

    def ordered(tiles: list[Tensor]) -> tuple[Tensor, Tensor]:  # per query tile: how many, and which first
        dense = torch.cat(tiles, dim=2).to(torch.int32)
        return dense.sum(-1, dtype=torch.int32), torch.argsort(dense, dim=-1, descending=True, stable=True).to(torch.int32)

    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=BLOCK_SIZE, mask_mod=mask_mod,
                                    seq_lengths=(q_len, kv_len))


@functools.lru_cache(maxsize=64)
def block_mask(pattern: Pattern, n: int, heads: int, device: str):
    """The pattern's BlockMask at length ``n`` (one per head when heads differ, else shared)."""

    def mask_mod(b, h, q_idx, kv_idx):  # a plain function: flex rejects bound methods
        return pattern.mask_mod(b, h, q_idx, kv_idx)

    return make_block_mask(mask_mod, None, heads if pattern.heads_differ() else None, n, n, device)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(q: Tensor, k: Tensor, v: Tensor, mask, scale: float, lse: bool = False):
    """flex_attention: compiled on CUDA, eager (a slow, unfused reference implementation) elsewhere;
    with ``lse``, returns ``(out, natural-log lse)``."""
    from torch.nn.attention import flex_attention as flex_module

    kwargs = dict(block_mask=mask, scale=scale)
    if lse:
        kwargs["return_aux"] = flex_module.AuxRequest(lse=True)
    if torch.compiler.is_compiling():  # the caller's compile fuses it (a warnings filter would break its graph)
        result = flex_module.flex_attention(q, k, v, **kwargs)
    elif q.is_cuda:
        result = _compiled_flex()(q, k, v, **kwargs)
    else:
        with warnings.catch_warnings():  # eager flex warns that it is unfused; on CPU that is the point
            warnings.simplefilter("ignore", UserWarning)
            result = flex_module.flex_attention(q, k, v, **kwargs)
    return (result[0], result[1].lse) if lse else result


@guarded
def flex_attention(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, scale: float) -> Tensor:
    """Sparse attention through FlexAttention. q, k, v: ``[B, H, N, D]``."""
    return _flex(q, k, v, block_mask(pattern, q.shape[2], q.shape[1], str(q.device)), scale)


# The part masks are built eagerly even inside a caller's compile, as a user builds a BlockMask once:
# traced, the gathered positions table is inlined into the mask_mod and Inductor's flex lowering fails.
@torch.compiler.disable
@functools.lru_cache(maxsize=64)
def _part_mask(part: Part, earlier: tuple[Part, ...], batch: int, heads: int, n: int,
               columns: Optional[tuple[int, int]], device: str, packed: Optional[tuple[int, int]] = None):
    """Block mask of ``part`` minus ``earlier`` over the sequence, over its column view when
    ``columns = (step, real heads)`` (batch index = batch x head, head index = column), or over the
    sequence read column by column when ``packed = (step, rows)`` (row ``f`` of it is position
    ``(f % rows) * step + f // rows``)."""
    def position(f):
        return f if packed is None else (f % packed[1]) * packed[0] + f // packed[1]

    def mask_mod(b, h, q_idx, kv_idx):
        head, i, j = (h, position(q_idx), position(kv_idx)) if columns is None else (
            b % columns[1], h + q_idx * columns[0], h + kv_idx * columns[0])
        mine = part.mask_mod(b * 0, head, i, j)
        hit = covered(earlier, head, i, j)
        return mine if hit is None else mine & ~hit

    per_head = part.heads_differ() or any(p.heads_differ() for p in earlier)
    if columns is None:
        b, h = None, (heads if per_head else None)
    else:  # the view's heads are its columns, whose positions differ; its batch holds the real heads
        b, h = (batch if per_head else None), heads
    return make_block_mask(mask_mod, b, h, n, n, device)


def flex_part(q: Tensor, k: Tensor, v: Tensor, scale: float, part: Part, earlier: tuple[Part, ...],
              columns: Optional[tuple[int, int]] = None,
              packed: Optional[tuple[int, int]] = None) -> tuple[Tensor, Tensor]:
    """``part``'s keys minus ``earlier``'s, ``(out, lse)``, with q, k, v ``[B, H, N, D]`` the sequence,
    (``columns``) its column view ``[B * heads, step, N / step, D]``, or (``packed = (step, rows)``)
    the sequence read column by column."""
    mask = _part_mask(part, earlier, q.shape[0], q.shape[1], q.shape[2], columns, str(q.device), packed)
    return _flex(q, k, v, mask, scale, lse=True)


def slot_table(part: Part, heads: int, n: int) -> Tensor:
    """Each head's fixed key positions of ``part`` (``part.slots``), ``[heads, at least 1]``, padded
    with position ``n``, which no query admits."""
    rows = [part.slots(h, n).positions for h in range(heads)]
    table = torch.full((heads, max(1, max(len(r) for r in rows))), n, dtype=torch.long)
    for h, r in enumerate(rows):
        table[h, :len(r)] = r
    return table


@torch.compiler.disable
@functools.lru_cache(maxsize=64)
def _gathered(part: Part, earlier: tuple[Part, ...], heads: int, n: int, device: str):
    """``(positions [H, G], block mask)``: each head's key positions (``part.slots``), padded."""
    positions = slot_table(part, heads, n).to(device)

    def mask_mod(b, h, q_idx, kv_idx):
        j = positions[h, kv_idx]
        hit = covered(earlier, h, q_idx, j)
        mine = (j <= q_idx) & part.allowed(b, h, q_idx, j)
        return mine if hit is None else mine & ~hit

    return positions, make_block_mask(mask_mod, None, heads, n, positions.shape[1], device)


def flex_gathered(q: Tensor, k: Tensor, v: Tensor, scale: float, part: Part,
                  earlier: tuple[Part, ...]) -> tuple[Tensor, Tensor]:
    """``part``'s keys gathered into one buffer per head (its cache slots' fixed positions), minus
    ``earlier``'s, through one flex call; ``(out, lse)``. The gather is part of the call."""
    positions, mask = _gathered(part, earlier, q.shape[1], q.shape[2], str(q.device))
    index = positions.clamp(max=q.shape[2] - 1)[None, :, :, None].expand(q.shape[0], -1, -1, q.shape[-1])
    return _flex(q, k.gather(2, index), v.gather(2, index), mask, scale, lse=True)
