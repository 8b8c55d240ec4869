"""Datasets held in memory as uint8 tensors, deterministic splits, and a sharded batch loader.

Everything here is plain torch + numpy: no torchvision at import time (it is only tried, lazily,
when a CIFAR/MNIST download is explicitly requested) and no worker processes, so that iteration
order and the per-example indices (`idx`) depend only on (seed, epoch, rank, world_size).
"""

from __future__ import annotations

import functools
import gzip
import importlib
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DataError",
    "DatasetInfo",
    "ArrayDataset",
    "DataSplits",
    "BatchLoader",
    "list_datasets",
    "dataset_info",
    "resolve_data_dir",
    "load_dataset",
    "read_idx",
    "shard_indices",
    "ENV_DATA_DIR",
]

ENV_DATA_DIR = "ROBUSTUNE_DATA_DIR"


class DataError(ValueError):
    """A user-facing data problem; the message names the path/dataset and says how to fix it."""


# --------------------------------------------------------------------------------------------
# Dataset descriptions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]  # per channel, of pixel values in [0, 1]
    std: tuple[float, ...]
    default_epsilon: float  # L-inf budget on the [0, 1] pixel scale
    augment: bool  # pad-4 random crop + horizontal flip during training


_INFOS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo(
        "cifar10", 10, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616), 8 / 255, True
    ),
    "cifar100": DatasetInfo(
        "cifar100", 100, (3, 32, 32), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 8 / 255, True
    ),
    "fashion-mnist": DatasetInfo("fashion-mnist", 10, (1, 28, 28), (0.2860,), (0.3530,), 0.1, False),
    "mnist": DatasetInfo("mnist", 10, (1, 28, 28), (0.1307,), (0.3081,), 0.3, False),
    # Measured on the generator below (seed 0); other seeds differ by < 0.01.
    "synthetic": DatasetInfo("synthetic", 10, (1, 28, 28), (0.5000,), (0.2668,), 0.05, False),
    # CIFAR-10's shape and size (50k/10k), for timing models and defenses where no CIFAR files are at hand.
    "synthetic-cifar": DatasetInfo("synthetic-cifar", 10, (3, 32, 32), (0.5000,) * 3, (0.2668,) * 3, 8 / 255, False),
}
# Generated in memory: (training, test) examples.
_SYNTHETIC_SIZES = {"synthetic": (3000, 1000), "synthetic-cifar": (50000, 10000)}


def list_datasets() -> list[str]:
    return sorted(_INFOS)


def dataset_info(name: str) -> DatasetInfo:
    try:
        return _INFOS[name]
    except KeyError:
        raise DataError(
            f"unknown dataset {name!r}; valid datasets are: {', '.join(list_datasets())}"
        ) from None


