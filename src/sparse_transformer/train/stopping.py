"""Stop a run cleanly on SIGTERM or Ctrl-C: finish the step, write a checkpoint, exit.

Schedulers and ``timeout`` send SIGTERM before they kill; a KeyboardInterrupt raised at an
arbitrary point (inside a CUDA call, the optimizer update or a collective) can leave no
checkpoint at all. The handler only records the request; the training loop checks it after each
step, and under several processes the ranks agree on it through the step's loss all-reduce.
A second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import signal
import threading


class StopRequest:
    """Context manager: while active, SIGTERM and SIGINT set :attr:`requested` instead of ending the
    process. Handlers are installed only in the main thread (Python allows no other) and only over
    the default ones: a signal the caller ignores stays ignored."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.name = ""
        self._previous: dict = {}

    def __enter__(self) -> "StopRequest":
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def install(self) -> None:
        """Take over SIGTERM and SIGINT (see the class docstring)."""
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                current = signal.getsignal(sig)
                if current in (signal.SIG_DFL, signal.default_int_handler):
                    self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now
        self.requested = True
        self.name = signal.Signals(signum).name

    def restore(self) -> None:
        """Put back the handlers :meth:`install` replaced."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
