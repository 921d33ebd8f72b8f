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
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .patterns import Dense, Fixed, Pattern, Strided


@dataclass
class _Slots:
    """Key slots of one head (1-D long tensors of one length ``K``)."""

    coef_t: Tensor
    coef_block: Tensor
    offset: Tensor
    exclude_own_block: Tensor  # bool: valid only before the query's own block
    block: int


def _slots(pattern: Pattern, head: int, context: int) -> tuple[_Slots, bool]:
    """Slots for ``head`` (its index within the heads that use ``pattern``); True if the mask
    function must be evaluated each step (custom patterns)."""
    def make(coef_t, coef_block, offset, exclude=None, block=1):
        offset = torch.as_tensor(offset, dtype=torch.long)
        full = lambda v: torch.full_like(offset, v)  # noqa: E731
        ex = torch.zeros_like(offset, dtype=torch.bool) if exclude is None else exclude
        return _Slots(full(coef_t), full(coef_block), offset, ex, block)

    if isinstance(pattern, Strided):
        l = pattern.stride
        row = -torch.arange(min(l, context))
        column = -l * torch.arange(-(-context // l))
        if pattern.part == "row":
            return make(1, 0, row), False
        if pattern.part == "column":
            return make(1, 0, column), False
        return make(1, 0, torch.cat([row, column[1:]])), False  # column offsets >= l never repeat a row key
    if isinstance(pattern, Fixed):
        l = pattern.stride
        lo, hi = pattern.summary_range(head)
        local = make(0, 1, torch.arange(l), block=l)
        starts = torch.arange(0, context, l)
        summary = (starts[:, None] + torch.arange(lo, hi)[None, :]).flatten()
        summary = summary[summary < context]
        if pattern.part == "local":
            return local, False
        if pattern.part == "summary":
            return make(0, 0, summary), False
        n_local, n_summary = len(local.offset), len(summary)
        ex = torch.cat([torch.zeros(n_local, dtype=torch.bool), torch.ones(n_summary, dtype=torch.bool)])
        return _Slots(torch.cat([local.coef_t, torch.zeros(n_summary, dtype=torch.long)]),
                      torch.cat([local.coef_block, torch.zeros(n_summary, dtype=torch.long)]),
                      torch.cat([local.offset, summary]), ex, l), False
    if isinstance(pattern, Dense):
        return make(0, 0, torch.arange(context)), False
    return make(0, 0, torch.arange(context)), True


class KeyPlan(nn.Module):
    """Which cached keys each head of one layer reads for the query at position ``t``.

    ``patterns`` are the layer's head groups (as in ``Attention``: heads split evenly, in order).
    ``forward(t)`` returns ``(index, valid)``, both ``[H, K]``: key positions to gather (clamped
    into range) and whether each is admissible.
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
        k = max(len(s.offset) for s in heads)

        def stack(name, fill):
            rows = [torch.cat([getattr(s, name), torch.full((k - len(s.offset),), fill, dtype=getattr(s, name).dtype)])
                    for s in heads]
            return torch.stack(rows)

        self.register_buffer("coef_t", stack("coef_t", 0), persistent=False)
        self.register_buffer("coef_block", stack("coef_block", 0), persistent=False)
        self.register_buffer("offset", stack("offset", -1), persistent=False)  # padding: index -1, never valid
        self.register_buffer("exclude", stack("exclude_own_block", False), persistent=False)
        self.register_buffer("block", torch.tensor([[s.block] for s in heads]), persistent=False)
        self.register_buffer("real", torch.stack([torch.arange(k) < len(s.offset) for s in heads]), persistent=False)
        self.context = context
        self.keys = k

    def forward(self, t: Tensor) -> tuple[Tensor, Tensor]:  # t: 0-dim long tensor
        start = t // self.block * self.block  # (H, 1)
        index = self.coef_t * t + self.coef_block * start + self.offset  # (H, K)
        valid = self.real & (index >= 0) & (index <= t) & (~self.exclude | (index < start))
        for pattern, first, last in self.custom:  # O(context) per step: evaluate the mask function
            h = torch.arange(last - first, device=t.device)[:, None]
            zero = torch.zeros((), dtype=torch.long, device=t.device)
            allowed = pattern.mask_mod(zero, h, t, index[first:last]).expand(last - first, self.keys)
            valid = torch.cat([valid[:first], valid[first:last] & allowed, valid[last:]])
        return index.clamp(0, self.context - 1), valid


class Decoder(nn.Module):
    """A :class:`~sparse_transformer.model.SparseTransformer` plus a preallocated key/value cache
    for ``batch`` sequences: :meth:`prefill` runs the full forward pass over a prime and stores its
    keys and values; :meth:`forward` decodes one position with static shapes.

    Cache per layer: keys ``[B, H, context, qk width / H]`` and values ``[B, H, context, d / H]``
    in the model's dtype. Layers with the same head patterns share one :class:`KeyPlan`, evaluated
    once per step; each layer's query, key and value projections run as one matrix product.
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
            key = tuple(block.attn.patterns)
            if key not in plans:
                plans[key] = len(plans)
            self.plan_of_layer.append(plans[key])
        self.plans = nn.ModuleList(KeyPlan(patterns, config.n_head, config.context) for patterns in plans).to(device)
        self.register_buffer("heads", torch.arange(config.n_head, device=device)[:, None], persistent=False)
        self.widths: list[tuple[int, int, int]] = []
        for i, block in enumerate(model.blocks):
            attn = block.attn
            self.widths.append((attn.qk_width, attn.qk_width, config.d_model))
            # Detached copies: a decoder is built per generate() call, after training has changed the weights.
            self.register_buffer(f"qkv_w{i}", torch.cat([attn.query.weight, attn.key.weight, attn.value.weight]).detach(),
                                 persistent=False)
            self.register_buffer(f"qkv_b{i}", torch.cat([attn.query.bias, attn.key.bias, attn.value.bias]).detach(),
                                 persistent=False)
            for name, width in (("k", attn.qk_width), ("v", config.d_model)):
                self.register_buffer(f"{name}{i}", torch.zeros(batch, self.n_head, config.context, width // self.n_head,
                                                               dtype=dtype, device=device), persistent=False)

    def cache_bytes(self) -> int:
        """Memory held by the key/value cache."""
        return sum(b.numel() * b.element_size() for name, b in self.named_buffers()
                   if name[0] in "kv" and name[1:].isdigit())

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
        keys_of_plan = []
        for plan in self.plans:  # once per step, shared by the layers using the plan
            index, valid = plan(t)  # (H, K)
            bias = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device).masked_fill(~valid, float("-inf"))
            keys_of_plan.append((index, bias, plan.may_be_empty))
        for i, block in enumerate(m.blocks):
            index, bias, may_be_empty = keys_of_plan[self.plan_of_layer[i]]
            y = block.norm_attn(x)
            q, k, v = F.linear(y, getattr(self, f"qkv_w{i}"), getattr(self, f"qkv_b{i}")).split(self.widths[i], -1)
            k_cache, v_cache = getattr(self, f"k{i}"), getattr(self, f"v{i}")
            k_cache.index_copy_(2, t1, k.view(b, h, 1, -1).to(k_cache.dtype))
            v_cache.index_copy_(2, t1, v.view(b, h, 1, -1).to(v_cache.dtype))
            q = q.view(b, h, 1, -1).float() * (1.0 / math.sqrt(q.shape[-1] // h))
            keys = k_cache[:, self.heads, index].float()  # (B, H, K, dk): fp32 scores, as in the paper
            scores = (q @ keys.transpose(-1, -2)).squeeze(2) + bias  # (B, H, K)
            if may_be_empty:  # a query with no admissible key gets zeros, as in sparse_attention
                top = scores.amax(-1, keepdim=True)
                weights = torch.exp(scores - torch.where(torch.isfinite(top), top, torch.zeros_like(top)))
                total = weights.sum(-1, keepdim=True)
                weights = weights / torch.where(total > 0, total, torch.ones_like(total))
            else:
                weights = torch.softmax(scores, -1)
            values = v_cache[:, self.heads, index].float()  # (B, H, K, dv)
            out = (weights.unsqueeze(2) @ values).reshape(b, -1)  # (B, d)
            a = block.attn.proj(out.to(x.dtype))
            x = x + a + block.ff(block.norm_ff(x + a))  # dropout is the identity when sampling
        return m.head(m.norm(x))
