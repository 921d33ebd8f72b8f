"""Model weights on disk: ``model.safetensors`` plus the ``config.json`` that builds the network.

The format of :meth:`SparseTransformer.save_pretrained` / ``from_pretrained`` and of the weights
inside every trainer checkpoint. safetensors only: loading never unpickles anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from .config import ModelConfig, from_dict, to_dict

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def save_weights(path: str | Path, state_dict: dict, config: ModelConfig) -> Path:
    """Write a model state dict as ``model.safetensors`` plus its ``config.json`` into folder ``path``."""
    from safetensors.torch import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    save_file(tensors, str(path / WEIGHTS_FILE))
    (path / CONFIG_FILE).write_text(json.dumps(to_dict(config), indent=2))
    return path


def load_model(path: str | Path, device: torch.device | str = "cpu", cls: Optional[type] = None):
    """The model in folder ``path`` (written by :func:`save_weights`), on ``device``; ``cls``
    defaults to :class:`~sparse_transformer.model.SparseTransformer`. Errors name the bad file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    if cls is None:
        from .model import SparseTransformer as cls
    path = Path(path)
    if not (path / WEIGHTS_FILE).is_file() or not (path / CONFIG_FILE).is_file():
        raise ValueError(f"{path} must hold {WEIGHTS_FILE} and {CONFIG_FILE} (written by save_pretrained)")
    try:
        config = from_dict(ModelConfig, json.loads((path / CONFIG_FILE).read_text()))
    except ValueError as err:  # bad JSON or fields: say which file
        raise ValueError(f"{path / CONFIG_FILE}: not a valid model config ({err})") from None
    model = cls(config).to(device)
    try:
        state = load_file(str(path / WEIGHTS_FILE), device=str(device))
    except (SafetensorError, OSError) as err:  # truncated or corrupt; not a ValueError
        raise ValueError(f"{path / WEIGHTS_FILE}: not a readable safetensors file "
                         f"(truncated or corrupt?): {err}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # missing, unexpected or mis-shaped tensors
        detail = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise ValueError(f"{path / WEIGHTS_FILE} does not fit the model in {path / CONFIG_FILE}: "
                         f"{detail[:300]}") from None
    return model
