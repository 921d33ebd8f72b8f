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

from ..attention.concatenated import concatenated_keys
from ..attention.flex import _flex
from ..attention.portable import merge
from ..patterns import Part, Pattern


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


def concatenated(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, scale: float,
                 mask: Optional[tuple] = None) -> Tensor:
    """One flex call over ``[sequence keys | gathered keys]`` (see the module docstring)."""
    keys, values, block = concatenated_keys(q, k, v, pattern, mask)
    return _flex(q, keys, values, block, scale)
