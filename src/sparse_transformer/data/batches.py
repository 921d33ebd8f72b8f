"""Batches for training and evaluation, cut from flat uint8 splits.

- :class:`TrainBatches`: random windows of a stream, or whole examples of an image set in a
  shuffled order per epoch. Batch ``s`` depends only on ``(seed, s)``, so the data position is one
  integer (``state_dict()``) and a resumed run sees exactly the batches an uninterrupted one would.
  Each rank takes its own disjoint slice of the same global batch.
- :func:`eval_windows`: every byte predicted once, with as much context as the model takes:
  overlapping windows of the context length, each scoring only bytes not scored before
  (PAPER.md: enwik8 evaluated with 12,160 bytes of context). Images: one example per window.
- :class:`Prefetcher`: a background thread that cuts batches ahead of the training step and
  pins them when CUDA is present.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch


def _windows(data: np.ndarray, length: int) -> np.ndarray:
    """A read-only ``[len - length + 1, length]`` view of every window (no copy)."""
    return np.lib.stride_tricks.sliding_window_view(data, length)


class TrainBatches:
    """Reproducible, resumable training batches for one rank.

    Args:
        data: the training split, 1-D uint8 (may be a memmap).
        context: bytes per sequence.
        batch_size: the *global* batch in sequences; each of ``world_size`` ranks gets
            ``batch_size // world_size`` of them (rank ``r`` the ``r``-th slice).
        example_length: bytes per example for image sets (then ``context`` must equal it and
            batches are whole examples, shuffled per epoch); None for streams (random windows).

    ``batch(step)`` returns this rank's ``[batch_size // world_size, context]`` uint8 array.
    """

    def __init__(self, data: np.ndarray, context: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, example_length: Optional[int] = None):
        if data.ndim != 1 or data.dtype != np.uint8:
            raise ValueError(f"data must be a 1-D uint8 array, got {data.dtype} {data.shape}")
        if batch_size % world_size:
            raise ValueError(f"batch_size ({batch_size}) must be divisible by the number of ranks ({world_size})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if example_length is not None and context != example_length:
            raise ValueError(f"image data: context ({context}) must equal the example length ({example_length})")
        if len(data) < context:
            raise ValueError(f"training split has {len(data)} bytes, fewer than one context of {context}")
        self.data, self.context, self.batch_size, self.seed = data, context, batch_size, seed
        self.rank, self.world_size, self.example_length = rank, world_size, example_length
        self.local = slice(rank * (batch_size // world_size), (rank + 1) * (batch_size // world_size))
        if example_length is not None:
            self.examples = len(data) // example_length
            if self.examples < batch_size:
                raise ValueError(f"training split has {self.examples} examples, fewer than batch_size {batch_size}")
        self.step = 0  # the next batch to hand out

    @property
    def steps_per_epoch(self) -> int:
        """Global batches per pass over the split (images: whole batches; streams: bytes / batch bytes)."""
        if self.example_length is not None:
            return self.examples // self.batch_size
        return max(1, len(self.data) // (self.batch_size * self.context))

    def epoch(self, step: Optional[int] = None) -> float:
        """Passes over the training split completed after ``step`` batches."""
        return (self.step if step is None else step) / self.steps_per_epoch

    def batch(self, step: int) -> np.ndarray:
        """This rank's slice of global batch ``step``: ``[batch_size // world_size, context]`` uint8."""
        if self.example_length is None:
            rng = np.random.default_rng([self.seed, step])
            starts = rng.integers(0, len(self.data) - self.context + 1, size=self.batch_size)
            return _windows(self.data, self.context)[starts[self.local]]
        epoch, index = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.examples)
        chosen = order[index * self.batch_size:(index + 1) * self.batch_size][self.local]
        return self.data.reshape(self.examples, self.example_length)[chosen]

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        """Yields ``(step, batch)`` from the current position on, forever."""
        while True:
            step = self.step
            self.step += 1
            yield step, self.batch(step)

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.seed or state.get("batch_size") != self.batch_size:
            raise ValueError(f"batch state is for seed {state.get('seed')} / batch_size {state.get('batch_size')}, "
                             f"this run uses seed {self.seed} / batch_size {self.batch_size}")
        self.step = int(state["step"])


