"""``backend="triton"``: each part of a pattern is one launch of the kernels in
``triton_kernels.py``, planned by the part's own module (``Part.kernel``, a
:class:`~sparse_transformer.patterns.plans.KernelPart`); the registered ops chain them (PAPER.md,
"Efficiency in the paper"). For the paper's patterns:

- dense:     one causal band of width N
- strided:   ``local``: a band of width ``stride`` (each query block sees at most two key blocks);
             ``column``: causal attention along the columns of the [N/stride, stride] view,
             addressed with a row step of ``stride`` (no transpose copy); columns of at most
             ``PACKED_COLUMN_ROWS`` rows are packed, several to a tile (a BLOCK part of width
             N/stride over the columns laid end to end), so that short columns fill the tiles
- fixed:     ``block``, block-diagonal, plus ``summary``: the head's summary slots, addressed in
             place as a contiguous list of key rows (their offset ``lo`` per head from the host)

Forward: a part over the sequence's rows and a summary part after it run in one launch (they
share the query rows, fixed's two parts do), so there is one online softmax. Other parts tile the
queries differently (rows, then columns), so a later launch continues the earlier one's online
softmax from its output and lse: the log-sum-exp merge, fused into the kernel. Each part leaves
out the keys of the parts before it (``KernelPart.dmin`` or ``exclude``). Backward: every part
uses the merged lse and ``delta = rowsum(dO * O)`` (which the first dQ launch computes), so each
part's probabilities are those of the one softmax; a later launch adds to the gradients an earlier
one wrote.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..patterns import Pattern, parse
from ..patterns.base import has_form
from ..patterns.column import PACKED_COLUMN_ROWS  # noqa: F401  (tests and tools read it here)
from ..patterns.plans import BAND, BLOCK, SUMMARY, KernelPart
from . import ops
from . import triton_kernels as tk
from .triton_launch import Launcher

LOG2E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)


Part = KernelPart  # one launch's part (the name the tools and tests use)

KERNELS = ("forward", "dkdv", "dq")
# A part kept to its first few key rows (global tokens) has few dK/dV programs (its key tiles x B x
# H), each looping over every query: their queries are split between programs up to about this
# many programs (two per multiprocessor of a 132-multiprocessor GPU), each split at least four query
# tiles long.
TARGET_PROGRAMS = 264


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch settings ``(BLOCK_M, BLOCK_N, num_warps, num_stages)``: ``tiles`` for
    every part, or per kind of part (``local``, ``global``; see :class:`Part`). ``dkdv`` and ``dq``
    override them in the two backward kernels, for every part: the dK/dV kernel holds ``BLOCK_N``
    keys and loops over ``BLOCK_M`` queries, the dQ kernel the other way round, so each may want
    its own shape (Triton's tutorial uses 32x128 and 128x32). ``None`` takes
    :data:`triton_kernels.DEFAULT_CONFIG` (and, for the dK/dV launch of a short part,
    :data:`triton_kernels.SHORT_DKDV_CONFIG` with its register cap). A launch that runs two parts
    (the fixed pattern's forward and dQ) takes the tiles of its second, ``global`` part; ``local``
    then shapes only the local part's dK/dV launch. ``tma``: load the loops' tiles through tensor
    descriptors (Hopper's copy engine) where the shapes allow it (:func:`tma_fits`); ``None``:
    where it pays (see :func:`_use_tma`), on GPUs of compute capability 9 or more (the CPU
    interpreter runs it when asked)."""

    tiles: Optional[tuple[int, int, int, int]] = None
    local: Optional[tuple[int, int, int, int]] = None
    global_: Optional[tuple[int, int, int, int]] = None
    dkdv: Optional[tuple[int, int, int, int]] = None
    dq: Optional[tuple[int, int, int, int]] = None
    tma: Optional[bool] = None

    def resolve(self, head_dim: int, part: "Part", kernel: str = "forward") -> tuple[int, int, int, int]:
        """The launch settings of ``kernel`` (one of :data:`KERNELS`) for ``part``."""
        return self.launch(head_dim, part, kernel)[0]

    def launch(self, head_dim: int, part: "Part",
               kernel: str = "forward") -> tuple[tuple[int, int, int, int], Optional[int]]:
        """``(resolve's settings, register cap or None)``. Only the default dK/dV launch of a short
        part has a cap (``maxnreg``: see ``triton_kernels.SHORT_DKDV_CONFIG``); a set config has none."""
        backward = {"forward": None, "dkdv": self.dkdv, "dq": self.dq}[kernel]
        mine = self.local if part.kind == "local" else self.global_
        chosen = backward or mine or self.tiles
        if chosen is not None:
            return chosen, None
        if kernel == "dkdv" and part.short and head_dim in tk.SHORT_DKDV_CONFIG:
            return tk.SHORT_DKDV_CONFIG[head_dim], tk.SHORT_DKDV_MAX_REGISTERS
        return tk.DEFAULT_CONFIG[part.kind][head_dim], None

    @property
    def spec(self) -> str:
        """This config as a string for :meth:`from_spec` (``""`` for the defaults): how it travels
        through the registered ops, whose arguments are plain values."""
        items = [f"{key + ':' if key else ''}{','.join(map(str, getattr(self, field)))}"
                 for key, field in _CONFIG_KEYS.items() if getattr(self, field) is not None]
        return "/".join(items + ([f"tma:{int(self.tma)}"] if self.tma is not None else []))

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def from_spec(text: str) -> "KernelConfig":
        """``BM,BN,W,S`` (every part and kernel), or items ``KEY:BM,BN,W,S`` joined by ``/`` with KEY
        ``local`` / ``global`` (a kind of part) or ``dkdv`` / ``dq`` (a backward kernel), and
        ``tma:0`` / ``tma:1`` (pointer loads or tensor descriptors); ``""`` is the default config."""
        fields = {}
        for item in filter(None, text.split("/")):
            key, _, tiles = item.rpartition(":")
            if key == "tma":
                if tiles not in ("0", "1"):
                    raise ValueError(f"kernel config: tma takes 0 or 1, got {tiles!r} in {text!r}")
                fields["tma"] = tiles == "1"
                continue
            if key not in _CONFIG_KEYS:
                raise ValueError(f"kernel config: unknown key {key!r} in {text!r}; expected local, global, dkdv or dq")
            try:
                values = tuple(int(x) for x in tiles.split(","))
            except ValueError:
                values = ()
            if len(values) != 4:
                raise ValueError(f"kernel config: expected BLOCK_M,BLOCK_N,WARPS,STAGES, got {tiles!r}")
            fields[_CONFIG_KEYS[key]] = values
        return KernelConfig(**fields)


