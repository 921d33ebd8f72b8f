"""Byte datasets: each split is a flat uint8 array; see :class:`ByteDataset` and :func:`load`."""

from .axes import position_axes, positions
from .batches import EvalWindow, Prefetcher, TrainBatches, eval_batches, eval_windows
from .dataset import ByteDataset, check_context, split_stream
from .download import cache_dir
from .registry import NAMES, load
from .stdlib import load_stdlib

__all__ = ["ByteDataset", "split_stream", "load_stdlib", "check_context", "load", "NAMES", "cache_dir",
           "position_axes", "positions", "TrainBatches", "EvalWindow", "eval_windows", "eval_batches", "Prefetcher"]
