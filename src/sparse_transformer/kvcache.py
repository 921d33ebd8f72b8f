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

import importlib.util
import math
import os
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


DECODE_BACKENDS = ("auto", "torch", "triton")
_PAD = 8  # the ones column and zeros: rows stay a multiple of 8 wide (16-byte aligned in bf16)
_HIDDEN_ONE = 16.0  # gelu(16) == 16 in fp32, bf16 and fp16; a power of two, so b / 16 * 16 == b


def _with_bias(linear: nn.Linear, bias_scale: float = 1.0) -> Tensor:
    """``[W | b * bias_scale | 0]`` of shape ``[out, in + _PAD]``: a row ending in ``[1 / bias_scale,
    0, ...]`` times its transpose is ``row W^T + b``."""
    w, b = linear.weight.detach(), linear.bias.detach()
    return torch.cat([w, b[:, None] * bias_scale, w.new_zeros(w.shape[0], _PAD - 1)], 1)


def _decode_backend(backend: str, device: torch.device) -> str:
    """``"auto"``: the Triton decode kernel on CUDA, PyTorch elsewhere. ``"triton"`` on the CPU
    needs ``TRITON_INTERPRET=1`` (tests)."""
    if backend not in DECODE_BACKENDS:
        raise ValueError(f"backend must be one of {DECODE_BACKENDS}, got {backend!r}")
    has_triton = importlib.util.find_spec("triton") is not None
    if backend == "auto":
        return "triton" if device.type == "cuda" and has_triton else "torch"
    if backend == "triton" and not (has_triton and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")):
        raise ValueError(f"backend='triton' needs Triton and a CUDA device (or TRITON_INTERPRET=1 on the CPU); "
                         f"the model is on {device}{'' if has_triton else ' and Triton is not installed'}")
    return backend


class Decoder(nn.Module):
    """A :class:`~sparse_transformer.model.SparseTransformer` plus a preallocated key/value cache
    for ``batch`` sequences: :meth:`prefill` runs the full forward pass over a prime and stores its
    keys and values; :meth:`forward` decodes one position with static shapes.

    Cache per layer, in the model's dtype: ``[B, H, context, dk + dv]``, each row a position's key
    and value side by side (one write, one gather per slot), plus, for fixed summaries, a compact
    copy of the summary rows (``[B, H, summary slots + 1, dk + dv]``). Layers with the same head
    patterns share one :class:`KeyPlan`, evaluated once per step; each layer's q/k/v projection is
    one matmul whose output rows are ordered ``[q | k_0 v_0 | k_1 v_1 | ...]`` so its key/value
    part *is* the new cache row, and each output projection adds its bias and the residual in the
    same matmul (``x.addmm_``: the bias rides on a constant column of the input row). ``backend`` computes the attention over the slots: ``"triton"``
    (one fused kernel, see :mod:`~sparse_transformer.attention.triton_decode`), ``"torch"``
    (gathers, matmuls and a softmax), or ``"auto"`` (Triton on CUDA). Both use fp32 scores.
    """

    def __init__(self, model: nn.Module, batch: int, backend: str = "auto"):
        super().__init__()
        config = model.config
        self.model = model
        self.batch, self.context, self.n_head = batch, config.context, config.n_head
        device, dtype = model.head.weight.device, model.head.weight.dtype
        self.backend = _decode_backend(backend, device)
        plans: dict[tuple, int] = {}
        self.plan_of_layer: list[int] = []
        for block in model.blocks:
            self.plan_of_layer.append(plans.setdefault(tuple(block.attn.patterns), len(plans)))
        self.plans = nn.ModuleList(KeyPlan(patterns, config.n_head, config.context) for patterns in plans).to(device)
        if self.backend == "triton":  # imported here: the CPU path never needs Triton
            from .attention.triton_decode import decode_attention, decode_splits
            self._kernel = decode_attention
            processors = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
            self.splits = [decode_splits(batch * self.n_head, p.moving + p.fixed, processors) for p in self.plans]
        self.register_buffer("heads", torch.arange(config.n_head, device=device)[:, None], persistent=False)
        h = self.n_head
        attn = model.blocks[0].attn
        self.dk, self.dv, self.qk_width = attn.qk_width // h, config.d_model // h, attn.qk_width
        self.scale = 1.0 / math.sqrt(self.dk)
        self.cache_names: list[str] = []
        # The attention output row, followed by a ones column: x.addmm_(rows, [W | b]^T) adds the
        # output projection, its bias and the residual in one kernel.
        attn_rows = torch.zeros(batch, config.d_model + _PAD, dtype=dtype, device=device)
        attn_rows[:, config.d_model] = 1
        self.register_buffer("attn_rows", attn_rows, persistent=False)
        for i, block in enumerate(model.blocks):
            attn, plan = block.attn, self.plans[self.plan_of_layer[i]]

            def rows(q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # [q | k_0 v_0 | k_1 v_1 | ...]
                kv = torch.cat([k.reshape(h, self.dk, *k.shape[1:]), v.reshape(h, self.dv, *v.shape[1:])], 1)
                return torch.cat([q, kv.flatten(0, 1)]).detach()

            # Detached copies: a decoder is built per generate() call, after training has changed the weights.
            self.register_buffer(f"qkv_w{i}", rows(attn.query.weight, attn.key.weight, attn.value.weight),
                                 persistent=False)
            self.register_buffer(f"qkv_b{i}", rows(attn.query.bias, attn.key.bias, attn.value.bias), persistent=False)
            self.register_buffer(f"proj_w{i}", _with_bias(attn.proj), persistent=False)
            # The feed-forward hidden row ends in gelu(16) = 16 (exactly, in every float dtype), so
            # its output projection adds 16 * b / 16 = b (exact: a power of two) with the residual.
            fc, proj = block.ff.fc, block.ff.proj
            self.register_buffer(f"fc_w{i}", torch.cat([fc.weight, fc.weight.new_zeros(_PAD, fc.in_features)]).detach(),
                                 persistent=False)
            self.register_buffer(f"fc_b{i}", torch.cat([fc.bias, fc.bias.new_tensor([_HIDDEN_ONE] + [0.0] * (_PAD - 1))]).detach(), persistent=False)
            self.register_buffer(f"ff_w{i}", _with_bias(proj, 1 / _HIDDEN_ONE), persistent=False)
            self._cache(f"kv{i}", torch.zeros(batch, h, config.context, self.dk + self.dv, dtype=dtype, device=device))
            if plan.fixed and not plan.whole_cache:
                self._cache(f"fkv{i}", torch.zeros(batch, h, plan.fixed + 1, self.dk + self.dv, dtype=dtype,
                                                   device=device))

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
        captured: dict[tuple[int, str], Tensor] = {}

        def capture(key):
            def hook(module, inputs, output):
                captured[key] = output
            return hook

        handles = []
        for i, block in enumerate(self.model.blocks):
            handles.append(block.attn.key.register_forward_hook(capture((i, "k"))))
            handles.append(block.attn.value.register_forward_hook(capture((i, "v"))))
        try:
            logits = self.model(tokens)
        finally:
            for handle in handles:
                handle.remove()
        for i in range(len(self.model.blocks)):
            cache = getattr(self, f"kv{i}")
            for columns, out in ((slice(0, self.dk), captured[i, "k"]), (slice(self.dk, None), captured[i, "v"])):
                cache[:, :, :n, columns] = out.view(b, n, self.n_head, -1).transpose(1, 2).to(cache.dtype)
            if hasattr(self, f"fkv{i}"):  # compact summary copy; unwritten positions stay invalid until decoded
                plan = self.plans[self.plan_of_layer[i]]
                getattr(self, f"fkv{i}")[:, :, :plan.fixed] = cache[:, self.heads, plan.positions.clamp(max=n - 1)]
        return logits

    @torch.no_grad()
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
            qkv = F.linear(block.norm_attn(x), getattr(self, f"qkv_w{i}"), getattr(self, f"qkv_b{i}"))
            q = qkv[:, :self.qk_width].view(b, h, self.dk)
            row = qkv[:, self.qk_width:].view(b, h, 1, self.dk + self.dv)  # this position's [k | v] per head
            kv = getattr(self, f"kv{i}")
            kv.index_copy_(2, t1, row)
            fixed_kv = kv
            if hasattr(self, f"fkv{i}"):  # compact summary copy: a non-summary position writes the scratch slot
                fixed_kv = getattr(self, f"fkv{i}")
                fixed_kv.scatter_(2, slot.expand(b, h, 1, row.shape[-1]), row)
            attn_out = self.attn_rows[:, :-_PAD].view(b, h, self.dv)  # (B, H, dv), then a ones column
            if self.backend == "triton":
                self._kernel(q, kv, fixed_kv, index, moving_bias, fixed_bias, self.scale,
                             self.splits[self.plan_of_layer[i]], attn_out)
            else:
                attn_out.copy_(self._attend(plan, q, kv, fixed_kv, index, moving_bias, fixed_bias))
            x.addmm_(self.attn_rows, getattr(self, f"proj_w{i}").t())  # x + out W^T + b, one kernel
            hidden = F.gelu(F.linear(block.norm_ff(x), getattr(self, f"fc_w{i}"), getattr(self, f"fc_b{i}")))
            x.addmm_(hidden, getattr(self, f"ff_w{i}").t())  # dropout is the identity when sampling
        return m.head(m.norm(x))

    def _attend(self, plan: KeyPlan, q: Tensor, kv: Tensor, fixed_kv: Tensor, index: Tensor, moving_bias: Tensor,
                fixed_bias: Tensor) -> Tensor:
        """The PyTorch path: one softmax over the gathered moving slots and the fixed slots;
        fp32 ``[B, H, dv]``."""
        b, h, dk = q.shape
        q = q.view(b, h, 1, dk).float() * self.scale  # fp32 scores, as in the paper
        rows, biases = [], []
        if plan.moving:  # gathered from the cache: O(keys per query)
            rows.append(kv[:, self.heads, index])
            biases.append(moving_bias)
        if plan.fixed:  # the compact summary copy, or the whole cache (dense, custom) read in place
            rows.append(fixed_kv[:, :, :plan.fixed])
            biases.append(fixed_bias)
        if not rows:  # no key slot at all (a summary part whose slots lie past the context): zeros
            return q.new_zeros(b, h, self.dv)
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
        return sum(p @ r[..., dk:].float() for p, r in zip(parts, rows)).view(b, h, -1)
