"""Triton kernels for one *part* of a factorized pattern, forward and backward.

Order as in Triton's fused-attention tutorial: jit helpers, configs, forward kernel, backward
kernels. The autograd.Function that chains the parts lives in ``triton_sparse.py``.

A part is causal-ish attention of queries over one contiguous list of key rows, with a
per-(query, key) condition from their positions (``MODE``):

- ``BAND``:    rows of a *view* of the sequence, ``DMIN <= i - j < W``. The view is either the
               sequence itself (strided row: ``W = stride``; dense: ``W = N``) or one column of the
               ``[N/stride, stride]`` matrix, reached with a row step of ``stride`` and no copy
               (strided column: ``W = N``, ``DMIN = 1`` when merged with the row part).
- ``BLOCK``:   ``i // W == j // W`` and ``j <= i - DMIN`` (fixed local). With ``PACKED`` the view is
               the columns of the ``[N/STEP, STEP]`` matrix one after another (row ``f`` at position
               ``f // W + (f % W) * STEP``, ``W = N / STEP``): the strided column part when its
               columns are shorter than a tile, so that one tile holds several of them.
- ``SUMMARY``: key row ``g`` is the g-th summary slot, at position ``(g // C) * L + lo + g % C``
               with ``lo`` the head's, read from the host's table ``LO`` (fixed summary); ``DMIN = 1``
               keeps only keys of earlier blocks (merged with the local part), else keys ``<= i``.

``KEYS > 0`` keeps a BAND or BLOCK part to the first ``KEYS`` key rows (global tokens: a causal
band over the first ``KEYS`` positions). ``patterns/plans.py`` says which part is which launch.

Keys an earlier part of a union already admits are left out, so every key counts once: by
``DMIN`` where the structure allows it (a window before a column or a block, a block before the
summary of its stride), else by testing positions against each earlier part's own condition
(``EXCL``: their modes, 3 bits each; ``XP``: their arguments and per-head ``lo``), on every tile
that may hold such keys (``XP[0]``: past it none; global tokens are a prefix).

Each kernel runs one loop over a part's tiles and evaluates the part's condition only on the
edge tiles (a uniform branch per tile), so interior tiles pay no mask arithmetic. One loop, not
one per kind of tile: the software pipeliner prefetches across all of a program's tiles, and
local parts have only two or three of them (three loops of one tile each waited on memory three
times). Scores live in the
log2 domain (``scale * log2(e)`` folded in); the saved log-sum-exp is base 2 too. The forward takes
the row max of the unscaled scores, so ``scale > 0`` (``triton_sparse`` rewrites other scales).
With ``TMA`` the loops load their tiles through tensor descriptors (the copy engine; see
``_load_rows``), else through pointers. A forward launch
with ``MERGE`` starts its online softmax from a previous part's (output, lse): parts on disjoint
key sets merge exactly, as one softmax. With ``TWO_PARTS`` the forward and dQ kernels run a second
part (``MODE2``) over the same query rows in the same program: the fixed pattern's block and
summary parts, or global tokens and the window or block after them (width ``W2``).
"""

from __future__ import annotations

import triton
import triton.language as tl

BAND, BLOCK, SUMMARY = 0, 1, 2


