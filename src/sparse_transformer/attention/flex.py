"""``backend="flex"``: FlexAttention with a BlockMask built from the pattern's mask function.

The general GPU path for custom patterns: any ``mask_mod`` works, and only the key blocks the
mask touches are computed. Block masks are cached per (pattern, N, heads, device); patterns are
frozen dataclasses (custom ones compare by identity), so the cache key is exact. For the built-in
strided and fixed patterns the triton backend is faster: their mask touches almost every key
block (issue 4's measurements), which a block mask cannot avoid.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor

from ..patterns import Pattern

BLOCK_SIZE = 128  # FlexAttention's default tile; masks shorter than this use one partial block


def flex_available() -> bool:
    """True when this torch ships FlexAttention."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=64)
def block_mask(pattern: Pattern, n: int, heads: int, device: str):
    """The pattern's BlockMask at length ``n`` (one per head when heads differ, else shared)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):  # a plain function: flex rejects bound methods
        return pattern.mask_mod(b, h, q_idx, kv_idx)

    h = heads if pattern.heads_differ() else None
    return create_block_mask(mask_mod, None, h, n, n, device=device, BLOCK_SIZE=BLOCK_SIZE)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_attention(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, scale: float) -> Tensor:
    """Sparse attention through FlexAttention. q, k, v: ``[B, H, N, D]``; compiled on CUDA, eager
    (a slow, unfused reference implementation) elsewhere."""
    from torch.nn.attention import flex_attention as flex_module

    mask = block_mask(pattern, q.shape[2], q.shape[1], str(q.device))
    if q.is_cuda:
        return _compiled_flex()(q, k, v, block_mask=mask, scale=scale)
    with warnings.catch_warnings():  # eager flex warns that it is unfused; on CPU that is the point
        warnings.simplefilter("ignore", UserWarning)
        return flex_module.flex_attention(q, k, v, block_mask=mask, scale=scale)
