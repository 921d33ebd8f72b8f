"""Bad inputs to the data pipelines and model loading: a one-line ValueError naming what was wrong,
and no user file removed, moved or written through."""

import hashlib
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

from local_http import LocalServer, Served
from sparse_transformer.config import ModelConfig
from sparse_transformer.data import load
from sparse_transformer.data.download import download
from sparse_transformer.data.images import load_cifar10, load_imagenet64
from sparse_transformer.model import SparseTransformer
from sparse_transformer.weights import CONFIG_FILE, WEIGHTS_FILE, write_manifest

TINY = ModelConfig(n_layer=2, n_head=2, d_model=32, context=64, pattern="fixed", stride=8, summary=2)


def _bytes_cache_name(src):
    return f"{src.name.split('.')[0]}-{hashlib.sha256(str(src.resolve()).encode()).hexdigest()[:10]}"


def test_a_user_folder_at_the_cache_path_is_not_deleted(tmp_path):
    src = tmp_path / "src.txt"
    src.write_bytes(b"hello world " * 100)
    mine = tmp_path / "cache" / _bytes_cache_name(src)
    mine.mkdir(parents=True)
    (mine / "precious.txt").write_text("mine")
    with pytest.raises(ValueError, match="expected a dataset cache folder.*precious.txt"):
        load("bytes", src, cache=tmp_path / "cache")
    assert (mine / "precious.txt").read_text() == "mine"


def test_a_user_folder_with_a_foreign_manifest_is_not_deleted(tmp_path):
    src = tmp_path / "src.txt"
    src.write_bytes(b"hello world " * 100)
    mine = tmp_path / "cache" / _bytes_cache_name(src)
    mine.mkdir(parents=True)
    (mine / "manifest.json").write_text('{"files": {}}')  # e.g. a model checkpoint folder
    (mine / "model.safetensors").write_bytes(b"weights")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="model.safetensors"):
        load("bytes", src, cache=tmp_path / "cache")
    assert (mine / "model.safetensors").read_bytes() == b"weights"


def test_a_user_file_at_the_cache_path_is_not_moved(tmp_path):
    src = tmp_path / "src.txt"
    src.write_bytes(b"hello world " * 100)
    (tmp_path / "cache").mkdir()
    mine = tmp_path / "cache" / _bytes_cache_name(src)
    mine.write_text("my file")
    with pytest.raises(ValueError, match="found a file"):
        load("bytes", src, cache=tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [mine.name] and mine.read_text() == "my file"


def test_a_stale_cache_is_still_rebuilt(tmp_path):
    src = tmp_path / "src.txt"
    src.write_bytes(b"hello world " * 100)
    expected = bytes(load("bytes", src, cache=tmp_path / "cache").test)
    folder = tmp_path / "cache" / _bytes_cache_name(src)
    (folder / "test.bin").write_bytes(b"x")
    with pytest.warns(UserWarning, match="rebuilding"):
        again = load("bytes", src, cache=tmp_path / "cache")
    assert bytes(again.test) == expected


def _imagenet(folder, labels):
    folder.mkdir()
    np.savez_compressed(folder / "train_data_batch_1.npz", data=np.arange(3 * 12288).astype(np.uint8).reshape(3, -1),
                        labels=labels)
    np.savez(folder / "val_data.npz", data=np.zeros((3, 12288), np.uint8), labels=np.zeros(3))
    return folder


def test_imagenet_batch_with_scalar_labels(tmp_path):
    folder = _imagenet(tmp_path / "in", np.array(5))
    with pytest.raises(ValueError, match="train_data_batch_1.npz.*'labels' must be 1-D"):
        load_imagenet64(folder, tmp_path / "cache", validation=1)


def test_imagenet_batch_with_corrupt_compressed_data(tmp_path):
    folder = _imagenet(tmp_path / "in", np.zeros(3))
    f = folder / "train_data_batch_1.npz"
    raw = bytearray(f.read_bytes())
    start = raw.index(b"data.npy") + 200  # inside the deflate stream of 'data', clear of the zip's directories
    for i in range(start, start + 300):
        raw[i] ^= 0x5A
    f.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="train_data_batch_1.npz: not a downsampled-ImageNet npz"):
        load_imagenet64(folder, tmp_path / "cache", validation=1)
    assert not (tmp_path / "cache" / "imagenet64").exists()


def test_cifar_batch_whose_labels_are_not_a_list(tmp_path):
    tarball = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            blob = pickle.dumps({b"data": np.zeros((10, 3072), np.uint8), b"labels": 5})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    with pytest.raises(ValueError, match="data_batch_1: not a CIFAR-10 batch"):
        load_cifar10(tarball, tmp_path / "cache", md5=None)


@pytest.mark.parametrize("kind", ["folder", "link"])
def test_a_part_file_that_is_not_a_file(tmp_path, kind):
    body = os.urandom(5000)
    part = tmp_path / "f.part"
    mine = tmp_path / "mine.txt"
    mine.write_bytes(b"user data")
    if kind == "folder":
        part.mkdir()
    else:
        part.symlink_to(mine)
    with LocalServer(Served({"/f": body})) as url, pytest.raises(ValueError, match=f"f.part: .*found a {kind}"):
        download(f"{url}/f", tmp_path / "f", size=5000, progress=False, retry_delay=0.01, timeout=1)
    assert mine.read_bytes() == b"user data"


def _saved_with(tmp_path, change):
    from safetensors.torch import load_file, save_file
    folder = SparseTransformer(TINY).save_pretrained(tmp_path / "model")
    state = load_file(str(folder / WEIGHTS_FILE))
    save_file(change(state), str(folder / WEIGHTS_FILE))
    write_manifest(folder, (WEIGHTS_FILE, CONFIG_FILE))
    return folder


def test_weights_with_nan_are_refused(tmp_path):
    def poison(state):
        name = sorted(state)[0]
        state[name] = state[name].clone()
        state[name].view(-1)[0] = float("nan")
        return state
    with pytest.raises(ValueError, match="model.safetensors: tensor .* NaN or infinite.*expected finite"):
        SparseTransformer.from_pretrained(_saved_with(tmp_path, poison))


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_weights_of_a_non_float_dtype_are_refused(tmp_path, dtype):
    folder = _saved_with(tmp_path, lambda state: {k: v.to(dtype) for k, v in state.items()})
    with pytest.raises(ValueError, match=f"is {str(dtype)[6:]}, expected a floating-point dtype"):
        SparseTransformer.from_pretrained(folder)


def test_half_precision_weights_still_load(tmp_path):
    folder = _saved_with(tmp_path, lambda state: {k: v.half() for k, v in state.items()})
    assert SparseTransformer.from_pretrained(folder).config == TINY
