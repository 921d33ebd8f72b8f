"""Byte datasets: each split is a flat uint8 array; see :class:`ByteDataset`."""

from .dataset import ByteDataset, split_stream
from .stdlib import load_stdlib

__all__ = ["ByteDataset", "split_stream", "load_stdlib"]
