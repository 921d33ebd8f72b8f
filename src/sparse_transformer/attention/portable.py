"""Portable PyTorch backend: O(N x keys-per-query) memory, autograd, CPU and GPU, any float dtype.

Each part of a factorized pattern is turned into small dense problems (PAPER.md, "Efficiency"):

- strided row:     a band; each block of ``stride`` queries sees its own and the previous block
- strided column:  causal attention along the columns of the [N/stride, stride] view (a transpose)
- fixed local:     block-diagonal causal attention
- fixed summary:   attention over the summary keys gathered into one contiguous buffer

A merged pattern computes both parts on disjoint key sets and combines them exactly by their
log-sum-exps, which equals one softmax over the union. Scores and softmax statistics are fp32.
Custom patterns run query chunk by query chunk over the key blocks their mask touches, each chunk
recomputed in the backward pass, so memory stays O(N x chunk).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..patterns import Dense, Fixed, Pattern, Strided

# Query rows per step of the gathered-summary and custom paths: bounds temporaries to chunk x N.
QUERY_CHUNK = 1024


def attend(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Masked softmax attention on small dense problems.

    q ``[..., M, D]``, k and v ``[..., K, D]``, ``allowed`` broadcastable to ``[..., M, K]``.
    Returns the normalized output ``[..., M, D]`` and the log-sum-exp ``[..., M]`` (fp32;
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


def _pad_to(x: Tensor, length: int) -> Tensor:
    """Zero-pad dim -2 (the sequence) of ``[B, H, N, D]`` up to ``length``."""
    return F.pad(x, (0, 0, 0, length - x.shape[-2]))


def _blocks(x: Tensor, blocks: int, w: int) -> Tensor:
    """``[B, H, N, D]`` zero-padded and viewed as ``[B, H, blocks, w, D]`` (D: this tensor's own width)."""
    return _pad_to(x, blocks * w).view(*x.shape[:2], blocks, w, x.shape[-1])


def band(q: Tensor, k: Tensor, v: Tensor, width: int, scale: float) -> tuple[Tensor, Tensor]:
    """Keys ``0 <= i - j < width`` (strided row). Each block of ``w`` queries sees two key blocks."""
    n = q.shape[-2]
    w = min(width, n)
    blocks = -(-n // w)
    qb, kb, vb = (_blocks(x, blocks, w) for x in (q, k, v))  # (B, H, R, w, D)

    def with_previous(x: Tensor) -> Tensor:  # (B, H, R, 2w, D): previous block, then own block
        return torch.cat([F.pad(x, (0, 0, 0, 0, 1, 0))[:, :, :-1], x], dim=3)

    a = torch.arange(w, device=q.device)[:, None]
    t = torch.arange(2 * w, device=q.device)[None, :]
    diff = w + a - t  # i - j for query slot a and key slot t
    allowed = ((diff >= 0) & (diff < width)).expand(blocks, w, 2 * w).clone()
    allowed[0, :, :w] = False  # block 0 has no previous block
    out, lse = attend(qb, with_previous(kb), with_previous(vb), allowed, scale)
    return out.flatten(2, 3)[:, :, :n], lse.flatten(2, 3)[:, :, :n]


def column(q: Tensor, k: Tensor, v: Tensor, stride: int, scale: float, exclusive: bool) -> tuple[Tensor, Tensor]:
    """Keys ``(i - j) % stride == 0``: row attention on the transposed [N/stride, stride] view.
    ``exclusive`` drops ``j = i`` (the row part already has it)."""
    n = q.shape[-2]
    s = min(stride, n)  # with stride >= n only j = i remains, as with stride = n
    rows = -(-n // s)

    def transposed(x: Tensor) -> Tensor:  # (B, H, s, rows, D)
        return _pad_to(x, rows * s).view(*x.shape[:2], rows, s, x.shape[-1]).transpose(2, 3)

    r = torch.arange(rows, device=q.device)
    allowed = (r[None, :] < r[:, None]) if exclusive else (r[None, :] <= r[:, None])
    out, lse = attend(transposed(q), transposed(k), transposed(v), allowed, scale)
    out = out.transpose(2, 3).flatten(2, 3)[:, :, :n]
    lse = lse.transpose(2, 3).flatten(2, 3)[:, :, :n]
    return out, lse


def block_diagonal(q: Tensor, k: Tensor, v: Tensor, block: int, scale: float) -> tuple[Tensor, Tensor]:
    """Keys in the query's own block, ``i // block == j // block`` (fixed local)."""
    n = q.shape[-2]
    w = min(block, n)
    blocks = -(-n // w)
    qb, kb, vb = (_blocks(x, blocks, w) for x in (q, k, v))
    causal = torch.ones(w, w, dtype=torch.bool, device=q.device).tril()
    out, lse = attend(qb, kb, vb, causal, scale)
    return out.flatten(2, 3)[:, :, :n], lse.flatten(2, 3)[:, :, :n]


def summary_count(x: int, stride: int, lo: int, hi: int) -> int:
    """How many positions ``j < x`` have ``j % stride`` in ``[lo, hi)``."""
    return (x // stride) * (hi - lo) + min(max(x % stride - lo, 0), hi - lo)


def summary_positions(n: int, stride: int, lo: int, hi: int, device=None) -> Tensor:
    """Sorted positions ``j < n`` with ``j % stride`` in ``[lo, hi)`` (their count is known ahead,
    so the shapes do not depend on data: torch.compile traces this without a graph break)."""
    g = torch.arange(summary_count(n, stride, lo, hi), device=device)
    return (g // (hi - lo)) * stride + lo + g % (hi - lo)


def gathered(q: Tensor, k: Tensor, v: Tensor, pattern: Fixed, head: int, scale: float,
             exclusive: bool) -> tuple[Tensor, Tensor]:
    """Summary keys of one head group gathered into a contiguous buffer. ``exclusive`` keeps only
    keys in earlier blocks (the local part has the query's own block)."""
    n = q.shape[-2]
    lo, hi = pattern.summary_range(head)
    pos = summary_positions(n, pattern.stride, lo, hi, q.device)
    ks, vs = k[:, :, pos], v[:, :, pos]
    chunk = max(pattern.stride, QUERY_CHUNK // pattern.stride * pattern.stride)
    outs, lses = [], []
    for start in range(0, n, chunk):
        last = min(start + chunk, n) - 1
        i = torch.arange(start, last + 1, device=q.device)[:, None]
        limit = (i // pattern.stride) * pattern.stride if exclusive else i + 1  # keys j < limit
        used = summary_count((last // pattern.stride) * pattern.stride if exclusive else last + 1,
                             pattern.stride, lo, hi)
        allowed = pos[None, :used] < limit
        out, lse = attend(q[:, :, start:start + chunk], ks[:, :, :used], vs[:, :, :used], allowed, scale)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2)


def by_head_group(q: Tensor, k: Tensor, v: Tensor, groups: int, fn) -> tuple[Tensor, Tensor]:
    """Run ``fn(q, k, v, u)`` on the heads ``h`` with ``h % groups == u`` and put them back in order."""
    heads = q.shape[1]
    if groups == 1:
        return fn(q, k, v, 0)
    order, results = [], []
    for u in range(min(groups, heads)):
        idx = torch.arange(u, heads, groups, device=q.device)
        order.append(idx)
        results.append(fn(q[:, idx], k[:, idx], v[:, idx], u))
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


def portable_attention(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, scale: float) -> Tensor:
    """Sparse attention in pure PyTorch; see the module docstring. q, k, v: ``[B, H, N, D]``."""
    if isinstance(pattern, Dense):
        # Dense causal is already memory-efficient in PyTorch (flash / chunked kernels).
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    if isinstance(pattern, Strided):
        parts = []
        if pattern.part in (None, "row"):
            parts.append(band(q, k, v, pattern.stride, scale))
        if pattern.part in (None, "column"):
            parts.append(column(q, k, v, pattern.stride, scale, exclusive=pattern.part is None))
        out, _ = merge(parts)
    elif isinstance(pattern, Fixed):
        parts = []
        if pattern.part in (None, "local"):
            parts.append(block_diagonal(q, k, v, pattern.stride, scale))
        if pattern.part in (None, "summary"):
            parts.append(by_head_group(
                q, k, v, pattern.distinct,
                lambda qg, kg, vg, u: gathered(qg, kg, vg, pattern, u, scale, exclusive=pattern.part is None)))
        out, _ = merge(parts)
    else:
        out = chunked_masked(q, k, v, pattern, scale)
    return out.to(q.dtype)
