"""Image datasets as sequences of sub-pixels in raster order, channels innermost (row, column, channel).

CIFAR-10 (official python tarball), ImageNet 64x64 (downsampled-ImageNet npz batches) and any folder
of pictures cut into tiles. Both official formats store images channel-planar (all red, then all
green, then all blue); they are transposed to H x W x C here, once, when the cache is built.
"""

from __future__ import annotations

import hashlib
import pickle
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import Optional

import numpy as np

from .dataset import ByteDataset, split_files
from .download import cache_dir, download, verify_file
from .store import SplitWriter, files_fingerprint, list_files, prepared

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_SHAPE = (32, 32, 3)
IMAGENET64_SHAPE = (64, 64, 3)
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def planar_to_hwc(data: np.ndarray, shape: tuple[int, int, int], origin: str) -> np.ndarray:
    """[N, C*H*W] channel-planar uint8 rows -> [N, H*W*C] rows in (row, column, channel) order."""
    h, w, c = shape
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != h * w * c:
        raise ValueError(f"{origin}: expected uint8 images of shape [N, {h * w * c}] ({c}x{h}x{w} planar), "
                         f"got {data.dtype} {list(data.shape)}")
    return data.reshape(-1, c, h, w).transpose(0, 2, 3, 1).reshape(len(data), h * w * c)


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR-10 batches are pickles (from a checksummed official tarball). Even so, only the globals a
    batch of numpy arrays needs may be loaded, so a hostile file cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch")
        return super().find_class(module, name)


def _cifar_batch(tar: tarfile.TarFile, member: str, origin: str) -> np.ndarray:
    try:
        f = tar.extractfile(member)
    except KeyError:
        f = None
    if f is None:
        raise ValueError(f"{origin}: expected {member} in the CIFAR-10 tarball")
    try:
        batch = _CifarUnpickler(f, encoding="bytes").load()
        data, labels = np.asarray(batch[b"data"]), batch[b"labels"]
        len(labels)  # an int or None here was a TypeError traceback below
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{origin}:{member}: not a CIFAR-10 batch (dict with b'data', b'labels'): {err!r}") from err
    if len(labels) != len(data):
        raise ValueError(f"{origin}:{member}: {len(data)} images but {len(labels)} labels")
    return planar_to_hwc(data, CIFAR10_SHAPE, f"{origin}:{member}")


def load_cifar10(path: Optional[Path] = None, cache: Optional[Path] = None, md5: Optional[str] = CIFAR10_MD5,
                 validation: int = 2000, seed: int = 0, progress: bool = True) -> ByteDataset:
    """CIFAR-10: 48,000 train / 2,000 validation / 10,000 test images of 3,072 bytes (32 x 32 x 3, HWC).

    ``path``: the official ``cifar-10-python.tar.gz``; without it, it is downloaded into
    ``cache/downloads``. The tarball's md5 is checked first (``md5=None`` skips it: tests only). The
    ``validation`` images are held out of the 50,000 training images by a permutation from ``seed``;
    both parts keep the original order.
    """
    root = Path(cache or cache_dir())
    fingerprint = f"cifar10-{md5}-{validation}-{seed}"

    def build(folder: Path) -> None:
        tarball = Path(path) if path is not None else download(
            CIFAR10_URL, root / "downloads" / "cifar-10-python.tar.gz", md5=md5, progress=progress,
            manual="sparse-transformer data prepare cifar10 --from cifar-10-python.tar.gz")
        verify_file(tarball, md5=md5)
        try:
            with tarfile.open(tarball, "r:gz") as tar:
                train = np.concatenate([_cifar_batch(tar, f"cifar-10-batches-py/data_batch_{i}", str(tarball))
                                        for i in range(1, 6)])
                test = _cifar_batch(tar, "cifar-10-batches-py/test_batch", str(tarball))
        except (tarfile.TarError, EOFError, OSError) as err:
            raise ValueError(f"{tarball}: not a readable .tar.gz ({err})") from err
        _write_images(folder, "cifar10", train, test, validation, seed, CIFAR10_SHAPE, fingerprint)

    return prepared(root / "cifar10", fingerprint, build)


def _held_out(n: int, validation: int, seed: int, origin: str) -> np.ndarray:
    """Boolean mask of the ``validation`` images held out of ``n`` training images (fixed seed)."""
    if not 0 < validation < n:
        raise ValueError(f"{origin}: cannot hold out {validation} validation images from {n} training images")
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).permutation(n)[:validation]] = True
    return mask


def _write_images(folder, name, train, test, validation, seed, shape, fingerprint) -> None:
    mask = _held_out(len(train), validation, seed, name)
    with SplitWriter(folder) as writer:
        writer.write("train", train[~mask])
        writer.write("validation", train[mask])
        writer.write("test", test)
        writer.finish(name, "image", fingerprint, shape, validation_seed=seed)


# What np.load raises on a file that is not a whole npz: a truncated zip is a BadZipFile, which is
# neither an OSError nor a ValueError.
# A corrupt deflate stream (np.savez_compressed) is a zlib.error.
_NPZ_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error)


def _npz_arrays(path: Path, *keys: str) -> list[np.ndarray]:
    """The arrays ``keys`` of one downsampled-ImageNet npz batch; a clear error naming the file."""
    try:
        with np.load(path) as z:
            arrays = {key: z[key] for key in keys}
        if "labels" in arrays and arrays["labels"].ndim != 1:
            raise ValueError(f"'labels' must be 1-D, got shape {list(arrays['labels'].shape)}")
        return list(arrays.values())
    except _NPZ_ERRORS as err:
        raise ValueError(f"{path}: not a downsampled-ImageNet npz batch with 'data' and 'labels' ({err})") from err