# Spec keys of KernelConfig's tile fields ("" is ``tiles``, written without a key).
_CONFIG_KEYS = {"": "tiles", "local": "local", "global": "global_", "dkdv": "dkdv", "dq": "dq"}


def plan(pattern: Pattern, n: int) -> tuple[Part, ...]:
    """One launch description per part of ``pattern`` at length ``n``, from the parts' modules; each
    leaves out the keys of the parts before it."""
    parts = pattern.parts
    if not parts or not all(has_form(p, "kernel") for p in parts):
        raise ValueError(f"the triton backend runs patterns whose parts all have a kernel form, got {pattern} "
                         f"(use backend='flex' or 'torch' for custom patterns)")
    return tuple(part.kernel(n, parts[:index]) for index, part in enumerate(parts))


def _interpreting() -> bool:
    """Under ``TRITON_INTERPRET=1`` (CPU tests) the dots take fp32 operands: the interpreter's bf16
    dot is wrong. On the GPU the dots take the input dtype, as usual."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _launches(parts: tuple[Part, ...]) -> tuple[tuple[Part, ...], ...]:
    """Parts grouped into query-tiled launches: two parts over the sequence's rows share one launch,
    one online softmax and no partial output between them, when the second only adds keys to the
    first's query tiles. That is a part followed by summary slots (the fixed pattern: the second
    reads ``L, C`` and ``lo``), or global tokens followed by a window or block (the second reads
    ``W2``, which its own first key tile leaves the global keys out of); the summary pair wins where
    both could form."""
    launches, index = [], 0
    while index < len(parts):
        pair = parts[index:index + 2]
        if _summary_pair(pair) or (_prefix_pair(pair) and not _summary_pair(parts[index + 1:index + 3])):
            launches.append(pair)
            index += 2
        else:
            launches.append(pair[:1])
            index += 1
    return tuple(launches)


def _summary_pair(pair: tuple[Part, ...]) -> bool:
    return (len(pair) == 2 and pair[0].mode != SUMMARY and pair[1].mode == SUMMARY and pair[0].step == 1
            and pair[1].step == 1)


def _prefix_pair(pair: tuple[Part, ...]) -> bool:
    """Global tokens (a band kept to its first keys) and then a band or block over the sequence."""
    return (len(pair) == 2 and pair[0].mode == BAND and pair[0].keys > 0 and pair[0].step == 1
            and pair[1].mode != SUMMARY and pair[1].step == 1 and not pair[1].keys)


def _grid_args(launch: tuple[Part, ...], n: int, heads: int, bh: int, block: int, keys: bool):
    """Program count and the shared launch arguments of one launch (one part, or two that share
    the query view: see :func:`_launches`)."""
    first = launch[0]
    summary = next((p for p in launch if p.mode == SUMMARY), None)
    cols = 1 if first.packed else first.step
    if keys:  # key tiles run over the longest column or head group's key rows
        rows = max(first.key_rows(n, h) for h in range(min(len(first.offsets), heads)))
    else:
        rows = -(-n // cols)
    tiles = max(-(-rows // block), 1)
    stride, count = (summary.stride, summary.summary) if summary else (1, 0)
    args = (n, heads, tiles, cols, first.step, first.width, first.keys, stride, count)
    return (tiles * cols * bh,), args


def _modes(launch: tuple[Part, ...], lo: tuple[int, ...]) -> dict:
    """The constexpr part arguments of a query-tiled launch (``lo``: its summary offset per head)."""
    last = launch[-1]
    return dict(MODE=launch[0].mode, DMIN=launch[0].dmin, MODE2=last.mode, DMIN2=last.dmin,
                TWO_PARTS=len(launch) == 2, PACKED=launch[0].packed, KEYED=launch[0].keys > 0,
                LO_TABLE=_lo_is_table(lo),
                **_exclusion_modes(launch[0]),
                **{f"{key}2": value for key, value in _exclusion_modes(last).items()})


def _lo_is_table(lo: tuple[int, ...]) -> bool:
    """Whether the heads' summary offsets ``lo`` differ (``distinct > 1`` and at least two heads): the
    kernels then read ``lo`` from a table (``LO_TABLE``), else take the one offset as an int."""
    return len(set(lo)) > 1


def _exclusion_modes(part: Part) -> dict:
    """``EXCL`` (each earlier part's kind, 3 bits: see ``triton_kernels._excluded``) and ``EXCL_COUNT``."""
    code = 0
    for x, earlier in enumerate(part.exclude):
        code |= _exclusion_kind(earlier) << (3 * x)
    return dict(EXCL=code, EXCL_COUNT=len(part.exclude))


def _exclusion_kind(part: Part) -> int:
    if part.mode == SUMMARY:
        return 4
    if part.step > 1:  # a column view, packed or not: a band over the columns
        return 2
    return 1 if part.mode == BAND else 3


def _exclusion_table(part: Part, n: int, heads: int) -> list[int]:
    """``XP``: the first key position no earlier part admits past (a part kept to its first keys
    reaches no further; any other, to N), then per earlier part ``W, step, DMIN, keys, L, C, 0, 0``
    and ``lo`` per head."""
    reach, rows = 0, []
    for earlier in part.exclude:
        reach = max(reach, earlier.keys if earlier.keys and earlier.mode != SUMMARY else n)
        width = n if earlier.packed else earlier.width  # a packed column is the whole column
        rows += [width, earlier.step, earlier.dmin, earlier.keys or n, earlier.stride, earlier.summary, 0, 0]
        rows += [earlier.offset(h) for h in range(heads)]
    return [reach] + rows


def tma_fits(part: Part, n: int, block: int, keys: bool) -> bool:
    """Whether a tensor descriptor reaches ``part``'s rows exactly: the ``[N/step, step]`` view needs
    ``step`` to divide N; the summary slots (``keys``) need N a whole number of blocks and ``C`` a
    power of two that divides the tile's rows or is divided by them, so a tile is whole sub-blocks.
    Packed columns are no box of either view."""
    if part.packed:
        return False
    if keys and part.mode == SUMMARY:
        c = part.summary
        return n % part.stride == 0 and c & (c - 1) == 0 and (block % c == 0 or c % block == 0)
    return n % part.step == 0


def _use_tma(config: KernelConfig, tma_capable: bool, launch: tuple[Part, ...]) -> bool:
    """Descriptors where they pay: ``config.tma`` if set, else on Hopper or newer for launches with a
    global part over contiguous rows (dense, fixed summary), whose loops are long. The strided parts
    gained on the GPU but lost more on the host, where each descriptor is built per launch."""
    if config.tma is not None:
        return config.tma
    return any(p.kind == "global" and p.step == 1 for p in launch) and tma_capable


def _has_tma(x: Tensor) -> bool:
    """Whether ``x`` lives on a GPU with a tensor copy engine (compute capability 9 or more)."""
    return x.is_cuda and _capability(x.device.index)[0] >= 9


@functools.lru_cache(maxsize=None)
def _capability(device: Optional[int]) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _descriptor(x: Tensor, part: Part, block: int, keys: bool):
    """A TMA descriptor of ``x`` [B, H, N, D] over ``part``'s rows, ``block`` rows a tile (see
    ``triton_kernels._load_rows``). Rows past a head's view are zero (the copy engine's padding)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    b, h, n, d = x.shape
    if keys and part.mode == SUMMARY:
        l, c = part.stride, part.summary
        box = [1, max(block // c, 1), min(c, block), d]
        return TensorDescriptor(x, [b * h, n // l, l, d], [n * d, l * d, d, 1], box)
    step = part.step
    return TensorDescriptor(x, [b * h, n // step, step * d], [n * d, step * d, 1], [1, block, d])


def _aligned(*tensors: Tensor) -> bool:
    """The copy engine reads from 16-byte aligned addresses only (a view may start anywhere)."""
    return all(t.data_ptr() % 16 == 0 for t in tensors)


def _key_descriptors(k: Tensor, v: Tensor, launch: "_Launch"):
    """``(use TMA, KD, VD, KD2, VD2)`` of a query-tiled launch: each part's key and value rows."""
    if not (launch.tma and _aligned(k, v)):
        return False, None, None, None, None
    first, last, block = launch.parts[0], launch.parts[-1], launch.block
    kd, vd = _descriptor(k, first, block, True), _descriptor(v, first, block, True)
    if last is first:  # one part: each descriptor costs host time on every launch, so build it once
        return True, kd, vd, kd, vd
    return True, kd, vd, _descriptor(k, last, block, True), _descriptor(v, last, block, True)


@dataclass(frozen=True, eq=False)
class _Launch:
    """One kernel launch of a pass, all but its tensors: ``grid``, the integer arguments, the
    constexprs and options, and whether its tiles load through descriptors of ``block`` rows
    (``tma``: wanted and they fit; a call still checks the tensors' alignment)."""

    parts: tuple[Part, ...]
    grid: tuple[int]
    args: tuple[int, ...]
    constexprs: dict
    block: int
    tma: bool
    tables: tuple[tuple[int, ...], ...]  # LO, then XP per part: int32 tables the kernels read

    def table_tensors(self, device: torch.device) -> tuple:
        """The tables as device tensors; ``LO`` as a plain int when every head has the same offset
        (then the kernels fold it into their index arithmetic: ``LO_TABLE`` False)."""
        lo, *rest = self.tables
        first = _device_table(lo, device) if _lo_is_table(lo) else lo[0]
        return (first, *(_device_table(table, device) for table in rest))


@functools.lru_cache(maxsize=1024)
def _device_table(values: tuple[int, ...], device: torch.device) -> Tensor:
    """An int32 tensor of ``values`` on ``device``, made once (a launch passes it every call)."""
    return torch.tensor(values, dtype=torch.int32, device=device)


def _tables(launch: tuple[Part, ...], n: int, heads: int) -> tuple[tuple[int, ...], ...]:
    """``(LO, XP, XP2)`` of a launch: the summary part's ``lo`` per head (zeros without one), and each
    part's exclusion table."""
    summary = next((p for p in launch if p.mode == SUMMARY), None)
    lo = tuple(summary.offset(h) if summary else 0 for h in range(heads))
    return (lo,) + tuple(tuple(_exclusion_table(p, n, heads)) for p in (launch[0], launch[-1]))


@functools.lru_cache(maxsize=256)
def _pass_plan(parts: tuple[Part, ...], shape: torch.Size, value_dim: int, config: KernelConfig, tma_capable: bool,
               upcast: bool, kernels) -> tuple[tuple[_Launch, ...], tuple[_Launch, ...], tuple[_Launch, ...]]:
    """The forward, dQ and dK/dV launches of ``parts`` on q/k of ``shape`` and values ``value_dim``
    wide. Worked out once per shape: the pass then spends its host time on the launches alone.
    ``kernels`` (the kernel module, whose default tiles the plan takes) is part of the key only.
    Tiles are chosen by the wider of the two head widths."""
    b, h, n, qk_dim = shape
    d = max(qk_dim, value_dim)
    dims = dict(QK_DIM=qk_dim, V_DIM=value_dim)
    forward, dq, dkdv = [], [], []
    for idx, launch in enumerate(_launches(parts)):
        tma = _use_tma(config, tma_capable, launch)
        tables = _tables(launch, n, h)
        for kernel, out in (("forward", forward), ("dq", dq)):
            bm, bn, warps, stages = config.resolve(d, launch[-1], kernel)
            grid, args = _grid_args(launch, n, h, b * h, bm, keys=False)
            args = (*args, launch[-1].width)  # W2: the second part's width (unused by summary slots)
            # A later launch continues from the earlier ones: the forward from their output and
            # lse (MERGE), dQ adding to their dQ; the first dQ launch writes delta. The forward of
            # a short part keeps q in registers (see triton_kernels, "register operands"); in a pair
            # the last part, which sets the tiles, decides (global tokens add one key tile to a window).
            if kernel == "forward":
                flags = dict(MERGE=idx > 0, Q_IN_REGISTERS=launch[-1].short)
            else:
                flags = dict(ACCUMULATE=idx > 0, WRITE_DELTA=idx == 0)
            out.append(_Launch(launch, grid, args, dict(**_modes(launch, tables[0]), **flags, **dims, BLOCK_M=bm, BLOCK_N=bn,
                                                        UPCAST=upcast, num_warps=warps, num_stages=stages),
                               bn, tma and all(tma_fits(p, n, bn, keys=True) for p in launch), tables))
    order = _dkdv_order(parts, n)
    first_covers_all = _writes_every_key(order[0], n)
    for idx, part in enumerate(order):
        (bm, bn, warps, stages), registers = config.launch(d, part, "dkdv")
        tables = _tables((part,), n, h)[:2]
        grid, args = _grid_args((part,), n, h, b * h, bn, keys=True)
        splits = _splits(part, grid[0], n, bm)
        grid, args = (grid[0] * splits,), (*args, splits)
        dkdv.append(_Launch((part,), grid, args, dict(
            MODE=part.mode, DMIN=part.dmin, ACCUMULATE=idx > 0 or not first_covers_all, PACKED=part.packed,
            **_exclusion_modes(part), **dims, BLOCK_M=bm, BLOCK_N=bn, UPCAST=upcast, num_warps=warps,
            num_stages=stages, SPLIT=splits > 1, KEYED=part.keys > 0, LO_TABLE=_lo_is_table(tables[0]),
            **({"maxnreg": registers} if registers else {})),
            bm, _use_tma(config, tma_capable, (part,)) and tma_fits(part, n, bm, keys=False),  # query rows
            tables))
    return tuple(forward), tuple(dq), tuple(dkdv)


def _splits(part: Part, programs: int, n: int, block_m: int) -> int:
    """How many programs share each key tile's queries in the dK/dV launch (see ``TARGET_PROGRAMS``):
    only for a part over the sequence's rows kept to its first key rows, whose rows are positions."""
    if not part.keys or part.mode == SUMMARY or part.step != 1 or programs >= TARGET_PROGRAMS:
        return 1
    return max(1, min(-(-TARGET_PROGRAMS // programs), -(-n // block_m) // 4))


def _dkdv_order(parts: tuple[Part, ...], n: int) -> tuple[Part, ...]:
    """The parts in dK/dV launch order: one that writes every key row first (not a summary part, nor
    global tokens), so that dK and dV need no zeroing; each launch adds its own part's share, so
    the order is free."""
    covering = next((p for p in parts if _writes_every_key(p, n)), None)
    return parts if covering is None else (covering, *(p for p in parts if p is not covering))


def _writes_every_key(part: Part, n: int) -> bool:
    """Whether the part's dK/dV launch stores every key row itself: it covers every key and is not
    kept to its first keys (such a launch may split its queries and leave the sum to the host)."""
    return not part.keys and part.covers_every_key(n)


def _plan_of(parts: tuple[Part, ...], q: Tensor, v: Tensor, config: KernelConfig):
    return _pass_plan(parts, q.shape, v.shape[-1], config, _has_tma(q), _interpreting(), tk)


@functools.lru_cache(maxsize=None)
def _launcher(kernel) -> Launcher:
    """``kernel`` through a launcher that skips the JIT's per-call work (see ``triton_launch``).
    Looked up per call, so that a tool which swaps the kernels (``benchmarks/kernel_ab.py``) is
    served its own."""
    return Launcher(kernel)


def _forward(q: Tensor, k: Tensor, v: Tensor, parts, scale: float, config: KernelConfig):
    b, h, n, _ = q.shape
    out = torch.empty_like(v)
    lse = torch.empty((b, h, n), device=q.device, dtype=torch.float32)
    for launch in _plan_of(parts, q, v, config)[0]:
        # A later launch reads the earlier one's output in ``out`` (then overwrites it, row by
        # row in the same program) and its lse.
        tma, *descriptors = _key_descriptors(k, v, launch)
        _launcher(tk._fwd_kernel)[launch.grid](q, k, v, out, lse, out, *descriptors, *launch.table_tensors(q.device),
                                               *launch.args, scale * LOG2E, TMA=tma, **launch.constexprs)
    return out, lse


def _backward(q, k, v, out, lse, do, parts, scale: float, config: KernelConfig):
    b, h, n, _ = q.shape
    _, dq_launches, dkdv_launches = _plan_of(parts, q, v, config)
    # dQ first: its first launch covers every query row once and writes delta = rowsum(dO * O),
    # which the dK/dV launches read.
    delta = torch.empty_like(lse)
    dq = torch.empty_like(q)
    for launch in dq_launches:
        tma, *descriptors = _key_descriptors(k, v, launch)
        _launcher(tk._dq_kernel)[launch.grid](q, k, v, out, do, dq, lse, delta, *descriptors,
                                              *launch.table_tensors(q.device), *launch.args, scale, scale * LOG2E,
                                              TMA=tma, **launch.constexprs)
    first_covers_all = not dkdv_launches[0].constexprs["ACCUMULATE"]  # else rows no part writes stay zero
    dk = torch.empty_like(k) if first_covers_all else torch.zeros_like(k)
    dv = torch.empty_like(v) if first_covers_all else torch.zeros_like(v)
    for launch in dkdv_launches:
        tma = launch.tma and _aligned(q, do)
        part = launch.parts[0]
        qd, dod = (_descriptor(q, part, launch.block, False), _descriptor(do, part, launch.block, False)) if tma \
            else (None, None)
        split = launch.constexprs["SPLIT"]
        # Each program's fp32 share of its key tile, [splits, B*H, key tiles' rows, D]; added up below.
        dkp, dvp = ((torch.empty(launch.args[-1], b * h, launch.args[2] * launch.constexprs["BLOCK_N"],
                                 x.shape[-1], device=x.device, dtype=torch.float32) for x in (k, v)) if split
                    else (dk, dv))
        _launcher(tk._dkdv_kernel)[launch.grid](q, k, v, do, dk, dv, lse, delta, qd, dod,
                                                *launch.table_tensors(q.device), dkp, dvp, *launch.args, scale,
                                                scale * LOG2E, TMA=tma, **launch.constexprs)
        if split:  # key rows are positions here (a part over the sequence's rows)
            rows = part.key_rows(n, 0)
            for grad, shares in ((dk, dkp), (dv, dvp)):  # in place: added in fp32, rounded once
                grad[:, :, :rows] += shares[:, :, :rows].sum(0).view(b, h, rows, -1)
    return dq, dk, dv


@functools.lru_cache(maxsize=256)
def _parts_of(pattern: str, n: int) -> tuple[Part, ...]:
    return plan(parse(pattern), n)


def forward(q: Tensor, k: Tensor, v: Tensor, pattern: str, scale: float, config: str) -> tuple[Tensor, Tensor]:
    """The implementation of op ``sparse_transformer::triton_attention`` (see ``ops.py``):
    ``(out, lse)`` for contiguous inputs, ``pattern`` and ``config`` given as spec strings."""
    return _forward(q, k, v, _parts_of(pattern, q.shape[2]), scale, KernelConfig.from_spec(config))


def backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, grad_out: Tensor, pattern: str,
             scale: float, config: str) -> tuple[Tensor, Tensor, Tensor]:
    """The implementation of op ``sparse_transformer::triton_attention_backward``: ``(dq, dk, dv)``."""
    return _backward(q, k, v, out, lse, grad_out, _parts_of(pattern, q.shape[2]), scale,
                     KernelConfig.from_spec(config))


def triton_attention(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, scale: float,
                     config: Optional[KernelConfig] = None) -> Tensor:
    """Sparse attention with the Triton kernels, through the registered op
    ``torch.ops.sparse_transformer.triton_attention`` (differentiable, traceable by torch.compile).
    q, k: ``[B, H, N, Dqk]``, v: ``[B, H, N, Dv]``, fp16/bf16, widths in 16/32/64/128, on CUDA (or
    CPU under ``TRITON_INTERPRET=1``). Returns ``[B, H, N, Dv]``."""
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"the triton backend needs float16 or bfloat16 inputs, got {q.dtype}")
    for name, d in (("q/k", q.shape[-1]), ("v", v.shape[-1])):
        if d not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"the triton backend needs head widths in {SUPPORTED_HEAD_DIMS}, got {d} for {name}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    if scale <= 0:  # the forward kernel takes row maxima before scaling, so it needs scale > 0
        q, scale = (-q, -scale) if scale < 0 else (q * 0, 1.0)
    return ops.sparse_attention_triton(q, k, v, pattern.spec, scale, (config or KernelConfig()).spec)
