"""FlexAttention on its FlashAttention-4 backend (``kernel_options={"BACKEND": "FLASH"}``), the
issue 28 peer of the ``fa4`` backend (:mod:`sparse_transformer.attention.fa4`, here :func:`direct`).

- :func:`flex_flash`: the concatenated layout (the sequence's keys, then each head's gathered keys,
  one softmax) with its block mask, whose mask function reads a table of key positions.
- :func:`flex_flash_as_is`: any pattern's own block mask (``backend="flex"``'s).

Forms that merge parts by log-sum-exp do not run on that backend: its backward takes no gradient
of the log-sum-exp.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..attention.concatenated import concatenated_keys
from ..attention.flex import block_mask
from ..patterns import Pattern


@functools.lru_cache(maxsize=1)
def _flex_flash():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_flash(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, scale: float) -> Tensor:
    """FlexAttention's FLASH backend (FlashAttention-4 underneath) on the concatenated layout."""
    keys, values, block = concatenated_keys(q, k, v, pattern)
    return _flex_flash()(q, keys, values, block_mask=block, scale=scale, kernel_options={"BACKEND": "FLASH"})


def flex_flash_as_is(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, scale: float) -> Tensor:
    """FlexAttention's FLASH backend on the pattern's own block mask (any pattern)."""
    mask = block_mask(pattern, q.shape[2], q.shape[1], str(q.device))
    return _flex_flash()(q, k, v, block_mask=mask, scale=scale, kernel_options={"BACKEND": "FLASH"})
