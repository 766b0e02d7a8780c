"""Small classification data sets as tensors: scikit-learn digits, Fashion-MNIST (IDX files), any torch
Dataset.

Everything returns a :class:`TensorData` (train/test tensors plus the clean training labels when label noise
was added), so experiments and the Local SGD part share one loader. Label noise follows the usual protocol:
a fraction ``p`` of training labels is replaced by a uniformly drawn *different* class.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hdopt.io import atomic_write_bytes

DATASETS = ("digits", "fashion-mnist")

# Where the Debian package dataset-fashion-mnist installs its gzipped IDX files (checked in order).
FASHION_MNIST_DIRS = (
    "/usr/share/datasets/fashion-mnist",
    "/usr/share/dataset-fashion-mnist",
)
FASHION_MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass
class TensorData:
    """A classification data set held in memory.

    Attributes:
        train_x, train_y: training inputs ``(n, d)`` float and labels ``(n,)`` int64 (possibly noisy).
        test_x, test_y: held-out inputs and clean labels.
        clean_train_y: training labels before label noise (equal to ``train_y`` without noise).
        num_classes: number of classes.
        name: where the data came from.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    clean_train_y: torch.Tensor
    num_classes: int
    name: str

    @property
    def dim(self) -> int:
        return int(self.train_x.shape[1])

    def to(self, dtype: torch.dtype) -> TensorData:
        """A copy with float inputs cast to ``dtype`` (labels unchanged)."""
        return TensorData(self.train_x.to(dtype), self.train_y, self.test_x.to(dtype), self.test_y,
                          self.clean_train_y, self.num_classes, self.name)


def add_label_noise(labels: torch.Tensor, fraction: float, num_classes: int,
                    generator: torch.Generator) -> torch.Tensor:
    """Replace ``round(fraction * n)`` labels, chosen at random, by a uniformly drawn different class.

    Args:
        labels: int64 labels ``(n,)``.
        fraction: share of labels to corrupt, in [0, 1].
        num_classes: number of classes.
        generator: source of randomness.

    Returns:
        A new label tensor; exactly ``round(fraction * n)`` entries differ from ``labels``.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"label noise fraction must be in [0, 1], got {fraction}")
    noisy = labels.clone()
    n_flip = round(fraction * len(labels))
    idx = torch.randperm(len(labels), generator=generator)[:n_flip]
    # an offset in 1..C-1 guarantees a different class
    offset = torch.randint(1, num_classes, (n_flip,), generator=generator)
    noisy[idx] = (labels[idx] + offset) % num_classes
    return noisy


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not.

    The header is two zero bytes, a type code (0x08 uint8 ... 0x0E float64), the number of dimensions, then
    one big-endian uint32 per dimension; the data follow in C order.

    Args:
        path: the file; a ``.gz`` suffix (or gzip magic bytes) means gzip.

    Returns:
        An array with the stored shape and dtype.
    """
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic bytes {raw[:4]!r})")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {data.size} values")
    return data.reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray, compress: bool | None = None) -> Path:
    """Write ``array`` (uint8, int8, int16, int32, float32 or float64) as an IDX file (tests, tiny data sets).

    Args:
        path: destination; gzip-compressed when ``compress`` is true or, if None, when it ends in ``.gz``.
        array: the data.
        compress: force or forbid gzip.

    Returns:
        The path written.
    """
    path = Path(path)
    codes = {np.dtype(v).newbyteorder("=").str: k for k, v in _IDX_DTYPES.items()}
    array = np.ascontiguousarray(array)
    code = codes.get(array.dtype.newbyteorder("=").str)
    if code is None:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    body = array.astype(np.dtype(_IDX_DTYPES[code])).tobytes()
    raw = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + body
    if compress or (compress is None and path.suffix == ".gz"):
        raw = gzip.compress(raw)
    return atomic_write_bytes(path, raw)


def find_fashion_mnist(dirs: tuple[str, ...] | None = None) -> Path | None:
    """The folder holding Fashion-MNIST's four IDX files (``.gz`` or plain), or None if absent.

    Searched: ``$HDOPT_FASHION_MNIST``, then ``dirs`` (default :data:`FASHION_MNIST_DIRS`, where the Debian
    package ``dataset-fashion-mnist`` installs them).
    """
    candidates = [os.environ.get("HDOPT_FASHION_MNIST", "")] + list(dirs or FASHION_MNIST_DIRS)
    for folder in filter(None, candidates):
        if all(_idx_file(Path(folder), stem) is not None for stem in FASHION_MNIST_FILES.values()):
            return Path(folder)
    return None


