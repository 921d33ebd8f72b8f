"""Resumable, verified downloads against a local HTTP server (127.0.0.1 only), and the cache folder."""

import hashlib
import os

import pytest

from local_http import LocalServer, Served
from sparse_transformer.data.download import cache_dir, download, verify_file

PAYLOAD = bytes(range(256)) * 4000 + b"tail"  # 1,024,004 bytes, not a multiple of the read chunk
SHA = hashlib.sha256(PAYLOAD).hexdigest()
MD5 = hashlib.md5(PAYLOAD).hexdigest()


def test_download_verifies_and_renames(tmp_path):
    served = Served(files={"/f.bin": PAYLOAD})
    with LocalServer(served) as url:
        dest = download(f"{url}/f.bin", tmp_path / "f.bin", size=len(PAYLOAD), sha256=SHA, md5=MD5,
                        progress=False, chunk=10_000)
    assert dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "f.bin.part").exists()
    assert served.requests == [("/f.bin", None, 200)]
    # A second call finds the verified file and does not fetch again.
    with LocalServer(served) as url:
        download(f"{url}/f.bin", dest, size=len(PAYLOAD), sha256=SHA, progress=False)
    assert len(served.requests) == 1


def test_interrupted_download_resumes_with_range(tmp_path):
    served = Served(files={"/f.bin": PAYLOAD}, cut_after={"/f.bin": 300_000})
    dest = tmp_path / "f.bin"
    with LocalServer(served) as url:
        with pytest.raises(ConnectionError, match="run again to resume"):
            download(f"{url}/f.bin", dest, size=len(PAYLOAD), sha256=SHA, retries=0, progress=False)
        part = tmp_path / "f.bin.part"
        assert not dest.exists() and part.stat().st_size == 300_000  # the partial file is never at dest
        download(f"{url}/f.bin", dest, size=len(PAYLOAD), sha256=SHA, retries=0, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert served.requests[-1] == ("/f.bin", "bytes=300000-", 206)


def test_dropped_connection_is_retried_within_one_call(tmp_path):
    served = Served(files={"/f.bin": PAYLOAD}, cut_after={"/f.bin": 12_345})
    with LocalServer(served) as url:
        dest = download(f"{url}/f.bin", tmp_path / "f.bin", size=len(PAYLOAD), md5=MD5, retries=2, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert [r[1] for r in served.requests] == [None, "bytes=12345-"]


def test_server_without_range_restarts_instead_of_appending(tmp_path):
    served = Served(files={"/f.bin": PAYLOAD}, ignore_range=True)
    (tmp_path / "f.bin.part").write_bytes(PAYLOAD[:5000])
    with LocalServer(served) as url:
        dest = download(f"{url}/f.bin", tmp_path / "f.bin", size=len(PAYLOAD), sha256=SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD and served.requests[0][2] == 200


def test_a_whole_part_file_of_unknown_size_is_verified_not_refetched(tmp_path):
    """Cut off after the last byte but before the rename: the server answers the resume with 416."""
    served = Served(files={"/f.bin": PAYLOAD})
    part = tmp_path / "f.bin.part"
    part.write_bytes(PAYLOAD)
    with LocalServer(served) as url:
        dest = download(f"{url}/f.bin", tmp_path / "f.bin", md5=MD5, retries=0, progress=False)
        assert dest.read_bytes() == PAYLOAD and not part.exists()
        assert served.requests == [("/f.bin", f"bytes={len(PAYLOAD)}-", 416)]
        (tmp_path / "g.bin.part").write_bytes(PAYLOAD[:-4] + b"oops")  # whole length, wrong bytes
        with pytest.raises(ValueError, match="rejected and deleted"):
            download(f"{url}/f.bin", tmp_path / "g.bin", md5=MD5, retries=0, progress=False)


def test_corrupted_download_is_rejected_and_deleted(tmp_path):
    corrupt = bytearray(PAYLOAD)
    corrupt[500_000] ^= 0xFF  # same size, one flipped byte
    served = Served(files={"/f.bin": bytes(corrupt)})
    dest = tmp_path / "f.bin"
    with LocalServer(served) as url:
        with pytest.raises(ValueError, match="sha256 .* expected"):
            download(f"{url}/f.bin", dest, size=len(PAYLOAD), sha256=SHA, progress=False)
        assert not dest.exists() and not (tmp_path / "f.bin.part").exists()
        # A stale .part that resumes into a wrong file is rejected the same way.
        served.files["/f.bin"] = PAYLOAD
        (tmp_path / "f.bin.part").write_bytes(bytes(1000))  # zeros: not a prefix of the real file
        with pytest.raises(ValueError, match="rejected"):
            download(f"{url}/f.bin", dest, size=len(PAYLOAD), sha256=SHA, progress=False)
        assert not dest.exists()
        # A short file is never accepted: without a known size the checksum rejects it ...
        served.files["/f.bin"] = PAYLOAD[:-10]
        with pytest.raises(ValueError, match="md5 .* expected"):
            download(f"{url}/f.bin", dest, md5=MD5, progress=False)
        assert not dest.exists()
        # ... and with one, a connection that closes early is an interrupted download that stays a
        # .part file, until the server says there is nothing more (HTTP 416): then it is deleted.
        with pytest.raises(ConnectionError, match="closed at 1,023,994 of 1,024,004"):
            download(f"{url}/f.bin", dest, size=len(PAYLOAD), retries=0, progress=False)
        assert not dest.exists() and (tmp_path / "f.bin.part").stat().st_size == len(PAYLOAD) - 10
        with pytest.raises(ValueError, match="offers 1,023,994 bytes, expected 1,024,004"):
            download(f"{url}/f.bin", dest, size=len(PAYLOAD), retries=0, progress=False)
        assert not dest.exists() and not (tmp_path / "f.bin.part").exists()
        (tmp_path / "f.bin.part").write_bytes(PAYLOAD[:-10])
    with pytest.raises(ValueError, match="f.bin.part: expected 1,024,004 bytes, found 1,023,994"):
        verify_file(tmp_path / "f.bin.part", size=len(PAYLOAD))


def test_http_error_and_existing_wrong_file(tmp_path):
    with LocalServer(Served()) as url:
        with pytest.raises(ValueError, match="HTTP 404"):
            download(f"{url}/missing", tmp_path / "m", progress=False)
    # A wrong file where the download belongs is moved aside (not deleted, not used) and fetched again.
    wrong = tmp_path / "w.bin"
    wrong.write_bytes(b"not it")
    said = []
    with LocalServer(Served(files={"/w.bin": PAYLOAD})) as url:
        download(f"{url}/w.bin", wrong, size=len(PAYLOAD), sha256=SHA, progress=False, log=said.append)
    assert wrong.read_bytes() == PAYLOAD and (tmp_path / "w.bin.rejected-1").read_bytes() == b"not it"
    assert said == [f"{wrong}: expected 1,024,004 bytes, found 6 (truncated or wrong file); moved aside to "
                    f"w.bin.rejected-1, fetching it again"]


def test_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_TRANSFORMER_DATA", str(tmp_path / "data"))
    assert cache_dir() == tmp_path / "data" and (tmp_path / "data").is_dir()
    monkeypatch.delenv("SPARSE_TRANSFORMER_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "sparse-transformer"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "sparse-transformer"
    assert os.path.isdir(tmp_path / "home" / ".cache" / "sparse-transformer")