@dataclass(frozen=True)
class EvalWindow:
    """One evaluation window: score ``tokens[first:]`` (the bytes before ``first`` are context)."""

    start: int  # offset of the window in the split
    first: int  # index inside the window of the first scored byte


def eval_windows(length: int, context: int, stride: Optional[int] = None,
                 example_length: Optional[int] = None, max_bytes: Optional[int] = None) -> list[EvalWindow]:
    """Windows that score every byte of a ``length``-byte split exactly once.

    Streams: the first window ``[0, context)`` scores all its bytes; each next one moves forward by
    ``stride`` (default ``context // 2``) and scores only its last ``stride`` bytes, so every
    scored byte after the first window has at least ``context - stride`` bytes of context. The last
    window ends at the end of the split. Images (``example_length``): one example per window.
    ``max_bytes`` keeps only the first windows covering at most that many scored bytes (a bounded
    slice of the split): images, whole ones (``max_bytes`` must hold one); streams, exactly
    ``max_bytes`` when the split is that long and the context no longer (for fewer, pass the split
    cut to ``max_bytes`` bytes, as :func:`~sparse_transformer.train.evaluate` does).
    """
    if example_length is not None:
        if context != example_length:  # a window must be one whole image, or part of each goes unscored
            raise ValueError(f"images of {example_length:,} bytes are evaluated one per window, so the model's "
                             f"context must be {example_length:,}, got {context:,}")
        count = length // example_length
        if max_bytes is not None:
            if max_bytes < example_length:  # "at most max_bytes" cannot hold a whole image
                raise ValueError(f"eval bytes {max_bytes:,} is less than one image of {example_length:,} bytes; "
                                 f"expected at least {example_length:,}")
            count = min(count, max_bytes // example_length)
        return [EvalWindow(i * example_length, 0) for i in range(count)]
    if length < 1:
        raise ValueError(f"an evaluation split needs at least 1 byte, got {length}")
    if stride is not None and stride < 1:  # a stride <= 0 never reaches the end of the split
        raise ValueError(f"eval stride must be >= 1 or None (context // 2), got {stride}")
    context = min(context, length)
    stride = min(stride or max(1, context // 2), context)
    if max_bytes is not None:
        length = min(length, max(max_bytes, context))
    windows = [EvalWindow(0, 0)]
    end = context
    while end < length:
        new_end = min(end + stride, length)
        windows.append(EvalWindow(new_end - context, context - (new_end - end)))
        end = new_end
    return windows


def eval_batches(data: np.ndarray, windows: list[EvalWindow], context: int,
                 batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields ``(tokens [b, n] uint8, first [b] int64)`` for consecutive groups of windows."""
    n = min(context, len(data))
    view = _windows(data, n)
    for i in range(0, len(windows), batch_size):
        group = windows[i:i + batch_size]
        yield (view[[w.start for w in group]], np.array([w.first for w in group], dtype=np.int64))


class Prefetcher:
    """Runs ``iterator`` (of ``(step, uint8 array)``) in a background thread, ``depth`` batches ahead.

    Yields ``(step, tensor)`` with uint8 CPU tensors, pinned when CUDA is available so the copy to
    the GPU can overlap compute. Stop it with :meth:`close` (also on garbage collection).
    """

    def __init__(self, iterator: Iterator[tuple[int, np.ndarray]], depth: int = 4, pin: Optional[bool] = None):
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(iterator,), daemon=True)
        self.thread.start()

    def _run(self, iterator) -> None:
        try:
            for step, array in iterator:
                tensor = torch.from_numpy(np.ascontiguousarray(array))
                if self.pin:
                    tensor = tensor.pin_memory()
                while not self.stopped.is_set():
                    try:
                        self.queue.put((step, tensor), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.stopped.is_set():
                    return
        except BaseException as err:  # hand the error to the consumer instead of dying silently
            self.queue.put(err)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[int, torch.Tensor]:
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)

    def __del__(self):
        self.stopped.set()
