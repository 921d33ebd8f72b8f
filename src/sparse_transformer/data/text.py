"""Text-like byte streams: enwik8, the staged gcide / cpython corpora, and any file or folder.

Every stream is split 90/5/5 by bytes (enwik8: exactly 90M / 5M / 5M, as in the paper). Converted
streams are cached as flat ``.bin`` splits (see :mod:`.store`) and memory-mapped on later loads.
"""

from __future__ import annotations

import gzip
import hashlib
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .dataset import ByteDataset, split_stream
from .download import cache_dir, download
from .store import files_fingerprint, list_files, load_splits, prepared, write_splits


@dataclass(frozen=True)
class TextSource:
    """What a known text file must be: its uncompressed size and checksums, and where to get it."""

    name: str
    size: int  # bytes after decompression
    sha256: Optional[str] = None
    md5: Optional[str] = None
    url: Optional[str] = None  # official download (None: must be given with --from)
    archive_size: Optional[int] = None  # bytes of the downloaded archive
    member: Optional[str] = None  # file inside a .zip archive


# enwik8: md5 as published by Matt Mahoney (http://mattmahoney.net/dc/textdata.html); sha256 of the same
# 10^8 bytes; the zip's size as served by mattmahoney.net.
ENWIK8 = TextSource("enwik8", 100_000_000,
                    sha256="2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8",
                    md5="a1fa5ffddb56f4953e226637dabbb36a", url="http://mattmahoney.net/dc/enwik8.zip",
                    archive_size=36_445_475, member="enwik8")
# The GCIDE dictionary and CPython 3.11 standard library as .gz files (sha256 of the uncompressed bytes).
GCIDE = TextSource("gcide", 39_952_321, sha256="802beb667e1fb666203e750f1faea60d5c202ac5430c2083c4180494609f10a7")
CPYTHON = TextSource("cpython", 31_525_224,
                     sha256="92debcc73de5cb17a70057ce13efc64f61091c06983d72aa9bcd764eb2e0c8df")
LOUD_COPY = 256 << 20  # bytes: a copy into the cache this large is announced
KNOWN_FILES = {"gcide.txt.gz": GCIDE, "cpython311-stdlib.txt.gz": CPYTHON, "enwik8": ENWIK8, "enwik8.zip": ENWIK8}


def read_file_bytes(path: Path) -> bytes:
    """The bytes of one file, decompressed if it ends in ``.gz``; clear errors for empty or broken files."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: {'is a folder, expected a file' if path.is_dir() else 'file not found'}")
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (EOFError, OSError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: not a complete gzip file ({err})") from err
    if not data:
        raise ValueError(f"{path}: file is empty")
    return data


def check_bytes(data: bytes, spec: TextSource, origin: str) -> None:
    """Raise ``ValueError`` naming ``origin`` unless ``data`` has the size and checksums of ``spec``."""
    if len(data) != spec.size:
        raise ValueError(f"{origin}: expected {spec.size:,} bytes of {spec.name}, found {len(data):,} "
                         f"(truncated or wrong file)")
    for algorithm, expected in (("sha256", spec.sha256), ("md5", spec.md5)):
        if expected and hashlib.new(algorithm, data).hexdigest() != expected:
            raise ValueError(f"{origin}: {algorithm} differs from {spec.name}'s {expected} (corrupted or wrong file)")


def source_files(path: Path) -> list[Path]:
    """A file, or every regular file under a folder (hidden ones skipped) in sorted path order."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.exists() and not path.is_dir():  # was "no such file or folder" for a path that exists
        raise ValueError(f"{path} is not a regular file or folder (a device, pipe or socket); expected a file "
                         f"or folder of bytes, which is copied into the data cache")
    if not path.is_dir():
        raise ValueError(f"{path}: no such file or folder")
    files = list_files(path)
    if not files:
        raise ValueError(f"{path}: folder holds no files")
    return files


