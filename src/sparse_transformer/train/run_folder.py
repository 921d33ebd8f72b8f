"""The run folder: one training at a time, nothing of the user's overwritten, and a resumed run
that continues the run that was stopped.

- :func:`hold`: a lock on ``<run>/.lock`` for the whole run (rank 0 takes it; every rank learns
  whether it got it). The operating system drops the lock when its process dies, so a run killed
  outright leaves nothing stuck. A folder this call created and the run left empty is removed.
- :func:`refuse_overwrite`: a fresh run never replaces ``train.json`` or the metrics of a folder
  without ``force``.
- :func:`saved_config` / :func:`resume_changes`: the config a resumed run continues, and what the
  user changed in it; a change of the data is refused, naming both sources.
- :func:`check_vocab`: the model's vocabulary must cover every byte value of the data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from ..config import TrainConfig, read_json
from ..data import ByteDataset
from ..parallel import World
from . import checkpoint as ckpt

LOCK = ".lock"
OWNER = ".lock.owner"  # who holds the lock, for the message of a refused second run
RUN_FILES = ("train.json", "metrics.jsonl", "metrics.dropped.jsonl", "metrics.png")  # what a run writes here
DATA_FIELDS = ("dataset", "path", "tile")  # which bytes a run trains on: a resumed run keeps them


def _owner(run_dir: Path) -> str:
    try:
        return f" ({(run_dir / OWNER).read_text().strip()})"
    except OSError:
        return ""


def _acquire(run_dir: Path):
    """Create ``run_dir`` if needed and lock it; ``(lock, created)``. Raises ``ValueError`` if it is a
    file or another process holds it."""
    from filelock import FileLock, Timeout
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run folder {run_dir} is a file; expected a folder (a new one, or an earlier run's)")
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except NotADirectoryError:  # was "[Errno 20] Not a directory: '<run_dir>'", naming neither cause nor fix
        blocker = next((p for p in run_dir.parents if p.exists() and not p.is_dir()), run_dir.parent)
        raise ValueError(f"run folder {run_dir} cannot be made: {blocker} is a file; expected a folder "
                         f"(choose another run folder, --out)") from None
    lock = FileLock(run_dir / LOCK)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ValueError(f"run folder {run_dir} is in use by another training{_owner(run_dir)}; wait for it to "
                         f"finish, or choose another run folder (--out)") from None
    (run_dir / OWNER).write_text(f"pid {os.getpid()} on {socket.gethostname()}, "
                                 f"since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    return lock, created


def _release(run_dir: Path, lock, created: bool) -> None:
    (run_dir / OWNER).unlink(missing_ok=True)
    lock.release()
    if created:  # a run refused before it wrote anything leaves no folder behind
        with contextlib.suppress(OSError):
            if set(os.listdir(run_dir)) <= {LOCK}:
                (run_dir / LOCK).unlink(missing_ok=True)
                run_dir.rmdir()


@contextlib.contextmanager
def hold(run_dir: str | Path, world: World) -> Iterator[None]:
    """Hold the run folder's lock for the body (see the module docstring). Collective: every rank
    raises the same ``ValueError`` when rank 0 cannot take it."""
    run_dir = Path(run_dir)
    held, problem = None, None
    if world.main:
        try:
            held = _acquire(run_dir)
        except (ValueError, OSError) as err:
            problem = str(err)
    if world.distributed:
        import torch.distributed as dist
        box = [problem]
        dist.broadcast_object_list(box, src=0, group=world.wait_group)
        problem = box[0]
    if problem is not None:
        raise ValueError(problem)
    try:
        yield
    finally:
        if held is not None:
            _release(run_dir, *held)


def refuse_overwrite(run_dir: str | Path, force: bool) -> None:
    """A fresh run into ``run_dir``: ``ValueError`` if it holds files a run writes (an earlier run's,
    or the user's), unless ``force``."""
    run_dir = Path(run_dir)
    if ckpt.list_checkpoints(run_dir):
        return  # the trainer refuses a fresh run over checkpoints, with or without force
    there = [name for name in RUN_FILES if (run_dir / name).exists()]
    if there and not force:
        raise ValueError(f"{run_dir} already holds {', '.join(there)} (not written by this run); pass --force "
                         f"to replace them, --resume to continue that run, or choose another run folder (--out)")


def saved_config(run_dir: str | Path) -> Optional[TrainConfig]:
    """The config of the newest checkpoint in ``run_dir`` whose ``train.json`` reads (not verified:
    the trainer verifies what it resumes from); None if there is none."""
    for path in reversed(ckpt.list_checkpoints(run_dir)):
        try:
            return read_json(TrainConfig, path / "train.json")
        except (OSError, ValueError):  # read_json turns a bad field's TypeError into a ValueError
            continue
    return None


def _differences(saved, current, prefix: str = "") -> list[tuple[str, object, object]]:
    out = []
    for f in dataclasses.fields(saved):
        a, b = getattr(saved, f.name), getattr(current, f.name)
        if dataclasses.is_dataclass(a):
            out += _differences(a, b, f"{prefix}{f.name}.")
        elif a != b:
            out.append((prefix + f.name, a, b))
    return out


def _same_path(a: Optional[str], b: Optional[str]) -> bool:
    if a is None or b is None:
        return a == b
    return a == b or Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _source(data) -> str:
    return f"dataset {data.dataset!r}" + (f" from {data.path}" if data.path is not None else "")


def resume_changes(found: Path, config: TrainConfig) -> str:
    """What ``config`` changes in the run saved in checkpoint ``found`` ("" if nothing), said in one
    line. A run is continued on the bytes it trained on: another dataset, path or tile size is a
    ``ValueError`` naming both. (A changed model is refused by the trainer.)"""
    saved = read_json(TrainConfig, found / "train.json")
    if (saved.data.dataset != config.data.dataset or not _same_path(saved.data.path, config.data.path)
            or saved.data.tile != config.data.tile):
        tile = f", tile {saved.data.tile} -> {config.data.tile}" if saved.data.tile != config.data.tile else ""
        raise ValueError(f"cannot resume from {found}: it trained on {_source(saved.data)}, this run names "
                         f"{_source(config.data)}{tile}; resume without naming other data, or start a new run "
                         f"in another folder (--out)")
    changes = [(k, a, b) for k, a, b in _differences(saved, config) if not k.startswith("model.")]
    if not changes:
        return ""
    return "resuming with changes: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in changes)


def check_vocab(vocab_size: int, dataset: ByteDataset) -> None:
    """``ValueError`` unless every byte of ``dataset`` is below ``vocab_size`` (always true from 256 on)."""
    if vocab_size >= 256:
        return
    for split in ("train", "validation", "test"):
        data = dataset.split(split)
        top = int(np.max(data)) if len(data) else -1
        if top >= vocab_size:
            raise ValueError(f"model.vocab_size {vocab_size} does not cover the data: the {split} split of "
                             f"{dataset.name} holds byte value {top}; expected vocab_size >= {top + 1} "
                             f"(256 covers every byte)")


def describe_data(config: TrainConfig, dataset: ByteDataset) -> str:
    """``gcide (35,957,088 training bytes, from /data/gcide.txt.gz)``: what a run trains on."""
    where = f", from {config.data.path}" if config.data.path is not None else ""
    return f"{dataset.name} ({len(dataset.train):,} training bytes{where})"
