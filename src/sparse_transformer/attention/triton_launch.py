"""Launching a ``@triton.jit`` kernel with less host work per call.

On every call Triton's JIT binds and specializes each argument, formats a cache key from them,
reads its knobs and looks the compiled kernel up; then the compiled kernel's launcher packs the
arguments. The JIT's part was most of a short pass's host time, so short passes were as long on
the host as on the GPU (docs/results.md, "Why the kernels' defaults are what they are").
:class:`Launcher` goes through the JIT once per *key* (everything the JIT specializes on: each
tensor's dtype and 16-byte alignment, each number's type and value, the constexprs and options)
and then calls the compiled kernel's launcher directly. So a knob changed later (``TRITON_DEBUG``)
reaches only keys not launched yet.

That launcher is not public Triton API, so the direct path is taken only on the Triton releases in
:data:`DIRECT_LAUNCH_VERSIONS` (those it was run and checked on, on a GPU); on any other release every
call goes through the public ``kernel[grid](...)``. docs/results.md has the measured gain.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import triton
from triton import knobs
from triton.runtime import driver
from triton.runtime.jit import JITFunction

# What a compiled kernel must have for the direct call (Triton 3.x ``CompiledKernel``).
_COMPILED_API = ("run", "function", "packed_metadata", "launch_metadata")
_PLAIN = frozenset((int, float, bool, type(None)))
_UNSEEN = object()
# (major, minor) of the Triton releases whose compiled-kernel launcher the direct path was run on.
DIRECT_LAUNCH_VERSIONS = ((3, 6),)


def direct_launch_supported(version: Optional[str] = None) -> bool:
    """Whether this Triton release (or ``version``) is one the direct path was checked on."""
    numbers = [int("".join(c for c in x if c.isdigit()) or 0) for x in (version or triton.__version__).split(".")[:2]]
    return tuple(numbers) in DIRECT_LAUNCH_VERSIONS


def _arg_key(arg: Any) -> Any:
    """The part of one positional argument that the JIT's specialization can depend on."""
    kind = type(arg)
    if kind in _PLAIN:
        return kind, arg  # the type too: 1 and 1.0 (or True) are one dict key but not one kernel
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    base = getattr(arg, "base", None)  # a tensor descriptor: its base tensor and box
    if isinstance(base, torch.Tensor):
        return (kind, base.dtype, base.data_ptr() % 16 == 0, tuple(arg.shape), tuple(arg.strides),
                tuple(arg.block_shape), getattr(arg, "padding", None))
    raise TypeError(f"Launcher cannot key an argument of type {kind.__name__}; "
                    f"expected a tensor, a tensor descriptor, a number or None")


class Launcher:
    """``launcher[grid](*args, **kwargs)`` runs ``kernel[grid](*args, **kwargs)``, the JIT only on
    the first call of each argument key. Tensors and descriptors go positionally; keywords are
    constexprs and launch options (``num_warps``...), plain values. Where there is no compiled
    kernel to call (the CPU interpreter, a Triton whose compiled kernels lack the launcher API, or
    a release not in :data:`DIRECT_LAUNCH_VERSIONS`), every call goes through the JIT."""

    def __init__(self, kernel: Any):
        self.kernel = kernel
        self.direct = isinstance(kernel, JITFunction) and direct_launch_supported()
        # key -> (compiled kernel, the trailing parameters' (name, default)), or None: JIT only
        self._compiled: dict = {}

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        return lambda *args, **kwargs: self._launch(grid, args, kwargs)

    def _launch(self, grid: tuple[int, ...], args: tuple, kwargs: dict) -> None:
        if not self.direct:
            self.kernel[grid](*args, **kwargs)
            return
        device = driver.active.get_current_device()  # as the JIT picks its device and stream
        key = (device, tuple(map(_arg_key, args)), tuple(kwargs.items()), tuple(map(type, kwargs.values())))
        entry = self._compiled.get(key, _UNSEEN)
        if entry is _UNSEEN:
            self._compiled[key] = self._first_launch(grid, args, kwargs)
            return
        if entry is None:
            self.kernel[grid](*args, **kwargs)
            return
        compiled, trailing = entry
        values = (*args, *(kwargs.get(name, default) for name, default in trailing))
        stream = driver.active.get_current_stream(device)
        hooks = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
        compiled.run(*grid, *(1,) * (3 - len(grid)), stream, compiled.function, compiled.packed_metadata,
                     compiled.launch_metadata(grid, stream, *values), *hooks, *values)

    def _first_launch(self, grid: tuple[int, ...], args: tuple, kwargs: dict) -> Optional[tuple]:
        for name, value in kwargs.items():  # the key holds keywords as they are
            if type(value) not in _PLAIN and not isinstance(value, str):
                raise TypeError(f"Launcher takes constexprs and launch options by keyword, got {name}="
                                f"{type(value).__name__}; pass tensors and descriptors positionally")
        compiled = self.kernel[grid](*args, **kwargs)
        compiled = compiled.result() if hasattr(compiled, "result") else compiled  # an async compile
        if not all(hasattr(compiled, name) for name in _COMPILED_API):
            return None
        # The launcher takes every parameter in signature order: ours positionally, then the
        # constexprs by name or their defaults.
        names = self.kernel.arg_names[len(args):]
        defaults = {p.name: p.default for p in self.kernel.params}
        return compiled, tuple((name, defaults[name]) for name in names)
