"""Which bytes a run trains on: the one place that maps a :class:`DataConfig` to a dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import DataConfig
from ..data import ByteDataset, load_stdlib, split_stream


def load_dataset(data: DataConfig) -> ByteDataset:
    """The dataset for ``data``: the embedded standard library (``stdlib``), a plain file given as
    ``path`` (memory-mapped, split 90/5/5 as one byte stream), or a named dataset from the data
    module's ``load(name, path)`` when it is available."""
    if data.path is not None and Path(data.path).is_file():
        stream = np.memmap(data.path, dtype=np.uint8, mode="r")
        if len(stream) < 100:
            raise ValueError(f"--data {data.path}: need at least 100 bytes to split, got {len(stream)}")
        return split_stream(stream, Path(data.path).name, "text")
    if data.dataset == "stdlib" and data.path is None:
        return load_stdlib()
    try:
        from ..data import load  # the data module's loader for named datasets (enwik8, cifar10, ...)
    except ImportError:
        raise ValueError(f"dataset {data.dataset!r} needs the data module's load(); pass a plain byte "
                         f"file with --data PATH or use the embedded default (dataset 'stdlib')") from None
    return load(data.dataset, data.path)
