"""Tests for diffem.data.cifar10: offline loader, pixel mapping, masked observations."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import diffem.data.cifar10 as cifar10_module
from diffem.data.cifar10 import (
    CLASS_NAMES,
    corrupt,
    from_uint8,
    images_to_tensor,
    load_cifar10,
    make_observations,
    to_uint8,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared/data"
ARCHIVE = DATA / "cifar10" / "cifar10-jpg.tar.gz"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def splits(cache):
    if not ARCHIVE.is_file():
        pytest.skip(f"offline CIFAR-10 archive not found: {ARCHIVE}")
    return load_cifar10("train", source=ARCHIVE, cache_dir=cache), load_cifar10("test", source=ARCHIVE, cache_dir=cache)


def _images(n: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g) * 4 - 2


def _jpeg(seed: int) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=75)
    return buffer.getvalue()


# --- loader ---------------------------------------------------------------------------


def test_offline_sizes_labels_and_classes(splits):
    train, test = splits
    assert len(train) == 50_000 and len(test) == 10_000
    assert set(train.column_names) == {"img", "label"}
    assert train.features["label"].names == list(CLASS_NAMES)
    assert list(CLASS_NAMES) == sorted(CLASS_NAMES)
    assert Counter(train["label"]) == {k: 5000 for k in range(10)}
    assert Counter(test["label"]) == {k: 1000 for k in range(10)}
    image = train[0]["img"]
    assert isinstance(image, Image.Image) and image.size == (32, 32) and image.mode == "RGB"


def test_second_load_hits_the_cache(splits, cache, monkeypatch):
    def rebuild(*args, **kwargs):
        raise AssertionError("the archive was decoded again instead of loading the cache")

    monkeypatch.setattr(cifar10_module, "_build", rebuild)
    again = load_cifar10("test", source=ARCHIVE, cache_dir=cache)
    assert len(again) == 10_000 and again[123]["label"] == splits[1][123]["label"]
    assert len(list((cache / "cifar10").iterdir())) == 1


def test_images_to_tensor_range_and_channel_means(splits):
    train = splits[0]
    x = images_to_tensor(train.select(range(0, 50_000, 25)))  # 2,000 images, every class
    assert x.shape == (2000, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -2 and x.max() <= 2
    means = ((x + 2) / 4).mean(dim=(0, 2, 3))
    assert torch.allclose(means, torch.tensor([0.4913, 0.4821, 0.4465]), atol=0.02)


def test_split_and_missing_source_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="split"):
        load_cifar10("validation", source=tmp_path)
    missing = tmp_path / "nope" / "cifar10-jpg.tar.gz"
    with pytest.raises(FileNotFoundError, match="cifar10-jpg.tar.gz"):
        load_cifar10("train", source=missing, cache_dir=tmp_path)
    monkeypatch.setenv("DIFFEM_CIFAR10", str(missing))
    with pytest.raises(FileNotFoundError, match="DIFFEM_CIFAR10"):
        load_cifar10("train", cache_dir=tmp_path)


def test_folder_source_and_missing_split(tmp_path):
    root = tmp_path / "cifar"
    for cls in ("cat", "airplane"):
        (root / "train" / cls).mkdir(parents=True)
        for i in range(2):
            (root / "train" / cls / f"{i:04d}.jpg").write_bytes(_jpeg(i))
    ds = load_cifar10("train", source=root, cache_dir=tmp_path / "cache")
    assert len(ds) == 4 and ds["label"] == [0, 0, 3, 3]  # airplane before cat: standard label ids
    with pytest.raises(FileNotFoundError, match="test"):
        load_cifar10("test", source=root, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_corrupt_jpeg_names_the_file(tmp_path, kind):
    folder = tmp_path / "cifar" / "train" / "dog"
    folder.mkdir(parents=True)
    (folder / "0000.jpg").write_bytes(_jpeg(0))
    bad = b"this is not a JPEG file" if kind == "garbage" else _jpeg(1)[:300]
    (folder / "0001.jpg").write_bytes(bad)
    with pytest.raises(ValueError, match=r"corrupt image file .*0001\.jpg"):
        load_cifar10("train", source=tmp_path / "cifar", cache_dir=tmp_path / "cache")


# --- pixels <-> [-2, 2] ---------------------------------------------------------------


def test_uint8_round_trip_and_clamp():
    pixels = torch.arange(256, dtype=torch.uint8)
    x = from_uint8(pixels)
    assert x[0] == -2 and x[-1] == 2
    assert torch.equal(to_uint8(x), pixels)
    assert to_uint8(torch.tensor([-3.0, 2.5])).tolist() == [0, 255]
    with pytest.raises(ValueError, match="x"):
        to_uint8(torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="pixels"):
        from_uint8(torch.zeros(2))


# --- corruption -----------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.25, 0.5, 0.75])
def test_corrupt_drops_fraction_and_keeps_observed_pixels(p):
    x = _images(64)
    y, mask = corrupt(x, p, noise_std=1e-3, seed=3)
    assert mask.shape == (64, 1, 32, 32) and mask.dtype == torch.bool
    assert y.shape == x.shape and y.dtype == torch.float32
    dropped = 1 - mask.float().mean().item()
    assert abs(dropped - p) < 0.01  # 65,536 Bernoulli draws: sd ~ 0.002
    observed = mask.expand_as(x)
    assert torch.all(y[~observed] == 0)
    assert (y - x)[observed].abs().max() < 6e-3  # noise 1e-3
    assert 0.5e-3 < (y - x)[observed].std() < 1.5e-3


def test_corrupt_is_deterministic_and_batch_independent():
    x = _images(10)
    y1, m1 = corrupt(x, 0.5, seed=7)
    y2, m2 = corrupt(x, 0.5, seed=7)
    assert torch.equal(y1, y2) and torch.equal(m1, m2)
    y3, m3 = corrupt(x, 0.5, seed=8)
    assert not torch.equal(m1, m3)
    y_part, m_part = corrupt(x[4:9], 0.5, seed=7, indices=range(4, 9))
    assert torch.equal(y_part, y1[4:9]) and torch.equal(m_part, m1[4:9])


@pytest.mark.parametrize("p", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_corrupt_rejects_p_outside_open_interval(p):
    with pytest.raises(ValueError, match="`p`"):
        corrupt(_images(2), p)


def test_corrupt_rejects_bad_inputs():
    with pytest.raises(ValueError, match="noise_std"):
        corrupt(_images(2), 0.5, noise_std=-1.0)
    with pytest.raises(ValueError, match="seed"):
        corrupt(_images(2), 0.5, seed=-1)
    with pytest.raises(ValueError, match="`x`"):
        corrupt(torch.zeros(3, 32, 32), 0.5)
    with pytest.raises(ValueError, match="indices"):
        corrupt(_images(2), 0.5, indices=[0])


def test_make_observations_has_no_ground_truth(tmp_path):
    x = _images(6)
    ds = make_observations(x, 0.5, seed=1, path=tmp_path / "obs")
    assert set(ds.column_names) == {"y", "mask"}
    row = ds[0]
    assert row["y"].shape == (3, 32, 32) and row["y"].dtype == torch.float32
    assert row["mask"].shape == (1, 32, 32) and row["mask"].dtype == torch.bool
    y, mask = corrupt(x, 0.5, seed=1)
    assert torch.equal(ds["y"][:], y) and torch.equal(ds["mask"][:], mask)
    import datasets

    reloaded = datasets.load_from_disk(str(tmp_path / "obs"))
    assert set(reloaded.column_names) == {"y", "mask"}
    assert not any(name in reloaded.column_names for name in ("img", "x", "image", "label"))


def test_make_observations_from_a_dataset(splits):
    subset = splits[1].select(range(4))
    ds = make_observations(subset, 0.25, seed=0)
    y, mask = corrupt(images_to_tensor(subset), 0.25, seed=0)
    assert torch.equal(ds["y"][:], y) and torch.equal(ds["mask"][:], mask)
