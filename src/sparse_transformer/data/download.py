"""Downloads that are resumable and verified, and the cache folder they land in.

A file is fetched into ``<dest>.part`` (resumed with an HTTP ``Range`` request when a previous
attempt was cut off), its size and checksums are checked, and only then is it renamed to ``dest``.
A partial or corrupt download is therefore never used: readers only ever look at ``dest``. Every
request has a timeout of a few seconds, and each retry is said on stderr, so a dead network is
reported within about half a minute.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Optional

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


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _reason(err: BaseException, timeout: float) -> str:
    """What went wrong with a request, in a few words (the useful part of urllib's nested errors)."""
    wrapped = isinstance(err, urllib.error.URLError) and not isinstance(err, urllib.error.HTTPError)
    cause = err.reason if wrapped else err
    if isinstance(cause, socket.gaierror):
        return f"the host name could not be resolved: {cause.strerror or cause}"
    if isinstance(cause, (TimeoutError, socket.timeout)):
        return f"no answer within {timeout:g} s"
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused"
    return str(cause) or type(cause).__name__


def _set_aside(path: Path) -> Path:
    """Rename ``path`` to an unused ``<name>.rejected-<n>`` beside it (kept for the user to inspect)."""
    for n in range(1, 1000):
        aside = path.with_name(f"{path.name}.rejected-{n}")
        if not aside.exists():
            os.replace(path, aside)
            return aside
    raise OSError(f"{path}: too many rejected copies beside it; delete them")


def download(url: str, dest: Path, *, size: Optional[int] = None, sha256: Optional[str] = None,
             md5: Optional[str] = None, check: Optional[Callable[[Path], None]] = None, retries: int = 3,
             timeout: float = 5.0, retry_delay: float = 1.0, patience: float = 30.0, progress: bool = True,
             chunk: int = 1 << 20, manual: str = "", log: Callable[[str], None] = _say) -> Path:
    """Fetch ``url`` into ``dest`` with a progress bar, resuming ``dest.part`` and verifying before rename.

    ``size``/``sha256``/``md5`` are the expected values (any may be None); ``check(path)`` may add a
    test of the content (raising ``ValueError``). Nothing reaches ``dest`` unless it passes all of
    them. A request that gets no answer within ``timeout`` seconds (connecting or between two
    reads) or whose connection drops is retried (resumed from where it stopped) up to ``retries``
    more times in a row without progress, and not past ``patience`` seconds without progress (a
    name lookup can block longer than ``timeout``), each retry said through ``log``; then
    ``ConnectionError`` is raised, naming the host when nothing could be fetched, else keeping the
    ``.part`` file so the next call resumes it. ``manual``: the command that supplies the file by hand, named in that
    error. A finished file that fails its checks is deleted and ``ValueError`` is raised. An
    existing ``dest`` that passes the checks is not fetched again; one that fails them is moved
    aside (``<dest>.rejected-<n>``) and fetched again. Returns ``dest``.
    """
    from tqdm import tqdm

    dest = Path(dest)
    if dest.exists():
        try:
            verify_file(dest, size, sha256, md5)  # the size first: cheap
            if check is not None:
                check(dest)
            return dest
        except ValueError as err:
            if dest.is_dir():
                raise
            log(f"{err}; moved aside to {_set_aside(dest).name}, fetching it again")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if os.path.lexists(part) and (part.is_symlink() or not part.is_file()):
        # would be appended through (a link) or retried as a network failure (a folder)
        raise ValueError(f"{part}: expected the partial download (a regular file) or nothing there, found "
                         f"{'a link' if part.is_symlink() else 'a folder' if part.is_dir() else 'a special file'}; "
                         f"move it away and run again")
    if size is not None and part.exists() and part.stat().st_size > size:
        part.unlink()  # longer than the real file: cannot be a prefix of it
    host = urllib.parse.urlsplit(url).hostname or url
    failures, stalled_since = 0, time.monotonic()
    while True:
        offset = part.stat().st_size if part.exists() else 0
        started = time.monotonic()
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
            have = part.stat().st_size if part.exists() else 0
            if have > offset:  # a retry that made progress starts a new count
                failures, stalled_since = 0, time.monotonic()
            failures += 1
            now = time.monotonic()
            waited, took = now - stalled_since, now - started
            reason = _reason(err, timeout)
            tries = f"{failures} attempt{'s' if failures > 1 else ''}"
            if failures > retries or waited + retry_delay + max(timeout, took) > patience:
                hint = f"; or get {url} another way and run `{manual}`" if manual else ""
                if have == 0:
                    what = (f"{url} answered {reason}" if isinstance(err, urllib.error.HTTPError)
                            else f"could not reach {host} ({reason})")
                    raise ConnectionError(f"{what}; gave up after {tries}; "
                                          f"check the network connection{hint}") from None
                raise ConnectionError(f"download of {url} interrupted ({reason}; {tries}): "
                                      f"{have:,}{f' of {size:,}' if size else ''} bytes are in {part}; "
                                      f"run again to resume{hint}") from None
            log(f"{host}: {reason}; retrying in {retry_delay:g} s (attempt {failures + 1} of {retries + 1})")
            time.sleep(retry_delay)
    try:
        verify_file(part, size, sha256, md5)
        if check is not None:
            check(part)
    except ValueError as err:
        part.unlink()
        raise ValueError(f"download of {url} rejected and deleted: {err}") from err
    os.replace(part, dest)
    return dest


def _fetch(url, part: Path, offset: int, size, timeout, progress, chunk, tqdm) -> None:
    """One HTTP request appending to ``part`` from ``offset`` (a 200 reply restarts from 0).
    ``timeout`` bounds the connection and every read, so a server that stops answering is noticed."""
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
