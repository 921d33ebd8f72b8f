"""Prepared datasets on disk: flat uint8 ``{train,validation,test}.bin`` plus ``manifest.json``.

A dataset is converted once (download, decode, split) into a cache folder and memory-mapped on every
later load. The manifest records each split's length and sha256 and a ``fingerprint`` of the source,
so a truncated, corrupted or stale cache is detected instead of silently trained on.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import secrets
import shutil
import socket
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .dataset import ByteDataset

SPLITS = ("train", "validation", "test")
MANIFEST = "manifest.json"
FULL_CHECK_LIMIT = 1 << 30  # sha256 of splits up to 1 GiB is re-checked on load; larger ones by length only


def list_files(folder: Path, suffixes: Optional[tuple[str, ...]] = None) -> list[Path]:
    """Files under ``folder`` in sorted relative-path order (so every machine reads them in the same
    order), skipping hidden files and folders; only those with one of ``suffixes`` (lower case)
    if given. Empty if ``folder`` is not a folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    files = (p for p in folder.rglob("*") if p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)
             and (suffixes is None or p.suffix.lower() in suffixes))
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def files_fingerprint(files: list[Path], root: Optional[Path] = None) -> str:
    """A short hash of the paths, sizes and modification times of ``files`` (detects a stale cache)."""
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        name = p.relative_to(root).as_posix() if root else str(p)
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _identity(folder: Path) -> Optional[tuple[int, int]]:
    """Which copy of a cache folder is there (its manifest's inode and modification time); None if none."""
    try:
        st = (folder / MANIFEST).stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _beside(folder: Path, what: str) -> Path:
    """A name no other process will pick, next to ``folder`` (same file system: renames are atomic):
    ``<name>.<what>-<host>-<pid>-<random>``."""
    return folder.with_name(f"{folder.name}.{what}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}")


def _remove_orphans(folder: Path) -> None:
    """Delete temporary folders beside ``folder`` left by processes of this host that no longer run
    (a conversion killed outright cannot clean up after itself; ImageNet's is gigabytes)."""
    host = socket.gethostname()
    for path in folder.parent.glob(f"{glob.escape(folder.name)}.*-{glob.escape(host)}-*-*"):
        what, _, rest = path.name[len(folder.name) + 1:].partition(f"-{host}-")
        pid = rest.split("-")[0]
        if what not in ("tmp", "stale") or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:  # running, as another user
            pass


def _check_removable(folder: Path) -> None:
    """``ValueError`` unless ``folder`` is absent or a real folder holding nothing but a cache's own
    files: a user's file, folder or link that happens to sit at the cache's path is never removed."""
    if not os.path.lexists(folder):
        return
    if folder.is_symlink() or not folder.is_dir():
        found = "a link" if folder.is_symlink() else "a file"
    else:
        extra = sorted(p.name for p in folder.iterdir() if p.name not in {MANIFEST, *(f"{s}.bin" for s in SPLITS)})
        if not extra:
            return
        found = f"a folder that also holds {', '.join(extra[:3])}"
    raise ValueError(f"{folder}: expected a dataset cache folder ({', '.join(f'{s}.bin' for s in SPLITS)}, "
                     f"{MANIFEST}) or nothing there, found {found}; move it away or choose another --cache")


def _discard(folder: Path, seen: Optional[tuple[int, int]]) -> None:
    """Remove the copy of ``folder`` identified by ``seen``: moved aside in one rename (a reader never
    sees half of it), then deleted. A copy another process put there meanwhile is moved back.
    Anything at ``folder`` that is not a cache is left alone (``ValueError``)."""
    _check_removable(folder)
    stale = _beside(folder, "stale")
    try:
        os.replace(folder, stale)
    except FileNotFoundError:
        return
    if _identity(stale) != seen:
        try:
            os.replace(stale, folder)  # not the copy we meant; give it back unless a newer one is there
            return
        except OSError:
            pass
    shutil.rmtree(stale, ignore_errors=True)


