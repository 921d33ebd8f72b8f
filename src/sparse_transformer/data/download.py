"""Downloads that are resumable and verified, and the cache folder they land in.

A file is fetched into ``<dest>.part`` (resumed with an HTTP ``Range`` request when a previous
attempt was cut off), its size and checksum are checked, and only then is it renamed to ``dest``.
A partial or corrupt download is therefore never used: readers only ever look at ``dest``.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

ENV_VAR = "SPARSE_TRANSFORMER_DATA"


def cache_dir() -> Path:
    """Where prepared datasets live: ``$SPARSE_TRANSFORMER_DATA``, else ``$XDG_CACHE_HOME/sparse-transformer``,
    else ``~/.cache/sparse-transformer``. Created on first use."""
    if os.environ.get(ENV_VAR):
        root = Path(os.environ[ENV_VAR]).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        root = Path(base).expanduser() / "sparse-transformer"
    root.mkdir(parents=True, exist_ok=True)
    return root


def file_digest(path: Path, algorithm: str = "sha256", chunk: int = 1 << 22) -> str:
    """Hex digest of a file, read in chunks (works for files larger than memory)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_file(path: Path, size: Optional[int] = None, sha256: Optional[str] = None,
                md5: Optional[str] = None) -> None:
    """Raise ``ValueError`` naming the file unless it exists with the expected size and checksums."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: {'is a folder, expected a file' if path.is_dir() else 'file not found'}")
    actual = path.stat().st_size
    if actual == 0:
        raise ValueError(f"{path}: file is empty")
    if size is not None and actual != size:
        raise ValueError(f"{path}: expected {size:,} bytes, found {actual:,} (truncated or wrong file)")
    for algorithm, expected in (("sha256", sha256), ("md5", md5)):
        if expected is not None:
            got = file_digest(path, algorithm)
            if got != expected.lower():
                raise ValueError(f"{path}: {algorithm} is {got}, expected {expected} (corrupt or wrong file)")


def download(url: str, dest: Path, *, size: Optional[int] = None, sha256: Optional[str] = None,
             md5: Optional[str] = None, retries: int = 3, timeout: float = 60.0, progress: bool = True,
             chunk: int = 1 << 20) -> Path:
    """Fetch ``url`` into ``dest`` with a progress bar, resuming ``dest.part`` and verifying before rename.

    ``size``/``sha256``/``md5`` are the expected values (any may be None). A connection that drops is
    resumed from where it stopped, up to ``retries`` more times; if it still fails, the ``.part`` file
    is kept so the next call resumes it. A finished file with the wrong size or checksum is deleted
    and ``ValueError`` is raised. Returns ``dest``. An existing verified ``dest`` is not fetched again.
    """
    from tqdm import tqdm

    dest = Path(dest)
    if dest.exists():
        verify_file(dest, size, sha256, md5)  # a wrong file at dest is an error, not something to overwrite
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if size is not None and part.exists() and part.stat().st_size > size:
        part.unlink()  # longer than the real file: cannot be a prefix of it
    attempt = 0
    while True:
        offset = part.stat().st_size if part.exists() else 0
        try:
            if size is None or offset < size:
                _fetch(url, part, offset, size, timeout, progress, chunk, tqdm)
            got = part.stat().st_size
            if size is not None and got < size:  # the server closed early without an error
                raise ConnectionError(f"connection closed at {got:,} of {size:,} bytes")
            break
        except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
            if isinstance(err, urllib.error.HTTPError) and err.code == 416 and offset:
                if size is None or offset >= size:
                    break  # nothing left past the .part's end: it is whole (or wrong, which verify_file says)
                part.unlink()  # the server's file is shorter than the real one: resuming can never finish
                raise ValueError(f"{url}: the server offers {offset:,} bytes, expected {size:,}; "
                                 f"the partial download was deleted") from err
            if isinstance(err, urllib.error.HTTPError) and err.code not in (408, 429, 500, 502, 503, 504):
                raise ValueError(f"{url}: HTTP {err.code} {err.reason}") from err
            attempt += 1
            if attempt > retries:
                raise ConnectionError(f"{url}: download interrupted after {attempt} attempts ({err}); "
                                      f"run again to resume {part}") from err
    try:
        verify_file(part, size, sha256, md5)
    except ValueError as err:
        part.unlink()
        raise ValueError(f"download of {url} rejected and deleted: {err}") from err
    os.replace(part, dest)
    return dest


def _fetch(url, part: Path, offset: int, size, timeout, progress, chunk, tqdm) -> None:
    """One HTTP request appending to ``part`` from ``offset`` (a 200 reply restarts from 0)."""
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        content_range = response.headers.get("Content-Range") or ""
        if offset and (response.status != 206 or not content_range.startswith(f"bytes {offset}-")):
            offset = 0  # the server ignored Range (or sent another one): start over rather than append
        length = response.headers.get("Content-Length")
        total = size if size is not None else (offset + int(length) if length is not None else None)
        with open(part, "ab" if offset else "wb") as out, \
                tqdm(total=total, initial=offset, unit="B", unit_scale=True, desc=part.name[:-5],
                     disable=not progress) as bar:
            while block := response.read(chunk):
                out.write(block)
                bar.update(len(block))
