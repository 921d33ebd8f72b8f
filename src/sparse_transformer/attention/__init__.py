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
from . import ops
from .portable import portable_attention
from .reference import reference_attention

AttentionFn = Callable[[Tensor, Tensor, Tensor, Pattern, float], Tensor]

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""The dtypes q, k and v may have (fp8 and other floating-point types have no softmax arithmetic here)."""

# Read once: torch.compile cannot trace a module lookup, and sparse_attention runs inside traced code.
HAS_TRITON = importlib.util.find_spec("triton") is not None


@dataclass(frozen=True)
class Backend:
    """A way to compute sparse attention; ``supports`` says whether it can take these inputs."""

    name: str
    load: Callable[[], AttentionFn]  # imported on first use
    supports: Callable[[Tensor, Tensor, Pattern], bool]  # (q, v, pattern)
    note: str
    # Stricter test for backend="auto" (None: same as supports); keeps the CPU interpreter out of auto.
    auto_supports: Optional[Callable[[Tensor, Tensor, Pattern], bool]] = None


def _always(q: Tensor, v: Tensor, pattern: Pattern) -> bool:
    return True


def _has_form(pattern: Pattern, form: str) -> bool:
    """Built-in parts that all define ``form`` (a custom pattern has no parts)."""
    return len(pattern.parts) > 0 and all(has_form(p, form) for p in pattern.parts)


def _triton_attention(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, scale: float) -> Tensor:
    return ops.sparse_attention_triton(q, k, v, pattern.spec, scale)


def _triton_supports(q: Tensor, v: Tensor, pattern: Pattern) -> bool:
    """Patterns whose parts all have a kernel form, fp16/bf16, head widths in 16/32/64/128, N * D
    below 2^31 (the kernels' int32 offsets), on CUDA; on CPU only under TRITON_INTERPRET=1."""
    if not _has_form(pattern, "kernel") or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if q.shape[-2] * max(q.shape[-1], v.shape[-1]) >= 2 ** 31:
        return False
    if q.shape[-1] not in (16, 32, 64, 128) or v.shape[-1] not in (16, 32, 64, 128) or not HAS_TRITON:
        return False
    if q.is_cuda:
        return True
    return q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _load_flex() -> AttentionFn:
    from .flex import flex_attention
    return flex_attention


def _flex_supports(q: Tensor, v: Tensor, pattern: Pattern) -> bool:
    """CUDA with FlexAttention (and Triton for its compiled kernels); head widths powers of two >= 16."""
    if not q.is_cuda or not HAS_TRITON:
        return False
    widths_ok = all(d >= 16 and d & (d - 1) == 0 for d in (q.shape[-1], v.shape[-1]))
    return widths_ok and q.dtype in (torch.float16, torch.bfloat16, torch.float32)


def _load_fa4() -> AttentionFn:
    from .fa4 import fa4_attention
    return fa4_attention


def _fa4_supports(q: Tensor, v: Tensor, pattern: Pattern) -> bool:
    from .fa4 import supports
    return supports(q, v, pattern)


def _fa4_auto(q: Tensor, v: Tensor, pattern: Pattern) -> bool:
    if torch.compiler.is_compiling() or not q.is_cuda:  # before the import: compiled code cannot trace it
        return False
    from .fa4 import auto_picks
    return auto_picks(q, v, pattern)


BACKENDS: dict[str, Backend] = {
    "reference": Backend("reference", lambda: reference_attention, _always,
                         "dense mask in float64; the oracle, O(N^2)"),
    "torch": Backend("torch", lambda: portable_attention, _always,
                     "portable PyTorch, O(N x keys per query) memory, CPU and GPU"),
    "triton": Backend("triton", lambda: _triton_attention, _triton_supports,
                      "Triton kernels, fwd+bwd, each part on its structure; fp16/bf16, CUDA",
                      auto_supports=lambda q, v, p: q.is_cuda and _triton_supports(q, v, p)),
    "flex": Backend("flex", _load_flex, _flex_supports,
                    "FlexAttention with a cached BlockMask from pattern.mask_mod; any pattern, CUDA"),
    "fa4": Backend("fa4", _load_fa4, _fa4_supports,
                   "FlashAttention-4's Hopper kernels on the fixed pattern's concatenated keys; fp16/bf16, "
                   "sm90+, optional (pip install sparse-transformer[fa4]); auto picks it for fixed 128/32 "
                   "(any distinct count), D = 64, N >= 32,768, outside torch.compile", auto_supports=_fa4_auto),
}

# Preference order for backend="auto"; the first that supports the inputs wins: fa4 where installed
# and measured faster (the fixed pattern at long context, eager), triton on CUDA when every part of
# the pattern has a kernel form, in fp16/bf16 (D in 16..128), flex for custom patterns and for what
# triton cannot take (fp32, other D, a part without a kernel) on CUDA, torch otherwise.
AUTO_ORDER = ("fa4", "triton", "flex", "torch")


def available_backends(q: Tensor, pattern: Pattern, v: Optional[Tensor] = None) -> list[str]:
    """Names of the backends that can run these inputs (``v`` defaults to ``q``'s shape), best first."""
    v = q if v is None else v
    return [name for name in AUTO_ORDER if BACKENDS[name].supports(q, v, pattern)]


def choose_backend(q: Tensor, pattern: Pattern, v: Optional[Tensor] = None) -> str:
    """The backend ``backend="auto"`` uses for these inputs (``v`` defaults to ``q``'s shape)."""
    v = q if v is None else v
    for name in AUTO_ORDER:
        backend = BACKENDS[name]
        if (backend.auto_supports or backend.supports)(q, v, pattern):
            return name
    return "torch"


def _check(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, scale: Optional[float], backend: str) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of shape [B, H, N, D], got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, N, D], got shape {tuple(x.shape)}")
        if x.dtype not in DTYPES:  # fp8 failed inside torch with a NotImplementedError
            raise ValueError(f"{name} must be a floating-point tensor ({', '.join(str(d) for d in DTYPES)}), "
                             f"got {x.dtype}")
    if q.shape != k.shape or q.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"q and k must have one shape [B, H, N, Dqk] and v the shape [B, H, N, Dv], got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must share dtype and device, got {q.dtype}/{q.device}, "
                         f"{k.dtype}/{k.device}, {v.dtype}/{v.device}")
    if q.shape[-1] == 0 or v.shape[-1] == 0:
        raise ValueError(f"head widths must be >= 1, got {q.shape[-1]} for q/k and {v.shape[-1]} for v")
    if not isinstance(pattern, Pattern):
        raise ValueError(f"pattern must be a sparse_transformer Pattern (see st.patterns), got {type(pattern).__name__}")
    if scale is not None and not _positive_finite(scale):
        raise ValueError(f"scale must be a finite number > 0 or None (1/sqrt(D)), got {str(scale)[:40]}")
    limits = torch.finfo(q.dtype) if q.is_floating_point() else None
    if scale is not None and limits is not None and not limits.tiny <= float(scale) <= limits.max:
        raise ValueError(f"scale {float(scale):g} is outside what {q.dtype} holds ({limits.tiny:g} to "
                         f"{limits.max:g}): the scores would overflow or vanish")
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
        q, k: ``[B, H, N, Dqk]``; v: ``[B, H, N, Dv]`` (half-size layers use a narrower q/k);
            one float dtype and device. Head ``h`` uses ``pattern.mask(N, head=h)``.
        pattern: from :mod:`sparse_transformer.patterns`: a part, a union of parts (strided and
            fixed are two), or a custom pattern.
        scale: score scale, default ``1/sqrt(Dqk)`` (PAPER.md, "The model").
        backend: ``"auto"`` (fastest available), or one of :data:`BACKENDS`.

    Returns ``[B, H, N, Dv]`` in the input dtype. A query with no admissible key gets zeros
    (and passes zero gradient); a NaN or inf in a value reaches only the queries that may attend it.
    Inside ``torch.compile`` (``fullgraph=True`` included) the Triton kernels are one registered op
    each way (``torch.ops.sparse_transformer``): no graph break.
    """
    _check(q, k, v, pattern, scale, backend)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    name = choose_backend(q, pattern, v) if backend == "auto" else backend
    problem = refusal(name, q, v, pattern)
    if problem:
        raise ValueError(problem)
    if q.numel() == 0:  # B, H or N is 0 (D = 0 was refused): nothing to attend
        return v.clone()
    return BACKENDS[name].load()(q, k, v, pattern, scale)


def refusal(backend: str, q: Tensor, v: Tensor, pattern: Pattern) -> Optional[str]:
    """Why ``backend`` cannot run ``pattern`` on inputs like q and v (None: it can), with what it
    needs and what can run them; shapes only matter, so expanded or empty tensors will do."""
    if BACKENDS[backend].supports(q, v, pattern):
        return None
    return (f"backend {backend!r} cannot run {pattern} on {q.dtype} {q.device.type} inputs ({backend}: "
            f"{BACKENDS[backend].note}); available here: {available_backends(q, pattern, v) + ['reference']}")


__all__ = ["sparse_attention", "BACKENDS", "available_backends", "choose_backend", "refusal"]