# ----------------------------------------------------------------------------- jit helpers
@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    """``a @ b (+ acc)``; ``UPCAST`` feeds fp32 operands (the CPU interpreter's bf16 dot is wrong)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc)


@triton.jit
def _summary_count(x, L, C, lo):
    """How many summary slots lie at positions < x (x >= 0)."""
    return (x // L) * C + tl.minimum(tl.maximum(x % L - lo, 0), C)


@triton.jit
def _position(j, col, STEP, W, L, C, lo, IS_SUMMARY: tl.constexpr, PACKED: tl.constexpr):
    """Sequence position of row ``j`` of a view (or of summary slot ``j``, or of the packed columns)."""
    if IS_SUMMARY:
        pos = (j // C) * L + lo + j % C
    elif PACKED:
        pos = j // W + (j % W) * STEP
    else:
        pos = col + j * STEP
    return pos


@triton.jit
def _view_length(N, col, STEP, PACKED: tl.constexpr):
    """Rows of the query view: column ``col`` of ``[N/STEP, STEP]`` (ragged: ``ceil((N - col) / STEP)``),
    or all N positions when the columns are packed (``STEP`` divides N then)."""
    if PACKED:
        length = N + col * 0
    else:
        length = (N - col + STEP - 1) // STEP
    return length


@triton.jit
def _load_rows(desc, ptr, bh, r0, col, STEP, W, L, C, lo, len_rows, offs_r, offs_d, HEAD_DIM: tl.constexpr,
               BLOCK: tl.constexpr, IS_SUMMARY: tl.constexpr, PACKED: tl.constexpr, TMA: tl.constexpr):
    """Rows ``r0 + offs_r`` of a view (or summary slots ``r0 + offs_r``) as a [BLOCK, HEAD_DIM] tile
    (``HEAD_DIM``: this tensor's width, q/k's or v's),
    zero past ``len_rows``. With ``TMA``, one copy-engine load through ``desc``: a view is
    ``[B*H, N / STEP, STEP * D]`` (the tile at column ``col * D``), the summary slots
    ``[B*H, N / L, L, D]`` (``BLOCK // C`` blocks of ``C`` slots from ``lo``). Else a pointer gather
    from ``ptr``, the batch-head's base."""
    if TMA:
        if IS_SUMMARY:
            x = tl.reshape(desc.load([bh, r0 // C, lo + r0 % C, 0]), [BLOCK, HEAD_DIM])
        else:
            x = tl.reshape(desc.load([bh, r0, col * HEAD_DIM]), [BLOCK, HEAD_DIM])
    else:
        rows = r0 + offs_r
        pos = _position(rows, col, STEP, W, L, C, lo, IS_SUMMARY, PACKED)
        x = tl.load(ptr + pos[:, None] * HEAD_DIM + offs_d[None, :], mask=(rows < len_rows)[:, None], other=0.0)
    return x


@triton.jit
def _allowed(i, j, len_q, len_k, W, L, C, lo, MODE: tl.constexpr, DMIN: tl.constexpr):
    """The part's condition on query rows ``i`` [BM, 1] and key rows ``j`` [1, BN] (or transposed)."""
    if MODE == 0:
        d = i - j
        ok = (d >= DMIN) & (d < W)
    elif MODE == 1:
        ok = (j <= i - DMIN) & (i // W == j // W)
    else:
        pos = (j // C) * L + lo + j % C
        if DMIN == 1:
            ok = pos < (i // L) * L
        else:
            ok = pos <= i
    return ok & (i < len_q) & (j < len_k)


@triton.jit
def _keys_of(i_lo, i_hi, W, L, C, lo, MODE: tl.constexpr, DMIN: tl.constexpr):
    """Key rows ``[start, end)`` some query row in ``[i_lo, i_hi]`` sees; all of them see ``[full_lo, full_hi)``."""
    if MODE == 0:
        start = tl.maximum(i_lo - W + 1, 0)
        end = i_hi - DMIN + 1
        full_lo = tl.maximum(i_hi - W + 1, 0)
        full_hi = i_lo - DMIN + 1
    elif MODE == 1:
        start = (i_lo // W) * W
        end = i_hi - DMIN + 1
        full_lo = start
        full_hi = tl.where(i_hi // W == i_lo // W, i_lo - DMIN + 1, start)
    else:
        start = i_lo * 0
        full_lo = start
        if DMIN == 1:
            end = (i_hi // L) * C
            full_hi = (i_lo // L) * C
        else:
            end = _summary_count(i_hi + 1, L, C, lo)
            full_hi = _summary_count(i_lo + 1, L, C, lo)
    return start, full_lo, full_hi, end


@triton.jit
def _queries_of(j_lo, j_hi, len_q, W, L, C, lo, MODE: tl.constexpr, DMIN: tl.constexpr):
    """Query rows ``[start, end)`` that see some key row in ``[j_lo, j_hi]``; ``[full_lo, full_hi)`` see all."""
    if MODE == 0:
        start = j_lo + DMIN
        end = tl.minimum(j_hi + W, len_q)
        full_lo = j_hi + DMIN
        full_hi = tl.minimum(j_lo + W, len_q)
    elif MODE == 1:
        start = j_lo + DMIN
        end = tl.minimum((j_hi // W + 1) * W, len_q)
        full_lo = j_hi + DMIN
        full_hi = tl.where(j_hi // W == j_lo // W, tl.minimum((j_lo // W + 1) * W, len_q), full_lo)
    else:
        end = len_q + j_lo * 0
        full_hi = end
        if DMIN == 1:
            start = (j_lo // C + 1) * L
            full_lo = (j_hi // C + 1) * L
        else:
            start = (j_lo // C) * L + lo + j_lo % C
            full_lo = (j_hi // C) * L + lo + j_hi % C
    return start, full_lo, full_hi, end


@triton.jit
def _split(start, full_lo, full_hi, end, BLOCK_SIZE: tl.constexpr):
    """Tile boundaries: tiles in ``[first, a)`` and ``[b, end)`` need the mask, ``[a, b)`` do not."""
    first = (start // BLOCK_SIZE) * BLOCK_SIZE
    a = tl.minimum(tl.maximum((full_lo + BLOCK_SIZE - 1) // BLOCK_SIZE * BLOCK_SIZE, first), end)
    b = tl.maximum(a, (full_hi // BLOCK_SIZE) * BLOCK_SIZE)
    return first, a, b


@triton.jit
def _program(n_tiles, NCOLS, H, LO, KEY_TILES: tl.constexpr, LO_TABLE: tl.constexpr):
    """Decode a 1-D program id into (tile, view column, batch*head, the head's summary offset ``lo``:
    from the host's per-head table ``LO`` with ``LO_TABLE``, else ``LO`` itself, every head's).

    Longest work first, for load balance in causal parts: the last query tile sees the most keys,
    the first key tile is seen by the most queries."""
    pid = tl.program_id(0)
    if KEY_TILES:
        tile = pid % n_tiles
    else:
        tile = n_tiles - 1 - pid % n_tiles
    rest = pid // n_tiles
    col = rest % NCOLS
    bh = rest // NCOLS
    if LO_TABLE:
        lo = tl.load(LO + bh % H)
    else:  # one offset: an argument, which the compiler folds into the index arithmetic
        lo = LO + bh * 0
    return tile, col, bh, lo


@triton.jit
def _query_tile(N, H, n_tiles, NCOLS, STEP, W, L, C, LO, PACKED: tl.constexpr, QK_DIM: tl.constexpr,
                V_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LO_TABLE: tl.constexpr):
    """The query rows of a query-tiled program (forward and dQ): its tile, column, head and summary
    offset; the view's length; the row and column offsets; which rows exist; their positions in the
    sequence and the offsets of their q and output rows."""
    tile, col, bh, lo = _program(n_tiles, NCOLS, H, LO, False, LO_TABLE)
    len_q = _view_length(N, col, STEP, PACKED)
    base_qk = bh.to(tl.int64) * N * QK_DIM
    base_v = bh.to(tl.int64) * N * V_DIM
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_qk = tl.arange(0, QK_DIM)
    offs_v = tl.arange(0, V_DIM)
    q_pos = _position(offs_m, col, STEP, W, L, C, lo, False, PACKED)
    q_off = base_qk + q_pos[:, None] * QK_DIM + offs_qk[None, :]
    o_off = base_v + q_pos[:, None] * V_DIM + offs_v[None, :]
    return (tile, col, bh, lo, len_q, base_qk, base_v, offs_m, tl.arange(0, BLOCK_N), offs_qk, offs_v,
            offs_m < len_q, q_pos, q_off, o_off)


@triton.jit
def _key_count(N, len_q, KEYS, L, C, lo, MODE: tl.constexpr, KEYED: tl.constexpr):
    """Length of a part's list of key rows: the summary slots, else the view (its first ``KEYS`` rows
    with ``KEYED``)."""
    if MODE == 2:
        count = _summary_count(N, L, C, lo)
    elif KEYED:
        count = tl.minimum(len_q, KEYS)
    else:
        count = len_q
    return count


@triton.jit
def _reaches(j0, col, STEP, W, L, C, lo, XP, MODE: tl.constexpr, PACKED: tl.constexpr):
    """Whether the earlier parts may admit a key of the tile whose first key row is ``j0``: keys at
    positions ``>= XP[0]`` they never admit (global tokens: past their count), and positions grow
    along a view's rows (the packed columns' do not: always)."""
    if PACKED:
        out = j0 >= 0
    else:
        out = _position(j0, col, STEP, W, L, C, lo, MODE == 2, PACKED) < tl.load(XP)
    return out


@triton.jit
def _excluded(ip, jp, XP, h, H, EXCL: tl.constexpr, EXCL_COUNT: tl.constexpr):
    """Where query position ``ip`` and key position ``jp`` (broadcast against each other) are a pair
    an earlier part admits: ``EXCL_COUNT`` parts, the x-th of mode ``(EXCL >> 3x) & 7`` (1: a band
    over the sequence, 2: a band over the columns of ``[N/step, step]``, 3: a block, 4: summary
    slots) with arguments ``XP[1 + x]``: ``W, step, DMIN, keys, L, C``, then ``lo`` per head."""
    hit = (ip < 0) & (jp < 0)
    for x in tl.static_range(EXCL_COUNT):
        kind = (EXCL >> (3 * x)) & 7  # a constexpr: the branches below are chosen when compiling
        row = XP + 1 + x * (8 + H)
        w = tl.load(row)
        if kind == 1:
            d = ip - jp
            mine = (d >= tl.load(row + 2)) & (d < w) & (jp < tl.load(row + 3))
        elif kind == 2:
            step = tl.load(row + 1)
            d = ip // step - jp // step
            mine = (ip % step == jp % step) & (d >= tl.load(row + 2)) & (d < w)
        elif kind == 3:
            mine = (ip // w == jp // w) & (ip - jp >= tl.load(row + 2))
        else:
            block = tl.load(row + 4)
            offset = jp % block - tl.load(row + 8 + h)
            mine = (offset >= 0) & (offset < tl.load(row + 5))
            mine = mine & ((tl.load(row + 2) == 0) | (jp < (ip // block) * block))
        hit = hit | mine
    return hit


# ----------------------------------------------------------------------------- configs
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kind of part and head dim. Local parts (a band or
# block of ``stride`` keys): BLOCK_N = 64 keeps the strided band at three key tiles per 64 queries
# (1.5x its real work); two stages, as their loops are two or three tiles long. Global parts (dense,
# strided column, fixed summary) are dense-like work. 128-row tiles and 8 warps were slower for
# every part. Override with ``KernelConfig``. The measurements behind every default here:
# docs/results.md, "Why the kernels' defaults are what they are".
DEFAULT_CONFIG = {
    "local": {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 64, 4, 2), 128: (64, 64, 4, 2)},
    "global": {16: (64, 64, 4, 3), 32: (64, 64, 4, 3), 64: (64, 64, 4, 3), 128: (64, 64, 4, 2)},
}
# dK/dV of *short* parts, whose keys few queries see (local parts; the strided column, N / stride
# rows): their loops are a few tiles long and bound by latency, so the programs resident per SM
# decide. 32-query steps and a cap of 168 registers (``maxnreg``) keep three programs of 4 warps
# per SM instead of two. On long loops (dense, fixed summary) the same was slower, and the cap
# alone, with 64x64 tiles, slower everywhere. D = 128 keeps the above.
SHORT_DKDV_CONFIG = {16: (32, 64, 4, 2), 32: (32, 64, 4, 2), 64: (32, 64, 4, 2)}
SHORT_DKDV_MAX_REGISTERS = 168
# Register operands: Hopper's matmul (wgmma) reads its first operand from shared memory or from
# registers. Triton keeps a loaded tile in shared memory and a computed one in registers, so the
# forward of short parts recomputes q (``Q_IN_REGISTERS``), which was faster there. Long loops lost,
# and so did register operands in the backward kernels (q, dO in dQ; k, v in dK/dV).


# ----------------------------------------------------------------------------- forward
@triton.jit
def _key_tiles(i_lo, i_hi, len_k, W, L, C, lo, MODE: tl.constexpr, DMIN: tl.constexpr, BLOCK_N: tl.constexpr,
               KEYED: tl.constexpr):
    """``(first, a, b, end)``: the key tiles of a part for the query rows ``[i_lo, i_hi]`` start at
    ``first`` and end before ``end``; those in ``[a, b)`` need no mask (see ``_split``)."""
    start, full_lo, full_hi, end = _keys_of(i_lo, i_hi, W, L, C, lo, MODE, DMIN)
    if KEYED:  # a part kept to its first KEYS rows
        end, full_hi = tl.minimum(end, len_k), tl.minimum(full_hi, len_k)
    first, a, b = _split(start, full_lo, full_hi, end, BLOCK_N)
    return first, a, b, end


@triton.jit
def _load_keys(KD, VD, Kb, Vb, bh, t, col, STEP, W, L, C, lo, len_k, offs_n, offs_qk, offs_v, MODE: tl.constexpr,
               PACKED: tl.constexpr, QK_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
               TMA: tl.constexpr):
    """The key and value rows of key tile ``t`` (see ``_load_rows``)."""
    k = _load_rows(KD, Kb, bh, t, col, STEP, W, L, C, lo, len_k, offs_n, offs_qk, QK_DIM, BLOCK_N, MODE == 2, PACKED,
                   TMA)
    v = _load_rows(VD, Vb, bh, t, col, STEP, W, L, C, lo, len_k, offs_n, offs_v, V_DIM, BLOCK_N, MODE == 2, PACKED,
                   TMA)
    return k, v


@triton.jit
def _fwd_part(acc, l_i, m_i, q, Kb, Vb, KD, VD, bh, i_lo, i_hi, offs_m, offs_n, offs_qk, offs_v, col, STEP, len_q,
              len_k, W, L, C, lo, scale2, q_pos, XP, H, MODE: tl.constexpr, DMIN: tl.constexpr, PACKED: tl.constexpr,
              QK_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
              TMA: tl.constexpr, EXCL: tl.constexpr, EXCL_COUNT: tl.constexpr, KEYED: tl.constexpr):
    """One part's keys for the query rows ``[i_lo, i_hi]``, continuing the online softmax."""
    first, a, b, end = _key_tiles(i_lo, i_hi, len_k, W, L, C, lo, MODE, DMIN, BLOCK_N, KEYED)
    for t in range(first, end, BLOCK_N):
        j = t + offs_n
        k, v = _load_keys(KD, VD, Kb, Vb, bh, t, col, STEP, W, L, C, lo, len_k, offs_n, offs_qk, offs_v, MODE,
                          PACKED, QK_DIM, V_DIM, BLOCK_N, TMA)
        s = _dot(q, tl.trans(k), None, UPCAST)  # unscaled: the scale folds into one FMA below (needs scale > 0)
        if (t < a) | (t >= b):  # an edge tile
            s = tl.where(_allowed(offs_m[:, None], j[None, :], len_q, len_k, W, L, C, lo, MODE, DMIN), s,
                         float("-inf"))
        if EXCL_COUNT > 0:  # keys an earlier part of the union admits
            if _reaches(t, col, STEP, W, L, C, lo, XP, MODE, PACKED):
                k_pos = _position(j, col, STEP, W, L, C, lo, MODE == 2, PACKED)
                s = tl.where(_excluded(q_pos[:, None], k_pos[None, :], XP, bh % H, H, EXCL, EXCL_COUNT),
                             float("-inf"), s)
        m_new = tl.maximum(m_i, tl.max(s, 1) * scale2)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: no NaN
        p = tl.math.exp2(s * scale2 - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = _dot(p.to(v.dtype), v, acc, UPCAST)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, O_PREV, KD, VD, KD2, VD2, LO, XP, XP2, N, H, n_tiles, NCOLS, STEP, W, KEYS, L, C,
                W2, scale2, MODE: tl.constexpr, DMIN: tl.constexpr, MODE2: tl.constexpr, DMIN2: tl.constexpr,
                TWO_PARTS: tl.constexpr, MERGE: tl.constexpr, PACKED: tl.constexpr, Q_IN_REGISTERS: tl.constexpr,
                QK_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                UPCAST: tl.constexpr, TMA: tl.constexpr, EXCL: tl.constexpr, EXCL_COUNT: tl.constexpr,
                EXCL2: tl.constexpr, EXCL_COUNT2: tl.constexpr, KEYED: tl.constexpr, LO_TABLE: tl.constexpr):
    """One part (``MODE``), or with ``TWO_PARTS`` a second one (``MODE2``) over the same query view
    in the same online softmax; with ``MERGE``, continue from an earlier launch's output and lse.
    With ``TMA``, keys and values come through the descriptors ``KD, VD`` (``KD2, VD2``: the second
    part's) instead of pointers (see ``_load_rows``). With ``Q_IN_REGISTERS`` the ``QK^T`` matmul reads
    q from registers, not shared memory (see "register operands" above)."""
    (tile, col, bh, lo, len_q, base_qk, base_v, offs_m, offs_n, offs_qk, offs_v, row_ok, q_pos, q_off,
     o_off) = _query_tile(N, H, n_tiles, NCOLS, STEP, W, L, C, LO, PACKED, QK_DIM, V_DIM, BLOCK_M, BLOCK_N, LO_TABLE)
    q = tl.load(Q + q_off, mask=row_ok[:, None], other=0.0)
    if Q_IN_REGISTERS:  # a computed q (the load's own mask again) stays in registers for the wgmma
        q = tl.where(row_ok[:, None], q, 0.0)
    lse_ptr = LSE + bh.to(tl.int64) * N + q_pos
    if MERGE:  # continue the online softmax of an earlier part: m = its lse, l = 1, acc = its output
        m_i = tl.load(lse_ptr, mask=row_ok, other=float("-inf"))
        l_i = tl.where(m_i == float("-inf"), 0.0, 1.0)
        acc = tl.load(O_PREV + o_off, mask=row_ok[:, None], other=0.0).to(tl.float32)
    else:
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, V_DIM], dtype=tl.float32)
    i_lo = tile * BLOCK_M
    i_hi = tl.minimum(i_lo + BLOCK_M, len_q) - 1
    Kb = K + base_qk
    Vb = V + base_v
    acc, l_i, m_i = _fwd_part(acc, l_i, m_i, q, Kb, Vb, KD, VD, bh, i_lo, i_hi, offs_m, offs_n, offs_qk, offs_v, col,
                              STEP, len_q, _key_count(N, len_q, KEYS, L, C, lo, MODE, KEYED), W, L, C, lo, scale2,
                              q_pos, XP, H, MODE, DMIN, PACKED, QK_DIM, V_DIM, BLOCK_N, UPCAST, TMA, EXCL, EXCL_COUNT,
                              KEYED)
    if TWO_PARTS:  # the first part reads W and KEYS; the second W2 (a band or block) or L, C and lo (summary)
        acc, l_i, m_i = _fwd_part(acc, l_i, m_i, q, Kb, Vb, KD2, VD2, bh, i_lo, i_hi, offs_m, offs_n, offs_qk, offs_v,
                                  col, STEP, len_q, _key_count(N, len_q, 0, L, C, lo, MODE2, False), W2, L, C, lo,
                                  scale2, q_pos, XP2, H, MODE2, DMIN2, PACKED, QK_DIM, V_DIM, BLOCK_N, UPCAST, TMA,
                                  EXCL2, EXCL_COUNT2, False)
    empty = l_i == 0.0  # no admissible key: output 0, lse -inf
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe))
    tl.store(O + o_off, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lse_ptr, lse, mask=row_ok)


# ----------------------------------------------------------------------------- backward
@triton.jit
def _dq_part(dq, q, do, lse, delta, Kb, Vb, KD, VD, bh, i_lo, i_hi, offs_m, offs_n, offs_qk, offs_v, col, STEP, len_q,
             len_k, W, L, C, lo, scale2, q_pos, XP, H, MODE: tl.constexpr, DMIN: tl.constexpr, PACKED: tl.constexpr,
             QK_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
             TMA: tl.constexpr, EXCL: tl.constexpr, EXCL_COUNT: tl.constexpr, KEYED: tl.constexpr):
    first, a, b, end = _key_tiles(i_lo, i_hi, len_k, W, L, C, lo, MODE, DMIN, BLOCK_N, KEYED)
    for t in range(first, end, BLOCK_N):
        j = t + offs_n
        k, v = _load_keys(KD, VD, Kb, Vb, bh, t, col, STEP, W, L, C, lo, len_k, offs_n, offs_qk, offs_v, MODE,
                          PACKED, QK_DIM, V_DIM, BLOCK_N, TMA)
        qk = _dot(q, tl.trans(k), None, UPCAST)
        dp = _dot(do, tl.trans(v), None, UPCAST)  # issued before the exp, which then overlaps it
        p = tl.math.exp2(qk * scale2 - lse[:, None])
        if (t < a) | (t >= b):  # an edge tile
            p = tl.where(_allowed(offs_m[:, None], j[None, :], len_q, len_k, W, L, C, lo, MODE, DMIN), p, 0.0)
        if EXCL_COUNT > 0:
            if _reaches(t, col, STEP, W, L, C, lo, XP, MODE, PACKED):
                k_pos = _position(j, col, STEP, W, L, C, lo, MODE == 2, PACKED)
                p = tl.where(_excluded(q_pos[:, None], k_pos[None, :], XP, bh % H, H, EXCL, EXCL_COUNT), 0.0, p)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq, UPCAST)
    return dq


@triton.jit
def _dq_kernel(Q, K, V, O, DO, DQ, LSE, DELTA, KD, VD, KD2, VD2, LO, XP, XP2, N, H, n_tiles, NCOLS, STEP, W, KEYS,
               L, C, W2, scale, scale2, MODE: tl.constexpr, DMIN: tl.constexpr, MODE2: tl.constexpr, DMIN2: tl.constexpr,
               TWO_PARTS: tl.constexpr, ACCUMULATE: tl.constexpr, WRITE_DELTA: tl.constexpr, PACKED: tl.constexpr,
               QK_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               UPCAST: tl.constexpr, TMA: tl.constexpr, EXCL: tl.constexpr, EXCL_COUNT: tl.constexpr,
               EXCL2: tl.constexpr, EXCL_COUNT2: tl.constexpr, KEYED: tl.constexpr, LO_TABLE: tl.constexpr):
    """dQ of one query tile over one part (or two, as the forward). With ``WRITE_DELTA`` it also
    computes delta = rowsum(dO * O), the softmax backward's correction term, and stores it for the
    dK/dV launches: the first dQ launch covers every query row once, so no launch of its own
    computes delta (a launch costs the host about as much as the delta kernel cost the GPU)."""
    (tile, col, bh, lo, len_q, base_qk, base_v, offs_m, offs_n, offs_qk, offs_v, row_ok, q_pos, q_off,
     o_off) = _query_tile(N, H, n_tiles, NCOLS, STEP, W, L, C, LO, PACKED, QK_DIM, V_DIM, BLOCK_M, BLOCK_N, LO_TABLE)
    q = tl.load(Q + q_off, mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + o_off, mask=row_ok[:, None], other=0.0)
    row_off = bh.to(tl.int64) * N + q_pos
    lse = tl.load(LSE + row_off, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # empty rows: p = 0, never NaN
    if WRITE_DELTA:
        o = tl.load(O + o_off, mask=row_ok[:, None], other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + row_off, delta, mask=row_ok)
    else:
        delta = tl.load(DELTA + row_off, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, QK_DIM], dtype=tl.float32)
    i_lo = tile * BLOCK_M
    i_hi = tl.minimum(i_lo + BLOCK_M, len_q) - 1
    Kb = K + base_qk
    Vb = V + base_v
    dq = _dq_part(dq, q, do, lse, delta, Kb, Vb, KD, VD, bh, i_lo, i_hi, offs_m, offs_n, offs_qk, offs_v, col, STEP,
                  len_q, _key_count(N, len_q, KEYS, L, C, lo, MODE, KEYED), W, L, C, lo, scale2, q_pos, XP, H, MODE,
                  DMIN, PACKED, QK_DIM, V_DIM, BLOCK_N, UPCAST, TMA, EXCL, EXCL_COUNT, KEYED)
    if TWO_PARTS:
        dq = _dq_part(dq, q, do, lse, delta, Kb, Vb, KD2, VD2, bh, i_lo, i_hi, offs_m, offs_n, offs_qk, offs_v, col,
                      STEP, len_q, _key_count(N, len_q, 0, L, C, lo, MODE2, False), W2, L, C, lo, scale2, q_pos, XP2, H,
                      MODE2, DMIN2, PACKED, QK_DIM, V_DIM, BLOCK_N, UPCAST, TMA, EXCL2, EXCL_COUNT2, False)
    dq = dq * scale
    if ACCUMULATE:  # an earlier part (separate launch) already wrote its share
        dq += tl.load(DQ + q_off, mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(DQ + q_off, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, QD, DOD, LO, XP, DKP, DVP, N, H, n_tiles, NCOLS, STEP, W, KEYS,
                 L, C, SPLITS, scale, scale2, MODE: tl.constexpr, DMIN: tl.constexpr, ACCUMULATE: tl.constexpr,
                 PACKED: tl.constexpr, QK_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr, EXCL: tl.constexpr,
                 EXCL_COUNT: tl.constexpr, SPLIT: tl.constexpr, KEYED: tl.constexpr, LO_TABLE: tl.constexpr):
    """dK, dV of one key tile, looping over the query tiles that see it. dQ has its own kernel:
    accumulating it here (two matmuls and one exponential fewer, with fp32 atomics or the copy
    engine's tile reduce-add) did not pay, and neither did a Gluon version of this kernel that
    scheduled the next tile's matmuls under this tile's exponentials by hand.

    With ``SPLIT`` (a part of few key tiles that many queries see: global tokens), ``SPLITS``
    programs share a key tile's queries, each writing its fp32 share to ``DKP, DVP``
    ``[SPLITS, B*H, key rows, D]``; the host adds the shares up. Else one program runs them all."""
    if SPLIT:
        shared, col, bh, lo = _program(n_tiles * SPLITS, NCOLS, H, LO, True, LO_TABLE)
        tile, split = shared % n_tiles, shared // n_tiles
    else:
        tile, col, bh, lo = _program(n_tiles, NCOLS, H, LO, True, LO_TABLE)
    len_q = _view_length(N, col, STEP, PACKED)
    len_k = _key_count(N, len_q, KEYS, L, C, lo, MODE, KEYED)
    base_qk = bh.to(tl.int64) * N * QK_DIM
    base_v = bh.to(tl.int64) * N * V_DIM
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # this program's key rows
    offs_m = tl.arange(0, BLOCK_M)
    offs_qk = tl.arange(0, QK_DIM)
    offs_v = tl.arange(0, V_DIM)
    key_ok = offs_n < len_k
    k_pos = _position(offs_n, col, STEP, W, L, C, lo, MODE == 2, PACKED)
    k_off = base_qk + k_pos[:, None] * QK_DIM + offs_qk[None, :]
    v_off = base_v + k_pos[:, None] * V_DIM + offs_v[None, :]
    k = tl.load(K + k_off, mask=key_ok[:, None], other=0.0)
    v = tl.load(V + v_off, mask=key_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, QK_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, V_DIM], dtype=tl.float32)
    j_lo = tile * BLOCK_N
    j_hi = tl.minimum(j_lo + BLOCK_N, len_k) - 1
    start, full_lo, full_hi, end = _queries_of(j_lo, j_hi, len_q, W, L, C, lo, MODE, DMIN)
    first, a, b = _split(start, full_lo, full_hi, end, BLOCK_M)
    Qb = Q + base_qk
    DOb = DO + base_v
    LSEb = LSE + bh.to(tl.int64) * N
    DELTAb = DELTA + bh.to(tl.int64) * N
    if SPLIT:  # this program's share of the query tiles
        share = ((end - first + BLOCK_M - 1) // BLOCK_M + SPLITS - 1) // SPLITS * BLOCK_M
        first = first + split * share
        end = tl.minimum(first + share, end)
    for t in range(first, end, BLOCK_M):
        i = t + offs_m
        q_pos = _position(i, col, STEP, W, L, C, lo, False, PACKED)
        ok_i = i < len_q
        q = _load_rows(QD, Qb, bh, t, col, STEP, W, L, C, lo, len_q, offs_m, offs_qk, QK_DIM, BLOCK_M, False,
                       PACKED, TMA)
        do = _load_rows(DOD, DOb, bh, t, col, STEP, W, L, C, lo, len_q, offs_m, offs_v, V_DIM, BLOCK_M, False,
                        PACKED, TMA)
        lse = tl.load(LSEb + q_pos, mask=ok_i, other=float("inf"))
        delta = tl.load(DELTAb + q_pos, mask=ok_i, other=0.0)
        lse = tl.where(lse == float("-inf"), float("inf"), lse)  # empty rows: p = 0, never NaN
        qkT = _dot(k, tl.trans(q), None, UPCAST)
        dpT = _dot(v, tl.trans(do), None, UPCAST)  # issued before the exp, which then overlaps it
        pT = tl.math.exp2(qkT * scale2 - lse[None, :])  # [BN, BM]
        if (t < a) | (t >= b):  # an edge tile
            pT = tl.where(_allowed(i[None, :], offs_n[:, None], len_q, len_k, W, L, C, lo, MODE, DMIN), pT, 0.0)
        if EXCL_COUNT > 0:
            if _reaches(j_lo, col, STEP, W, L, C, lo, XP, MODE, PACKED):
                pT = tl.where(_excluded(q_pos[None, :], k_pos[:, None], XP, bh % H, H, EXCL, EXCL_COUNT), 0.0, pT)
        dv = _dot(pT.to(do.dtype), do, dv, UPCAST)
        dsT = pT * (dpT - delta[None, :])
        dk = _dot(dsT.to(q.dtype), q, dk, UPCAST)
    dk = dk * scale
    if SPLIT:
        row = (split * tl.num_programs(0) // (n_tiles * SPLITS) + bh).to(tl.int64) * n_tiles * BLOCK_N + offs_n
        tl.store(DKP + row[:, None] * QK_DIM + offs_qk[None, :], dk, mask=key_ok[:, None])
        tl.store(DVP + row[:, None] * V_DIM + offs_v[None, :], dv, mask=key_ok[:, None])
    else:
        if ACCUMULATE:
            dk += tl.load(DK + k_off, mask=key_ok[:, None], other=0.0).to(tl.float32)
            dv += tl.load(DV + v_off, mask=key_ok[:, None], other=0.0).to(tl.float32)
        tl.store(DK + k_off, dk.to(DK.dtype.element_ty), mask=key_ok[:, None])
        tl.store(DV + v_off, dv.to(DV.dtype.element_ty), mask=key_ok[:, None])