def _npz_label_count(path: Path) -> int:
    """Images in one batch, read from its labels only (the first pass over the training batches)."""
    return len(_npz_arrays(path, "labels")[0])


def _npz_images(path: Path) -> np.ndarray:
    data, labels = _npz_arrays(path, "data", "labels")
    if len(labels) != len(data):
        raise ValueError(f"{path}: {len(data)} images but {len(labels)} labels")
    return planar_to_hwc(data, IMAGENET64_SHAPE, str(path))


def load_imagenet64(path: Path, cache: Optional[Path] = None, validation: int = 10_000,
                    seed: int = 0) -> ByteDataset:
    """ImageNet 64x64 from the downsampled-ImageNet npz batches (Chrabaszcz et al. 2017).

    ``path``: a folder holding ``train_data_batch_*.npz`` and ``val_data.npz`` (e.g. the unpacked
    ``Imagenet64_train_npz`` and ``Imagenet64_val_npz``; image-net.org needs an account, so there is no
    automatic download). Each image becomes 12,288 bytes (64 x 64 x 3, HWC). The official 50,000
    validation images are the test split (as in the paper's comparisons); ``validation`` training
    images are held out with ``seed``. Converted batch by batch, so 1.28M images never sit in memory.
    """
    if path is None:
        raise ValueError("imagenet64 needs --from FOLDER with train_data_batch_*.npz and val_data.npz "
                         "(downsampled ImageNet 64x64 from image-net.org, which needs an account)")
    path = Path(path)
    train_files = sorted(path.rglob("train_data_batch_*.npz"), key=lambda p: (len(p.name), p.name))
    val_files = sorted(path.rglob("val_data*.npz"))
    if not train_files or not val_files:
        raise ValueError(f"{path}: expected train_data_batch_*.npz and val_data.npz, found "
                         f"{len(train_files)} training and {len(val_files)} validation batches")
    fingerprint = f"imagenet64-{files_fingerprint(train_files + val_files)}-{validation}-{seed}"

    def build(folder: Path) -> None:
        counts = []
        for f in train_files:  # first pass: count images (reads only 'labels') to draw the held-out set
            counts.append(_npz_label_count(f))
        mask = _held_out(sum(counts), validation, seed, str(path))
        with SplitWriter(folder) as writer:
            start = 0
            for f, n in zip(train_files, counts):
                images, held = _npz_images(f), mask[start:start + n]
                start += n
                writer.write("train", images[~held])
                writer.write("validation", images[held])
            for f in val_files:
                writer.write("test", _npz_images(f))
            writer.finish("imagenet64", "image", fingerprint, IMAGENET64_SHAPE, validation_seed=seed)

    return prepared(Path(cache or cache_dir()) / "imagenet64", fingerprint, build)


def picture_tiles(file: Path, tile: tuple[int, int]) -> np.ndarray:
    """Non-overlapping ``tile`` = (H, W) RGB tiles of one picture, raster order: uint8 [n, H*W*3].

    Grey or RGBA pictures are converted to RGB; edges that do not fill a whole tile are dropped.
    """
    from PIL import Image, UnidentifiedImageError

    h, w = tile
    try:
        with Image.open(file) as im:
            pixels = np.asarray(im.convert("RGB"))  # (rows, cols, 3)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{file}: not a readable picture ({err})") from err
    rows, cols = pixels.shape[0] // h, pixels.shape[1] // w
    pixels = pixels[:rows * h, :cols * w].reshape(rows, h, cols, w, 3).transpose(0, 2, 1, 3, 4)
    return pixels.reshape(rows * cols, h * w * 3)


def load_picture_tiles(path: Path, tile: tuple[int, int] = (32, 32), cache: Optional[Path] = None,
                       fractions=(0.90, 0.05, 0.05)) -> ByteDataset:
    """A folder of pictures (PNG, JPEG, ...) cut into ``tile`` = (H, W) RGB tiles, split by picture.

    Pictures are taken in sorted path order and assigned whole to train / validation / test (so no
    photo leaks into two splits): the last ``ceil(5%)`` of them to test, the ``ceil(5%)`` before to
    validation, at least one each. Needs at least three pictures at least one tile in size.
    """
    path = Path(path)
    files = list_files(path, PICTURE_SUFFIXES)
    if len(files) < 3:
        raise ValueError(f"{path}: expected a folder with at least 3 pictures ({', '.join(PICTURE_SUFFIXES)}), "
                         f"found {len(files)}")
    h, w = tile
    if h < 1 or w < 1:
        raise ValueError(f"tile must be positive (H, W), got {tile}")
    groups = split_files(files, fractions)
    tag = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:10]
    fingerprint = f"tiles-{h}x{w}-{files_fingerprint(files)}"

    def build(folder: Path) -> None:
        with SplitWriter(folder) as writer:
            for split, group in groups.items():
                tiles = [picture_tiles(f, tile) for f in group]
                if not sum(len(t) for t in tiles):
                    raise ValueError(f"{path}: the {split} pictures ({', '.join(f.name for f in group)}) are "
                                     f"all smaller than one {h}x{w} tile")
                for t in tiles:
                    writer.write(split, t)
            writer.finish(f"tiles{h}x{w}", "image", fingerprint, (h, w, 3), source=str(path),
                          pictures=len(files))

    return prepared(Path(cache or cache_dir()) / f"tiles{h}x{w}-{tag}", fingerprint, build)
