"""Model weights on disk: ``model.safetensors`` plus the ``config.json`` that builds the network.

The format of :meth:`SparseTransformer.save_pretrained` / ``from_pretrained`` and of the weights
inside every trainer checkpoint, with a ``manifest.json`` (size and SHA-256 of each file) that
loading checks. safetensors only: loading never unpickles anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from .config import ModelConfig, read_json, to_dict
from .model import join_qkv

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MANIFEST = "manifest.json"  # size and SHA-256 of the folder's files (trainer checkpoints list every file)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: str | Path, names: Sequence[str], **extra) -> Path:
    """``manifest.json`` in ``folder``: ``extra`` fields plus ``files``, each name's bytes and SHA-256."""
    folder = Path(folder)
    files = {name: {"bytes": (folder / name).stat().st_size, "sha256": _sha256(folder / name)} for name in names}
    path = folder / MANIFEST
    path.write_text(json.dumps({**extra, "files": files}, indent=2))
    return path


def check_manifest(folder: str | Path) -> Optional[str]:
    """None if the files listed in ``folder``'s manifest match it, else what is wrong (files the
    manifest does not list are not checked)."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        for name, meta in manifest["files"].items():
            f = folder / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != meta["bytes"] or _sha256(f) != meta["sha256"]:
                return f"{name} does not match its manifest (truncated or modified)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"unreadable manifest ({err})"
    return None


def _folder(path) -> Path:
    """``path`` as a Path; a ValueError unless it names a folder: ``""`` is the current
    folder (save_pretrained("") wrote there, replacing any config.json), None failed as a TypeError."""
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise ValueError(f"path must name a folder, got {path!r}")
    return Path(path)


def save_weights(path: str | Path, state_dict: dict, config: ModelConfig, manifest: bool = True) -> Path:
    """Write a model state dict as ``model.safetensors`` plus its ``config.json`` into folder ``path``,
    and a manifest of both unless ``manifest=False`` (a trainer checkpoint writes its own)."""
    from safetensors.torch import save_file
    path = _folder(path)
    if path.exists() and not path.is_dir():  # was FileExistsError "[Errno 17] File exists"
        raise ValueError(f"path {path} is a file; expected a folder to write {WEIGHTS_FILE} and {CONFIG_FILE} into")
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    save_file(tensors, str(path / WEIGHTS_FILE))
    (path / CONFIG_FILE).write_text(json.dumps(to_dict(config), indent=2))
    if manifest:
        write_manifest(path, (WEIGHTS_FILE, CONFIG_FILE))
    return path


def read_config(path: str | Path) -> ModelConfig:
    """The :class:`ModelConfig` in folder ``path``'s ``config.json``; errors name the file."""
    return read_json(ModelConfig, Path(path) / CONFIG_FILE)


def _listed(what: str, names: list[str]) -> list[str]:
    if not names:
        return []
    return [f"{what} {', '.join(names[:3])}" + (f" and {len(names) - 3} more" if len(names) > 3 else "")]


def weight_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Name and shape of every tensor in ``model.safetensors`` of folder ``path``, from its header."""
    from safetensors import SafetensorError, safe_open
    file = Path(path) / WEIGHTS_FILE
    try:
        with safe_open(str(file), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError) as err:  # truncated or corrupt; not a ValueError
        raise ValueError(f"{file}: not a readable safetensors file (truncated or corrupt?): {err}") from None


def check_weights(path: str | Path, config: ModelConfig, cls: Optional[type] = None) -> None:
    """``ValueError`` unless ``model.safetensors`` in ``path`` holds exactly the tensors, with the
    shapes, of ``cls(config)``. Reads only the file's header and builds the model on the meta
    device: nothing is allocated, however large the config says the model is."""
    if cls is None:
        from .model import SparseTransformer as cls
    path = Path(path)
    file = path / WEIGHTS_FILE
    found = join_qkv(weight_shapes(path))
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in cls(config).state_dict().items()}
    missing = [n for n in expected if n not in found]
    unexpected = [n for n in found if n not in expected]
    shapes = [f"{n} is {list(found[n])} in the file, {list(expected[n])} in the config"
              for n in expected if n in found and found[n] != expected[n]]
    problems = _listed("missing", missing) + _listed("unexpected", unexpected) + shapes[:2]
    problems += [f"{len(shapes) - 2} more shapes differ"] if len(shapes) > 2 else []
    if problems:
        raise ValueError(f"{file} does not fit the model in {path / CONFIG_FILE}: {'; '.join(problems)}")


def _check_values(file: Path, state: dict) -> None:
    """``ValueError`` naming the tensor unless every weight is floating point and finite: load_state_dict
    would silently cast integer or bool tensors, and a NaN or inf weight makes every output NaN."""
    for name, t in state.items():
        if not t.is_floating_point():
            raise ValueError(f"{file}: tensor {name} is {str(t.dtype).removeprefix('torch.')}, "
                             f"expected a floating-point dtype (float32, bfloat16, float16)")
        if not torch.isfinite(t).all():
            raise ValueError(f"{file}: tensor {name} holds {int((~torch.isfinite(t)).sum()):,} NaN or "
                             f"infinite values, expected finite weights (saved from a diverged run?)")


def load_model(path: str | Path, device: torch.device | str = "cpu", cls: Optional[type] = None,
               allow_unverified: bool = False, backend: Optional[str] = None):
    """The model in folder ``path`` (written by :func:`save_weights`), on ``device``; ``cls``
    defaults to :class:`~sparse_transformer.model.SparseTransformer`. Errors name the bad file.

    The folder's files must match its manifest; a folder without one is refused unless
    ``allow_unverified``. The weights' names and shapes are checked against the config before the
    model is allocated. ``backend`` replaces the attention backend the model was saved with."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from .parallel import resolve_device
    if cls is None:
        from .model import SparseTransformer as cls
    path = _folder(path)
    device = resolve_device(device)  # "gpu" was a RuntimeError, "cuda" without one an AssertionError
    if not (path / WEIGHTS_FILE).is_file() or not (path / CONFIG_FILE).is_file():
        raise ValueError(f"{path} must hold {WEIGHTS_FILE} and {CONFIG_FILE} (written by save_pretrained)")
    if (path / MANIFEST).is_file():
        problem = check_manifest(path)
        if problem is not None:
            raise ValueError(f"checkpoint {path} is damaged: {problem}")
    elif not allow_unverified:
        raise ValueError(f"{path} has no {MANIFEST}, so its files cannot be verified; if you trust them, "
                         f"load it with allow_unverified=True (command line: --allow-unverified)")
    config = read_config(path)
    if backend is not None:  # a runtime choice, not part of the weights: a GPU run's model samples on a CPU
        config = dataclasses.replace(config, backend=backend)
    check_weights(path, config, cls)
    model = cls(config).to(device)
    try:
        state = load_file(str(path / WEIGHTS_FILE), device=str(device))
    except (SafetensorError, OSError) as err:  # truncated or corrupt; not a ValueError
        raise ValueError(f"{path / WEIGHTS_FILE}: not a readable safetensors file "
                         f"(truncated or corrupt?): {err}") from None
    _check_values(path / WEIGHTS_FILE, state)
    try:
        model.load_state_dict(join_qkv(state, config.n_head))
    except RuntimeError as err:  # missing, unexpected or mis-shaped tensors
        detail = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise ValueError(f"{path / WEIGHTS_FILE} does not fit the model in {path / CONFIG_FILE}: "
                         f"{detail[:300]}") from None
    return model
