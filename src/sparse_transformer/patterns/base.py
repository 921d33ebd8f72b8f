"""What every pattern is (a mask function with a canonical spec string) and what every
primitive part must tell the backends.

A built-in pattern is a union of primitive parts. Each part lives in its own module, which holds
everything about it: its mask function, its exact keys per query, its portable PyTorch form, its
Triton launch plan, its key/value-cache slots and its FlexAttention form. Backends ask the parts
through the :class:`Part` interface below; none of them switches on pattern classes.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable, ClassVar, Optional

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .plans import KernelPart, Slots

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
"""``(b, h, q_idx, kv_idx) -> bool tensor``: True where the query may attend the key."""

MAX_PARAMETER = 2 ** 31 - 1
"""Largest size a part takes (stride, window, summary, count, distinct): every index the Triton
kernels form from it fits their int32 arithmetic (the plan clamps sizes to the sequence first)."""

MAX_LENGTH = 2 ** 62
"""Longest sequence whose cost is counted: positions and pair counts stay in int64 elsewhere."""


def check_int(name: str, value: int, low: int, high: int = MAX_PARAMETER) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is an int in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {_short(repr(value))}")
    if not low <= value <= high:
        allowed = f">= {low} and <= {high:,}" if high == MAX_PARAMETER else f"in [{low}, {high:,}]"
        got = f"{value:,}" if abs(value) < 10 ** 30 else f"an integer of {len(str(abs(value)))} digits"
        raise ValueError(f"{name} must be {allowed}, got {got}")


def check_pattern(value) -> None:
    """Raise a ValueError unless ``value`` is a pattern (a spec string is not: parse() reads it)."""
    if not isinstance(value, Pattern):
        raise ValueError(f"pattern must be a pattern from st.patterns (parse a spec string with "
                         f"st.patterns.parse), got {type(value).__name__} {_short(repr(value))}")


def _short(text: str, limit: int = 60) -> str:
    """``text`` cut to ``limit`` characters, so that an error stays one readable line."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