def load_bytes(path: Path, name: Optional[str] = None, cache: Optional[Path] = None) -> ByteDataset:
    """Any file or folder as one text-like stream, split 90/5/5.

    The bytes (a folder's files concatenated in sorted path order, ``.gz`` ones decompressed) are
    converted once into the cache and memory-mapped from there: a run never reads a file that
    the user may change or truncate under it. A file whose name is one
    of the staged corpora (``gcide.txt.gz``, ``cpython311-stdlib.txt.gz``, ``enwik8``) is checked
    against its known size and sha256.
    """
    path = Path(path).expanduser().resolve()
    files = source_files(path)
    name = name or path.name.split(".")[0] or "bytes"
    spec = KNOWN_FILES.get(path.name) if path.is_file() else None
    if spec is not None and spec.member and path.suffix == ".zip":
        return load_enwik8(path, cache=cache)
    fingerprint = files_fingerprint(files)
    folder = Path(cache or cache_dir()) / f"{name}-{hashlib.sha256(str(path).encode()).hexdigest()[:10]}"

    def build(folder: Path) -> None:
        total = sum(p.stat().st_size for p in files)
        if total >= LOUD_COPY:  # seconds to minutes of reading and writing: say what is going on
            print(f"copying {total:,} bytes of {path} into the data cache {folder} (done once)", file=sys.stderr)
        data = b"".join(read_file_bytes(p) for p in files)
        if spec is not None:
            check_bytes(data, spec, str(path))
        write_splits(folder, split_stream(np.frombuffer(data, np.uint8), name, "text"), fingerprint,
                     source=str(path), files=len(files))

    return prepared(folder, fingerprint, build)


def load_known(spec: TextSource, path: Optional[Path] = None, cache: Optional[Path] = None) -> ByteDataset:
    """A staged corpus (gcide, cpython): prepared from ``path`` once, then loaded from ``cache/<name>``."""
    folder = Path(cache or cache_dir()) / spec.name
    fingerprint = f"{spec.name}-{spec.sha256}"
    if path is None:
        if not (folder / "manifest.json").is_file():
            raise ValueError(f"{spec.name} is not prepared in {folder}; run `sparse-transformer data prepare "
                             f"{spec.name} --from PATH` with your copy of the .gz file")
        return load_splits(folder, fingerprint)

    def build(folder: Path) -> None:
        data = read_file_bytes(Path(path))
        check_bytes(data, spec, str(path))
        write_splits(folder, split_stream(np.frombuffer(data, np.uint8), spec.name, "text"), fingerprint,
                     source=str(path))

    return prepared(folder, fingerprint, build)


def load_enwik8(path: Optional[Path] = None, cache: Optional[Path] = None, spec: TextSource = ENWIK8,
                progress: bool = True) -> ByteDataset:
    """enwik8 split 90M / 5M / 5M bytes, from ``path`` (the zip or the unzipped file) or downloaded.

    Without ``path`` the zip is downloaded from ``spec.url`` into ``cache/downloads`` (resumable),
    and it is kept there only if its size matches and its unzipped 10^8 bytes match the published
    md5 and the sha256 (a kept zip that no longer does is moved aside and fetched again). ``spec``
    exists so tests can use a small file in the true format.
    """
    root = Path(cache or cache_dir())
    folder = root / spec.name
    fingerprint = f"{spec.name}-{spec.md5 or spec.sha256}"

    def content(source: Path) -> bytes:
        data = _unzip(source, spec.member) if zipfile.is_zipfile(source) else read_file_bytes(source)
        check_bytes(data, spec, str(source))
        return data

    def build(folder: Path) -> None:
        # The published checksums are of the unzipped bytes: checked before the zip enters the cache.
        source = Path(path) if path is not None else download(
            spec.url, root / "downloads" / Path(spec.url).name, size=spec.archive_size, check=content,
            progress=progress, manual=f"sparse-transformer data prepare {spec.name} --from {Path(spec.url).name}")
        data = content(source)
        write_splits(folder, split_stream(np.frombuffer(data, np.uint8), spec.name, "text"), fingerprint,
                     source=str(source))

    return prepared(folder, fingerprint, build)


def _unzip(path: Path, member: Optional[str]) -> bytes:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            if member not in names:
                raise ValueError(f"{path}: expected a member {member!r} in the zip, found {names[:5]}")
            return z.read(member)  # checks the member's CRC-32
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise ValueError(f"{path}: corrupt zip archive ({err})") from err
