"""Incremental decoding with a sparse key/value cache (PAPER.md, "Sampling").

A new byte at position ``t`` needs, in every layer, only the keys its head's pattern allows:
O(keys per query) work instead of a forward pass over the whole window. Each layer gets a
:class:`KeyPlan`: per head, a fixed number ``K`` of key *slots*, each slot an index formula

    ``index = coef_t * t + coef_block * block_start(t) + offset``  (``block_start = t // l * l``)

plus a validity rule (``0 <= index <= t``; merged fixed summary slots also need
``index < block_start``, since the query's own block is covered by its local slots). Shapes do not
depend on ``t``, so a decode step has static shapes and can be captured in a CUDA graph or compiled
with ``torch.compile(mode="reduce-overhead")``. Slots per head:

- dense: all ``context`` positions (dense attention is O(N) per byte by definition);
- strided row ``t - r`` (r < l), column ``t - m l``; merged: row plus column for m >= 1;
- fixed local ``block_start + r``; summary: the head's ``c`` summary offsets in every block;
- custom patterns: all ``context`` positions, masked each step by ``pattern.mask_mod`` for the new
  query (O(N) per byte: a custom pattern gives no structure to exploit).

Scores, softmax and the value sum are fp32, as the paper did when sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .patterns import Dense, Fixed, Pattern, Strided


@dataclass
class _Slots:
    """Key slots of one head: *moving* slots (1-D long tensors of one length) whose position
    follows the query, ``coef_t * t + coef_block * block_start + offset``, and *fixed* slots at
    absolute ``positions``, valid once written (merged summary slots: only before the query's block)."""

    coef_t: Tensor
    coef_block: Tensor
    offset: Tensor
    block: int
    positions: Tensor
    exclude_own_block: bool


def _slots(pattern: Pattern, head: int, context: int) -> tuple[_Slots, bool]:
    """Slots for ``head`` (its index within the heads that use ``pattern``); True if the mask
    function must be evaluated each step (custom patterns)."""
    none = torch.zeros(0, dtype=torch.long)

    def moving(coef_t: int, coef_block: int, offset: Tensor, block: int = 1, positions=none, exclude=False):
        return _Slots(torch.full_like(offset, coef_t), torch.full_like(offset, coef_block), offset, block,
                      positions, exclude)

    if isinstance(pattern, Strided):
        l = pattern.stride
        row = -torch.arange(min(l, context))
        column = -l * torch.arange(-(-context // l))
        offsets = {"row": row, "column": column, None: torch.cat([row, column[1:]])}[pattern.part]
        return moving(1, 0, offsets), False  # merged: column offsets >= l never repeat a row key
    if isinstance(pattern, Fixed):
        l = pattern.stride
        lo, hi = pattern.summary_range(head)
        summary = (torch.arange(0, context, l)[:, None] + torch.arange(lo, hi)[None, :]).flatten()
        summary = summary[summary < context]
        if pattern.part == "local":
            return moving(0, 1, torch.arange(l), l), False
        if pattern.part == "summary":
            return moving(0, 0, none, positions=summary), False
        # merged: the own block comes from the local slots, earlier blocks' summaries from fixed slots
        return moving(0, 1, torch.arange(l), l, positions=summary, exclude=True), False
    return moving(0, 0, none, positions=torch.arange(context)), not isinstance(pattern, Dense)


class KeyPlan(nn.Module):
    """Which keys each head of one layer reads for the query at position ``t``.

    ``patterns`` are the layer's head groups (as in ``Attention``: heads split evenly, in order).
    Moving slots are gathered from the cache each step (``forward(t)`` gives their positions);
    fixed slots (fixed summaries) live in a compact per-layer buffer, written when their
    position is decoded (``slot_of[position, head]``), so the step reads them without a gather.
    When the fixed slots are every position (dense, custom) the cache itself is that buffer.
    """

    def __init__(self, patterns: Sequence[Pattern], n_head: int, context: int):
        super().__init__()
        groups = torch.tensor_split(torch.arange(n_head), len(patterns))
        heads: list[_Slots] = []
        self.custom: list[tuple[Pattern, int, int]] = []  # (pattern, first head, last head + 1)
        for pattern, group in zip(patterns, groups):
            masked = False
            for local_head in range(len(group)):
                slots, masked = _slots(pattern, local_head, context)
                heads.append(slots)
            if masked:
                self.custom.append((pattern, int(group[0]), int(group[-1]) + 1))
        # A query may have no admissible key only under a summary part or a custom mask.
        self.may_be_empty = bool(self.custom) or any(isinstance(p, Fixed) and p.part == "summary" for p in patterns)
        self.context = context
        self.moving = max(len(s.offset) for s in heads)
        self.fixed = max(len(s.positions) for s in heads)

        def pad(rows: list[Tensor], width: int, fill) -> Tensor:
            return torch.stack([torch.cat([r, torch.full((width - len(r),), fill, dtype=r.dtype)]) for r in rows])

        self.register_buffer("coef_t", pad([s.coef_t for s in heads], self.moving, 0), persistent=False)
        self.register_buffer("coef_block", pad([s.coef_block for s in heads], self.moving, 0), persistent=False)
        self.register_buffer("offset", pad([s.offset for s in heads], self.moving, 0), persistent=False)
        self.register_buffer("moving_real", pad([torch.ones_like(s.offset, dtype=torch.bool) for s in heads],
                                                self.moving, False), persistent=False)
        self.register_buffer("block", torch.tensor([[s.block] for s in heads]), persistent=False)
        # Fixed slots; padding sits at position `context`, never valid.
        self.register_buffer("positions", pad([s.positions for s in heads], self.fixed, context), persistent=False)
        self.register_buffer("exclude", torch.tensor([[s.exclude_own_block] for s in heads]), persistent=False)
        self.whole_cache = self.fixed == context and bool((self.positions == torch.arange(context)).all())
        slot_of = torch.full((context, n_head), self.fixed, dtype=torch.long)  # `fixed`: a scratch slot
        for h, s in enumerate(heads):
            slot_of[s.positions, h] = torch.arange(len(s.positions))
        self.register_buffer("slot_of", slot_of, persistent=False)

    def forward(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """For query position ``t`` (0-dim long tensor): moving slots' cache positions ``[H, Km]``
        (clamped into range), and the score biases (0 or -inf) of the moving ``[H, Km]`` and the
        fixed ``[H, Kf]`` slots."""
        start = t // self.block * self.block  # (H, 1)
        index = self.coef_t * t + self.coef_block * start + self.offset
        moving = self.moving_real & (index >= 0) & (index <= t)
        fixed = (self.positions <= t) & (~self.exclude | (self.positions < start))
        for pattern, first, last in self.custom:  # O(context) per step: evaluate the mask function
            h = torch.arange(last - first, device=t.device)[:, None]
            zero = torch.zeros((), dtype=torch.long, device=t.device)
            allowed = pattern.mask_mod(zero, h, t, self.positions[first:last]).expand(last - first, self.fixed)
            fixed = torch.cat([fixed[:first], fixed[first:last] & allowed, fixed[last:]])

        def bias(valid: Tensor) -> Tensor:
            return torch.zeros(valid.shape, device=valid.device).masked_fill(~valid, float("-inf"))

        return index.clamp(0, self.context - 1), bias(moving), bias(fixed)

    def keys(self, t: int) -> list[list[int]]:
        """Per head, the sorted key positions the query at ``t`` reads (for tests and pictures)."""
        index, moving, fixed = self(torch.tensor(t, device=self.offset.device))
        return [sorted(index[h][moving[h] == 0].tolist() + self.positions[h][fixed[h] == 0].tolist())
                for h in range(len(index))]


class Decoder(nn.Module):
    """A :class:`~sparse_transformer.model.SparseTransformer` plus a preallocated key/value cache
    for ``batch`` sequences: :meth:`prefill` runs the full forward pass over a prime and stores its
    keys and values; :meth:`forward` decodes one position with static shapes.

    Cache per layer: keys ``[B, H, context, qk width / H]`` and values ``[B, H, context, d / H]``
    in the model's dtype, plus, for fixed summaries, compact fp32 copies of the summary keys and
    values (``[B, H, summary slots + 1, width]``). Layers with the same head patterns share one
    :class:`KeyPlan`, evaluated once per step; each layer's q/k/v projections are one matmul.
    """

    def __init__(self, model: nn.Module, batch: int):
        super().__init__()
        config = model.config
        self.model = model
        self.batch, self.context, self.n_head = batch, config.context, config.n_head
        device, dtype = model.head.weight.device, model.head.weight.dtype
        plans: dict[tuple, int] = {}
        self.plan_of_layer: list[int] = []
        for block in model.blocks:
            self.plan_of_layer.append(plans.setdefault(tuple(block.attn.patterns), len(plans)))
        self.plans = nn.ModuleList(KeyPlan(patterns, config.n_head, config.context) for patterns in plans).to(device)
        self.register_buffer("heads", torch.arange(config.n_head, device=device)[:, None], persistent=False)
        self.widths: list[tuple[int, int, int]] = []
        self.cache_names: list[str] = []
        for i, block in enumerate(model.blocks):
            attn, plan = block.attn, self.plans[self.plan_of_layer[i]]
            self.widths.append((attn.qk_width, attn.qk_width, config.d_model))
            # Detached copies: a decoder is built per generate() call, after training has changed the weights.
            self.register_buffer(f"qkv_w{i}", torch.cat([attn.query.weight, attn.key.weight, attn.value.weight]).detach(),
                                 persistent=False)
            self.register_buffer(f"qkv_b{i}", torch.cat([attn.query.bias, attn.key.bias, attn.value.bias]).detach(),
                                 persistent=False)
            for name, width in (("k", attn.qk_width), ("v", config.d_model)):
                shape = (batch, self.n_head, config.context, width // self.n_head)
                self._cache(f"{name}{i}", torch.zeros(shape, dtype=dtype, device=device))
                if plan.fixed and not plan.whole_cache:
                    shape = (batch, self.n_head, plan.fixed + 1, width // self.n_head)
                    self._cache(f"f{name}{i}", torch.zeros(shape, dtype=torch.float32, device=device))

    def _cache(self, name: str, tensor: Tensor) -> None:
        self.register_buffer(name, tensor, persistent=False)
        self.cache_names.append(name)

    def cache_bytes(self) -> int:
        """Memory held by the key/value cache (compact summary copies included)."""
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in self.cache_names)

    @torch.no_grad()
    def prefill(self, tokens: Tensor) -> Tensor:
        """Full forward pass over ``tokens [B, N]`` storing keys and values of positions ``0..N-1``.

        Returns the logits ``[B, N, V]`` (``logits[:, t]`` predicts ``tokens[:, t]``; the last
        token is only a placeholder: it is never an input).
        """
        b, n = tokens.shape
        captured: dict[str, Tensor] = {}

        def capture(name):
            def hook(module, inputs, output):
                captured[name] = output
            return hook

        handles = []
        for i, block in enumerate(self.model.blocks):
            handles.append(block.attn.key.register_forward_hook(capture(f"k{i}")))
            handles.append(block.attn.value.register_forward_hook(capture(f"v{i}")))
        try:
            logits = self.model(tokens)
        finally:
            for handle in handles:
                handle.remove()
        for name, out in captured.items():  # (B, N, w) -> (B, H, N, w / H)
            cache = getattr(self, name)
            cache[:, :, :n] = out.view(b, n, self.n_head, -1).transpose(1, 2).to(cache.dtype)
            if hasattr(self, "f" + name):  # compact summary copy; unwritten positions stay invalid until decoded
                plan = self.plans[self.plan_of_layer[int(name[1:])]]
                getattr(self, "f" + name)[:, :, :plan.fixed] = cache[:, self.heads, plan.positions.clamp(max=n - 1)]
        return logits

    def forward(self, token: Tensor, t: Tensor) -> Tensor:
        """Logits ``[B, V]`` at position ``t`` (0-dim long tensor, ``t >= 1``) whose input is
        ``token [B]``, the byte at ``t - 1``; positions before ``t`` must be cached."""
        m, b, h = self.model, self.batch, self.n_head
        t1 = t.view(1)
        x = m.token(token)  # (B, d)
        pos = m.position_index.index_select(0, t1)  # (1, axes): no host sync, graph-safe
        for axis, table in enumerate(m.positions):
            x = x + table(pos[:, axis])
        per_plan = [(plan, *plan(t), plan.slot_of.index_select(0, t1).view(1, h, 1, 1)) for plan in self.plans]
        for i, block in enumerate(m.blocks):
            plan, index, moving_bias, fixed_bias, slot = per_plan[self.plan_of_layer[i]]
            y = block.norm_attn(x)
            q, k, v = F.linear(y, getattr(self, f"qkv_w{i}"), getattr(self, f"qkv_b{i}")).split(self.widths[i], -1)
            q = q.view(b, h, 1, -1).float() * (1.0 / math.sqrt(q.shape[-1] // h))  # fp32 scores, as in the paper
            k, v = k.view(b, h, 1, -1), v.view(b, h, 1, -1)
            k_cache, v_cache = getattr(self, f"k{i}"), getattr(self, f"v{i}")
            k_cache.index_copy_(2, t1, k.to(k_cache.dtype))
            v_cache.index_copy_(2, t1, v.to(v_cache.dtype))
            scores, values = [], []
            if plan.moving:  # gathered from the cache: O(keys per query)
                scores.append(q @ k_cache[:, self.heads, index].float().transpose(-1, -2) + moving_bias[:, None])
                values.append(v_cache[:, self.heads, index])
            if plan.fixed:
                if plan.whole_cache:  # dense or custom: every position, read in place
                    fk, fv = k_cache, v_cache
                else:  # compact summary copy: a non-summary position writes the scratch slot
                    fk, fv = getattr(self, f"fk{i}"), getattr(self, f"fv{i}")
                    fk.scatter_(2, slot.expand(b, h, 1, fk.shape[-1]), k.float())
                    fv.scatter_(2, slot.expand(b, h, 1, fv.shape[-1]), v.float())
                    fk, fv = fk[:, :, :plan.fixed], fv[:, :, :plan.fixed]
                scores.append(q @ fk.float().transpose(-1, -2) + fixed_bias[:, None])
                values.append(fv)
            if scores:
                out = _attend(scores, values, plan.may_be_empty)  # (B, H, 1, dv)
            else:  # no key slot at all (a summary part whose slots lie past the context): zeros
                out = torch.zeros(b, h, 1, v.shape[-1], device=x.device)
            x = x + block.attn.proj(out.reshape(b, -1).to(x.dtype))  # (B, d)
            x = x + block.ff(block.norm_ff(x))  # dropout is the identity when sampling
        return m.head(m.norm(x))


def _attend(scores: list[Tensor], values: list[Tensor], may_be_empty: bool) -> Tensor:
    """One softmax over the concatenated slot scores ``[B, H, 1, K_i]``, then the weighted sum of
    the matching ``values`` ``[B, H, K_i, dv]``; fp32 ``[B, H, 1, dv]``."""
    scores = torch.cat(scores, -1) if len(scores) > 1 else scores[0]  # (B, H, 1, K)
    if may_be_empty:  # a query with no admissible key gets zeros, as in sparse_attention
        top = scores.amax(-1, keepdim=True)
        weights = torch.exp(scores - torch.where(torch.isfinite(top), top, torch.zeros_like(top)))
        total = weights.sum(-1, keepdim=True)
        weights = weights / torch.where(total > 0, total, torch.ones_like(total))
    else:
        weights = torch.softmax(scores, -1)
    parts = weights.split([vals.shape[-2] for vals in values], -1) if len(values) > 1 else [weights]
    out = parts[0] @ values[0].float()
    if len(values) > 1:
        out = out + parts[1] @ values[1].float()
    return out
