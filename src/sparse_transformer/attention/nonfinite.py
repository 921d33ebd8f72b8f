"""A NaN or inf in a value row reaches only the queries that may attend it.

A matmul over the weights multiplies a masked key's weight 0 by its value, and ``0 * nan`` is
nan: one bad value row would spoil every query of its tile or matrix. The backends that use such
matmuls (``reference``, ``torch``, ``flex``) run on values with non-finite entries set to 0 and
then give each query, per value coordinate, what IEEE arithmetic gives over its admissible keys
alone: nan if it attends a nan (or both infinities), else the infinity it attends. Finite inputs
cost one ``isfinite`` pass (and one host sync) and no more. Inside ``torch.compile`` the check is
skipped (a data-dependent branch would break the graph): compiled code gets the plain matmuls.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..patterns import Pattern


def split_values(v: Tensor) -> tuple[Tensor, Tensor | None]:
    """``(v with non-finite entries zeroed, the bad-entry mask or None)``; checks on the host."""
    bad = ~torch.isfinite(v)
    if not bool(bad.any()):
        return v, None
    return v.masked_fill(bad, 0), bad


def restore(out: Tensor, v: Tensor, bad: Tensor, pattern: Pattern) -> Tensor:
    """``out`` [B, H, N, D] computed from the zeroed values, with each query's coordinates set to
    nan / +inf / -inf where it may attend a key whose value is non-finite there."""
    n = v.shape[2]
    queries = torch.arange(n, device=v.device)
    zero = torch.zeros((), dtype=torch.long, device=v.device)
    flags = torch.zeros(3, *out.shape, dtype=torch.bool, device=out.device)  # attends nan, +inf, -inf
    rows = bad.any(-1).nonzero()  # (R, 3): batch, head, key position
    for b, h in rows[:, :2].unique(dim=0).tolist():
        keys = rows[(rows[:, 0] == b) & (rows[:, 1] == h), 2]
        attends = pattern.mask_mod(zero, zero + h, queries[:, None], keys[None, :])
        attends = attends.expand(n, len(keys)).double()  # (N, R_bh): query i may attend bad key r
        values = v[b, h, keys].double()
        for f, kind in enumerate((values.isnan(), values == float("inf"), values == float("-inf"))):
            flags[f, b, h] = attends @ kind.double() > 0
    nan = flags[0] | (flags[1] & flags[2])
    special = torch.where(flags[1], float("inf"), float("-inf")).to(out.dtype)
    return torch.where(nan, torch.full_like(out, float("nan")), torch.where(flags[1] | flags[2], special, out))


def guarded(attention):
    """Wrap a backend ``attention(q, k, v, pattern, scale)`` with :func:`split_values` / :func:`restore`."""
    @functools.wraps(attention)
    def wrapper(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, scale: float) -> Tensor:
        if torch.compiler.is_compiling():
            return attention(q, k, v, pattern, scale)
        clean, bad = split_values(v)
        out = attention(q, k, clean, pattern, scale)
        return out if bad is None else restore(out, v, bad, pattern)
    return wrapper
