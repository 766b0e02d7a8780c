"""Loaders: IDX files (written here), Fashion-MNIST from a folder, digits, label noise, any Dataset."""

import gzip

import numpy as np
import pytest
import torch

from hdopt.dynamics.data import (
    FASHION_MNIST_FILES,
    add_label_noise,
    find_fashion_mnist,
    from_dataset,
    load_data,
    load_digits,
    load_fashion_mnist,
    read_idx,
    write_idx,
)


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"])
def test_idx_round_trip(tmp_path, dtype, name):
    array = (np.arange(24).reshape(2, 3, 4) * 3).astype(dtype)
    path = write_idx(tmp_path / name, array)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype) and np.array_equal(out, array)


def test_idx_header_layout_and_errors(tmp_path):
    raw = bytes([0, 0, 0x08, 1]) + (3).to_bytes(4, "big") + bytes([7, 8, 9])
    (tmp_path / "labels").write_bytes(gzip.compress(raw))
    assert read_idx(tmp_path / "labels").tolist() == [7, 8, 9]
    (tmp_path / "bad").write_bytes(b"PK\x03\x04....")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(raw[:-1])
    with pytest.raises(ValueError, match="holds"):
        read_idx(tmp_path / "short")


def tiny_fashion(folder, n_train=30, n_test=10):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n_train, 28, 28)).astype(np.uint8)
    write_idx(folder / (FASHION_MNIST_FILES["train_x"] + ".gz"), images)
    write_idx(folder / (FASHION_MNIST_FILES["train_y"] + ".gz"), (np.arange(n_train) % 10).astype(np.uint8))
    write_idx(folder / FASHION_MNIST_FILES["test_x"], rng.integers(0, 256, (n_test, 28, 28)).astype(np.uint8))
    write_idx(folder / FASHION_MNIST_FILES["test_y"], (np.arange(n_test) % 10).astype(np.uint8))


def test_fashion_mnist_from_a_folder(tmp_path, monkeypatch):
    tiny_fashion(tmp_path)
    data = load_fashion_mnist(n_train=20, label_noise=0.5, folder=tmp_path)
    assert data.train_x.shape == (20, 784) and data.test_x.shape == (10, 784)
    assert (data.train_y != data.clean_train_y).sum().item() == 10
    assert data.train_x.mean(0).abs().max() < 1e-5  # standardized
    monkeypatch.setenv("HDOPT_FASHION_MNIST", str(tmp_path))
    assert find_fashion_mnist(dirs=()) == tmp_path


def test_missing_fashion_mnist_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("HDOPT_FASHION_MNIST", raising=False)
    monkeypatch.setattr("hdopt.dynamics.data.FASHION_MNIST_DIRS", (str(tmp_path),))
    assert find_fashion_mnist() is None
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist()


@pytest.mark.skipif(find_fashion_mnist() is None, reason="Debian package dataset-fashion-mnist not installed")
def test_installed_fashion_mnist():
    data = load_data("fashion-mnist", n_train=500, seed=0)
    assert data.train_x.shape == (500, 784) and data.test_x.shape == (1000, 784)
    assert set(data.train_y.tolist()) <= set(range(10))


def test_label_noise_flips_exactly_and_to_other_classes():
    labels = torch.arange(100) % 10
    noisy = add_label_noise(labels, 0.2, 10, torch.Generator().manual_seed(0))
    changed = noisy != labels
    assert changed.sum().item() == 20
    assert noisy.min() >= 0 and noisy.max() < 10
    with pytest.raises(ValueError, match="fraction"):
        add_label_noise(labels, 1.5, 10, torch.Generator())


def test_digits_and_dispatch():
    data = load_digits(n_train=200, label_noise=0.1, seed=1)
    assert data.train_x.shape == (200, 64) and data.num_classes == 10 and data.dim == 64
    assert len(data.test_y) == 359
    assert (data.train_y != data.clean_train_y).sum().item() == 20
    again = load_data("digits", 200, 0.1, seed=1)
    assert torch.equal(again.train_x, data.train_x) and torch.equal(again.train_y, data.train_y)
    with pytest.raises(ValueError, match="unknown data set"):
        load_data("cifar10")


def test_any_torch_dataset():
    ds = torch.utils.data.TensorDataset(torch.randn(12, 2, 2), torch.arange(12) % 3)
    data = from_dataset(ds, ds, num_classes=3, label_noise=0.25)
    assert data.train_x.shape == (12, 4)
    assert (data.train_y != data.clean_train_y).sum().item() == 3
