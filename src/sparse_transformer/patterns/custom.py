"""``custom(fn)``: a user's own mask function (FlexAttention's ``mask_mod`` convention).

A custom pattern has no parts and no spec: the ``torch`` backend evaluates its function in query
chunks, ``flex`` builds a block mask from it, the cache evaluates it over the context at each
step. It cannot join a union (write one function that ORs the rules instead).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .base import MaskMod, Part, Pattern


@dataclass(frozen=True, eq=False)
class Custom(Pattern):
    """A user-defined pattern from a ``(b, h, q_idx, kv_idx) -> bool`` function.

    The function must work elementwise on broadcast integer tensors (as FlexAttention's
    ``mask_mod`` does); causality (``kv_idx <= q_idx``) is always added. Compared by identity.
    """

    fn: MaskMod
    label: str = "custom"
    per_head: bool = True

    # Pattern compares by spec, and a custom pattern has none: compare by identity, as documented.
    def __eq__(self, other):
        return self is other

    def __hash__(self):
        return id(self)

    def __post_init__(self):
        if not callable(self.fn):
            raise ValueError(f"custom pattern needs a callable (b, h, q_idx, kv_idx) -> bool, got {self.fn!r}")
        try:
            signature = inspect.signature(self.fn)
        except (TypeError, ValueError):  # some builtins have no signature: checked when first called
            return
        try:
            signature.bind(0, 0, 0, 0)
        except TypeError:
            # Found here rather than as a TypeError deep inside a backend on the first forward pass.
            raise ValueError(f"custom pattern {self.label!r} must take four arguments (b, h, q_idx, kv_idx), "
                             f"got a function with signature {signature}") from None

    @property
    def parts(self) -> tuple[Part, ...]:
        return ()

    @property
    def spec(self) -> Optional[str]:
        return None

    @property
    def kind(self) -> str:
        return "custom"

    @property
    def name(self) -> str:
        return self.label

    def allowed(self, b, h, q_idx, kv_idx):
        out = self.fn(b, h, q_idx, kv_idx)
        if not isinstance(out, Tensor) or out.dtype != torch.bool:
            raise ValueError(f"custom pattern {self.label!r} must return a bool tensor, got {type(out).__name__}"
                             + (f" of dtype {out.dtype}" if isinstance(out, Tensor) else ""))
        # An elementwise result broadcasts to the inputs' shape; anything else (a fixed-size mask, a
        # reduction) would fail inside a backend with a bare broadcasting error, or broadcast wrongly.
        expected = torch.broadcast_shapes(b.shape, h.shape, q_idx.shape, kv_idx.shape)
        try:
            fits = torch.broadcast_shapes(out.shape, expected) == expected
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"custom pattern {self.label!r} must work elementwise on its index tensors: for inputs "
                             f"broadcasting to {tuple(expected)} it returned shape {tuple(out.shape)}")
        return out

    def heads_differ(self) -> bool:
        return self.per_head


def custom(fn: MaskMod, name: Optional[str] = None, per_head: bool = True) -> Custom:
    """Wrap a FlexAttention-style ``mask_mod`` as a pattern. Set ``per_head=False`` when the
    function ignores ``h``, so backends compute the mask once for all heads."""
    return Custom(fn, name or getattr(fn, "__name__", "custom"), per_head)
