"""Incremental decoding with a sparse key/value cache (PAPER.md, "Sampling").

A new byte at position ``t`` needs, in every layer, only the keys its head's pattern allows:
O(keys per query) work instead of a forward pass over the whole window. Each part of a pattern
says which key *slots* a query reads (``Part.slots``, in the part's module):

- *moving* slots, at ``coef_t * t + coef_block * block_start(t) + offset`` (a window ``t - r``, a
  column ``t - m l``, a block ``block_start + r``), gathered from the cache at each step;
- *fixed* slots, at absolute positions (summary slots, global tokens; every position for dense),
  valid once written, read from a compact per-layer copy (or the cache itself for dense).

A slot is valid when its position is in ``[0, t]`` and no earlier part of the union admits that
key (each key counts once, as in every backend). Shapes do not depend on ``t``, so a decode step
has static shapes and can be captured in a CUDA graph. A custom pattern reads every position,
masked each step by its mask function (O(N) per byte: it gives no structure to exploit).

The decode step runs the model's own code (``SparseTransformer.decode``: its embedding, blocks,
attention projections, norms and head). Only the attention over the slots is the cache's:
:class:`LayerCache` stores each position's key and value side by side and attends over the slots in
fp32, as the paper did when sampling, with PyTorch or one Triton kernel (``triton_decode``).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from .attention import HAS_TRITON
from .patterns import Pattern
from .patterns.base import has_form


def _head_slots(pattern: Pattern, head: int, context: int) -> dict:
    """Slots of one head: per moving slot ``(coef_t, coef_block, block, offset, part)``, per fixed
    slot ``(position, part)``; a position two parts fix is read once (it belongs to the earlier)."""
    moving: list[tuple[int, int, int, int, int]] = []
    fixed: dict[int, int] = {}
    parts = pattern.parts
    if not parts:  # custom: every position, masked each step
        return dict(moving=moving, fixed={p: -1 for p in range(context)})
    for index, part in enumerate(parts):
        if not has_form(part, "slots"):
            raise ValueError(f"part {part.spec} of {pattern} has no cache slots (Part.slots): the key/value "
                             f"cache cannot decode it")
        slots = part.slots(head, context)
        for offset in ([] if slots.offsets is None else slots.offsets.tolist()):
            moving.append((slots.coef_t, slots.coef_block, slots.block, offset, index))
        for position in ([] if slots.positions is None else slots.positions.tolist()):
            fixed.setdefault(position, index)
    return dict(moving=moving, fixed=fixed)


class KeyPlan(nn.Module):
    """Which keys each head of one layer reads for the query at position ``t``.

    ``patterns`` are the layer's head groups (as in ``Attention``: heads split evenly, in order).
    Moving slots are gathered from the cache each step (``forward(t)`` gives their positions);
    fixed slots live in a compact per-layer buffer, written when their position is decoded
    (``slot_of[position, head]``), so the step reads them without a gather. When the fixed slots
    are every position (dense, custom) the cache itself is that buffer.
    """

    def __init__(self, patterns: Sequence[Pattern], n_head: int, context: int):
        super().__init__()
        groups = torch.tensor_split(torch.arange(n_head), len(patterns))
        heads: list[dict] = []
        self.groups: list[tuple[Pattern, int, int]] = []  # (pattern, first head, last head + 1)
        for pattern, group in zip(patterns, groups):
            heads += [_head_slots(pattern, local_head, context) for local_head in range(len(group))]
            if len(group):
                self.groups.append((pattern, int(group[0]), int(group[-1]) + 1))
        # A query has no admissible key only when no part admits the query itself (or a custom mask).
        self.may_be_empty = any(not any(p.admits_diagonal() for p in pattern.parts) for pattern in patterns)
        self.context = context
        self.moving = max(len(h["moving"]) for h in heads)
        self.fixed = max(len(h["fixed"]) for h in heads)

        def table(rows: list[list], fill) -> Tensor:
            return torch.tensor([r + [fill] * (width - len(r)) for r in rows], dtype=torch.long)

        width = self.moving
        for name, column in (("coef_t", 0), ("coef_block", 1), ("block", 2), ("offset", 3), ("moving_part", 4)):
            fill = 1 if name == "block" else (-1 if name == "moving_part" else 0)  # padding: part -1, never valid
            self.register_buffer(name, table([[s[column] for s in h["moving"]] for h in heads], fill),
                                 persistent=False)
        width = self.fixed  # padding sits at position `context`, never valid
        self.register_buffer("positions", table([sorted(h["fixed"]) for h in heads], context), persistent=False)
        self.register_buffer("fixed_part", table([[h["fixed"][p] for p in sorted(h["fixed"])] for h in heads], -1),
                             persistent=False)
        self.whole_cache = self.fixed == context and bool((self.positions == torch.arange(context)).all())
        slot_of = torch.full((context, n_head), self.fixed, dtype=torch.long)  # `fixed`: a scratch slot
        for h, row in enumerate(heads):
            slot_of[sorted(row["fixed"]), h] = torch.arange(len(row["fixed"]))
        self.register_buffer("slot_of", slot_of, persistent=False)
        # Each slot's head within its pattern's group (what the parts' mask functions take).
        self.register_buffer("local_head", torch.cat([torch.arange(z - a) for _, a, z in self.groups])[:, None],
                             persistent=False)

    def forward(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """For query position ``t`` (0-dim long tensor): moving slots' cache positions ``[H, Km]``
        (clamped into range), and the score biases (0 or -inf) of the moving ``[H, Km]`` and the
        fixed ``[H, Kf]`` slots."""
        start = t // self.block * self.block
        index = self.coef_t * t + self.coef_block * start + self.offset
        moving = (self.moving_part >= 0) & (index >= 0) & (index <= t)
        fixed = self.positions <= t
        moving, fixed = self._drop_covered(t, index, moving), self._drop_covered(t, self.positions, fixed, True)

        def bias(valid: Tensor) -> Tensor:
            return torch.zeros(valid.shape, device=valid.device).masked_fill(~valid, float("-inf"))

        return index.clamp(0, self.context - 1), bias(moving), bias(fixed)

    def _drop_covered(self, t: Tensor, positions: Tensor, valid: Tensor, fixed: bool = False) -> Tensor:
        """``valid`` without the slots whose key an earlier part of the head's union admits (and,
        for a custom pattern's slots, without those its mask function refuses)."""
        owner = self.fixed_part if fixed else self.moving_part
        rows = []
        zero = torch.zeros((), dtype=torch.long, device=t.device)
        for pattern, first, last in self.groups:
            keep = valid[first:last]
            head, pos, part = self.local_head[first:last], positions[first:last], owner[first:last]
            if len(pattern.parts) == 0:  # custom: O(context) per step, the mask function itself
                keep = keep & pattern.mask_mod(zero, head, t, pos).expand_as(keep)
            for index, earlier in enumerate(pattern.parts[:-1]):
                keep = keep & ~((part > index) & earlier.allowed(zero, head, t, pos))
            rows.append(keep)
        return torch.cat(rows)

    def keys(self, t: int) -> list[list[int]]:
        """Per head, the sorted key positions the query at ``t`` reads (for tests and pictures)."""
        index, moving, fixed = self(torch.tensor(t, device=self.offset.device))
        return [sorted(index[h][moving[h] == 0].tolist() + self.positions[h][fixed[h] == 0].tolist())
                for h in range(len(index))]


