"""Which bytes a run trains on: the one place that maps a :class:`DataConfig` to a dataset."""

from __future__ import annotations

from ..config import DataConfig
from ..data import ByteDataset, load


def load_dataset(data: DataConfig, progress: bool = True) -> ByteDataset:
    """The dataset for ``data``: ``data.dataset`` by name through :func:`sparse_transformer.data.load`
    (``data.path`` is its local copy). A path with the default dataset name means "these bytes": any
    file or folder, ``.gz`` decompressed, split 90/5/5."""
    name = data.dataset
    if data.path is not None and name in ("stdlib", "default"):
        name = "bytes"
    return load(name, data.path, tile=tuple(data.tile), progress=progress)
