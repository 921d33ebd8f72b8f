"""Training checkpoints: written atomically, the last k kept, loaded without unpickling code.

A checkpoint is a folder ``<run>/checkpoints/step-00001234/`` holding

- ``model.safetensors`` + ``config.json``: the weights, loadable by ``SparseTransformer.from_pretrained``;
- ``train.json``: the full training config;
- ``state.pt``: optimizer, loss scaler, step, data position, elapsed time (tensors and plain
  Python values only, read back with ``torch.load(weights_only=True)``);
- ``rng-rank<r>.pt``: each rank's torch RNG states (dropout), same loader;
- ``manifest.json``: size and SHA-256 of every file above, written last.

Everything is written into a hidden temporary folder that is renamed into place only when
complete, so a crash or Ctrl-C mid-write leaves the previous checkpoint as the latest; a write
that fails (a full disk) removes its partial folder and says so in one ``OSError``. A folder
whose manifest does not match its files, or (for resuming) whose files do not load, is reported
and skipped when looking for the latest.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ..config import TrainConfig, read_json, to_dict
from ..weights import MANIFEST, check_manifest, check_weights, read_config, save_weights, write_manifest

PREFIX = "step-"
STATE_KEYS = ("step", "elapsed", "optimizer", "scaler", "batches")  # what state.pt must hold to resume


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


def _attempt(write: Callable[[], object]) -> Optional[str]:
    """Run ``write``; None if it worked, else why not in a few words (disk full, permissions...).
    torch.save reports a full disk as a RuntimeError ("unexpected pos", "file write failed")."""
    try:
        write()
    except (OSError, RuntimeError) as err:
        if isinstance(err, OSError) and err.strerror:
            return err.strerror
        lines = str(err).strip().splitlines()
        return lines[-1] if lines else type(err).__name__
    return None


def _agree(problem: Optional[str], distributed: bool, run_dir: Path, step: int, tmp: Optional[Path]) -> None:
    """A barrier that also raises on every rank, as one clear ``OSError``, when some rank could not
    write its part of checkpoint ``step``. Rank 0 (``tmp`` given) removes the partial folder."""
    if distributed:
        problems = [None] * dist.get_world_size()
        dist.all_gather_object(problems, problem)
        problem = next((p for p in problems if p), None)
    if problem is None:
        return
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    root = checkpoint_dir(run_dir)
    try:
        free = f", {shutil.disk_usage(root).free / 2 ** 20:,.0f} MiB free there"
    except OSError:
        free = ""
    earlier = list_checkpoints(run_dir)
    kept = (f"the earlier checkpoint {earlier[-1].name} is intact: continue from it with --resume"
            if earlier else "no earlier checkpoint exists")
    raise OSError(f"could not write checkpoint {PREFIX}{step:08d} into {root} ({problem}{free}); {kept} "
                  f"once the cause is fixed")


def save_checkpoint(run_dir: str | Path, step: int, model_state: Optional[dict], config: TrainConfig,
                    state: Optional[dict], rank: int = 0, world_size: int = 1, keep: int = 3) -> Path:
    """Write checkpoint ``step`` atomically; every rank calls this (rank 0 passes the states).

    ``model_state`` and ``state`` (optimizer, scaler, step, data position...) are needed on rank 0
    only; each rank adds its own RNG states. Keeps the newest ``keep`` checkpoints. A write that
    fails (a full disk) removes the partial folder, leaves every earlier checkpoint as it was and
    raises ``OSError`` on every rank.
    """
    run_dir = Path(run_dir)
    root = checkpoint_dir(run_dir)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".{final.name}.tmp"
    distributed = world_size > 1
    mine = tmp if rank == 0 else None
    problem = None
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".*.tmp"):  # left behind by a crash
            shutil.rmtree(stale, ignore_errors=True)

        def write_states() -> None:
            tmp.mkdir()
            save_weights(tmp, model_state, config.model, manifest=False)
            (tmp / "train.json").write_text(json.dumps(to_dict(config), indent=2))
            torch.save(state, tmp / "state.pt")
        problem = _attempt(write_states)
    _agree(problem, distributed, run_dir, step, mine)
    rng = rng_state()
    _agree(_attempt(lambda: torch.save(rng, tmp / f"rng-rank{rank}.pt")), distributed, run_dir, step, mine)

    def publish() -> None:
        write_manifest(tmp, sorted(p.name for p in tmp.iterdir() if p.name != MANIFEST),
                       step=step, world_size=world_size)
        for p in tmp.iterdir():  # on disk before the rename makes it visible
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _agree(_attempt(publish) if rank == 0 else None, distributed, run_dir, step, mine)
    if rank == 0:
        if final.exists():  # this run resumed before it, or skipped it as damaged: say the latter
            if check(final) is not None:
                warnings.warn(f"replacing damaged checkpoint {final} with this run's step {step:,}")
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        # Prune among this checkpoint and older ones only: newer ones are damaged ones the resumed run
        # skipped, and counting them pruned the checkpoint just written (with keep=1, every intact one).
        for old in [p for p in list_checkpoints(run_dir) if _step(p) <= step][:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(distributed)
    return final


def _step(path: Path) -> int:
    """The step of checkpoint folder ``step-00001234`` (-1 for a name that holds no step)."""
    digits = path.name[len(PREFIX):]
    return int(digits) if digits.isdigit() else -1


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Completed checkpoint folders of a run, oldest first (not verified). Ordered by step, not by
    name: from step 10**8 on the name has nine digits and sorted as the oldest."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)),
                  key=lambda p: (_step(p), p.name))


def check(path: Path, deep: bool = False) -> Optional[str]:
    """None if the checkpoint's files match its manifest, else what is wrong. ``deep`` also loads
    what a resumed run needs (train.json, the weights' shapes against config.json, state.pt), so a
    checkpoint whose files match a manifest but do not load is found before the run relies on it."""
    problem = check_manifest(path)
    if problem is not None or not deep:
        return problem
    try:
        read_json(TrainConfig, path / "train.json")
        check_weights(path, read_config(path))
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
        if missing:
            return f"state.pt lacks {', '.join(missing)}"
    except Exception as err:  # noqa: BLE001 -- anything that stops it loading makes it unusable
        return f"its files match the manifest but do not load ({type(err).__name__}: {err})"
    return None


def latest_checkpoint(run_dir: str | Path, deep: bool = False) -> Optional[Path]:
    """The newest checkpoint of a run whose files are intact (``deep``: and load, see :func:`check`);
    damaged ones are skipped with a warning."""
    for path in reversed(list_checkpoints(run_dir)):
        problem = check(path, deep)
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


def rng_state() -> dict:
    """This process's torch RNG states (what dropout draws from), as a checkpoint holds them."""
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def restore_rng(rng: Optional[dict]) -> None:
    if rng is None:
        warnings.warn("checkpoint has no RNG state for this rank (different number of processes?); "
                      "dropout masks will differ from the original run")
        return
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
