"""Training checkpoints: written atomically, the last k kept, loaded without unpickling code.

A checkpoint is a folder ``<run>/checkpoints/step-00001234/`` holding

- ``model.safetensors`` + ``config.json``: the weights, loadable by ``SparseTransformer.from_pretrained``;
- ``train.json``: the full training config;
- ``state.pt``: optimizer, loss scaler, step, data position, elapsed time (tensors and plain
  Python values only, read back with ``torch.load(weights_only=True)``);
- ``rng-rank<r>.pt``: each rank's torch RNG states (dropout), same loader;
- ``manifest.json``: size and SHA-256 of every file above, written last.

Everything is written into a hidden temporary folder that is renamed into place only when
complete, so a crash or Ctrl-C mid-write leaves the previous checkpoint as the latest. A folder
whose manifest does not match its files is reported and skipped when looking for the latest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from ..config import TrainConfig, to_dict
from ..weights import save_weights

MANIFEST = "manifest.json"
PREFIX = "step-"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _barrier(distributed: bool) -> None:
    if distributed:
        dist.barrier()


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: str | Path, step: int, model_state: Optional[dict], config: TrainConfig,
                    state: Optional[dict], rank: int = 0, world_size: int = 1, keep: int = 3) -> Path:
    """Write checkpoint ``step`` atomically; every rank calls this (rank 0 passes the states).

    ``model_state`` and ``state`` (optimizer, scaler, step, data position...) are needed on rank 0
    only; each rank adds its own RNG states. Keeps the newest ``keep`` checkpoints.
    """
    root = checkpoint_dir(run_dir)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".{final.name}.tmp"
    distributed = world_size > 1
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".*.tmp"):  # left behind by a crash
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        save_weights(tmp, model_state, config.model)
        (tmp / "train.json").write_text(json.dumps(to_dict(config), indent=2))
        torch.save(state, tmp / "state.pt")
    _barrier(distributed)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, tmp / f"rng-rank{rank}.pt")
    _barrier(distributed)
    if rank == 0:
        files = sorted(p for p in tmp.iterdir() if p.name != MANIFEST)
        manifest = {"step": step, "world_size": world_size,
                    "files": {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        for p in tmp.iterdir():  # on disk before the rename makes it visible
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(distributed)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Completed checkpoint folders of a run, oldest first (not verified)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def check(path: Path) -> Optional[str]:
    """None if the checkpoint's files match its manifest, else what is wrong."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        for name, meta in manifest["files"].items():
            f = path / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != meta["bytes"] or _sha256(f) != meta["sha256"]:
                return f"{name} does not match its manifest (truncated or modified)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable manifest ({err})"
    return None


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    """The newest checkpoint of a run whose files are intact; damaged ones are skipped with a warning."""
    for path in reversed(list_checkpoints(run_dir)):
        problem = check(path)
        if problem is None:
            return path
        warnings.warn(f"skipping damaged checkpoint {path}: {problem}")
    return None


def load_state(path: str | Path, rank: int = 0, verify: bool = True) -> tuple[dict, dict, Optional[dict]]:
    """Read a checkpoint: ``(model_state, train_state, rng_state or None)``; no arbitrary unpickling.

    ``verify=False`` skips re-hashing the files (another rank has just verified them)."""
    from safetensors.torch import load_file
    path = Path(path)
    problem = check(path) if verify else None
    if problem is not None:
        raise ValueError(f"checkpoint {path} is damaged: {problem}")
    model_state = load_file(str(path / "model.safetensors"))
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    rng_file = path / f"rng-rank{rank}.pt"
    rng = torch.load(rng_file, map_location="cpu", weights_only=True) if rng_file.is_file() else None
    return model_state, state, rng


def restore_rng(rng: Optional[dict]) -> None:
    if rng is None:
        warnings.warn("checkpoint has no RNG state for this rank (different number of processes?); "
                      "dropout masks will differ from the original run")
        return
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
