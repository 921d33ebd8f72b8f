"""Portable PyTorch backend: O(N x keys-per-query) memory, autograd, CPU and GPU, any float dtype.

Each part of a pattern turns itself into small dense problems (``Part.portable``, in the part's
module): a band (local), the transposed ``[N/stride, stride]`` view (column), block-diagonal
attention (block), gathered keys (summary, global tokens). Part ``p`` of a union leaves out the
keys of the parts before it, so the parts cover disjoint key sets; their outputs combine exactly
by their log-sum-exps (:func:`merge`), which equals one softmax over the union. Scores and softmax
statistics are fp32. Custom patterns (and a union with a part that has no portable form) run query chunk by query chunk
over the key blocks their mask touches, each chunk recomputed in the backward pass, so memory stays
O(N x chunk).

This module holds what every part's form shares: :func:`attend` (masked softmax attention with
its log-sum-exp), :func:`merge`, and the head-group and padding helpers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..patterns import Part, Pattern
from ..patterns.base import has_form
from .nonfinite import guarded

# Query rows per step of the custom path: bounds temporaries to chunk x N.
QUERY_CHUNK = 1024


def attend(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Masked softmax attention on small dense problems.

    q ``[..., M, Dqk]``, k ``[..., K, Dqk]``, v ``[..., K, Dv]``, ``allowed`` broadcastable to
    ``[..., M, K]``. Returns the normalized output ``[..., M, Dv]`` and the log-sum-exp ``[..., M]`` (fp32;
    ``-inf`` and a zero output for a query with no admissible key).
    """
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 statistics; fp64 stays fp64 (gradcheck)
    if k.shape[-2] == 0:  # nothing to attend: zero output (still connected to q for autograd)
        zero = (q.to(acc).sum(-1, keepdim=True) + k.to(acc).sum((-2, -1), keepdim=True)) * 0  # [..., M, 1]
        out = zero + v.to(acc).sum(-2, keepdim=True) * 0  # [..., M, Dv]: v's width (half-size q/k are narrower)
        return out, torch.full(q.shape[:-1], float("-inf"), dtype=acc, device=q.device)
    # In place on the fresh matmul output: autograd keeps matmul's inputs, not its output.
    scores = torch.matmul(q.to(acc) * scale, k.to(acc).transpose(-1, -2))
    scores.masked_fill_(~allowed, float("-inf"))
    row_max = scores.amax(-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    total = weights.sum(-1, keepdim=True)
    nonempty = total > 0
    safe_total = torch.where(nonempty, total, torch.ones_like(total))
    out = torch.matmul(weights, v.to(acc)) / safe_total
    lse = torch.where(nonempty, row_max + torch.log(safe_total), torch.full_like(total, float("-inf")))
    return out, lse.squeeze(-1)


def merge(parts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Combine attention over disjoint key sets: ``out = sum_p exp(lse_p - lse) out_p``."""
    if len(parts) == 1:
        return parts[0]
    lses = torch.stack([lse for _, lse in parts])  # (P, ..., N)
    top = lses.amax(0).detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = torch.exp(lses - top)  # 0 for an empty part
    total = weights.sum(0)
    nonempty = total > 0
    safe_total = torch.where(nonempty, total, torch.ones_like(total))
    out = sum(w[..., None] * o for w, (o, _) in zip(weights, parts)) / safe_total[..., None]
    lse = torch.where(nonempty, top + torch.log(safe_total), torch.full_like(total, float("-inf")))
    return out, lse


def pad_to(x: Tensor, length: int) -> Tensor:
    """Zero-pad dim -2 (the sequence) of ``[B, H, N, D]`` up to ``length``."""
    return F.pad(x, (0, 0, 0, length - x.shape[-2]))


def blocks_of(x: Tensor, width: int) -> Tensor:
    """``[B, H, N, D]`` as ``[B, H, ceil(N / width), width, D]``, zero-padded."""
    blocks = -(-x.shape[-2] // width)
    return pad_to(x, blocks * width).view(*x.shape[:2], blocks, width, x.shape[-1])


def heads_of(q: Tensor, earlier: tuple[Part, ...]):
    """Head indices to evaluate ``earlier`` parts with, shaped ``[H, 1, 1, 1]`` to broadcast
    against a part's ``[R, M, K]`` masks (0 when no earlier part depends on the head)."""
    if not any(p.heads_differ() for p in earlier):
        return 0
    return torch.arange(q.shape[1], device=q.device)[:, None, None, None]


def by_head_group(q: Tensor, k: Tensor, v: Tensor, groups: int, fn) -> tuple[Tensor, Tensor]:
    """Run ``fn(q, k, v, u, heads)`` on the heads ``heads = [u, u + groups, ...]`` (a tensor) for
    each ``u`` and put them back in order."""
    count = q.shape[1]
    if groups == 1:
        return fn(q, k, v, 0, torch.arange(count, device=q.device))
    order, results = [], []
    for u in range(min(groups, count)):
        idx = torch.arange(u, count, groups, device=q.device)
        order.append(idx)
        results.append(fn(q[:, idx], k[:, idx], v[:, idx], u, idx))
    inverse = torch.argsort(torch.cat(order))
    out = torch.cat([o for o, _ in results], 1)[:, inverse]
    lse = torch.cat([s for _, s in results], 1)[:, inverse]
    return out, lse


def _custom_chunk(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, key_idx: Tensor, scale: float) -> Tensor:
    out, _ = attend(q, k[:, :, key_idx], v[:, :, key_idx], allowed, scale)
    return out


def chunked_masked(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, scale: float) -> Tensor:
    """Any pattern, from its mask function: per query chunk, attend only the keys that some query of
    the chunk may see; the chunk is recomputed in backward so saved memory stays O(N x chunk)."""
    heads, n = q.shape[1], q.shape[2]
    dev = q.device
    h = torch.arange(heads if pattern.heads_differ() else 1, device=dev)[:, None, None]
    b = torch.zeros((), dtype=torch.long, device=dev)
    keys = torch.arange(n, device=dev)
    outs = []
    for start in range(0, n, QUERY_CHUNK):
        i = torch.arange(start, min(start + QUERY_CHUNK, n), device=dev)
        mask = pattern.mask_mod(b, h, i[None, :, None], keys[None, None, : i[-1] + 1])
        mask = mask.expand(h.shape[0], len(i), int(i[-1]) + 1)  # (H|1, chunk, keys so far)
        key_idx = mask.any(dim=(0, 1)).nonzero().squeeze(-1)
        allowed = mask[:, :, key_idx]
        args = (q[:, :, start:start + len(i)], k, v, allowed, key_idx, scale)
        needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
        outs.append(checkpoint(_custom_chunk, *args, use_reentrant=False) if needs_grad else _custom_chunk(*args))
    return torch.cat(outs, 2)


@guarded
def portable_attention(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, scale: float) -> Tensor:
    """Sparse attention in pure PyTorch; see the module docstring. q, k: ``[B, H, N, Dqk]``, v:
    ``[B, H, N, Dv]``; returns ``[B, H, N, Dv]``."""
    parts = pattern.parts
    if len(parts) == 0 or not all(has_form(p, "portable") for p in parts):  # custom, or a part without the form
        return chunked_masked(q, k, v, pattern, scale).to(q.dtype)
    results = [part.portable(q, k, v, scale, parts[:index]) for index, part in enumerate(parts)]
    out, _ = merge(results) if len(results) > 1 else results[0]
    return out.to(q.dtype)
