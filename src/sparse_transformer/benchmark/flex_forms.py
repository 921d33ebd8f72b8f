"""FlexAttention formulations of the strided and fixed patterns, for the benchmark's baseline.

- as-is:        one BlockMask from the pattern's mask function (``backend="flex"``)
- strided, decomposed: the window part (band) plus the column part as causal-exclusive row
  attention on the transposed [N/stride, stride] view; two flex calls whose times are summed
  (a lower bound: their log-sum-exp merge is not counted, which only favours Flex)
- fixed, gathered: the summary keys of every block gathered into one buffer appended to K and V,
  one flex call over ``N + G`` keys with one softmax (exact; the gather is timed too)
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..attention.flex import BLOCK_SIZE, _compiled_flex
from ..attention.portable import summary_positions
from ..patterns import Fixed, Strided


@functools.lru_cache(maxsize=32)
def _mask(kind: str, n_q: int, n_kv: int, a: int, b: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    if kind == "band":
        def fn(bb, h, q, k):
            return (k <= q) & (q - k < a)
    elif kind == "causal_exclusive":
        def fn(bb, h, q, k):
            return k < q
    else:  # gathered fixed: keys < n_q are the sequence (local part), the rest summary slots
        stride, summary = a, b

        def fn(bb, h, q, k):
            local = (k <= q) & (k // stride == q // stride) & (k < n_q)
            g = k - n_q
            pos = (g // summary) * stride + (stride - summary) + g % summary
            return local | ((k >= n_q) & (pos < (q // stride) * stride))
    return create_block_mask(fn, None, None, n_q, n_kv, device=device, BLOCK_SIZE=BLOCK_SIZE)


def strided_window(q: Tensor, k: Tensor, v: Tensor, pattern: Strided, scale: float) -> Tensor:
    n = q.shape[2]
    return _compiled_flex()(q, k, v, block_mask=_mask("band", n, n, pattern.stride, 0, str(q.device)), scale=scale)


def strided_column(q: Tensor, k: Tensor, v: Tensor, pattern: Strided, scale: float) -> Tensor:
    """Column part on the transposed view ``[B*H, stride, N/stride, D]`` (a strided view, no copy)."""
    b, h, n, d = q.shape
    s = pattern.stride
    assert n % s == 0, "the benchmark's column form needs N divisible by the stride"

    def view(x):
        return x.reshape(b * h, n // s, s, d).transpose(1, 2)

    mask = _mask("causal_exclusive", n // s, n // s, 0, 0, str(q.device))
    out = _compiled_flex()(view(q), view(k), view(v), block_mask=mask, scale=scale)
    return out.transpose(1, 2).reshape(b, h, n, d)


def fixed_gathered(q: Tensor, k: Tensor, v: Tensor, pattern: Fixed, scale: float) -> Tensor:
    assert pattern.distinct == 1 and pattern.part is None, "benchmark form: merged fixed, one summary group"
    n = q.shape[2]
    lo, hi = pattern.summary_range(0)
    pos = summary_positions(n, pattern.stride, lo, hi, q.device)
    kk = torch.cat([k, k[:, :, pos]], 2)
    vv = torch.cat([v, v[:, :, pos]], 2)
    mask = _mask("gathered", n, n + len(pos), pattern.stride, pattern.summary, str(q.device))
    return _compiled_flex()(q, kk, vv, block_mask=mask, scale=scale)
