"""Image datasets: CIFAR-10 (small tarball in the official format), ImageNet 64x64 npz, picture tiles.

The official formats are channel-planar; the datasets must come out in (row, column, channel) order,
which these tests check pixel by pixel against an independent formula.
"""

import io
import os
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from sparse_transformer.data import load
from sparse_transformer.data.images import load_cifar10, load_imagenet64


def value(i, r, c, ch):
    """The byte the test writes for image i, row r, column c, channel ch."""
    return (i * 7 + r * 3 + c * 5 + ch * 11) % 256


def planar(first, n, size):
    """n images numbered from `first`, each stored as CIFAR / ImageNet do: all R, then G, then B."""
    i, ch, r, c = np.meshgrid(np.arange(first, first + n), np.arange(3), np.arange(size), np.arange(size),
                              indexing="ij")
    return value(i, r, c, ch).astype(np.uint8).reshape(n, 3 * size * size)


def check_hwc(rows, numbers, size):
    """rows[k] must be image numbers[k] in (row, column, channel) order."""
    images = np.asarray(rows).reshape(len(numbers), size, size, 3)
    r, c, ch = np.meshgrid(np.arange(size), np.arange(size), np.arange(3), indexing="ij")
    for img, i in zip(images, numbers):
        np.testing.assert_array_equal(img, value(i, r, c, ch).astype(np.uint8))


