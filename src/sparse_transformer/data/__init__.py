"""Byte datasets: each split is a flat uint8 array; see :class:`ByteDataset`."""

from .dataset import ByteDataset, split_stream
from .stdlib import load_stdlib

__all__ = ["ByteDataset", "split_stream", "load_stdlib"]

from .batches import EvalWindow, Prefetcher, TrainBatches, eval_batches, eval_windows  # noqa: E402

__all__ += ["TrainBatches", "EvalWindow", "eval_windows", "eval_batches", "Prefetcher"]