class SplitWriter:
    """Streams bytes into the three split files of a new cache folder, hashing as it goes.

    Writes into a temporary folder of its own beside ``folder`` and only renames it to ``folder`` in
    :meth:`finish`, so an interrupted conversion never leaves a folder that looks prepared, and
    several processes may prepare the same cache at once (each under torchrun, say): the first to
    finish publishes it, the others find the same bytes there and discard theirs. Use it as a
    context manager: leaving the ``with`` block without :meth:`finish` (an error, Ctrl-C) closes the
    files and removes the temporary folder.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        _remove_orphans(self.folder)
        self.tmp = _beside(self.folder, "tmp")
        self.tmp.mkdir()
        self.files = {s: open(self.tmp / f"{s}.bin", "wb") for s in SPLITS}
        self.hashes = {s: hashlib.sha256() for s in SPLITS}
        self.lengths = dict.fromkeys(SPLITS, 0)
        self.finished = False

    def __enter__(self) -> "SplitWriter":
        return self

    def __exit__(self, *exc) -> None:
        if not self.finished:
            self.abort()

    def write(self, split: str, data: np.ndarray) -> None:
        data = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
        self.files[split].write(data.tobytes())
        self.hashes[split].update(data)
        self.lengths[split] += data.size

    def finish(self, name: str, kind: str, fingerprint: str, image_shape=None, **extra) -> Path:
        for f in self.files.values():
            f.close()
        manifest = {"name": name, "kind": kind, "image_shape": list(image_shape) if image_shape else None,
                    "fingerprint": fingerprint,
                    "splits": {s: {"bytes": self.lengths[s], "sha256": self.hashes[s].hexdigest()} for s in SPLITS},
                    **extra}
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        self._publish(manifest)
        self.finished = True
        return self.folder

    def _publish(self, manifest: dict, attempts: int = 5) -> None:
        """Rename the temporary folder to ``folder``: atomic, and refused while ``folder`` exists.
        There, a copy of the very bytes we wrote (another process published them first) is kept and
        ours dropped; any other copy (another source) is replaced."""
        for _ in range(attempts):
            try:
                os.replace(self.tmp, self.folder)
                return
            except OSError as err:
                failure = err
            seen = _identity(self.folder)
            try:
                theirs = read_manifest(self.folder)
            except (OSError, ValueError):
                theirs = None
            if theirs is not None and all(theirs.get(k) == manifest[k] for k in ("fingerprint", "splits")):
                shutil.rmtree(self.tmp, ignore_errors=True)
                return
            try:
                _discard(self.folder, seen)
            except ValueError:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise
        shutil.rmtree(self.tmp, ignore_errors=True)
        raise OSError(f"could not publish the cache {self.folder} after {attempts} tries "
                      f"(other processes keep replacing it): {failure}") from failure

    def abort(self) -> None:
        for f in self.files.values():
            f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def write_splits(folder: Path, dataset: ByteDataset, fingerprint: str, **extra) -> Path:
    """Write an in-memory :class:`ByteDataset` as a prepared cache folder."""
    with SplitWriter(folder) as writer:
        for s in SPLITS:
            writer.write(s, dataset.split(s))
        return writer.finish(dataset.name, dataset.kind, fingerprint, dataset.image_shape, **extra)


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ValueError(f"{folder}: no {MANIFEST}; the dataset has not been prepared there")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); delete the folder and prepare again") from err
    # Valid JSON of the wrong shape (hand-edited, another tool's file) would fail later with a KeyError.
    splits = manifest.get("splits") if isinstance(manifest, dict) else None
    if not (isinstance(splits, dict) and all(isinstance(splits.get(s), dict) and {"bytes", "sha256"} <= set(splits[s])
                                             for s in SPLITS)
            and manifest.get("kind") in ("text", "image", "audio") and isinstance(manifest.get("name"), str)):
        raise ValueError(f"{path}: not a dataset manifest (needs name, kind and bytes + sha256 for each of "
                         f"{', '.join(SPLITS)}); delete the folder and prepare again")
    return manifest


def load_splits(folder: Path, fingerprint: Optional[str] = None, full_check: Optional[bool] = None) -> ByteDataset:
    """Memory-map a prepared folder, checking every split's length (and sha256, see ``full_check``).

    ``fingerprint``: when given, must equal the manifest's (else the cache is stale). ``full_check``:
    re-hash the splits; default: only those up to ``FULL_CHECK_LIMIT`` bytes. Raises ``ValueError``
    naming the file on any mismatch.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if fingerprint is not None and manifest.get("fingerprint") != fingerprint:
        raise ValueError(f"{folder}: prepared from a different source (fingerprint {manifest.get('fingerprint')}, "
                         f"expected {fingerprint}); the cache is stale")
    arrays = {}
    for s in SPLITS:
        path, expected = folder / f"{s}.bin", manifest["splits"][s]
        actual = path.stat().st_size if path.is_file() else None
        if actual != expected["bytes"]:
            raise ValueError(f"{path}: expected {expected['bytes']:,} bytes, found "
                             f"{'no file' if actual is None else f'{actual:,}'} (truncated or missing)")
        # np.memmap refuses empty files, and a split may legitimately be empty (never for training).
        arrays[s] = np.memmap(path, dtype=np.uint8, mode="r") if actual else np.zeros(0, np.uint8)
        if full_check or (full_check is None and actual <= FULL_CHECK_LIMIT):
            digest = hashlib.sha256(arrays[s]).hexdigest()
            if digest != expected["sha256"]:
                raise ValueError(f"{path}: sha256 {digest} does not match the manifest's {expected['sha256']} "
                                 f"(corrupted)")
    shape = tuple(manifest["image_shape"]) if manifest.get("image_shape") else None
    return ByteDataset(manifest["name"], manifest["kind"], arrays["train"], arrays["validation"], arrays["test"],
                       shape)


def prepared(folder: Path, fingerprint: str, build: Callable[[Path], object]) -> ByteDataset:
    """Load ``folder`` if it holds a valid cache for ``fingerprint``; otherwise run ``build(folder)``
    (which must write it, e.g. with :class:`SplitWriter`) and load the result.

    A cache that fails its checks is derived data: it is removed and rebuilt from the source, with a
    warning. Several processes may do this at once (see :class:`SplitWriter`).
    """
    folder = Path(folder)
    for _ in range(3):  # another process may replace the copy while we check it
        seen = _identity(folder)
        if seen is None:
            break
        try:
            return load_splits(folder, fingerprint)
        except (ValueError, KeyError) as err:
            if _identity(folder) != seen:
                continue  # a new copy arrived meanwhile: check that one
            warnings.warn(f"rebuilding the cache: {err}", stacklevel=2)
            # Removed now, so that whatever is at ``folder`` when the rebuild publishes is another
            # process's fresh copy (see SplitWriter).
            _discard(folder, seen)
            break
    _check_removable(folder)  # before a conversion that may take hours, not after it
    build(folder)
    return load_splits(folder, fingerprint)
