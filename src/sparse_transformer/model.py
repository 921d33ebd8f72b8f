"""The Sparse Transformer: a decoder-only byte model (PAPER.md, "The model").

Single-device code: no DDP, autocast or checkpointing here; :mod:`sparse_transformer.parallel`
wraps the model for recompute, compile and distribution from outside.

The model predicts *every* byte of its input window: inputs are shifted right by one with a
learned start embedding at position 0, so ``logits[:, t]`` predicts ``tokens[:, t]`` from
``tokens[:, :t]``. That is what lets an image's bits per dim cover all of its bytes.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .attention import refusal, sparse_attention
from .config import ModelConfig
from .patterns import Pattern
from .patterns.base import check_pattern

def layer_patterns(config: ModelConfig, custom: Optional[Pattern] = None) -> list[tuple[Pattern, ...]]:
    """Per layer, the patterns its heads use: one pattern for all heads, or one per group of heads.

    With parts A1, A2, ... of the pattern (the paper's two for strided and fixed): merged: their
    union under one softmax; interleaved: ``interleave_ratio`` layers of A1, then one layer of each
    other part, repeated; split: the heads in as many even groups as parts, in order. ``custom`` (a
    Pattern object) replaces the configured pattern in every layer, merged.
    """
    if custom is not None:
        return [(custom,)] * config.n_layer
    pattern, pieces = config.attention_pattern(), config.pattern_pieces()
    if config.integration == "merged" or len(pieces) == 1:
        return [(pattern,)] * config.n_layer
    if config.integration == "interleaved":
        cycle = [pieces[0]] * config.interleave_ratio + list(pieces[1:])
        return [(cycle[i % len(cycle)],) for i in range(config.n_layer)]
    return [pieces] * config.n_layer  # split heads


def backend_refusal(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why ``config.backend`` cannot run this model's attention on ``device`` in ``dtype`` (None: it
    can, or the backend is ``auto``), checked on shapes alone before anything is built."""
    if config.backend == "auto":
        return None
    point = torch.zeros((), device=device, dtype=dtype)
    q = point.expand(1, config.n_head, config.context, config.qk_width // config.n_head)
    v = point.expand(1, config.n_head, config.context, config.d_model // config.n_head)
    for patterns in dict.fromkeys(layer_patterns(config)):
        for pattern in patterns:
            problem = refusal(config.backend, q, v, pattern)
            if problem:
                return f"model.backend: {problem}"
    return None


class Attention(nn.Module):
    """Multi-head attention over a sparse pattern. Half-size layers have q/k half as wide as the
    values (``sparse_attention`` takes both widths), scaled by their own width."""

    def __init__(self, config: ModelConfig, patterns: Sequence[Pattern]):
        super().__init__()
        d, h = config.d_model, config.n_head
        self.n_head, self.patterns, self.backend = h, tuple(patterns), config.backend
        self.qk_width = config.qk_width
        # Queries, then each head's key and value side by side (the row a sampling cache stores): one matmul.
        self.qkv = nn.Linear(d, 2 * self.qk_width + d)
        self.proj = nn.Linear(d, d)
        # Split heads: the [first, last) heads of each pattern (as torch.tensor_split would cut them),
        # plain ints, constants when compiled.
        groups = len(self.patterns)
        ends = [sum(h // groups + (i < h % groups) for i in range(g + 1)) for g in range(groups)]
        self.head_groups = tuple(zip([0] + ends[:-1], ends))

    def forward(self, x: Tensor, cache=None) -> Tensor:  # x: (B, N, d)
        """``cache`` (sampling, see :mod:`~sparse_transformer.kvcache`) stores this layer's keys and
        values, and while decoding one position attends over its cached key slots instead."""
        b, n, d = x.shape
        h = self.n_head

        def heads(t: Tensor) -> Tensor:  # (B, N, w) -> (B, H, N, w / H)
            return t.view(b, n, h, -1).transpose(1, 2)

        projected = self.qkv(x)
        q, kv = heads(projected[..., :self.qk_width]), heads(projected[..., self.qk_width:])
        k, v = kv.split([self.qk_width // h, d // h], -1)
        scale = 1.0 / math.sqrt(q.shape[-1])
        if cache is not None:
            cache.write(kv)
            out = cache.attend(q, scale)
            if out is not None:  # (B, H, 1, d / H): one decoded position
                return self.proj(out.transpose(1, 2).reshape(b, n, d))
        if len(self.patterns) == 1:
            out = sparse_attention(q, k, v, self.patterns[0], scale, self.backend)
        else:  # split heads: each group of heads uses its own part
            out = torch.cat([sparse_attention(q[:, a:z], k[:, a:z], v[:, a:z], p, scale, self.backend)
                             for (a, z), p in zip(self.head_groups, self.patterns)], dim=1)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


def join_qkv(state: dict, n_head: Optional[int] = None) -> dict:
    """``state`` with the separate ``attn.query`` / ``attn.key`` / ``attn.value`` entries of older
    checkpoints joined into the one ``attn.qkv`` projection that :class:`Attention` now has
    (queries, then each head's key and value rows side by side: tensors need ``n_head``); values are
    tensors, or shapes as a file's header gives them. A current state is returned as is; pieces
    that cannot be one projection raise a ``ValueError`` naming them."""
    joined = dict(state)
    for name in state:
        prefix, found, suffix = name.rpartition(".attn.query.")
        pieces = [f"{prefix}.attn.{piece}.{suffix}" for piece in ("query", "key", "value")]
        if not found or not all(piece in state for piece in pieces):
            continue
        target = f"{prefix}.attn.qkv.{suffix}"
        if target in state:
            raise ValueError(f"{target} and the older {pieces[0]} (key, value) are both present: "
                             f"two versions of one projection")
        values = [state[piece] for piece in pieces]
        q, k, v = (tuple(x.shape) if isinstance(x, Tensor) else tuple(x) for x in values)
        if not q or q != k or v[1:] != q[1:] or (n_head and (k[0] % n_head or v[0] % n_head)):
            raise ValueError(f"{prefix}.attn query {list(q)}, key {list(k)} and value {list(v)} cannot be one "
                             f"projection (query and key of one shape, value as wide, rows split into heads)")
        if isinstance(values[0], Tensor):
            query, key, value = values
            per_head = torch.cat([key.unflatten(0, (n_head, -1)), value.unflatten(0, (n_head, -1))], 1)
            joined[target] = torch.cat([query, per_head.flatten(0, 1)])
        else:
            joined[target] = (q[0] + k[0] + v[0], *q[1:])
        for piece in pieces:
            del joined[piece]
    return joined


class FeedForward(nn.Module):
    """``W2 gelu(W1 x + b1) + b2`` with inner width 4d (2d when half-size)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        inner = (2 if config.half_ff else 4) * config.d_model
        self.fc = nn.Linear(config.d_model, inner)
        self.proj = nn.Linear(inner, config.d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-norm residual block: ``a = drop(attn(norm(H)))``, ``b = drop(ff(norm(H + a)))``, ``H + a + b``."""

    def __init__(self, config: ModelConfig, patterns: Sequence[Pattern]):
        super().__init__()
        self.norm_attn = nn.LayerNorm(config.d_model)
        self.attn = Attention(config, patterns)
        self.norm_ff = nn.LayerNorm(config.d_model)
        self.ff = FeedForward(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, cache=None) -> Tensor:
        h = x + self.drop(self.attn(self.norm_attn(x), cache))  # x + a once: one kernel fewer per decode step
        return h + self.drop(self.ff(self.norm_ff(h)))


class SparseTransformer(nn.Module):
    """Decoder-only Sparse Transformer over bytes.

    ``forward(tokens)``: tokens ``[B, N]`` integer bytes (N <= context) -> logits ``[B, N, 256]``
    where ``logits[:, t]`` predicts ``tokens[:, t]`` from the bytes before it.
    Pass ``pattern`` (a :class:`~sparse_transformer.patterns.Pattern`) to use a custom pattern in
    every layer; it is not saved by :meth:`save_pretrained`.
    """

    def __init__(self, config: ModelConfig, pattern: Optional[Pattern] = None):
        super().__init__()
        if not isinstance(config, ModelConfig):  # a TrainConfig or a dict failed as an AttributeError
            hint = " (pass its .model)" if hasattr(config, "model") else ""
            raise ValueError(f"config must be a sparse_transformer ModelConfig{hint}, got {type(config).__name__}")
        if pattern is not None:  # a spec string was taken here and failed only at the first forward pass
            check_pattern(pattern)
        self.config = config
        d = config.d_model
        self.token = nn.Embedding(config.vocab_size, d)
        self.start = nn.Parameter(torch.empty(d))  # input at position 0 (nothing before it)
        self.positions = nn.ModuleList(nn.Embedding(size, d) for size in config.axes)
        self.blocks = nn.ModuleList(Block(config, p) for p in layer_patterns(config, pattern))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, config.vocab_size, bias=False)
        # (context, n_axes): the index into each position table, mixed-radix over the axes.
        idx, t = [], torch.arange(config.context)
        for i in range(len(config.axes)):
            inner = math.prod(config.axes[i + 1:])
            idx.append((t // inner) % config.axes[i])
        self.register_buffer("position_index", torch.stack(idx, 1), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The paper's initialization; the logit projection starts at zero (8 bits per byte at step 0)."""
        d = self.config.d_model
        nn.init.normal_(self.token.weight, std=math.sqrt(0.125 / d))
        nn.init.normal_(self.start, std=math.sqrt(0.125 / d))
        for table in self.positions:
            nn.init.normal_(table.weight, std=math.sqrt(0.125 / (d * len(self.positions))))
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=math.sqrt(0.125 / module.in_features))
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)
        nn.init.zeros_(self.head.weight)

    def embed(self, tokens: Tensor) -> Tensor:
        """Shifted token embeddings plus factorized positions: ``[B, N] -> [B, N, d]``."""
        if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.is_floating_point() or tokens.is_complex():
            what = (f"a {tokens.dim()}-D {tokens.dtype} tensor" if isinstance(tokens, Tensor)
                    else type(tokens).__name__)
            raise ValueError(f"tokens must be a 2-D integer tensor [B, N] of bytes, got {what}")
        b, n = tokens.shape
        if n > self.config.context or n < 1:
            raise ValueError(f"sequence length must be in [1, context={self.config.context}], got {n}")
        if b < 1:  # failed in a reshape deep in attention
            raise ValueError(f"tokens must hold at least one sequence (B >= 1), got shape {tuple(tokens.shape)}")
        # Checked where it costs no device sync (a GPU would stop at every step) and breaks no compiled
        # graph; was an IndexError.
        if (tokens.device.type == "cpu" and not torch.compiler.is_compiling()
                and (int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size)):
            raise ValueError(f"tokens must be bytes in [0, {self.config.vocab_size}), got "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")
        x = self.token(tokens[:, :-1].long())
        x = torch.cat([self.start.to(x.dtype).expand(b, 1, -1), x], dim=1)  # shift right by one
        index = self.position_index[:n]
        for axis, table in enumerate(self.positions):
            x = x + table(index[:, axis])
        return x

    def embed_step(self, token: Tensor, t: Tensor) -> Tensor:
        """The input at position ``t`` (0-dim long tensor, ``t >= 1``) whose byte before it is
        ``token [B]``: ``[B, 1, d]`` (what :meth:`embed` gives at ``t``, without a host sync)."""
        x = self.token(token)
        index = self.position_index.index_select(0, t.view(1))  # (1, axes)
        for axis, table in enumerate(self.positions):
            x = x + table(index[:, axis])
        return x[:, None]

    def forward(self, tokens: Tensor, cache: Optional[Sequence] = None) -> Tensor:
        """``cache``: one :class:`~sparse_transformer.kvcache.LayerCache` per block, filled with the
        keys and values of every position (a sampler's prefill)."""
        x = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache[i])
        return self.head(self.norm(x))

    def decode(self, token: Tensor, t: Tensor, cache: Sequence) -> Tensor:
        """Logits ``[B, V]`` at position ``t`` given ``token [B]`` (the byte at ``t - 1``): one step
        of sampling, each block attending over its ``cache`` entry (see :mod:`~sparse_transformer.kvcache`)."""
        x = self.embed_step(token, t)
        for block, layer_cache in zip(self.blocks, cache):
            x = block(x, layer_cache)
        return self.head(self.norm(x))[:, 0]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, path: str | Path) -> Path:
        """Write ``model.safetensors`` and ``config.json`` into folder ``path`` (see :mod:`.weights`)."""
        from .weights import save_weights
        return save_weights(path, self.state_dict(), self.config)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | str = "cpu") -> "SparseTransformer":
        """Load a model written by :meth:`save_pretrained` (or a trainer checkpoint folder)."""
        from .weights import load_model
        return load_model(path, device, cls)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put ``model`` in eval mode for the block, then give every submodule back its own mode
    (``model.train(was_training)`` would flip submodules a user had frozen in eval)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def byte_loss(logits: Tensor, tokens: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy in nats (fp32) of ``logits [B, N, V]`` against ``tokens [B, N]``;
    bits per byte is this over ln 2."""
    return F.cross_entropy(logits.float().flatten(0, 1), tokens.long().flatten(), reduction=reduction)
