"""The Triton kernels as registered PyTorch operators (``torch.ops.sparse_transformer.*``).

``torch.compile`` sees a custom op as one opaque node with a known output shape (its fake
implementation), so a model that calls ``sparse_attention`` compiles as one graph (no graph
break around the kernels, ``fullgraph=True`` works) and a whole training step can be captured as
a CUDA graph. The pattern and the kernel configuration travel as strings (``Pattern.spec``,
``KernelConfig.spec``), since an operator's arguments are tensors and plain values.

Defining the ops imports no Triton: their implementations import the kernels on first call, so
the CPU path never needs Triton.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("sparse_transformer::triton_attention", mutates_args=())
def triton_attention(q: Tensor, k: Tensor, v: Tensor, pattern: str, scale: float,
                     config: str) -> tuple[Tensor, Tensor]:
    """Forward: ``(out [B, H, N, Dv], lse [B, H, N] fp32, base 2)`` for contiguous q, k ``[B, H, N, Dqk]``
    and v ``[B, H, N, Dv]``; ``scale > 0``. ``lse`` is what the backward needs."""
    from .triton_sparse import forward
    return forward(q, k, v, pattern, scale, config)


@triton_attention.register_fake
def _(q, k, v, pattern, scale, config):
    b, h, n, _ = q.shape
    return v.new_empty((b, h, n, v.shape[-1])), q.new_empty((b, h, n), dtype=torch.float32)


@torch.library.custom_op("sparse_transformer::triton_attention_backward", mutates_args=())
def triton_attention_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, grad_out: Tensor,
                              pattern: str, scale: float, config: str) -> tuple[Tensor, Tensor, Tensor]:
    """Backward: ``(dq, dk, dv)`` from the forward's inputs, ``out``, ``lse`` and ``grad_out``."""
    from .triton_sparse import backward
    return backward(q, k, v, out, lse, grad_out, pattern, scale, config)


@triton_attention_backward.register_fake
def _(q, k, v, out, lse, grad_out, pattern, scale, config):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, pattern, scale, config = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.pattern, ctx.scale, ctx.config = pattern, scale, config
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out: Tensor, grad_lse: Tensor):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = triton_attention_backward(q, k, v, out, lse, grad_out.contiguous(), ctx.pattern, ctx.scale,
                                           ctx.config)
    return dq, dk, dv, None, None, None


triton_attention.register_autograd(_backward, setup_context=_setup_context)


def sparse_attention_triton(q: Tensor, k: Tensor, v: Tensor, pattern: str, scale: float, config: str = "") -> Tensor:
    """Attention output ``[B, H, N, Dv]`` through :func:`triton_attention` (inputs made contiguous)."""
    out, _ = triton_attention(q.contiguous(), k.contiguous(), v.contiguous(), pattern, float(scale), config)
    return out