@dataclass
class ArrayDataset:
    images: torch.Tensor  # uint8, (N, C, H, W), CPU
    labels: torch.Tensor  # int64, (N,)

    def __post_init__(self) -> None:
        # Catch shape/dtype mistakes here rather than deep inside a training step.
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(
                f"ArrayDataset.images must be a uint8 (N, C, H, W) tensor, got "
                f"{self.images.dtype} with shape {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise DataError(
                f"ArrayDataset.labels must be an int64 (N,) tensor, got "
                f"{self.labels.dtype} with shape {tuple(self.labels.shape)}"
            )
        if self.images.shape[0] != self.labels.shape[0]:
            raise DataError(
                f"ArrayDataset has {self.images.shape[0]} images but {self.labels.shape[0]} labels"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class DataSplits:
    info: DatasetInfo
    train: ArrayDataset
    val: ArrayDataset | None  # None when val_size == 0
    test: ArrayDataset


# --------------------------------------------------------------------------------------------
# Locating files
# --------------------------------------------------------------------------------------------

_IDX_STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_CIFAR_FILES = {
    "cifar10": tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",),
    "cifar100": ("train", "test"),
}
# Layout torchvision uses when it downloads MNIST-like datasets into a root folder.
_TORCHVISION_IDX_FOLDERS = {"mnist": "MNIST/raw", "fashion-mnist": "FashionMNIST/raw"}
# Installed by the Debian package `dataset-fashion-mnist`.
_SYSTEM_DIRS: dict[str, Path] = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist")}


def _repo_root() -> Path | None:
    # Only when running from a source checkout (platform/robustune/data.py), not an installed wheel.
    platform_dir = Path(__file__).resolve().parent.parent
    return platform_dir.parent if platform_dir.name == "platform" else None


def _idx_file(folder: Path, stem: str) -> Path | None:
    # Prefer the uncompressed file: it loads faster when both are present.
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _has_files(name: str, folder: Path) -> bool:
    if not folder.is_dir():
        return False
    if name in _CIFAR_FOLDERS:
        return all((folder / f).is_file() for f in _CIFAR_FILES[name])
    return all(_idx_file(folder, stem) is not None for stem in _IDX_STEMS)


def _layouts(name: str, folder: Path) -> list[Path]:
    """`folder` itself, then the sub-folder the standard archives / torchvision create in it."""
    if name in _CIFAR_FOLDERS:
        return [folder, folder / _CIFAR_FOLDERS[name]]
    if name in _TORCHVISION_IDX_FOLDERS:
        return [folder, folder / _TORCHVISION_IDX_FOLDERS[name]]
    return [folder]


def _how_to_get(name: str) -> str:
    if name == "fashion-mnist":
        return (
            "To fix: `sudo apt-get install dataset-fashion-mnist`, or `make data` (extracts the "
            "Debian package into ./data without root), or pass --data-dir / set "
            f"{ENV_DATA_DIR} to a folder holding the four *-ubyte.gz files."
        )
    if name in _CIFAR_FOLDERS:
        files = ", ".join(_CIFAR_FILES[name])
        return (
            f"To fix: place the standard python-version folder {_CIFAR_FOLDERS[name]}/ ({files}) "
            "in DIR and pass --set data.data_dir=DIR (or set "
            f"{ENV_DATA_DIR}), or enable download with torchvision installed "
            "(pip install 'robustune[torchvision]')."
        )
    files = ", ".join(f"{s}[.gz]" for s in _IDX_STEMS)
    return (
        f"To fix: place the standard files ({files}) in DIR and pass --set data.data_dir=DIR "
        f"(or set {ENV_DATA_DIR})."
    )


def _search(name: str, data_dir: str | os.PathLike[str] | None) -> tuple[Path | None, list[Path]]:
    """Return (folder with the files or None, folders searched in order)."""
    if name not in _INFOS:
        dataset_info(name)  # raises the unknown-dataset error
    if data_dir is not None:
        # An explicit folder is authoritative: silently using data from elsewhere would surprise.
        base = Path(data_dir).expanduser()
        candidates = _layouts(name, base) + _layouts(name, base / name)
    else:
        candidates = []
        env = os.environ.get(ENV_DATA_DIR)
        if env:
            base = Path(env).expanduser()
            candidates += _layouts(name, base / name) + _layouts(name, base)
        if name in _SYSTEM_DIRS:
            candidates.append(_SYSTEM_DIRS[name])
        candidates += _layouts(name, Path.cwd() / "data" / name)
        root = _repo_root()
        if root is not None:
            candidates += _layouts(name, root / "data" / name)
    searched: list[Path] = []
    for folder in candidates:
        folder = folder.resolve() if folder.exists() else folder.absolute()
        if folder in searched:
            continue
        searched.append(folder)
        if _has_files(name, folder):
            return folder, searched
    return None, searched


def resolve_data_dir(name: str, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Folder that directly contains `name`'s files.

    Search order: the explicit `data_dir` (authoritative when given: DIR itself, then DIR/<name>);
    else $ROBUSTUNE_DATA_DIR/<name>, $ROBUSTUNE_DATA_DIR; /usr/share/datasets/fashion-mnist
    (fashion-mnist only); ./data/<name>; <repo root>/data/<name>. For CIFAR each place may be the
    `cifar-10-batches-py` / `cifar-100-python` folder itself or its parent.
    """
    if name in _SYNTHETIC_SIZES:
        raise DataError(f"dataset {name!r} is generated in memory and has no data folder")
    found, searched = _search(name, data_dir)
    if found is None:
        places = "\n  ".join(str(p) for p in searched)
        raise DataError(
            f"dataset {name!r} not found; searched (in order):\n  {places}\n{_how_to_get(name)}"
        )
    return found


def check_available(name: str, data_dir: str | os.PathLike[str] | None = None, download: bool = False) -> None:
    """Fail fast (DataError) when a dataset's files are missing and will not be downloaded.

    Called before any run starts, so a wrong --data-dir costs seconds, not a Ray start-up."""
    if name in _SYNTHETIC_SIZES or download:
        return
    folder = resolve_data_dir(name, data_dir)
    if name not in _CIFAR_FOLDERS:  # IDX: headers and sizes only, so a wrong or truncated file fails here too
        info = dataset_info(name)
        for split in ("train", "t10k"):
            images = _check_idx_header(_idx_file(folder, f"{split}-images-idx3-ubyte"), 3)
            labels = _check_idx_header(_idx_file(folder, f"{split}-labels-idx1-ubyte"), 1)
            if images[0] != labels[0] or images[1:] != info.input_shape[1:]:
                raise DataError(f"{folder}: {split} files hold {images[0]} images of {images[1]}x{images[2]} and "
                                f"{labels[0]} labels; {name} needs as many labels as images of "
                                f"{info.input_shape[1]}x{info.input_shape[2]}; wrong files, replace them")


def _check_idx_header(path: Path, expected_ndim: int) -> tuple[int, ...]:
    """The dims of an IDX file from its header, checking the magic number and the file's length without
    reading the data (a gzip file's length is its trailer's uncompressed size)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
            f.seek(max(0, size - 4))
            trailer = f.read(4)
        with (gzip.open if gzipped else open)(path, "rb") as f:
            head = f.read(4 + 4 * expected_ndim)
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {path}: {e}; the file is corrupt or truncated, replace it") from e
    expected_magic = 0x0800 + expected_ndim
    magic = int.from_bytes(head[:4], "big") if len(head) >= 4 else None
    if magic != expected_magic:
        found = "no header" if magic is None else f"magic number 0x{magic:08x}"
        raise DataError(f"IDX file {path} has {found}, expected magic 0x{expected_magic:08x} (unsigned-byte "
                        f"data with {expected_ndim} dimensions); wrong or corrupt file, replace it")
    if len(head) < 4 + 4 * expected_ndim:
        raise DataError(f"IDX file {path} is truncated inside its header; replace it")
    dims = tuple(int(d) for d in np.frombuffer(head, dtype=">u4", count=expected_ndim, offset=4))
    expected_len = 4 + 4 * expected_ndim + math.prod(dims)
    if gzipped and int.from_bytes(trailer, "little") != expected_len % 2**32:
        raise DataError(f"IDX file {path} is truncated or corrupt: header dims {dims} need {expected_len} bytes, "
                        f"its gzip trailer says {int.from_bytes(trailer, 'little')}; replace it")
    if not gzipped and size != expected_len:
        what = "truncated" if size < expected_len else "longer than its header says"
        raise DataError(f"IDX file {path} is {what}: header dims {dims} need {expected_len} bytes, "
                        f"the file has {size}; replace it")
    return dims


# --------------------------------------------------------------------------------------------
# File formats
# --------------------------------------------------------------------------------------------


def read_idx(path: str | os.PathLike[str], expected_ndim: int) -> np.ndarray:
    """Parse an unsigned-byte IDX file (gzip-compressed or plain) into a uint8 array.

    Magic number is 0x0000 08 <ndim> (0x00000803 for images, 0x00000801 for labels), followed by
    ndim big-endian uint32 dimensions and the data.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":  # sniff gzip instead of trusting the file name
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(
            f"cannot read IDX file {path}: {e}; the file is corrupt or truncated, replace it"
        ) from e
    expected_magic = 0x0800 + expected_ndim
    if len(raw) < 4:
        raise DataError(f"IDX file {path} is truncated: {len(raw)} bytes, no header; replace it")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise DataError(
            f"IDX file {path} has magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
            f"(unsigned-byte data with {expected_ndim} dimensions); wrong or corrupt file, replace it"
        )
    header = 4 + 4 * expected_ndim
    if len(raw) < header:
        raise DataError(f"IDX file {path} is truncated inside its header; replace it")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=expected_ndim, offset=4))
    expected_len = header + math.prod(dims)
    if len(raw) != expected_len:
        what = "truncated" if len(raw) < expected_len else "longer than its header says"
        raise DataError(
            f"IDX file {path} is {what}: header dims {dims} need {expected_len} bytes, "
            f"file has {len(raw)}; replace it"
        )
    # bytearray gives a writable buffer so torch.from_numpy does not warn.
    return np.frombuffer(bytearray(raw[header:]), dtype=np.uint8).reshape(dims)


def _load_idx_pair(folder: Path, split: str, info: DatasetInfo) -> ArrayDataset:
    img_path = _idx_file(folder, f"{split}-images-idx3-ubyte")
    lbl_path = _idx_file(folder, f"{split}-labels-idx1-ubyte")
    if img_path is None or lbl_path is None:
        raise DataError(f"{split} IDX files missing in {folder}. {_how_to_get(info.name)}")
    images = read_idx(img_path, 3)
    labels = read_idx(lbl_path, 1)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{img_path} has {images.shape[0]} images but {lbl_path} has {labels.shape[0]} "
            "labels; the files do not belong together, replace them"
        )
    if images.shape[1:] != info.input_shape[1:]:
        raise DataError(
            f"{img_path} holds {images.shape[1]}x{images.shape[2]} images, {info.name} needs "
            f"{info.input_shape[1]}x{info.input_shape[2]}; wrong file, replace it"
        )
    _check_labels(labels, info, lbl_path)
    return ArrayDataset(
        torch.from_numpy(images).unsqueeze(1).contiguous(),
        torch.from_numpy(labels.astype(np.int64)),
    )


def _check_labels(labels: np.ndarray, info: DatasetInfo, path: Path) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= info.num_classes):
        raise DataError(
            f"{path} has labels in [{labels.min()}, {labels.max()}], {info.name} needs "
            f"0..{info.num_classes - 1}; wrong file, replace it"
        )


def _load_cifar_file(path: Path, info: DatasetInfo) -> tuple[np.ndarray, np.ndarray]:
    label_key = b"labels" if info.name == "cifar10" else b"fine_labels"
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
        data = np.asarray(entry[b"data"], dtype=np.uint8)
        labels = np.asarray(entry[label_key], dtype=np.int64)
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as e:
        raise DataError(
            f"cannot read {info.name} batch {path}: {type(e).__name__}: {e}; expected the "
            f"python-version pickle with keys b'data' and {label_key!r}; replace the file"
        ) from e
    c, h, w = info.input_shape
    if data.ndim != 2 or data.shape[1] != c * h * w or data.shape[0] != labels.shape[0]:
        raise DataError(
            f"{path}: data has shape {data.shape} and {labels.shape[0]} labels, expected "
            f"(N, {c * h * w}) with N labels; replace the file"
        )
    _check_labels(labels, info, path)
    return data.reshape(-1, c, h, w), labels


def _load_cifar(folder: Path, info: DatasetInfo) -> tuple[ArrayDataset, ArrayDataset]:
    *train_files, test_file = _CIFAR_FILES[info.name]
    parts = [_load_cifar_file(folder / f, info) for f in train_files]
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    test_x, test_y = _load_cifar_file(folder / test_file, info)
    return (
        ArrayDataset(torch.from_numpy(train_x), torch.from_numpy(train_y)),
        ArrayDataset(torch.from_numpy(test_x), torch.from_numpy(test_y)),
    )


def _download(name: str, data_dir: str | os.PathLike[str] | None) -> Path:
    """Download with torchvision (imported only here) and return the folder with the files."""
    if data_dir is not None:
        root = Path(data_dir).expanduser()
    elif os.environ.get(ENV_DATA_DIR):
        root = Path(os.environ[ENV_DATA_DIR]).expanduser() / name
    else:
        root = (_repo_root() or Path.cwd()) / "data" / name
    try:  # optional dependency, imported only when a download is asked for
        torchvision = importlib.import_module("torchvision")
    except ImportError as e:
        raise DataError(
            f"dataset {name!r} is not on disk and download needs torchvision, which is not "
            f"importable ({e}). Install the `robustune[torchvision]` extra "
            f"(pip install 'robustune[torchvision]'), or place the files manually in {root} "
            "(or another folder passed with --set data.data_dir=DIR)."
        ) from e
    cls = {
        "cifar10": "CIFAR10",
        "cifar100": "CIFAR100",
        "mnist": "MNIST",
        "fashion-mnist": "FashionMNIST",
    }[name]
    try:
        for train in (True, False):
            getattr(torchvision.datasets, cls)(str(root), train=train, download=True)
    except Exception as e:  # network errors, checksum errors, ...: all end up as a DataError
        raise DataError(
            f"downloading {name!r} into {root} failed: {type(e).__name__}: {e}. {_how_to_get(name)}"
        ) from e
    found, searched = _search(name, root)
    if found is None:
        raise DataError(f"download of {name!r} finished but no files found in {searched}")
    return found


# --------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------


def _make_synthetic(seed: int, shape: tuple[int, int, int] = (1, 28, 28), n_train: int = 3000,
                    n_test: int = 1000) -> tuple[ArrayDataset, ArrayDataset]:
    """10 classes, each a fixed random smooth template of `shape`; examples = template + noise."""
    g = torch.Generator().manual_seed(_mix_seed(seed, 0x5EED))
    channels, height, width = shape
    # Upsampled noise at a quarter of the size gives blob-like templates that a small CNN separates.
    coarse = torch.rand(10, channels, height // 4, width // 4, generator=g)
    templates = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    templates = 0.15 + 0.7 * templates  # keep away from 0/1 so clipping rarely bites

    def sample(n: int) -> ArrayDataset:
        labels = torch.randint(0, 10, (n,), generator=g)
        x = templates[labels] + 0.25 * torch.randn(n, *shape, generator=g)
        images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
        return ArrayDataset(images, labels.to(torch.int64))

    return sample(n_train), sample(n_test)


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------

# Seed of the test-subset permutation. Fixed (independent of `seed`) so that every run, trial and
# training seed that asks for the same test_subset is evaluated on exactly the same examples.
TEST_SUBSET_SEED = 0


def _mix_seed(*parts: int) -> int:
    """Combine integers into one 63-bit torch seed without collisions like seed+epoch has."""
    state = np.random.SeedSequence([p % 2**64 for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _randperm(n: int, *seed_parts: int) -> torch.Tensor:
    # Always on CPU with an explicit generator: identical on every machine, rank and device.
    return torch.randperm(n, generator=torch.Generator().manual_seed(_mix_seed(*seed_parts)))


def _take(ds: ArrayDataset, idx: torch.Tensor) -> ArrayDataset:
    return ArrayDataset(ds.images[idx].contiguous(), ds.labels[idx].contiguous())


def _check_subset(value: int | None, what: str, available: int, name: str) -> None:
    if value is None:
        return
    if value <= 0:
        raise DataError(f"{what}={value} for {name!r}: must be a positive number of examples or None")
    if value > available:
        raise DataError(
            f"{what}={value} for {name!r}, but only {available} examples are available; "
            f"lower {what} (or val_size) or leave it unset"
        )


def _split(
    info: DatasetInfo,
    train_full: ArrayDataset,
    test_full: ArrayDataset,
    *,
    val_size: int,
    train_subset: int | None,
    test_subset: int | None,
    seed: int,
) -> DataSplits:
    n = len(train_full)
    if val_size < 0 or val_size >= n:
        raise DataError(
            f"val_size={val_size} for {info.name!r}, which has {n} training examples; "
            f"use 0 <= val_size < {n}"
        )
    _check_subset(train_subset, "train_subset", n - val_size, info.name)
    _check_subset(test_subset, "test_subset", len(test_full), info.name)

    # val is carved out of the training data only; the test set is never part of this permutation.
    perm = _randperm(n, seed, 0x0A1)
    val_idx, train_idx = perm[:val_size], perm[val_size:]
    if train_subset is not None:
        train_idx = train_idx[:train_subset]
    # Sorting keeps the original file order inside each split (the subset itself stays random).
    train = _take(train_full, train_idx.sort().values)
    val = _take(train_full, val_idx.sort().values) if val_size > 0 else None

    test = test_full
    if test_subset is not None:
        test_idx = _randperm(len(test_full), TEST_SUBSET_SEED, 0x7E57)[:test_subset]
        test = _take(test_full, test_idx.sort().values)
    return DataSplits(info=info, train=train, val=val, test=test)


@functools.lru_cache(maxsize=4)
def _read_files(name: str, folder: Path) -> tuple[ArrayDataset, ArrayDataset]:
    """The decoded training and test files, once per process: a reused Ray process (a Tune trial actor that
    runs trial after trial) decodes the gz IDX files once, not for every run. Splits index into copies."""
    info = dataset_info(name)
    if name in _CIFAR_FOLDERS:
        return _load_cifar(folder, info)
    return _load_idx_pair(folder, "train", info), _load_idx_pair(folder, "t10k", info)


def load_dataset(
    name: str,
    *,
    data_dir: str | None = None,
    val_size: int = 5000,
    train_subset: int | None = None,
    test_subset: int | None = None,
    seed: int = 0,
    download: bool = False,
) -> DataSplits:
    """Load `name` into memory and split it.

    - val: `val_size` examples drawn by a `seed`-permutation of the TRAINING data (never test).
    - train: the remaining training examples; `train_subset` keeps the first k of them in that
      same seeded permutation (so it is a random, class-mixed subset).
    - test: the full test set, or with `test_subset` the first k of a permutation with the fixed
      seed TEST_SUBSET_SEED, so all runs/seeds evaluate on the same examples.
    Within each split examples keep their original file order.
    """
    info = dataset_info(name)
    if name in _SYNTHETIC_SIZES:
        train_full, test_full = _make_synthetic(seed, info.input_shape, *_SYNTHETIC_SIZES[name])
    else:
        found, _ = _search(name, data_dir)
        if found is None:
            folder = _download(name, data_dir) if download else resolve_data_dir(name, data_dir)
        else:
            folder = found
        train_full, test_full = _read_files(name, folder.resolve())
    return _split(
        info,
        train_full,
        test_full,
        val_size=val_size,
        train_subset=train_subset,
        test_subset=test_subset,
        seed=seed,
    )


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


def shard_indices(n: int, rank: int, world_size: int) -> torch.Tensor:
    """Positions 0..n-1 that `rank` takes, like torch's DistributedSampler (drop_last=False).

    The list is padded by wrapping around to ceil(n / world_size) * world_size entries, then rank r
    takes entries r, r + W, r + 2W, ...: every rank gets the same count, so all ranks run the same
    number of batches (and collective ops).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if n <= 0:
        raise ValueError(f"cannot shard an empty dataset (n={n})")
    total = math.ceil(n / world_size) * world_size
    return (torch.arange(total) % n)[rank::world_size]


def _augment(x: torch.Tensor, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Per-example random crop from a zero-padded image + random horizontal flip, one gather."""
    b, c, h, w = x.shape
    # Random numbers come from a CPU generator so results do not depend on the device.
    oy = torch.randint(0, 2 * pad + 1, (b, 1), generator=g).to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (b, 1), generator=g).to(x.device)
    flip = (torch.rand(b, 1, generator=g) < 0.5).to(x.device)
    padded = F.pad(x, (pad, pad, pad, pad))  # zeros = black border
    rows = oy + torch.arange(h, device=x.device)  # (B, H)
    ar = torch.arange(w, device=x.device)
    cols = ox + torch.where(flip, w - 1 - ar, ar)  # (B, W), flip folded into the column index
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


class BatchLoader:
    """Iterates (x, y, idx) batches of an ArrayDataset held in memory.

    x: float32 in [0, 1], (B, C, H, W); y: int64 labels; idx: int64 positions of the examples in
    `dataset` (stable across epochs and ranks, for per-example buffers). All on `device`.
    The order depends only on (seed, epoch) and the shard on (rank, world_size); call
    set_epoch(e) before each epoch to get a new order (as with DistributedSampler).
    """

    def __init__(
        self,
        dataset: ArrayDataset,
        *,
        batch_size: int,
        shuffle: bool,
        augment: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        device: torch.device | str = "cpu",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(dataset) == 0:
            raise DataError("BatchLoader got an empty dataset")
        self.device = torch.device(device)
        # Whole dataset moved once: the datasets here are small (CIFAR train is 150 MB as uint8).
        self.images = dataset.images.to(self.device)
        self.labels = dataset.labels.to(self.device)
        self.n = len(dataset)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        self._positions = shard_indices(self.n, rank, world_size)  # validates rank/world_size
        self.num_samples = int(self._positions.numel())  # same on every rank

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def epoch_indices(self) -> torch.Tensor:
        """Dataset indices this rank visits this epoch, in order (CPU, int64)."""
        order = _randperm(self.n, self.seed, self.epoch) if self.shuffle else torch.arange(self.n)
        return order[self._positions]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        indices = self.epoch_indices().to(self.device)
        g = torch.Generator().manual_seed(_mix_seed(self.seed, self.epoch, self.rank, 0xA06))
        for i in range(len(self)):
            idx = indices[i * self.batch_size : (i + 1) * self.batch_size]
            x = self.images[idx]
            if self.augment:
                x = _augment(x, g)
            yield x.float().div_(255), self.labels[idx], idx
