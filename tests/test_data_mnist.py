"""Tests for diffem.data.mnist: IDX parsing, the offline loader, observations."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from diffem.data.mnist import images_to_tensor, load_mnist, make_noisy_observations, read_idx

DATA = Path(__file__).resolve().parents[1].parent / "shared/data"
MNIST = DATA / "mnist"

needs_data = pytest.mark.skipif(
    not (MNIST / "t10k-images-idx3-ubyte.gz").is_file(), reason=f"offline MNIST not found in {MNIST}"
)


@pytest.fixture(scope="module")
def test_set():
    if not (MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"offline MNIST not found in {MNIST}")
    return load_mnist("test", source=MNIST)


@pytest.fixture(scope="module")
def images(test_set):
    return images_to_tensor(test_set.select(range(512)))


def _write_idx(path: Path, magic: int, array: np.ndarray, compress: bool) -> Path:
    header = magic.to_bytes(4, "big") + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def _fake_folder(folder: Path, n: int = 3, compress: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    _write_idx(folder / f"t10k-images-idx3-ubyte{suffix}", 2051, rng.integers(0, 256, (n, 28, 28)), compress)
    _write_idx(folder / f"t10k-labels-idx1-ubyte{suffix}", 2049, np.arange(n) % 10, compress)
    return folder


def test_offline_test_split(test_set):
    assert len(test_set) == 10_000
    assert test_set.column_names == ["image", "label"]
    assert test_set.features["label"].names == [str(i) for i in range(10)]
    first = test_set[0]
    assert first["image"].mode == "L" and first["image"].size == (28, 28)
    assert first["label"] == 7  # the first MNIST test digit is a 7
    counts = np.bincount(np.asarray(test_set["label"][:]), minlength=10)
    assert counts.sum() == 10_000 and counts.min() > 800


@needs_data
def test_default_source_is_offline(monkeypatch):
    monkeypatch.delenv("DIFFEM_MNIST", raising=False)
    ds = load_mnist()
    assert len(ds) == 10_000


@needs_data
def test_train_split_offline_raises(monkeypatch):
    monkeypatch.delenv("DIFFEM_MNIST", raising=False)
    with pytest.raises(FileNotFoundError, match="test split"):
        load_mnist("train")


def test_bad_split_raises():
    with pytest.raises(ValueError, match="split"):
        load_mnist("validation")


def test_images_to_tensor_range(images):
    assert images.shape == (512, 1, 28, 28) and images.dtype == torch.float32
    assert images.min() == -2.0 and images.max() == 2.0
    # pixel p -> 4 p / 255 - 2 exactly
    pixels = (images + 2) * 255 / 4
    assert torch.allclose(pixels, pixels.round(), atol=1e-4)


def test_images_to_tensor_pad(test_set):
    small = test_set.select(range(4))
    x = images_to_tensor(small)
    padded = images_to_tensor(small, pad_to=32)
    assert padded.shape == (4, 1, 32, 32)
    assert torch.equal(padded[..., 2:30, 2:30], x)
    assert (padded[..., :2, :] == -2).all() and (padded[..., :, 30:] == -2).all()
    with pytest.raises(ValueError, match="pad_to"):
        images_to_tensor(small, pad_to=20)


def test_fake_folder_raw_and_gzip(tmp_path):
    for compress in (True, False):
        folder = _fake_folder(tmp_path / str(compress), n=5, compress=compress)
        ds = load_mnist("test", source=folder)
        assert len(ds) == 5 and ds["label"][:] == [0, 1, 2, 3, 4]
        x = images_to_tensor(ds)
        raw = read_idx(next(folder.glob("t10k-images*")), 2051)
        assert torch.allclose(x[:, 0], torch.from_numpy(raw.astype(np.float32)) * 4 / 255 - 2, atol=1e-6)


def test_env_variable(tmp_path, monkeypatch):
    folder = _fake_folder(tmp_path / "env", n=2)
    monkeypatch.setenv("DIFFEM_MNIST", str(folder))
    assert len(load_mnist()) == 2


@pytest.mark.parametrize("compress", [True, False])
def test_truncated_idx_raises(tmp_path, compress):
    folder = _fake_folder(tmp_path, n=4, compress=compress)
    path = next(folder.glob("t10k-images*"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 37])
    with pytest.raises(ValueError, match=path.name):
        load_mnist("test", source=folder)


def test_truncated_real_file_raises(tmp_path):
    if not (MNIST / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip(f"offline MNIST not found in {MNIST}")
    shutil.copy(MNIST / "t10k-images-idx3-ubyte.gz", tmp_path)
    data = (MNIST / "t10k-labels-idx1-ubyte.gz").read_bytes()
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(data[:-100])
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz"):
        load_mnist("test", source=tmp_path)


def test_wrong_magic_raises(tmp_path):
    folder = _fake_folder(tmp_path, n=2)
    # labels written with the image magic number
    path = _write_idx(folder / "t10k-labels-idx1-ubyte.gz", 2051, np.zeros((2, 1, 1)), True)
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\.gz.*expected 2049"):
        load_mnist("test", source=folder)
    with pytest.raises(ValueError, match="magic"):
        read_idx(path, 2049)


def test_extra_bytes_raise(tmp_path):
    path = tmp_path / "labels.idx"
    path.write_bytes((2049).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes(4))
    with pytest.raises(ValueError, match="expected exactly 11"):
        read_idx(path, 2049)


def test_missing_folder_raises(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_mnist("test", source=missing)


@pytest.mark.parametrize("sigma_y", [0.0, -0.1, float("nan")])
def test_sigma_y_raises(sigma_y):
    with pytest.raises(ValueError, match="sigma_y"):
        make_noisy_observations(torch.zeros(2, 1, 28, 28), sigma_y, seed=0)


def test_bad_mask_prob_and_seed_raise():
    x = torch.zeros(2, 1, 28, 28)
    with pytest.raises(ValueError, match="mask_prob"):
        make_noisy_observations(x, 0.1, seed=0, mask_prob=1.0)
    with pytest.raises(ValueError, match="seed"):
        make_noisy_observations(x, 0.1, seed=-1)
    with pytest.raises(ValueError, match="indices"):
        make_noisy_observations(x, 0.1, seed=0, indices=[0])


def test_observations_deterministic_and_batch_independent(images):
    x = images[:64]
    a = make_noisy_observations(x, 0.1, seed=3, mask_prob=0.5)
    b = make_noisy_observations(x, 0.1, seed=3, mask_prob=0.5)
    c = make_noisy_observations(x, 0.1, seed=4, mask_prob=0.5)
    assert torch.equal(a["y"][:], b["y"][:]) and torch.equal(a["mask"][:], b["mask"][:])
    assert not torch.equal(a["y"][:], c["y"][:])
    # observing a slice with its indices gives the same rows
    part = make_noisy_observations(x[10:30], 0.1, seed=3, mask_prob=0.5, indices=range(10, 30))
    assert torch.equal(part["y"][:], a["y"][10:30]) and torch.equal(part["mask"][:], a["mask"][10:30])


def test_observations_carry_no_clean_image(images):
    x = images[:32]
    ds = make_noisy_observations(x, 1e-3, seed=0)
    assert ds.column_names == ["y"]
    masked = make_noisy_observations(x, 1e-3, seed=0, mask_prob=0.25)
    assert sorted(masked.column_names) == ["mask", "y"]
    assert not torch.equal(ds["y"][:], x)


def test_noise_statistics(images):
    sigma_y = 0.1
    y = make_noisy_observations(images, sigma_y, seed=1)["y"][:]
    residual = (y - images).flatten()
    n = residual.numel()
    assert abs(residual.mean().item()) < 5 * sigma_y / n**0.5
    assert abs(residual.std().item() / sigma_y - 1) < 5 / (2 * n) ** 0.5


def test_mask_statistics(images):
    ds = make_noisy_observations(images, 0.1, seed=2, mask_prob=0.25)
    y, mask = ds["y"][:], ds["mask"][:]
    assert mask.shape == (len(images), 1, 28, 28)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    kept = mask.mean().item()
    assert abs(kept - 0.75) < 5 * (0.25 * 0.75 / mask.numel()) ** 0.5
    assert (y[mask == 0] == 0).all()
    assert ((y - images)[mask == 1]).std().item() == pytest.approx(0.1, rel=0.02)
