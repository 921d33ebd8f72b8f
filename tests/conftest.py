import os

# Triton kernels run on the CPU interpreter when there is no GPU (must be set before triton loads).
try:
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

import pytest


def pytest_collection_modifyitems(config, items):
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `python -m pytest -m gpu` on a machine with one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory):
    """Datasets the tests prepare (every --data file is converted into the cache) go to a folder of
    this session, not the user's cache; subprocesses inherit it."""
    patch = pytest.MonkeyPatch()
    folder = tmp_path_factory.mktemp("data-cache")
    patch.setenv("SPARSE_TRANSFORMER_DATA", str(folder))
    yield folder
    patch.undo()
