"""Tests for diffem.data.mri: fastMRI .h5 loader (synthetic files), brain slices, held-out slab."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffem.data.mri as mri
from diffem.data.mri import (
    BRAIN_VOLUMES,
    DEFAULT_MRI_DIR,
    brain_volume_slices,
    images_of,
    load_brain_slices,
    load_fastmri,
    normalize_volume,
    read_fastmri_file,
    resize_images,
    to_magnitude,
)

h5py = pytest.importorskip("h5py")
needs_brains = pytest.mark.skipif(
    not all((DEFAULT_MRI_DIR / f).is_file() for f in BRAIN_VOLUMES.values()),
    reason=f"offline brain volumes not found in {DEFAULT_MRI_DIR}",
)


def write_fastmri(path, slices: int, side: int = 24, seed: int = 0, kspace_width: int | None = None, **overrides):
    """A small file shaped like a fastMRI single-coil knee file (keys, dtypes, attributes)."""
    rng = np.random.default_rng(seed)
    rss = rng.uniform(0, 5, (slices, side, side)).astype(np.float32)
    rss[:, 0, 0] = 0.0
    width = kspace_width or side
    kspace = (rng.standard_normal((slices, 2 * side, width)) + 1j * rng.standard_normal((slices, 2 * side, width)))
    arrays = {"kspace": kspace.astype(np.complex64), "reconstruction_rss": rss, "reconstruction_esc": rss.copy()}
    arrays |= overrides
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            if value is not None:
                f.create_dataset(key, data=value)
        f.attrs["acquisition"] = "CORPD_FBK"
        f.attrs["max"] = float(rss.max())
        f.attrs["norm"] = float(np.linalg.norm(rss))
        f.attrs["patient_id"] = f"synthetic-{seed}"
    return rss


# -- intensities ---------------------------------------------------------------------------------
def test_normalize_volume_maps_zero_and_max_to_the_ends():
    v = np.array([[[0.0, 1.0], [2.0, 4.0]]], dtype=np.float32)
    x = normalize_volume(v)
    assert x.dtype == torch.float32
    torch.testing.assert_close(x, torch.tensor([[[-2.0, -1.0], [0.0, 2.0]]]))
    torch.testing.assert_close(to_magnitude(x), torch.from_numpy(v) / 4)


@pytest.mark.parametrize("bad, match", [
    (np.zeros((1, 2, 2)), "all zero"), (-np.ones((1, 2, 2)), "negative"), (np.ones((2, 2)), r"\(N, H, W\)"),
    (np.full((1, 2, 2), np.nan), "NaN"),
])
def test_normalize_volume_rejects_bad_volumes(bad, match):
    with pytest.raises(ValueError, match=match):
        normalize_volume(bad)


def test_resize_pads_to_a_centred_square_with_the_background():
    images = torch.full((2, 4, 8), 1.0)
    images[:, :, 0] = -2.0  # min is the padding value
    out = resize_images(images, 8)
    assert out.shape == (2, 8, 8)
    assert (out[:, :2] == -2).all() and (out[:, -2:] == -2).all()  # 2 rows of padding above and below
    torch.testing.assert_close(out[:, 2:6], images)
    assert resize_images(torch.rand(3, 32, 32), 8).shape == (3, 8, 8)


# -- fastMRI -------------------------------------------------------------------------------------
def test_fastmri_keeps_slices_10_to_39_normalised_per_volume(tmp_path):
    folder = tmp_path / "knee"
    folder.mkdir()
    a = write_fastmri(folder / "file_a.h5", slices=45, seed=1)
    write_fastmri(folder / "file_b.h5", slices=10, seed=2)  # <= 10 slices: skipped
    c = write_fastmri(folder / "file_c.h5", slices=14, seed=3)
    ds = load_fastmri(folder, size=24, cache_dir=tmp_path / "cache")
    assert set(ds.column_names) == {"x", "volume", "orientation", "slice"}
    assert ds["volume"] == ["file_a"] * 30 + ["file_c"] * 4
    assert ds["slice"] == list(range(10, 40)) + list(range(10, 14))
    x = images_of(ds)
    assert x.shape == (34, 1, 24, 24)
    torch.testing.assert_close(x[:30, 0], normalize_volume(a[10:40]))  # max over the kept slices only
    torch.testing.assert_close(x[30:, 0], normalize_volume(c[10:]))
    assert x[:30].max() == 2 and x.min() == -2


def test_fastmri_resizes_and_caches(tmp_path, monkeypatch):
    folder = tmp_path / "knee"
    folder.mkdir()
    write_fastmri(folder / "a.h5", slices=12, side=32)
    small = images_of(load_fastmri(folder, size=16, cache_dir=tmp_path / "cache"))
    assert small.shape == (2, 1, 16, 16) and small.min() >= -2 and small.max() <= 2

    def forbidden(*args, **kwargs):
        raise AssertionError("rebuilt a cached dataset")

    monkeypatch.setattr(mri, "_fastmri_rows", forbidden)
    again = images_of(load_fastmri(folder, size=16, cache_dir=tmp_path / "cache"))
    torch.testing.assert_close(again, small)


def test_fastmri_errors_name_the_file_and_key(tmp_path):
    folder = tmp_path / "knee"
    folder.mkdir()
    write_fastmri(folder / "nokey.h5", slices=12, reconstruction_rss=None)
    with pytest.raises(ValueError, match=r"nokey\.h5 has no 'reconstruction_rss'"):
        load_fastmri(folder, size=24, cache_dir=tmp_path / "cache")
    bad = tmp_path / "bad.h5"
    write_fastmri(bad, slices=12, reconstruction_rss=np.full((12, 24, 24), np.inf, np.float32))
    with pytest.raises(ValueError, match="NaN or inf"):
        read_fastmri_file(bad)
    flat = tmp_path / "flat.h5"
    write_fastmri(flat, slices=12, kspace=np.ones((24, 24), np.complex64))
    with pytest.raises(ValueError, match=r"expected \(slices, height, width\)"):
        read_fastmri_file(flat, "kspace")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(ValueError, match="not a readable HDF5"):
        read_fastmri_file(tmp_path / "text.h5")
    with pytest.raises(FileNotFoundError):
        load_fastmri(tmp_path / "missing", cache_dir=tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .h5"):
        load_fastmri(tmp_path / "empty", cache_dir=tmp_path / "cache")


# -- brain slices ----------------------------------------------------------------------------------
def _labelled_volume(shape=(40, 44, 50)):
    """An ellipsoid whose intensity is 1 + z (its axial index): every voxel tells its slab."""
    X, Y, Z = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    inside = X**2 + Y**2 + Z**2 < 0.8
    z = np.arange(shape[2])[None, None, :] * np.ones(shape)
    return np.where(inside, 1.0 + z, 0.0).astype(np.float32)


def test_held_out_slab_never_reaches_training():
    volume = _labelled_volume()
    nz, peak = volume.shape[2], volume.max()
    holdout, gap = (0.5, 0.6), 2
    z0, z1 = round(0.5 * nz), round(0.6 * nz)
    train = brain_volume_slices(volume, 16, "train", holdout, gap, min_foreground=0.05)
    test = brain_volume_slices(volume, 16, "test", holdout, gap, min_foreground=0.05)
    assert {o for o, _, _ in train} == {0, 1, 2}  # three orientations
    assert test and all(o == 2 and z0 <= i < z1 for o, i, _ in test)
    for orientation, index, image in train:
        if orientation == 2:
            assert index < z0 - gap or index >= z1 + gap
        else:
            # coronal / sagittal slices come from below the slab: intensities 1 + z with z < z0 - gap
            # (antialiased resizing averages, it never exceeds the largest voxel)
            assert to_magnitude(image).max() * peak <= 1 + (z0 - gap - 1) + 1e-3
    assert all(image.min() >= -2 and image.max() <= 2 for _, _, image in train + test)


def test_near_empty_slices_are_dropped():
    volume = _labelled_volume()
    kept = {i for o, i, _ in brain_volume_slices(volume, 16, "train", (0.9, 1.0), 0, min_foreground=0.15) if o == 2}
    assert 0 not in kept and volume.shape[2] // 3 in kept  # the tip of the ellipsoid is nearly empty


@needs_brains
def test_offline_brains_train_and_test_splits(tmp_path):
    train = load_brain_slices("train", 32, cache_dir=tmp_path)
    test = load_brain_slices("test", 32, cache_dir=tmp_path)
    assert set(train["volume"]) == set(BRAIN_VOLUMES) == set(test["volume"])
    assert set(train["orientation"]) == {0, 1, 2} and set(test["orientation"]) == {2}
    assert len(train) > 500 and 20 <= len(test) <= 60
    x_train, x_test = images_of(train), images_of(test)
    assert x_train.shape[1:] == (1, 32, 32) and x_train.min() >= -2 and x_train.max() <= 2
    # No held-out image is (nearly) a training image.
    distance = torch.cdist(x_test.flatten(1), x_train.flatten(1)).min(1).values
    assert distance.min() > 1.0
    for name in BRAIN_VOLUMES:
        held = sorted(s for v, s in zip(test["volume"], test["slice"]) if v == name)
        assert held == list(range(held[0], held[-1] + 1))  # a contiguous slab
        axial = [s for v, o, s in zip(train["volume"], train["orientation"], train["slice"]) if v == name and o == 2]
        assert not set(axial) & set(range(held[0] - 4, held[-1] + 5))


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        brain_volume_slices(_labelled_volume(), 16, "val")
    with pytest.raises(ValueError, match="holdout"):
        brain_volume_slices(_labelled_volume(), 16, "train", holdout=(0.6, 0.5))
    with pytest.raises(ValueError, match="split"):
        load_brain_slices("validation")
    with pytest.raises(FileNotFoundError):
        load_brain_slices("train", 16, source="/no/such/folder")


def test_complex_fastmri_slices_come_from_kspace_with_the_scanner_phase(tmp_path):
    """data.complex on fastMRI: x = 2 z / max|z| of the centred IFFT of `kspace`, cropped to 320 (here the
    whole, smaller grid), real and imaginary channels; the magnitude dataset of the same files is untouched."""
    from diffem.data.mri import centred_ifft2, complex_magnitude, complex_volume

    folder = tmp_path / "knee"
    folder.mkdir()
    rng = np.random.default_rng(4)
    z = (rng.uniform(0, 1, (12, 24, 24)) * np.exp(1j * rng.uniform(-np.pi, np.pi, (12, 24, 24)))).astype(np.complex64)
    kspace = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(z, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    write_fastmri(folder / "a.h5", slices=12, side=24, kspace=kspace.astype(np.complex64))
    np.testing.assert_allclose(centred_ifft2(kspace), z, atol=1e-5)
    x = images_of(load_fastmri(folder, size=24, cache_dir=tmp_path / "cache", complex_images=True))
    assert x.shape == (2, 2, 24, 24)
    kept = z[10:12]
    expected = 2 * np.stack([kept.real, kept.imag], axis=1) / np.abs(kept).max()
    torch.testing.assert_close(x, torch.from_numpy(expected.astype(np.float32)), rtol=1e-4, atol=1e-4)
    assert float(complex_magnitude(x).max()) == pytest.approx(1.0, abs=1e-5)  # magnitudes in [0, 1]
    assert complex_volume(kspace[10:12], 12).shape == (2, 2, 12, 12)  # resized channel by channel
    assert images_of(load_fastmri(folder, size=24, cache_dir=tmp_path / "cache")).shape == (2, 1, 24, 24)
