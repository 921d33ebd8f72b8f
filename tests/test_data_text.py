"""Text streams: enwik8 (small file in the true zip format; the real one when staged), the staged
gcide / cpython corpora, and any file or folder."""

import gzip
import hashlib
import os
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from local_http import LocalServer, Served
from sparse_transformer.data import load
from sparse_transformer.data.text import CPYTHON, ENWIK8, GCIDE, load_bytes, load_enwik8

# The real corpora, when a folder of them is at hand: $SPARSE_TRANSFORMER_TEST_DATA, else a `shared/data`
# folder beside the checkout (or beside the folder of checkouts).
SHARED = Path(os.environ.get("SPARSE_TRANSFORMER_TEST_DATA")
              or Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
if not SHARED.is_dir() and not os.environ.get("SPARSE_TRANSFORMER_TEST_DATA"):
    SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
HOW = "set SPARSE_TRANSFORMER_TEST_DATA to a folder holding it to run this test"

TEXT = b"<mediawiki>" + bytes(np.random.default_rng(1).integers(0, 256, 20_000 - 11, dtype=np.uint8))


def small_spec(data=TEXT):
    """enwik8's format (a zip with one member named 'enwik8'), with this file's size and checksums."""
    return replace(ENWIK8, size=len(data), md5=hashlib.md5(data).hexdigest(),
                   sha256=hashlib.sha256(data).hexdigest())


def write_zip(path, data=TEXT, member="enwik8"):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(member, data)
    return path


def test_enwik8_from_local_zip(tmp_path):
    d = load_enwik8(write_zip(tmp_path / "enwik8.zip"), cache=tmp_path / "cache", spec=small_spec())
    assert (len(d.train), len(d.validation), len(d.test)) == (18_000, 1_000, 1_000)
    assert bytes(d.train[:11]) == b"<mediawiki>" and bytes(d.test) == TEXT[19_000:]
    assert isinstance(d.train, np.memmap)


def test_enwik8_download_from_local_server(tmp_path):
    archive = write_zip(tmp_path / "served.zip").read_bytes()
    served = Served(files={"/dc/enwik8.zip": archive}, cut_after={"/dc/enwik8.zip": 1000})
    with LocalServer(served) as url:
        spec = replace(small_spec(), url=f"{url}/dc/enwik8.zip", archive_size=len(archive))
        d = load_enwik8(cache=tmp_path / "cache", spec=spec, progress=False)
    assert bytes(d.validation) == TEXT[18_000:19_000]
    assert [r[1] for r in served.requests] == [None, "bytes=1000-"]  # the cut download was resumed
    assert (tmp_path / "cache" / "downloads" / "enwik8.zip").read_bytes() == archive


def test_enwik8_rejects_wrong_data(tmp_path):
    spec = small_spec()
    with pytest.raises(ValueError, match="expected 20,000 bytes of enwik8, found 19,999"):
        load_enwik8(write_zip(tmp_path / "short.zip", TEXT[:-1]), cache=tmp_path / "c", spec=spec)
    altered = TEXT[:-1] + b"!"
    with pytest.raises(ValueError, match="sha256 differs"):
        load_enwik8(write_zip(tmp_path / "alt.zip", altered), cache=tmp_path / "c", spec=spec)
    with pytest.raises(ValueError, match="expected a member 'enwik8'"):
        load_enwik8(write_zip(tmp_path / "other.zip", TEXT, "enwik9"), cache=tmp_path / "c", spec=spec)
    good = write_zip(tmp_path / "trunc.zip").read_bytes()
    (tmp_path / "trunc.zip").write_bytes(good[:len(good) // 2])
    with pytest.raises(ValueError, match="trunc.zip"):
        load_enwik8(tmp_path / "trunc.zip", cache=tmp_path / "c", spec=spec)
    assert not (tmp_path / "c" / "enwik8").exists()  # nothing half-prepared was left behind


@pytest.mark.skipif(not (SHARED / "enwik8.zip").exists() and not (SHARED / "enwik8").exists(),
                    reason=f"enwik8.zip is not in {SHARED} ({HOW}); the format is tested on a small zip above")
def test_real_enwik8(tmp_path):
    source = SHARED / "enwik8.zip" if (SHARED / "enwik8.zip").exists() else SHARED / "enwik8"
    d = load_enwik8(source, cache=tmp_path)
    assert (len(d.train), len(d.validation), len(d.test)) == (90_000_000, 5_000_000, 5_000_000)
    assert bytes(d.train[:19]) == b"<mediawiki xmlns=\"h"


@pytest.mark.parametrize("name,spec,first", [
    ("gcide", GCIDE, b"\n\n00-database-url\n"),
    ("cpython", CPYTHON, b'"""Record of phased-in incompatible language changes.'),  # __future__.py
])
def test_real_staged_corpora(tmp_path, name, spec, first):
    source = SHARED / ("gcide.txt.gz" if name == "gcide" else "cpython311-stdlib.txt.gz")
    if not source.exists():
        pytest.skip(f"{source} is not there ({HOW})")
    d = load(name, source, cache=tmp_path)  # checks the sha256 from SOURCES.md
    assert len(d.train) + len(d.validation) + len(d.test) == spec.size
    assert len(d.train) == spec.size * 9 // 10 and len(d.validation) == spec.size // 20
    assert bytes(d.train[:len(first)]) == first
    with gzip.open(source) as f:  # the splits are the file's bytes in order
        f.seek(len(d.train))
        assert bytes(d.validation[:4096]) == f.read(4096)
    again = load(name, cache=tmp_path)  # later loads need no path
    assert bytes(again.test[-64:]) == bytes(d.test[-64:])


def test_known_name_with_wrong_content_is_rejected(tmp_path):
    fake = tmp_path / "gcide.txt.gz"
    fake.write_bytes(gzip.compress(b"not the dictionary"))
    with pytest.raises(ValueError, match="gcide.txt.gz: expected 39,952,321 bytes of gcide, found 18"):
        load("bytes", fake, cache=tmp_path / "c")
    with pytest.raises(ValueError, match="gcide is not prepared"):
        load("gcide", cache=tmp_path / "c")


def test_any_file_or_folder(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "b").mkdir(parents=True)
    (folder / "b" / "2.txt").write_bytes(b"B" * 300)
    (folder / "a.txt").write_bytes(b"A" * 600)
    (folder / "c.gz").write_bytes(gzip.compress(b"C" * 100))
    (folder / ".hidden").write_bytes(b"H" * 50)
    d = load("bytes", folder, cache=tmp_path / "c")
    whole = bytes(d.train) + bytes(d.validation) + bytes(d.test)
    assert whole == b"A" * 600 + b"B" * 300 + b"C" * 100  # sorted paths a.txt, b/2.txt, c.gz; hidden skipped
    assert (len(d.train), len(d.validation), len(d.test)) == (900, 50, 50)
    plain = tmp_path / "one.bin"
    plain.write_bytes(bytes(range(200)))
    p = load_bytes(plain, cache=tmp_path / "c")
    # A private copy in the cache: the run does not depend on a file the user may change under it.
    assert isinstance(p.train, np.memmap) and Path(p.train.filename).parent.parent == tmp_path / "c"
    plain.write_bytes(b"")
    assert p.test.tolist() == list(range(190, 200))


def test_bad_text_inputs(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.txt: file is empty"):
        load("bytes", tmp_path / "empty.txt")
    (tmp_path / "broken.gz").write_bytes(gzip.compress(b"x" * 1000)[:-8])
    with pytest.raises(ValueError, match="broken.gz: not a complete gzip file"):
        load("bytes", tmp_path / "broken.gz", cache=tmp_path / "c")
    with pytest.raises(ValueError, match="missing: no such file or folder"):
        load("bytes", tmp_path / "missing")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="folder holds no files"):
        load("bytes", tmp_path / "nothing")
    with pytest.raises(ValueError, match="unknown dataset 'enwik9'"):
        load("enwik9")
    with pytest.raises(ValueError, match="needs a path"):
        load("audio")
