"""Behavioural tests of robustune.data: file parsing, splits, sharded batching, augmentation."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from robustune import data
from robustune.data import ArrayDataset, BatchLoader, DataError

SYSTEM_FMNIST = Path("/usr/share/datasets/fashion-mnist")


# ------------------------------------------------------------------------------------ helpers


def write_idx(path: Path, array: np.ndarray, *, magic: int | None = None, gz: bool = False) -> Path:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = 0x0800 + array.ndim if magic is None else magic
    payload = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    if gz:
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


def write_fake_mnist(folder: Path, n_train: int = 40, n_test: int = 20, gz: bool = True) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for stem, arr in arrays.items():
        write_idx(folder / (stem + (".gz" if gz else "")), arr, gz=gz)
    return arrays


def make_dataset(n: int, shape: tuple[int, int, int] = (1, 8, 8)) -> ArrayDataset:
    g = torch.Generator().manual_seed(123)
    images = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    return ArrayDataset(images, torch.arange(n, dtype=torch.int64) % 10)


def collect_indices(loader: BatchLoader) -> list[int]:
    return [i for _, _, idx in loader for i in idx.tolist()]


# ------------------------------------------------------------------------------------ registry


def test_list_and_info() -> None:
    assert data.list_datasets() == ["cifar10", "cifar100", "fashion-mnist", "mnist", "synthetic", "synthetic-cifar"]
    fm = data.dataset_info("fashion-mnist")
    assert fm.input_shape == (1, 28, 28) and fm.num_classes == 10 and fm.default_epsilon == 0.1
    assert not fm.augment and data.dataset_info("cifar10").augment
    assert data.dataset_info("cifar100").num_classes == 100
    assert data.dataset_info("cifar10").default_epsilon == pytest.approx(8 / 255)
    assert data.dataset_info("mnist").default_epsilon == 0.3
    with pytest.raises(DataError, match="imagenet.*cifar10.*synthetic"):
        data.dataset_info("imagenet")


# ------------------------------------------------------------------------------------ IDX files


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    np.testing.assert_array_equal(data.read_idx(write_idx(tmp_path / "i", images, gz=gz), 3), images)
    np.testing.assert_array_equal(data.read_idx(write_idx(tmp_path / "l", labels, gz=gz), 1), labels)


@pytest.mark.parametrize("gz", [True, False])
def test_load_idx_folder(tmp_path: Path, gz: bool) -> None:
    arrays = write_fake_mnist(tmp_path / "fm", gz=gz)
    splits = data.load_dataset("fashion-mnist", data_dir=str(tmp_path / "fm"), val_size=0)
    assert splits.val is None
    assert splits.train.images.shape == (40, 1, 28, 28) and splits.train.images.dtype == torch.uint8
    assert splits.train.labels.dtype == torch.int64
    np.testing.assert_array_equal(splits.train.images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(splits.test.labels.numpy(), arrays["t10k-labels-idx1-ubyte"])


def test_idx_wrong_magic(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "bad-images", np.zeros((2, 28, 28)), magic=0x00000801)
    with pytest.raises(DataError, match="bad-images.*magic") as err:
        data.read_idx(path, 3)
    assert "0x00000803" in str(err.value)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_truncated(tmp_path: Path, gz: bool) -> None:
    full = write_idx(tmp_path / "full", np.ones((4, 28, 28)), gz=gz).read_bytes()
    cut = tmp_path / "cut-file"
    cut.write_bytes(full[: len(full) - 100])
    with pytest.raises(DataError, match="cut-file.*(truncated|corrupt)"):
        data.read_idx(cut, 3)


def test_idx_count_mismatch(tmp_path: Path) -> None:
    folder = tmp_path / "fm"
    write_fake_mnist(folder)
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(39, dtype=np.uint8), gz=True)
    with pytest.raises(DataError, match="40 images.*train-labels-idx1-ubyte.gz.*39 labels"):
        data.load_dataset("fashion-mnist", data_dir=str(folder), val_size=0)


# ------------------------------------------------------------------------------------ locating


def test_missing_explicit_dir(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        data.resolve_data_dir("fashion-mnist", str(missing))
    msg = str(err.value)
    assert str(missing) in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "make data" in msg
    # An explicit folder is authoritative: loading must not fall back to the system copy.
    with pytest.raises(DataError, match="nowhere"):
        data.load_dataset("fashion-mnist", data_dir=str(missing))


def test_missing_everywhere_lists_places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = tmp_path / "env"
    env.mkdir()
    monkeypatch.setenv(data.ENV_DATA_DIR, str(env))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as err:
        data.resolve_data_dir("mnist", None)
    msg = str(err.value)
    assert str(env / "mnist") in msg and str(tmp_path / "data" / "mnist") in msg
    assert "data.data_dir=DIR" in msg


def test_env_var_subfolder_and_direct(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_fake_mnist(tmp_path / "root" / "mnist")
    monkeypatch.setenv(data.ENV_DATA_DIR, str(tmp_path / "root"))
    assert data.resolve_data_dir("mnist", None) == (tmp_path / "root" / "mnist").resolve()
    monkeypatch.setenv(data.ENV_DATA_DIR, str(tmp_path / "root" / "mnist"))
    assert data.resolve_data_dir("mnist", None) == (tmp_path / "root" / "mnist").resolve()
    assert len(data.load_dataset("mnist", val_size=10).train) == 30


def test_cwd_data_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(data.ENV_DATA_DIR, raising=False)
    write_fake_mnist(tmp_path / "data" / "mnist", gz=False)
    monkeypatch.chdir(tmp_path)
    assert data.resolve_data_dir("mnist", None) == (tmp_path / "data" / "mnist").resolve()


# ------------------------------------------------------------------------------------ CIFAR


def write_fake_cifar(root: Path, n_per_batch: int = 10) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        entry = {
            b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
            b"labels": [(i + j) % 10 for j in range(n_per_batch)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    return folder


def test_cifar10_pickles(tmp_path: Path) -> None:
    folder = write_fake_cifar(tmp_path)
    with open(folder / "data_batch_2", "rb") as f:
        batch2 = pickle.load(f)
    for data_dir in (tmp_path, folder):  # the parent or the folder itself
        splits = data.load_dataset("cifar10", data_dir=str(data_dir), val_size=0)
        assert splits.train.images.shape == (50, 3, 32, 32) and splits.test.images.shape == (10, 3, 32, 32)
        assert splits.train.images.dtype == torch.uint8 and splits.train.labels.dtype == torch.int64
        # val_size=0 keeps file order: rows 10..19 are data_batch_2, channel-major (R plane first).
        expected = torch.from_numpy(batch2[b"data"].reshape(10, 3, 32, 32))
        assert torch.equal(splits.train.images[10:20], expected)
        assert splits.train.labels[10:20].tolist() == batch2[b"labels"]
    assert splits.info.augment


def test_cifar_missing_without_torchvision_download(tmp_path: Path) -> None:
    try:
        import torchvision  # noqa: F401  (only checks whether it is importable)
    except ImportError:
        with pytest.raises(DataError, match=r"robustune\[torchvision\]"):
            data.load_dataset("cifar10", data_dir=str(tmp_path / "empty"), download=True)
    with pytest.raises(DataError, match="data.data_dir=DIR"):
        data.load_dataset("cifar10", data_dir=str(tmp_path / "empty"))


# ------------------------------------------------------------------------------------ splits


def test_val_split_properties() -> None:
    a = data.load_dataset("synthetic", val_size=500, seed=0)
    b = data.load_dataset("synthetic", val_size=500, seed=0)
    assert len(a.train) == 2500 and len(a.val) == 500 and len(a.test) == 1000

    # The synthetic images are almost surely unique, so rows identify examples.
    def rows(ds: ArrayDataset) -> set[bytes]:
        return {bytes(r) for r in ds.images.reshape(len(ds), -1).numpy()}

    full = data.load_dataset("synthetic", val_size=0, seed=0)
    assert len(rows(full.train)) == 3000
    assert rows(a.train).isdisjoint(rows(a.val))
    assert rows(a.train) | rows(a.val) == rows(full.train)
    assert rows(a.test) == rows(full.test)  # test is never touched by the val split
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.train.labels, b.train.labels)


def test_val_split_depends_on_seed(tmp_path: Path) -> None:
    folder = tmp_path / "fm"
    write_fake_mnist(folder, n_train=200)
    s0 = data.load_dataset("fashion-mnist", data_dir=str(folder), val_size=50, seed=0)
    s0b = data.load_dataset("fashion-mnist", data_dir=str(folder), val_size=50, seed=0)
    s1 = data.load_dataset("fashion-mnist", data_dir=str(folder), val_size=50, seed=1)
    assert torch.equal(s0.val.images, s0b.val.images)
    assert not torch.equal(s0.val.images, s1.val.images)
    assert torch.equal(s0.test.images, s1.test.images)


def test_subsets() -> None:
    s = data.load_dataset("synthetic", val_size=300, train_subset=1000, test_subset=200)
    assert (len(s.train), len(s.val), len(s.test)) == (1000, 300, 200)
    again = data.load_dataset("synthetic", val_size=300, train_subset=1000, test_subset=200)
    assert torch.equal(s.train.images, again.train.images) and torch.equal(s.test.images, again.test.images)
    # A seeded permutation mixes classes into the test subset.
    assert len(set(s.test.labels.tolist())) == 10
    for bad in (dict(val_size=3000), dict(val_size=-1), dict(train_subset=0), dict(test_subset=-5),
                dict(val_size=100, train_subset=2901), dict(test_subset=1001)):
        with pytest.raises(DataError):
            data.load_dataset("synthetic", **{"val_size": 100, **bad})


# ------------------------------------------------------------------------------------ loader


def test_shard_indices() -> None:
    shards = [data.shard_indices(10, r, 3).tolist() for r in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7, 0], [2, 5, 8, 1]]


def test_loader_covers_every_index_once() -> None:
    ds = make_dataset(103)
    loader = BatchLoader(ds, batch_size=16, shuffle=True, seed=5)
    assert len(loader) == 7
    seen = collect_indices(loader)
    assert sorted(seen) == list(range(103))
    assert seen != list(range(103))
    loader.set_epoch(1)
    epoch1 = collect_indices(loader)
    assert sorted(epoch1) == list(range(103)) and epoch1 != seen
    loader.set_epoch(0)
    assert collect_indices(loader) == seen  # deterministic per (seed, epoch)
    assert collect_indices(BatchLoader(ds, batch_size=16, shuffle=True, seed=6)) != seen


def test_loader_no_shuffle_and_drop_last() -> None:
    ds = make_dataset(10)
    assert collect_indices(BatchLoader(ds, batch_size=4, shuffle=False)) == list(range(10))
    loader = BatchLoader(ds, batch_size=4, shuffle=False, drop_last=True)
    assert len(loader) == 2 and collect_indices(loader) == list(range(8))


def test_loader_sharding_two_ranks() -> None:
    ds = make_dataset(101)
    loaders = [BatchLoader(ds, batch_size=8, shuffle=True, seed=3, rank=r, world_size=2) for r in range(2)]
    for epoch in (0, 1):
        for loader in loaders:
            loader.set_epoch(epoch)
        per_rank = [collect_indices(loader) for loader in loaders]
        batches = [sum(1 for _ in loader) for loader in loaders]
        assert batches[0] == batches[1] == len(loaders[0]) == len(loaders[1]) == 7
        assert len(per_rank[0]) == len(per_rank[1]) == 51
        assert set(per_rank[0]) | set(per_rank[1]) == set(range(101))
        # 101 is odd: exactly one example is repeated to pad rank 1 (wrap-around).
        assert len(set(per_rank[0]) & set(per_rank[1])) == 1
        assert len(set(per_rank[0])) == 51 and len(set(per_rank[1])) == 51


def test_loader_batches_match_indices() -> None:
    ds = make_dataset(50, shape=(3, 6, 6))
    for x, y, idx in BatchLoader(ds, batch_size=7, shuffle=True, seed=1):
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and idx.dtype == torch.int64
        assert x.shape[1:] == (3, 6, 6)
        assert torch.equal(x, ds.images[idx].float() / 255)
        assert torch.equal(y, ds.labels[idx])


def test_augmentation() -> None:
    ds = make_dataset(64, shape=(3, 32, 32))

    def first_epoch(seed: int, epoch: int, augment: bool) -> tuple[torch.Tensor, torch.Tensor]:
        loader = BatchLoader(ds, batch_size=64, shuffle=True, augment=augment, seed=seed)
        loader.set_epoch(epoch)
        x, _, idx = next(iter(loader))
        return x, idx

    x, idx = first_epoch(0, 0, True)
    plain, plain_idx = first_epoch(0, 0, False)
    assert torch.equal(idx, plain_idx)
    assert x.shape == plain.shape == (64, 3, 32, 32)
    assert x.min() >= 0 and x.max() <= 1
    changed = (x != plain).flatten(1).any(1)
    assert changed.float().mean() > 0.8
    assert torch.equal(x, first_epoch(0, 0, True)[0])
    x1, idx1 = first_epoch(0, 1, True)
    order = torch.argsort(idx1)[torch.argsort(torch.argsort(idx))]  # align epoch-1 rows to epoch 0
    assert not torch.equal(x, x1[order])
    # Each augmented image is a shifted (and maybe mirrored) crop of its zero-padded original.
    padded = torch.nn.functional.pad(plain, (4, 4, 4, 4))
    for i in range(8):
        crops = [padded[i, :, dy : dy + 32, dx : dx + 32] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(x[i], c) or torch.equal(x[i], c.flip(-1)) for c in crops)


def test_augmentation_flips_sometimes() -> None:
    # With pad=4 crops alone a mirrored image is impossible for asymmetric content.
    ds = make_dataset(64, shape=(1, 8, 8))
    x, _, idx = next(iter(BatchLoader(ds, batch_size=64, shuffle=False, augment=True)))
    plain = ds.images[idx].float() / 255
    padded = torch.nn.functional.pad(plain, (4, 4, 4, 4))
    flipped = 0
    for i in range(64):
        crops = [padded[i, :, dy : dy + 8, dx : dx + 8] for dy in range(9) for dx in range(9)]
        if not any(torch.equal(x[i], c) for c in crops):
            flipped += 1
    assert 10 < flipped < 54


# ------------------------------------------------------------------------------------ synthetic


@pytest.fixture
def one_torch_thread():
    # Tiny models are ~100x slower with several intra-op threads on a busy CPU (spin-waiting).
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_synthetic_fast_and_learnable(one_torch_thread: None) -> None:
    import time

    # CPU time, not wall time: other jobs on a shared CI machine must not make this flaky.
    start = time.process_time()
    splits = data.load_dataset("synthetic", val_size=500, seed=0)
    assert time.process_time() - start < 1.0  # generation takes ~0.05 s
    assert splits.train.images.shape == (2500, 1, 28, 28)
    assert splits.info.num_classes == 10

    # 200 steps of plain SGD on a linear model (manual updates: torch.optim's first import
    # alone costs seconds).
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    mean, std = splits.info.mean[0], splits.info.std[0]
    loader = BatchLoader(splits.train, batch_size=64, shuffle=True, seed=0)
    steps, epoch = 0, 0
    while steps < 200:
        loader.set_epoch(epoch)
        for x, y, _ in loader:
            loss = torch.nn.functional.cross_entropy(model((x - mean) / std), y)
            model.zero_grad()
            loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.05 * p.grad
            steps += 1
            if steps == 200:
                break
        epoch += 1
    with torch.no_grad():
        x = splits.test.images.float() / 255
        acc = (model((x - mean) / std).argmax(1) == splits.test.labels).float().mean().item()
    assert acc > 0.8, f"synthetic test accuracy {acc:.3f}"


# ------------------------------------------------------------------------------------ real data


def test_real_fashion_mnist() -> None:
    if not (SYSTEM_FMNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(
            f"Fashion-MNIST not found in {SYSTEM_FMNIST}: run `make data` "
            "(or `sudo apt-get install dataset-fashion-mnist`)"
        )
    splits = data.load_dataset("fashion-mnist", data_dir=str(SYSTEM_FMNIST))
    assert splits.train.images.shape == (55000, 1, 28, 28)
    assert splits.val.images.shape == (5000, 1, 28, 28)
    assert splits.test.images.shape == (10000, 1, 28, 28)
    for ds in (splits.train, splits.val, splits.test):
        assert ds.images.dtype == torch.uint8
        assert ds.labels.min() >= 0 and ds.labels.max() <= 9
    counts = torch.bincount(splits.test.labels, minlength=10)
    assert counts.min() >= 800 and counts.max() <= 1200
    val_counts = torch.bincount(splits.val.labels, minlength=10)
    assert val_counts.min() >= 350 and val_counts.max() <= 650
    # The published statistics match what DatasetInfo hands the normalization layer.
    x = splits.train.images.float() / 255
    assert x.mean().item() == pytest.approx(splits.info.mean[0], abs=0.005)
    assert x.std().item() == pytest.approx(splits.info.std[0], abs=0.005)