def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def load_fashion_mnist(n_train: int | None = None, n_test: int | None = None, label_noise: float = 0.0,
                       seed: int = 0, folder: str | os.PathLike | None = None) -> TensorData:
    """Fashion-MNIST from IDX files, flattened to 784 features in [0, 1] and standardized per feature.

    Args:
        n_train, n_test: keep this many examples (a seeded random subset); None keeps all (60k / 10k).
        label_noise: fraction of training labels replaced by a different class.
        seed: seed for the subset and the label noise.
        folder: folder with the IDX files; default :func:`find_fashion_mnist`.

    Returns:
        The data as :class:`TensorData`.
    """
    folder = Path(folder) if folder is not None else find_fashion_mnist()
    if folder is None:
        raise FileNotFoundError("Fashion-MNIST IDX files not found: install the Debian package "
                                "dataset-fashion-mnist or set HDOPT_FASHION_MNIST to their folder")
    arrays = {}
    for key, stem in FASHION_MNIST_FILES.items():
        path = _idx_file(folder, stem)
        if path is None:
            raise FileNotFoundError(f"{folder} lacks {stem}[.gz]")
        arrays[key] = read_idx(path)
    gen = torch.Generator().manual_seed(seed)
    train = _subset(arrays["train_x"], arrays["train_y"], n_train, gen)
    test = _subset(arrays["test_x"], arrays["test_y"], n_test, gen)
    return _finish(train, test, 10, label_noise, gen, "fashion-mnist")


def load_digits(n_train: int | None = None, label_noise: float = 0.0, seed: int = 0,
                test_fraction: float = 0.2) -> TensorData:
    """scikit-learn's bundled 8x8 digits (1,797 images, 64 features, 10 classes), standardized per feature.

    Args:
        n_train: keep this many training examples (None: all of the training split).
        label_noise: fraction of training labels replaced by a different class (the test labels stay clean).
        seed: seed for the train/test split, the subset and the label noise.
        test_fraction: share of the 1,797 examples held out.

    Returns:
        The data as :class:`TensorData`.
    """
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x, y = bunch.data.astype(np.float32), bunch.target.astype(np.int64)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=gen).numpy()
    n_test = round(test_fraction * len(y))
    test = (x[perm[:n_test]], y[perm[:n_test]])
    train = _subset(x[perm[n_test:]], y[perm[n_test:]], n_train, gen)
    return _finish(train, test, 10, label_noise, gen, "digits")


def from_dataset(train: torch.utils.data.Dataset, test: torch.utils.data.Dataset, num_classes: int,
                 label_noise: float = 0.0, seed: int = 0, name: str = "dataset") -> TensorData:
    """Materialize any map-style torch Datasets of ``(x, label)`` pairs as :class:`TensorData`.

    Inputs are flattened; no standardization is applied (the caller's transforms decide).

    Args:
        train, test: the datasets.
        num_classes: number of classes.
        label_noise: fraction of training labels replaced by a different class.
        seed: seed for the label noise.
        name: a label stored with the data.

    Returns:
        The data as :class:`TensorData`.
    """
    def stack(ds: torch.utils.data.Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = zip(*(ds[i] for i in range(len(ds))), strict=True)
        x = torch.stack([torch.as_tensor(v, dtype=torch.float32).reshape(-1) for v in xs])
        return x, torch.as_tensor([int(v) for v in ys], dtype=torch.int64)

    train_x, train_y = stack(train)
    test_x, test_y = stack(test)
    gen = torch.Generator().manual_seed(seed)
    noisy = add_label_noise(train_y, label_noise, num_classes, gen) if label_noise else train_y
    return TensorData(train_x, noisy, test_x, test_y, train_y, num_classes, name)


def load_data(name: str, n_train: int | None = None, label_noise: float = 0.0, seed: int = 0) -> TensorData:
    """Load a data set by name: ``digits`` (bundled) or ``fashion-mnist`` (Debian package).

    Args:
        name: one of :data:`DATASETS`.
        n_train: training subset size (None: all).
        label_noise: fraction of noisy training labels.
        seed: seed for splits, subsets and noise.

    Returns:
        The data as :class:`TensorData`.
    """
    if name == "digits":
        return load_digits(n_train, label_noise, seed)
    if name == "fashion-mnist":
        n_test = None if n_train is None else max(1000, n_train // 5)
        return load_fashion_mnist(n_train, n_test, label_noise, seed)
    raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")


def _subset(x: np.ndarray, y: np.ndarray, n: int | None,
            gen: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    if n is None or n >= len(y):
        return x, y
    idx = torch.randperm(len(y), generator=gen)[:n].numpy()
    return x[idx], y[idx]


def _finish(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], num_classes: int,
            label_noise: float, gen: torch.Generator, name: str) -> TensorData:
    train_x = torch.as_tensor(train[0].reshape(len(train[0]), -1), dtype=torch.float32)
    test_x = torch.as_tensor(test[0].reshape(len(test[0]), -1), dtype=torch.float32)
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-3)  # constant pixels stay finite
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    train_y = torch.as_tensor(train[1], dtype=torch.int64)
    noisy = add_label_noise(train_y, label_noise, num_classes, gen) if label_noise else train_y
    return TensorData(train_x, noisy, test_x, torch.as_tensor(test[1], dtype=torch.int64), train_y,
                      num_classes, name)


def batches(data_x: torch.Tensor, data_y: torch.Tensor, batch_size: int, generator: torch.Generator):
    """Endless stream of i.i.d. mini-batches (sampled with replacement across batches, without inside one).

    Args:
        data_x, data_y: the full data.
        batch_size: examples per batch.
        generator: source of randomness.

    Yields:
        ``(x, y)`` batches.
    """
    n = len(data_y)
    while True:
        idx = torch.randperm(n, generator=generator)[:batch_size]
        yield data_x[idx], data_y[idx]
