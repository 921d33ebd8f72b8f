"""Triton kernels for one decode step: one query per (sequence, head) over a list of key slots.

Sampling (``sparse_transformer.kvcache``) reads, for each head, ``K_MOVING`` *moving* slots (cache
rows at gathered positions: a strided row, a fixed block) and ``K_FIXED`` *fixed* slots (rows of a
compact buffer, or of the cache itself for dense patterns), each slot valid or not this step. A key
row holds the key and the value side by side, ``[k | v]``, so one slot is one contiguous read.

Flash-decoding: the slot list is cut into ``splits`` chunks, one program per (sequence x head,
chunk), each keeping an online softmax (fp32, log2 domain) over its chunk; a second kernel merges
the chunks' (max, sum, weighted values). With one chunk the first kernel writes the output itself.
Invalid slots are masked out of the loads, so a step early in a long sequence reads only the few
rows that exist. A query with no valid slot gets zeros, as in ``sparse_attention``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor


# ----------------------------------------------------------------------------- jit helpers
@triton.jit
def _slots(q, m, l, acc, rows, valid, dk, dv, DK: tl.constexpr, DV: tl.constexpr):
    """Online-softmax update with ``BLOCK`` slots starting at pointers ``rows`` (``[k | v]`` rows)."""
    keys = tl.load(rows[:, None] + dk[None, :], mask=valid[:, None] & (dk[None, :] < DK), other=0.0)
    s = tl.sum(keys.to(tl.float32) * q[None, :], axis=1)
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid slot yet: keep zeros, no NaN
    alpha = tl.exp2(m - m_safe)
    p = tl.exp2(s - m_safe)
    values = tl.load(rows[:, None] + DK + dv[None, :], mask=valid[:, None] & (dv[None, :] < DV), other=0.0)
    acc = acc * alpha + tl.sum(p[:, None] * values.to(tl.float32), axis=0)
    return m_new, l * alpha + tl.sum(p, axis=0), acc


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _decode_chunk(Q, KV, FKV, INDEX, MOVING_BIAS, FIXED_BIAS, OUT, PART_ACC, PART_ML,
                  scale_log2, H, K_MOVING, K_FIXED, CHUNK,
                  q_sb, q_sh, kv_sb, kv_sh, kv_st, f_sb, f_sh, f_st, o_sb, o_sh,
                  DK: tl.constexpr, DV: tl.constexpr, DK_P2: tl.constexpr, DV_P2: tl.constexpr,
                  BLOCK: tl.constexpr, DIRECT: tl.constexpr):
    bh = tl.program_id(0)
    chunk = tl.program_id(1)
    b = bh // H
    h = bh % H
    dk = tl.arange(0, DK_P2)
    dv = tl.arange(0, DV_P2)
    # fp32 even where the caller's float arrives as fp64 (torch.compile passes Python floats so).
    q = (tl.load(Q + b * q_sb + h * q_sh + dk, mask=dk < DK, other=0.0).to(tl.float32) * scale_log2).to(tl.float32)
    m = tl.full([], float("-inf"), tl.float32)
    l = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([DV_P2], tl.float32)
    lo = chunk * CHUNK
    hi = tl.minimum(lo + CHUNK, K_MOVING + K_FIXED)
    # Moving slots [lo, min(hi, K_MOVING)): cache rows at this step's gathered positions.
    kv = KV + b * kv_sb + h * kv_sh
    for start in range(lo, tl.minimum(hi, K_MOVING), BLOCK):
        j = start + tl.arange(0, BLOCK)
        inside = j < tl.minimum(hi, K_MOVING)
        pos = tl.load(INDEX + h * K_MOVING + j, mask=inside, other=0)
        valid = inside & (tl.load(MOVING_BIAS + h * K_MOVING + j, mask=inside, other=float("-inf")) == 0)
        m, l, acc = _slots(q, m, l, acc, kv + pos * kv_st, valid, dk, dv, DK, DV)
    # Fixed slots [max(lo, K_MOVING), hi) - K_MOVING: consecutive rows of FKV.
    fkv = FKV + b * f_sb + h * f_sh
    for start in range(tl.maximum(lo, K_MOVING) - K_MOVING, hi - K_MOVING, BLOCK):
        f = start + tl.arange(0, BLOCK)
        inside = f < hi - K_MOVING
        valid = inside & (tl.load(FIXED_BIAS + h * K_FIXED + f, mask=inside, other=float("-inf")) == 0)
        m, l, acc = _slots(q, m, l, acc, fkv + f * f_st, valid, dk, dv, DK, DV)
    if DIRECT:
        out = acc / tl.where(l > 0, l, 1.0)
        tl.store(OUT + b * o_sb + h * o_sh + dv, out.to(OUT.dtype.element_ty), mask=dv < DV)
    else:
        splits = tl.num_programs(1)
        tl.store(PART_ACC + (bh * splits + chunk) * DV_P2 + dv, acc)
        tl.store(PART_ML + (bh * splits + chunk) * 2, m)
        tl.store(PART_ML + (bh * splits + chunk) * 2 + 1, l)


@triton.jit
def _decode_merge(OUT, PART_ACC, PART_ML, H, o_sb, o_sh,
                  DV: tl.constexpr, DV_P2: tl.constexpr, SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    s = tl.arange(0, SPLITS_P2)
    dv = tl.arange(0, DV_P2)
    m = tl.load(PART_ML + (bh * SPLITS + s) * 2, mask=s < SPLITS, other=float("-inf"))
    l = tl.load(PART_ML + (bh * SPLITS + s) * 2 + 1, mask=s < SPLITS, other=0.0)
    top = tl.max(m, axis=0)
    weight = tl.exp2(m - tl.where(top == float("-inf"), 0.0, top))  # 0 for chunks without a valid slot
    acc = tl.load(PART_ACC + (bh * SPLITS + s)[:, None] * DV_P2 + dv[None, :], mask=(s < SPLITS)[:, None],
                  other=0.0)
    total = tl.sum(l * weight, axis=0)
    out = tl.sum(acc * weight[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(OUT + b * o_sb + h * o_sh + dv, out.to(OUT.dtype.element_ty), mask=dv < DV)


# ----------------------------------------------------------------------------- launcher
def _pow2(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


def decode_splits(programs: int, slots: int, processors: int, block: int = 64) -> int:
    """How many chunks to cut ``slots`` into. With ``programs`` (sequences x heads) filling half the
    ``processors`` or more, one: a merge kernel would cost more than it saves. Else about 4
    programs per processor, at least one ``block`` per chunk."""
    if 2 * programs >= processors:
        return 1
    return max(1, min(-(-4 * processors // programs), -(-slots // block)))


def decode_attention(q: Tensor, kv: Tensor, fixed_kv: Tensor, index: Tensor, moving_bias: Tensor,
                     fixed_bias: Tensor, scale: float, splits: int, out: Tensor) -> Tensor:
    """Attention of one query per (sequence, head) over its moving and fixed key slots.

    Args:
        q: ``[B, H, dk]`` (any float dtype; scores are fp32). Rows may be strided views.
        kv: the cache ``[B, H, context, dk + dv]``, a row being ``[key | value]``.
        fixed_kv: ``[B, H, >= K_fixed, dk + dv]``, the fixed slots' rows (may be ``kv`` itself).
        index: ``[H, K_moving]`` cache positions of the moving slots (in range).
        moving_bias, fixed_bias: ``[H, K_moving]``, ``[H, K_fixed]`` fp32, 0 where the slot is valid
            and ``-inf`` where not.
        scale: multiplies the scores before the softmax.
        splits: chunks of the slot list, run in parallel and merged (see :func:`decode_splits`).
        out: ``[B, H, dv]`` written in place (its dtype is the output's) and returned.
    """
    b, h, dk = q.shape
    dv = kv.shape[-1] - dk
    k_moving, k_fixed = index.shape[-1], fixed_bias.shape[-1]
    assert kv.shape[:2] == fixed_kv.shape[:2] == (b, h) and fixed_kv.shape[-1] == kv.shape[-1]
    assert kv.stride(-1) == fixed_kv.stride(-1) == q.stride(-1) == 1 and out.shape == (b, h, dv)
    assert index.is_contiguous() and moving_bias.is_contiguous() and fixed_bias.is_contiguous()
    assert moving_bias.shape == (h, k_moving) and fixed_bias.shape[0] == h and fixed_kv.shape[2] >= k_fixed
    slots = k_moving + k_fixed
    block = min(64, max(16, _pow2(-(-slots // splits))))
    chunk = -(-slots // splits // block) * block if slots else block
    splits = max(1, -(-slots // chunk))
    dv_p2 = _pow2(dv)
    if splits == 1:
        part_acc = part_ml = out  # unused
    else:
        part_acc = torch.empty(b * h * splits * dv_p2, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(b * h * splits * 2, dtype=torch.float32, device=q.device)
    _decode_chunk[(b * h, splits)](
        q, kv, fixed_kv, index, moving_bias, fixed_bias, out, part_acc, part_ml,
        scale * math.log2(math.e), h, k_moving, k_fixed, chunk,
        q.stride(0), q.stride(1), kv.stride(0), kv.stride(1), kv.stride(2),
        fixed_kv.stride(0), fixed_kv.stride(1), fixed_kv.stride(2), out.stride(0), out.stride(1),
        DK=dk, DV=dv, DK_P2=_pow2(dk), DV_P2=dv_p2, BLOCK=block, DIRECT=splits == 1, num_warps=4)
    if splits > 1:
        _decode_merge[(b * h,)](out, part_acc, part_ml, h, out.stride(0), out.stride(1),
                                DV=dv, DV_P2=dv_p2, SPLITS=splits, SPLITS_P2=_pow2(splits), num_warps=4)
    return out