DECODE_BACKENDS = ("auto", "torch", "triton")


def _decode_backend(backend: str, device: torch.device) -> str:
    """``"auto"``: the Triton decode kernel on CUDA, PyTorch elsewhere. ``"triton"`` on the CPU
    needs ``TRITON_INTERPRET=1`` (tests)."""
    if backend not in DECODE_BACKENDS:
        raise ValueError(f"backend must be one of {DECODE_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and HAS_TRITON else "torch"
    if backend == "triton" and not (HAS_TRITON and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")):
        raise ValueError(f"backend='triton' needs Triton and a CUDA device (or TRITON_INTERPRET=1 on the CPU); "
                         f"the model is on {device}{'' if HAS_TRITON else ' and Triton is not installed'}")
    return backend


class LayerCache(nn.Module):
    """One layer's keys and values ``[B, H, context, dk + dv]`` (a position's key and value side by
    side: one write, one gather per slot), plus the compact copy of its fixed slots. Passed to the
    layer's ``Attention`` as ``cache``: during the prefill it stores the keys and values of every
    position and lets the layer attend as usual; a :meth:`step` view decodes one position."""

    def __init__(self, plan: KeyPlan, plan_index: int, batch: int, n_head: int, dk: int, dv: int, dtype, device):
        super().__init__()
        self.plan, self.plan_index, self.dk, self.dv = plan, plan_index, dk, dv
        self.register_buffer("kv", torch.zeros(batch, n_head, plan.context, dk + dv, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("heads", torch.arange(n_head, device=device)[:, None], persistent=False)
        compact = plan.fixed and not plan.whole_cache
        self.register_buffer("fixed_kv", torch.zeros(batch, n_head, plan.fixed + 1, dk + dv, dtype=dtype,
                                                     device=device) if compact else None, persistent=False)

    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in (self.kv, self.fixed_kv) if x is not None)

    def write(self, kv: Tensor) -> None:
        """Prefill: store keys and values side by side, ``kv [B, H, N, dk + dv]``, as positions ``0..N-1``."""
        n = kv.shape[2]
        self.kv[:, :, :n] = kv
        if self.fixed_kv is not None:  # unwritten positions stay invalid until decoded
            self.fixed_kv[:, :, :self.plan.fixed] = self.kv[:, self.heads, self.plan.positions.clamp(max=n - 1)]

    def attend(self, q: Tensor, scale: float) -> Optional[Tensor]:
        """Prefill: None (the layer attends over its whole input as usual)."""
        return None

    def step(self, t: Tensor, state: tuple, decoder: "Decoder") -> "_Step":
        return _Step(self, t, state, decoder)


class _Step:
    """A :class:`LayerCache` while decoding position ``t``, with its plan's slots for this step."""

    def __init__(self, cache: LayerCache, t: Tensor, state: tuple, decoder: "Decoder"):
        self.cache, self.t, self.decoder = cache, t.view(1), decoder
        self.index, self.moving_bias, self.fixed_bias, self.slot = state

    def write(self, kv: Tensor) -> None:
        """Store this position's keys and values ``kv [B, H, 1, dk + dv]`` (and its fixed-slot copy;
        a position that is no fixed slot writes the scratch slot)."""
        cache = self.cache
        row = kv.to(cache.kv.dtype)
        cache.kv.index_copy_(2, self.t, row)
        if cache.fixed_kv is not None:
            cache.fixed_kv.scatter_(2, self.slot.expand(*row.shape[:2], 1, row.shape[-1]), row)

    def attend(self, q: Tensor, scale: float) -> Tensor:
        """Attention of ``q [B, H, 1, dk]`` over the valid slots: ``[B, H, 1, dv]`` in q's dtype."""
        cache, decoder = self.cache, self.decoder
        fixed_kv = cache.kv if cache.fixed_kv is None else cache.fixed_kv
        b, h = q.shape[:2]
        if decoder.backend == "triton":
            out = q.new_empty(b, h, cache.dv)
            decoder.kernel(q.view(b, h, -1), cache.kv, fixed_kv, self.index, self.moving_bias, self.fixed_bias, scale,
                           decoder.splits[cache.plan_index], out)
            return out.view(b, h, 1, -1)
        return _attend(cache, q, fixed_kv, self.index, self.moving_bias, self.fixed_bias, scale).to(q.dtype)


def _attend(cache: LayerCache, q: Tensor, fixed_kv: Tensor, index: Tensor, moving_bias: Tensor, fixed_bias: Tensor,
            scale: float) -> Tensor:
    """The PyTorch path: one softmax over the gathered moving slots and the fixed slots; fp32
    ``[B, H, 1, dv]``."""
    plan, dk = cache.plan, cache.dk
    q = q.float() * scale  # fp32 scores, as in the paper
    rows, biases = [], []
    if plan.moving:  # gathered from the cache: O(keys per query)
        rows.append(cache.kv[:, cache.heads, index])
        biases.append(moving_bias)
    if plan.fixed:  # the compact summary copy, or the whole cache (dense, custom) read in place
        rows.append(fixed_kv[:, :, :plan.fixed])
        biases.append(fixed_bias)
    if not rows:  # no key slot at all (a summary part whose slots lie past the context): zeros
        return q.new_zeros(*q.shape[:3], cache.dv)
    scores = torch.cat([q @ r[..., :dk].float().transpose(-1, -2) + bias[:, None]
                        for r, bias in zip(rows, biases)], -1)  # (B, H, 1, K)
    if plan.may_be_empty:  # a query with no admissible key gets zeros, as in sparse_attention
        top = scores.amax(-1, keepdim=True)
        weights = torch.exp(scores - torch.where(torch.isfinite(top), top, torch.zeros_like(top)))
        total = weights.sum(-1, keepdim=True)
        weights = weights / torch.where(total > 0, total, torch.ones_like(total))
    else:
        weights = torch.softmax(scores, -1)
    parts = weights.split([r.shape[-2] for r in rows], -1)
    return sum(p @ r[..., dk:].float() for p, r in zip(parts, rows))


class Decoder(nn.Module):
    """A :class:`~sparse_transformer.model.SparseTransformer` plus a preallocated key/value cache
    for ``batch`` sequences: :meth:`prefill` runs the model's forward pass over a prime and stores
    its keys and values; :meth:`forward` decodes one position with static shapes through the
    model's own code (``model.decode``). Layers with the same head patterns share one
    :class:`KeyPlan`, evaluated once per step. ``backend`` computes the attention over the slots:
    ``"triton"`` (one fused kernel, see :mod:`~sparse_transformer.attention.triton_decode`),
    ``"torch"`` (gathers, matmuls and a softmax), or ``"auto"`` (Triton on CUDA); both fp32.
    """

    def __init__(self, model: nn.Module, batch: int, backend: str = "auto"):
        super().__init__()
        config = model.config
        self.model, self.batch = model, batch
        device, dtype = model.head.weight.device, model.head.weight.dtype
        self.backend = _decode_backend(backend, device)
        plans: dict[tuple, int] = {}
        self.plan_of_layer = [plans.setdefault(tuple(block.attn.patterns), len(plans)) for block in model.blocks]
        self.plans = nn.ModuleList(KeyPlan(patterns, config.n_head, config.context) for patterns in plans).to(device)
        if self.backend == "triton":  # imported here: the CPU path never needs Triton
            from .attention.triton_decode import decode_attention, decode_splits
            self.kernel = decode_attention
            processors = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
            self.splits = [decode_splits(batch * config.n_head, p.moving + p.fixed, processors) for p in self.plans]
        h = config.n_head
        dk, dv = model.blocks[0].attn.qk_width // h, config.d_model // h
        self.caches = nn.ModuleList(LayerCache(self.plans[p], p, batch, h, dk, dv, dtype, device)
                                    for p in self.plan_of_layer)

    def cache_bytes(self) -> int:
        """Memory held by the key/value cache (compact summary copies included)."""
        return sum(cache.nbytes() for cache in self.caches)

    @torch.no_grad()
    def prefill(self, tokens: Tensor) -> Tensor:
        """The model's forward pass over ``tokens [B, N]``, storing keys and values of positions
        ``0..N-1``. Returns the logits ``[B, N, V]`` (``logits[:, t]`` predicts ``tokens[:, t]``; the
        last token is only a placeholder: it is never an input)."""
        return self.model(tokens, cache=list(self.caches))

    @torch.no_grad()
    def forward(self, token: Tensor, t: Tensor) -> Tensor:
        """Logits ``[B, V]`` at position ``t`` (0-dim long tensor, ``t >= 1``) whose input is
        ``token [B]``, the byte at ``t - 1``; positions before ``t`` must be cached."""
        t1 = t.view(1)
        states = [(*plan(t), plan.slot_of.index_select(0, t1).view(1, -1, 1, 1)) for plan in self.plans]
        steps = [cache.step(t, states[p], self) for cache, p in zip(self.caches, self.plan_of_layer)]
        return self.model.decode(token, t, steps)