def cifar_tarball(path, per_batch=10, test=6, batches=None):
    """A cifar-10-python.tar.gz with the real layout: pickled dicts with b'data', b'labels', ..."""
    batches = batches or {f"data_batch_{k + 1}": {b"batch_label": b"training batch", b"labels":
                          [(k * per_batch + j) % 10 for j in range(per_batch)],
                          b"data": planar(k * per_batch, per_batch, 32)} for k in range(5)}
    batches.setdefault("test_batch", {b"batch_label": b"testing batch", b"labels": [j % 10 for j in range(test)],
                                      b"data": planar(1000, test, 32)})
    with tarfile.open(path, "w:gz") as tar:
        for name, batch in batches.items():
            blob = batch if isinstance(batch, bytes) else pickle.dumps(batch, protocol=2)
            if name.endswith(("1", "3", "5")):  # the real file was pickled under numpy 1: legacy module name
                blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def test_cifar10_conversion_and_split(tmp_path):
    tarball = cifar_tarball(tmp_path / "cifar-10-python.tar.gz")
    d = load_cifar10(tarball, cache=tmp_path / "c", md5=None, validation=5, seed=0)
    assert d.image_shape == (32, 32, 3) and d.example_length == 3072 and d.kind == "image"
    assert (len(d.train) // 3072, len(d.validation) // 3072, len(d.test) // 3072) == (45, 5, 6)
    mask = np.zeros(50, bool)
    mask[np.random.default_rng(0).permutation(50)[:5]] = True  # the documented held-out rule
    check_hwc(d.train, np.flatnonzero(~mask), 32)
    check_hwc(d.validation, np.flatnonzero(mask), 32)
    check_hwc(d.test, range(1000, 1006), 32)
    again = load_cifar10(tarball, cache=tmp_path / "c2", md5=None, validation=5, seed=0)
    assert bytes(again.validation) == bytes(d.validation)  # fixed seed: same held-out images


def test_cifar10_rejects_bad_input(tmp_path):
    tarball = cifar_tarball(tmp_path / "cifar-10-python.tar.gz")
    with pytest.raises(ValueError, match="md5 is .* expected c58f30108f718f92721af3b95e74349a"):
        load_cifar10(tarball, cache=tmp_path / "c")
    wrong = cifar_tarball(tmp_path / "wrong.tar.gz", batches={"data_batch_1": {
        b"data": np.zeros((4, 1024), np.uint8), b"labels": [0] * 4}})
    with pytest.raises(ValueError, match=r"data_batch_1: expected uint8 images of shape \[N, 3072\].*\[4, 1024\]"):
        load_cifar10(wrong, cache=tmp_path / "c", md5=None)
    missing = cifar_tarball(tmp_path / "missing.tar.gz", batches={"data_batch_1": {
        b"data": planar(0, 2, 32), b"labels": [0, 1]}})
    with pytest.raises(ValueError, match="expected cifar-10-batches-py/data_batch_2"):
        load_cifar10(missing, cache=tmp_path / "c", md5=None)

    class Exploit:  # a pickle that would call a function when loaded
        def __reduce__(self):
            return (os.getcwd, ())

    hostile = cifar_tarball(tmp_path / "hostile.tar.gz", batches={"data_batch_1": pickle.dumps(
        {b"data": Exploit(), b"labels": []}, protocol=2)})
    with pytest.raises(ValueError, match="refusing to load posix.getcwd"):
        load_cifar10(hostile, cache=tmp_path / "c", md5=None)
    raw = tarball.read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(raw[:len(raw) // 2])
    with pytest.raises(ValueError, match="cut.tar.gz"):
        load_cifar10(tmp_path / "cut.tar.gz", cache=tmp_path / "c", md5=None)
    assert not (tmp_path / "c" / "cifar10").exists()


def write_npz(path, first, n, size=64):
    np.savez(path, data=planar(first, n, size), labels=np.arange(n) % 1000 + 1,
             mean=np.zeros(3 * size * size))


def test_imagenet64_npz(tmp_path):
    src = tmp_path / "imagenet"
    (src / "Imagenet64_train_npz").mkdir(parents=True)
    (src / "Imagenet64_val").mkdir()
    write_npz(src / "Imagenet64_train_npz" / "train_data_batch_1.npz", 0, 7)
    write_npz(src / "Imagenet64_train_npz" / "train_data_batch_2.npz", 7, 5)
    write_npz(src / "Imagenet64_train_npz" / "train_data_batch_10.npz", 12, 4)  # sorted numerically, after 2
    write_npz(src / "Imagenet64_val" / "val_data.npz", 500, 3)
    d = load_imagenet64(src, tmp_path / "c", validation=3)
    assert d.image_shape == (64, 64, 3) and d.example_length == 12_288
    mask = np.zeros(16, bool)
    mask[np.random.default_rng(0).permutation(16)[:3]] = True
    check_hwc(d.train, np.flatnonzero(~mask), 64)
    check_hwc(d.validation, np.flatnonzero(mask), 64)
    check_hwc(d.test, [500, 501, 502], 64)


def test_imagenet64_rejects_bad_input(tmp_path):
    (tmp_path / "a").mkdir()
    np.savez(tmp_path / "a" / "train_data_batch_1.npz", data=planar(0, 4, 32), labels=np.arange(4))
    write_npz(tmp_path / "a" / "val_data.npz", 0, 2)
    with pytest.raises(ValueError, match=r"train_data_batch_1.npz: expected uint8 images of shape \[N, 12288\]"):
        load_imagenet64(tmp_path / "a", tmp_path / "c", validation=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="found 0 training and 0 validation"):
        load_imagenet64(tmp_path / "empty", tmp_path / "c")
    with pytest.raises(ValueError, match="needs a path"):
        load("imagenet64")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "no labels"])
def test_imagenet64_broken_npz_names_the_file(tmp_path, damage):
    """The first pass (counting images by their labels) read the batches unguarded: a BadZipFile, a
    KeyError or numpy's pickle message came out without the file's name."""
    batch = tmp_path / "train_data_batch_1.npz"
    if damage == "no labels":
        np.savez(batch, data=planar(0, 4, 64))
    else:
        np.savez(batch, data=planar(0, 4, 64), labels=np.arange(4))
        raw = batch.read_bytes()
        batch.write_bytes(b"not an npz file" if damage == "garbage" else raw[:len(raw) // 2])
    write_npz(tmp_path / "val_data.npz", 0, 2)
    with pytest.raises(ValueError, match="train_data_batch_1.npz: not a downsampled-ImageNet npz batch"):
        load_imagenet64(tmp_path, tmp_path / "c", validation=1)
    assert not any((tmp_path / "c").glob("*/manifest.json"))


def test_picture_tiles(tmp_path):
    pics = tmp_path / "pics"
    pics.mkdir()
    rng = np.random.default_rng(0)
    arrays = {}
    for k, (h, w) in enumerate([(20, 17), (16, 16), (8, 24), (9, 9)]):
        arrays[k] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arrays[k]).save(pics / f"p{k}.png")
    grey = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    Image.fromarray(grey).save(pics / "p4.png")
    (pics / "notes.txt").write_text("not a picture")
    d = load("images", pics, cache=tmp_path / "c", tile=(8, 8))
    assert d.image_shape == (8, 8, 3)
    # Split by picture: p0..p2 train (2x2 + 2x2 + 1x3 tiles), p3 validation (1), p4 test (1).
    assert (len(d.train) // 192, len(d.validation) // 192, len(d.test) // 192) == (11, 1, 1)
    tiles = np.asarray(d.train).reshape(-1, 8, 8, 3)
    np.testing.assert_array_equal(tiles[1], arrays[0][0:8, 8:16])  # row 0, second tile of p0
    np.testing.assert_array_equal(tiles[3], arrays[0][8:16, 8:16])
    np.testing.assert_array_equal(tiles[10], arrays[2][:, 16:24])
    np.testing.assert_array_equal(np.asarray(d.test).reshape(8, 8, 3), np.repeat(grey[:, :, None], 3, axis=2))


def test_picture_tiles_reject_bad_input(tmp_path):
    pics = tmp_path / "pics"
    pics.mkdir()
    for k in range(3):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(pics / f"p{k}.png")
    (pics / "p3.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="p3.jpg: not a readable picture"):
        load("images", pics, cache=tmp_path / "c", tile=(8, 8))
    (pics / "p3.jpg").unlink()
    with pytest.raises(ValueError, match="smaller than one 32x32 tile"):
        load("images", pics, cache=tmp_path / "c", tile=(32, 32))
    with pytest.raises(ValueError, match="at least 3 pictures"):
        load("images", tmp_path / "c")
