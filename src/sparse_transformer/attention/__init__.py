"""``sparse_attention``: argument checks and backend choice, in one place.

Backends take ``(q, k, v, pattern, scale)`` with checked ``[B, H, N, D]`` inputs and return
``[B, H, N, D]`` in the input dtype. Each backend says when it can run; ``"auto"`` takes the
first available in order of preference. GPU kernels register here too, imported lazily so
the CPU path never needs Triton.
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from ..patterns import Pattern
from ..patterns.base import has_form
from .portable import portable_attention
from .reference import reference_attention

AttentionFn = Callable[[Tensor, Tensor, Tensor, Pattern, float], Tensor]


@dataclass(frozen=True)
class Backend:
    """A way to compute sparse attention; ``supports`` says whether it can take these inputs."""

    name: str
    load: Callable[[], AttentionFn]  # imported on first use
    supports: Callable[[Tensor, Pattern], bool]
    note: str
    # Stricter test for backend="auto" (None: same as supports); keeps the CPU interpreter out of auto.
    auto_supports: Optional[Callable[[Tensor, Pattern], bool]] = None


def _always(q: Tensor, pattern: Pattern) -> bool:
    return True


def _has_form(pattern: Pattern, form: str) -> bool:
    """Built-in parts that all define ``form`` (a custom pattern has no parts)."""
    return bool(pattern.parts) and all(has_form(p, form) for p in pattern.parts)


def _portable_supports(q: Tensor, pattern: Pattern) -> bool:
    return not pattern.parts or _has_form(pattern, "portable")


def _load_triton() -> AttentionFn:
    from .triton_sparse import triton_attention
    return triton_attention


def _triton_supports(q: Tensor, pattern: Pattern) -> bool:
    """Patterns whose parts all have a kernel form, fp16/bf16, D in 16/32/64/128, N * D < 2^31 (the
    kernels' int32 offsets), on CUDA; on CPU only under TRITON_INTERPRET=1."""
    if not _has_form(pattern, "kernel") or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if q.shape[-2] * q.shape[-1] >= 2 ** 31:
        return False
    if q.shape[-1] not in (16, 32, 64, 128) or importlib.util.find_spec("triton") is None:
        return False
    if q.is_cuda:
        return True
    return q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _load_flex() -> AttentionFn:
    from .flex import flex_attention
    return flex_attention


def _flex_supports(q: Tensor, pattern: Pattern) -> bool:
    """CUDA with FlexAttention (and Triton for its compiled kernels); D a power of two >= 16."""
    if not q.is_cuda or importlib.util.find_spec("triton") is None:
        return False
    from .flex import flex_available
    d = q.shape[-1]
    return flex_available() and d >= 16 and d & (d - 1) == 0 and q.dtype in (torch.float16, torch.bfloat16,
                                                                            torch.float32)


BACKENDS: dict[str, Backend] = {
    "reference": Backend("reference", lambda: reference_attention, _always,
                         "dense mask in float64; the oracle, O(N^2)"),
    "torch": Backend("torch", lambda: portable_attention, _portable_supports,
                     "portable PyTorch, O(N x keys per query) memory, CPU and GPU"),
    "triton": Backend("triton", _load_triton, _triton_supports,
                      "Triton kernels, fwd+bwd, each part on its structure; fp16/bf16, CUDA",
                      auto_supports=lambda q, p: q.is_cuda and _triton_supports(q, p)),
    "flex": Backend("flex", _load_flex, _flex_supports,
                    "FlexAttention with a cached BlockMask from pattern.mask_mod; any pattern, CUDA"),
}

# Preference order for backend="auto"; the first that supports the inputs wins: triton on CUDA
# when every part of the pattern has a kernel form, in fp16/bf16 (D in 16..128), flex for custom
# patterns and for what triton cannot take (fp32, other D, a part without a kernel) on CUDA, torch
# otherwise.
AUTO_ORDER = ("triton", "flex", "torch")


def available_backends(q: Tensor, pattern: Pattern) -> list[str]:
    """Names of the backends that can run these inputs, best first."""
    return [name for name in AUTO_ORDER if BACKENDS[name].supports(q, pattern)]


def choose_backend(q: Tensor, pattern: Pattern) -> str:
    """The backend ``backend="auto"`` uses for these inputs."""
    for name in AUTO_ORDER:
        backend = BACKENDS[name]
        if (backend.auto_supports or backend.supports)(q, pattern):
            return name
    return "torch"


def _check(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, scale: Optional[float], backend: str) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of shape [B, H, N, D], got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, N, D], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k and v must have the same shape [B, H, N, D], got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must share dtype and device, got {q.dtype}/{q.device}, "
                         f"{k.dtype}/{k.device}, {v.dtype}/{v.device}")
    if q.shape[-1] == 0:
        raise ValueError("head dimension D must be >= 1, got 0")
    if not isinstance(pattern, Pattern):
        raise ValueError(f"pattern must be a sparse_transformer Pattern (see st.patterns), got {type(pattern).__name__}")
    if scale is not None and not _positive_finite(scale):
        raise ValueError(f"scale must be a finite number > 0 or None (1/sqrt(D)), got {scale!r}")
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {backend!r}")


def _positive_finite(x) -> bool:
    """A real number (Python or numpy, not bool) that is finite and > 0; never raises."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        return False
    try:
        return math.isfinite(float(x)) and float(x) > 0
    except OverflowError:  # an int too large for a float
        return False


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, scale: Optional[float] = None,
                     backend: str = "auto") -> Tensor:
    """Causal attention restricted to ``pattern``: ``softmax(q k^T * scale + mask) v`` per head.

    Args:
        q, k, v: ``[B, H, N, D]`` tensors of one float dtype and device. Head ``h`` uses
            ``pattern.mask(N, head=h)``.
        pattern: from :mod:`sparse_transformer.patterns`: a part, a union of parts (strided and
            fixed are two), or a custom pattern.
        scale: score scale, default ``1/sqrt(D)`` (PAPER.md, "The model").
        backend: ``"auto"`` (fastest available), or one of :data:`BACKENDS`.

    Returns ``[B, H, N, D]`` in the input dtype. A query with no admissible key gets zeros
    (and passes zero gradient); a NaN or inf in a value reaches only the queries that may attend it.
    """
    _check(q, k, v, pattern, scale, backend)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    name = choose_backend(q, pattern) if backend == "auto" else backend
    chosen = BACKENDS[name]
    if not chosen.supports(q, pattern):
        raise ValueError(f"backend {name!r} cannot run {pattern} on {q.dtype} {q.device.type} inputs; "
                         f"available here: {available_backends(q, pattern) + ['reference']}")
    if q.numel() == 0:  # B, H or N is 0 (D = 0 was refused): nothing to attend
        return q.clone()
    return chosen.load()(q, k, v, pattern, scale)


__all__ = ["sparse_attention", "BACKENDS", "available_backends", "choose_backend"]
