"""Prepared caches (.bin splits + manifest), the stdlib default, split sizes, check_context, positions."""

import json
import os
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from sparse_transformer.data import ByteDataset, check_context, load, position_axes, positions, split_stream
from sparse_transformer.data import store
from sparse_transformer.data.dataset import split_files
from sparse_transformer.data.stdlib import load_stdlib, stdlib_files
from sparse_transformer.data.store import SplitWriter, load_splits, prepared, read_manifest, write_splits


def small(n=1000, name="t"):
    return split_stream(np.arange(n, dtype=np.int64).astype(np.uint8), name)


def test_split_sizes_exact():
    d = split_stream(np.zeros(100_000_000, np.uint8), "enwik8-sized")  # 100 MB of zeros, allocated lazily
    assert (len(d.train), len(d.validation), len(d.test)) == (90_000_000, 5_000_000, 5_000_000)
    d = small(1001)
    assert (len(d.train), len(d.validation), len(d.test)) == (900, 50, 51)
    with pytest.raises(ValueError, match="empty"):
        split_stream(np.zeros(0, np.uint8), "e")
    assert split_files(list(range(20))) == {"train": list(range(18)), "validation": [18], "test": [19]}
    assert [len(v) for v in split_files(list(range(41))).values()] == [35, 3, 3]  # ceil(2.05) = 3
    with pytest.raises(ValueError, match="at least 3 files"):
        split_files([1, 2])


def test_cache_roundtrip_is_memory_mapped(tmp_path):
    d = small()
    write_splits(tmp_path / "c", d, "fp1")
    back = load_splits(tmp_path / "c", "fp1")
    assert isinstance(back.train, np.memmap) and back.name == "t" and back.kind == "text"
    for s in ("train", "validation", "test"):
        np.testing.assert_array_equal(back.split(s), d.split(s))
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["splits"]["validation"]["bytes"] == 50


def test_cache_detects_truncation_corruption_staleness(tmp_path):
    folder = tmp_path / "c"
    write_splits(folder, small(), "fp1")
    with pytest.raises(ValueError, match="stale"):
        load_splits(folder, "fp2")
    train = folder / "train.bin"
    raw = bytearray(train.read_bytes())
    train.write_bytes(raw[:-1])
    with pytest.raises(ValueError, match=r"train.bin: expected 900 bytes, found 899"):
        load_splits(folder)
    raw[10] ^= 1
    train.write_bytes(raw)
    with pytest.raises(ValueError, match=r"train.bin: sha256 .* \(corrupted\)"):
        load_splits(folder)
    # prepared() treats a bad cache as derived data: it warns and rebuilds from the source.
    built = []
    with pytest.warns(UserWarning, match="rebuilding"):
        d = prepared(folder, "fp1", lambda f: built.append(write_splits(f, small(), "fp1")))
    assert len(built) == 1 and d.train[10] == 10


def test_stdlib_default_cached_once(tmp_path):
    files = stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel) and not any("site-packages" in r for r in rel)
    d = load("default", cache=tmp_path)
    total = sum(f.stat().st_size for f in files)
    assert len(d.train) + len(d.validation) + len(d.test) == total
    assert len(d.train) == total * 9 // 10 and isinstance(d.train, np.memmap)
    head = files[0].read_bytes()
    assert bytes(d.train[:len(head)]) == head
    (folder,) = [p for p in tmp_path.iterdir() if p.name.startswith("stdlib-")]
    stamp = (folder / "train.bin").stat().st_mtime_ns
    again = load_stdlib(cache=tmp_path)
    assert (folder / "train.bin").stat().st_mtime_ns == stamp  # memory-mapped, not rebuilt
    assert bytes(again.test[-100:]) == bytes(d.test[-100:])
    # A truncated cache is rebuilt, never used.
    (folder / "test.bin").write_bytes(b"x")
    with pytest.warns(UserWarning, match="test.bin: expected"):
        fixed = load_stdlib(cache=tmp_path)
    assert len(fixed.test) == len(d.test)


def test_check_context():
    d = small(1000)
    check_context(d, 49)
    with pytest.raises(ValueError, match="validation split holds 50 bytes, fewer than context \\+ 1 = 51"):
        check_context(d, 50)
    img = ByteDataset("img", "image", np.zeros(12 * 4, np.uint8), np.zeros(12, np.uint8), np.zeros(0, np.uint8),
                      (2, 2, 3))
    with pytest.raises(ValueError, match="2x2x3 = 12 bytes, got context 10"):
        check_context(img, 10)
    with pytest.raises(ValueError, match="test split holds 0 bytes, fewer than one image"):
        check_context(img, 12)