class Pattern:
    """Base class of attention patterns. ``mask_mod`` is the single source of truth; built-in
    patterns are unions of :class:`Part` objects (``parts``) and have a canonical ``spec`` string
    that :func:`~sparse_transformer.patterns.parse` turns back into an equal pattern. Patterns are
    immutable and hashable (built-in ones compare by spec), so backends can cache per pattern."""

    @property
    def parts(self) -> tuple["Part", ...]:
        """The primitive parts whose union is this pattern, in canonical order (a key two parts
        admit belongs to the earlier one)."""
        raise NotImplementedError

    @property
    def spec(self) -> Optional[str]:
        """Canonical string (``"local:256+global_tokens:16"``); None for custom patterns."""
        return "+".join(p.spec for p in self.parts)

    @property
    def kind(self) -> str:
        return "union"

    @property
    def name(self) -> str:
        return self.spec

    def allowed(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        """The pattern without causality: the union of its parts."""
        out = None
        for part in self.parts:
            mine = part.allowed(b, h, q_idx, kv_idx)
            out = mine if out is None else out | mine
        return out

    def mask_mod(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        """FlexAttention-style mask function: the pattern, restricted to ``kv_idx <= q_idx``."""
        return (kv_idx <= q_idx) & self.allowed(b, h, q_idx, kv_idx)

    def mask(self, n: int, head: int = 0, device: torch.device | str | None = None) -> Tensor:
        """Dense boolean mask ``[n, n]`` for one head: ``mask[i, j]`` is True if query i may attend key j."""
        check_int("n", n, 0)
        check_int("head", head, 0)
        idx = torch.arange(n, device=device)
        zero = torch.zeros((), dtype=torch.long, device=device)
        m = self.mask_mod(zero, zero + head, idx[:, None], idx[None, :])
        return m.expand(n, n).to(torch.bool)

    def heads_differ(self) -> bool:
        """True when heads see different masks (then ``mask(n, head)`` depends on ``head``)."""
        return any(p.heads_differ() for p in self.parts)

    # Closed forms of the keys per query (``layout`` counts a pattern without them from its parts).
    def keys_per_query(self, i: Tensor, head: int) -> Optional[Tensor]:
        """Exact number of admissible keys of queries at positions ``i`` (LongTensor, any shape),
        or None when there is no closed form."""
        return self.parts[0].keys_per_query(i, head) if len(self.parts) == 1 else None

    def pairs(self, n: int, head: int) -> Optional[int]:
        """Admissible (query, key) pairs at length ``n`` in Python ints, or None."""
        return self.parts[0].pairs(n, head) if len(self.parts) == 1 else None

    def max_keys(self, n: int, head: int) -> Optional[int]:
        """The largest keys-per-query at length ``n >= 1``, or None."""
        return self.parts[0].max_keys(n, head) if len(self.parts) == 1 else None

    def __or__(self, other: "Pattern") -> "Pattern":
        from .union import union
        return union(self, other)

    def __ror__(self, other) -> "Pattern":  # ``3 | local(4)``: the same one-line error as ``local(4) | 3``
        from .union import union
        return union(other, self)

    def __eq__(self, other) -> bool:
        if self is other:
            return True
        if not isinstance(other, Pattern):
            return NotImplemented
        return self.spec is not None and self.spec == other.spec

    def __hash__(self) -> int:
        return hash(self.spec)

    def __str__(self) -> str:
        return self.name


class Part(Pattern):
    """A primitive part: one rule, and everything a backend needs to know about it.

    A subclass (a frozen dataclass in its own module) defines the rule (:meth:`allowed`) and the
    forms below. ``earlier`` arguments are the parts before this one in a union: keys they admit
    belong to them, so this part leaves them out (overlaps count once, exactly).
    """

    token: ClassVar[str]  # the spec keyword, e.g. "local"
    rank: ClassVar[int]  # place in a union's canonical order
    period: ClassVar[int] = 1  # see :meth:`structure`

    @property
    def parts(self) -> tuple["Part", ...]:
        return (self,)

    @property
    def kind(self) -> str:
        return self.token

    @property
    def arguments(self) -> tuple[int, ...]:
        """The ints after the token in the spec: the part's dataclass fields, in order (a part whose
        spec leaves a default out says so by overriding this)."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    @property
    def spec(self) -> str:
        return ":".join([self.token, *map(str, self.arguments)])

    def sort_key(self) -> tuple:
        return (self.rank, self.arguments)

    def contains(self, other: "Part") -> bool:
        """True when this part admits every key ``other`` does (for every length and head): a
        union then drops ``other``."""
        return other == self

    def heads_differ(self) -> bool:
        return False

    def allowed(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        """The part's rule without causality, elementwise on broadcast index tensors."""
        raise NotImplementedError

    def admits_diagonal(self) -> bool:
        """Whether every query may attend itself (then no query of a union with it is empty)."""
        return True

    # ---------------------------------------------------------------- keys per query
    # A part defines ``keys_per_query``, ``pairs`` and ``max_keys`` (see Pattern) in closed form;
    # without them (None) ``layout`` counts it from its mask function and ``structure``.
    def keys_per_query(self, i: Tensor, head: int) -> Optional[Tensor]:
        return None

    def pairs(self, n: int, head: int) -> Optional[int]:
        return None

    def max_keys(self, n: int, head: int) -> Optional[int]:
        return None

    def structure(self) -> tuple[int, int, int]:
        """``(period, reach, prefix)`` for counting a union exactly at any length (``layout``):
        a key at ``j >= prefix`` is admitted or not by ``(i - j, i % period)`` alone, periodically
        in ``i - j`` (period ``period``) once ``i - j >= reach``; keys ``j < prefix`` are all admitted."""
        return self.period, 0, 0

    # ---------------------------------------------------------------- backends
    def portable(self, q: Tensor, k: Tensor, v: Tensor, scale: float,
                 earlier: tuple["Part", ...]) -> tuple[Tensor, Tensor]:
        """This part's keys minus ``earlier``'s in PyTorch: ``(out [B, H, N, D], lse [B, H, N])``
        fp32, O(N x keys per query) memory (see ``attention/portable.py``)."""
        raise NotImplementedError

    def kernel(self, n: int, earlier: tuple["Part", ...]) -> "KernelPart":
        """This part at length ``n`` as one launch of the Triton kernels (``plans.KernelPart``),
        with the keys of ``earlier`` excluded."""
        raise NotImplementedError

    def slots(self, head: int, context: int) -> "Slots":
        """The key slots a decoded query reads for this part (``plans.Slots``); keys of earlier
        parts are dropped by the cache at each step."""
        raise NotImplementedError

    def flex(self, q: Tensor, k: Tensor, v: Tensor, scale: float,
             earlier: tuple["Part", ...]) -> tuple[Tensor, Tensor]:
        """This part's keys minus ``earlier``'s through FlexAttention on the part's own structure,
        ``(out, lse)``: the benchmark's decomposed Flex form (CUDA)."""
        raise NotImplementedError

    def flex_forms(self) -> dict:
        """Every Flex formulation of this part by name (``""``: :meth:`flex`), each called as
        :meth:`flex` is. The benchmark times them all and takes the fastest at each N."""
        return {"": self.flex}


def has_form(part: Part, form: str) -> bool:
    """Whether ``part`` defines ``form`` (``"portable"``, ``"kernel"``, ``"slots"``, ``"flex"``):
    a backend that needs a form a part lacks refuses the pattern, and ``auto`` routes past it."""
    return getattr(type(part), form) is not getattr(Part, form)


def covered(earlier: tuple[Part, ...], h, i: Tensor, j: Tensor) -> Optional[Tensor]:
    """Where a key at position ``j`` is admitted to query ``i`` by one of ``earlier`` (broadcast
    tensors; ``h`` the head index, an int or a tensor); None when there are no earlier parts."""
    out = None
    zero = torch.zeros((), dtype=torch.long, device=i.device)
    h = zero + h
    for part in earlier:
        mine = part.allowed(zero, h, i, j)
        out = mine if out is None else out | mine
    return out