def test_positions():
    img = ByteDataset("img", "image", np.zeros(3072, np.uint8), np.zeros(3072, np.uint8), np.zeros(3072, np.uint8),
                      (32, 32, 3))
    axes = position_axes(img, 3072, 128)
    assert axes == (32, 32, 3)
    p = positions(axes, 3072)
    assert p.dtype == torch.long and p.shape == (3072, 3)
    i = 5 * 96 + 7 * 3 + 2  # row 5, column 7, channel 2
    assert p[i].tolist() == [5, 7, 2] and p.max(0).values.tolist() == [31, 31, 2]
    text_axes = position_axes(small(), 1000, 128)
    assert text_axes == (8, 128)
    q = positions(text_axes, 1000)
    assert torch.equal(q[:, 0], torch.arange(1000) // 128) and torch.equal(q[:, 1], torch.arange(1000) % 128)
    with pytest.raises(ValueError, match="do not fit"):
        positions((2, 3), 7)
    with pytest.raises(ValueError, match="image context must be 3,072"):
        position_axes(img, 1024, 32)
    assert position_axes(small(), 100, 128) == (1, 100)  # stride > context: one row


@pytest.mark.parametrize("context,stride,axes", [(1000, 128, None), (100, 128, None), (3072, 96, (32, 32, 3))])
def test_data_positions_are_the_models(context, stride, axes):
    from sparse_transformer import SparseTransformer
    from sparse_transformer.config import ModelConfig
    model = SparseTransformer(ModelConfig(n_layer=1, n_head=1, d_model=8, context=context, stride=stride,
                                          summary=1, position_axes=axes))
    assert model.config.axes == (axes or position_axes(small(), context, stride))
    assert torch.equal(model.position_index, positions(model.config.axes, context))


def test_manifest_of_the_wrong_shape_is_a_clear_error(tmp_path):
    """Valid JSON that is not a manifest used to fail with a KeyError or an AttributeError."""
    folder = tmp_path / "ds"
    folder.mkdir()
    for text in ('{"fingerprint": "x"}', "[1, 2]", '{"name": "d", "kind": "text", "splits": {"train": {}}}'):
        (folder / "manifest.json").write_text(text)
        with pytest.raises(ValueError, match="manifest.json: not a dataset manifest .*prepare again"):
            load_splits(folder)


def test_empty_path_is_not_the_current_folder(tmp_path):
    with pytest.raises(ValueError, match="the path is an empty string"):
        load("bytes", "", cache=tmp_path)


def test_split_writer_leaves_nothing_behind_when_a_conversion_fails(tmp_path):
    folder = tmp_path / "set"
    with pytest.raises(ValueError, match="bad source"):
        with SplitWriter(folder) as writer:
            writer.write("train", np.arange(10, dtype=np.uint8))
            raise ValueError("bad source")
    assert list(tmp_path.iterdir()) == []  # no half-written folder, no .tmp
    with SplitWriter(folder) as writer:
        for split in ("train", "validation", "test"):
            writer.write(split, np.arange(4, dtype=np.uint8))
        writer.finish("set", "text", "fingerprint-1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]
    assert read_manifest(folder)["splits"]["train"]["bytes"] == 4


def _fill(writer, value):
    for split in ("train", "validation", "test"):
        writer.write(split, np.full(4, value, dtype=np.uint8))


def test_processes_preparing_one_cache_at_once_both_succeed(tmp_path):
    """As under torchrun: both ranks convert; the first to finish publishes, the other finds the
    same bytes and keeps them (once, one rank's temporary folder was deleted by the other's start)."""
    folder = tmp_path / "set"
    with SplitWriter(folder) as first, SplitWriter(folder) as second:
        _fill(first, 1)
        _fill(second, 1)
        assert first.finish("set", "text", "fp") == folder
        published = (folder / "train.bin").stat().st_ino
        assert second.finish("set", "text", "fp") == folder
    assert (folder / "train.bin").stat().st_ino == published  # the first copy stayed, readers undisturbed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_an_outdated_cache_is_replaced_whole(tmp_path):
    folder = tmp_path / "set"
    for value, fingerprint in ((1, "old source"), (2, "new source")):
        with SplitWriter(folder) as writer:
            _fill(writer, value)
            writer.finish("set", "text", fingerprint)
    assert read_manifest(folder)["fingerprint"] == "new source"
    assert (folder / "train.bin").read_bytes() == bytes([2] * 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_a_writer_that_starts_after_another_published_keeps_that_copy(tmp_path):
    folder = tmp_path / "set"
    with SplitWriter(folder) as first:  # a rank that found no cache and built it quickly
        _fill(first, 1)
        first.finish("set", "text", "fp")
    published = (folder / "train.bin").stat().st_ino
    with SplitWriter(folder) as late:  # a rank that also found none, but read its sources for longer
        _fill(late, 1)
        late.finish("set", "text", "fp")
    assert (folder / "train.bin").stat().st_ino == published


def test_publishing_survives_another_process_moving_the_old_copy_away(tmp_path, monkeypatch):
    folder = tmp_path / "set"
    with SplitWriter(folder) as old:
        _fill(old, 0)
        old.finish("set", "text", "old source")
    writer = SplitWriter(folder)
    _fill(writer, 1)
    real_replace, calls = os.replace, []

    def replace(src, dst):  # our first publish fails; the other process then renames the old copy aside
        calls.append(src)
        if len(calls) == 1:
            try:
                return real_replace(src, dst)
            finally:
                real_replace(folder, tmp_path / "moved-by-the-other")
        return real_replace(src, dst)

    monkeypatch.setattr(store.os, "replace", replace)
    assert writer.finish("set", "text", "new source") == folder
    assert read_manifest(folder)["fingerprint"] == "new source"


def test_temporary_folders_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    orphan = tmp_path / f"set.tmp-{host}-{int(dead.stdout)}-0123abcd"
    other_host = tmp_path / f"set.tmp-elsewhere-{int(dead.stdout)}-0123abcd"
    running = tmp_path / f"set.tmp-{host}-{os.getpid()}-0123abcd"
    for path in (orphan, other_host, running):
        path.mkdir()
    with SplitWriter(tmp_path / "set") as writer:
        _fill(writer, 1)
        writer.finish("set", "text", "fp")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["set", other_host.name, running.name])
