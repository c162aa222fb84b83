r"""CIFAR-10 images and their masked, noisy observations.

Images live in [-2, 2] inside diffem: pixels :math:`p \in \{0, \dots, 255\}` map to

.. math:: x = 4 p / 255 - 2

(:func:`from_uint8`; :func:`to_uint8` is the clamped, rounded inverse). This
module is the dataset boundary: nothing else maps CIFAR pixels to [-2, 2].

Observations follow the paper's CIFAR-10 setting (Section 5.2)

.. math:: y = m \odot (x + \sigma_y e), \qquad e \sim \mathcal{N}(0, I), \quad \sigma_y = 10^{-3}

where the mask :math:`m \in \{0, 1\}^{1 \times 32 \times 32}`, shared over the
RGB channels, deletes each pixel independently with probability :math:`p`
(0.25, 0.5 or 0.75 in the paper). The noise is applied before masking, so a
deleted pixel is exactly 0 and carries no information. The mask and noise of
image :math:`i` come from ``numpy.random.default_rng([seed, i])`` alone, so the
observations do not depend on batching.

Sources (see :func:`load_cifar10`): an explicit ``source``, the
``DIFFEM_CIFAR10`` environment variable, the offline archive
``<repo>/../shared/data/cifar10/cifar10-jpg.tar.gz`` (JPEG re-encodings, quality
~75: FIDs against it are self-consistent but not comparable with published
CIFAR-10 FIDs), or the Hugging Face Hub dataset ``uoft-cs/cifar10``.

References:
    Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009.
    Rozet et al., "Learning Diffusion Priors from Observations by Expectation
    Maximization", NeurIPS 2024, arXiv:2405.13712, Section 5.2.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..cache import resolve_cache_dir
from ._common import check_seed, image_indices

__all__ = [
    "CIFAR10_HUB_ID",
    "CLASS_NAMES",
    "DEFAULT_CIFAR10_ARCHIVE",
    "load_cifar10",
    "images_to_tensor",
    "from_uint8",
    "to_uint8",
    "corrupt",
    "make_observations",
]

#: Hugging Face Hub id of the online dataset.
CIFAR10_HUB_ID = "uoft-cs/cifar10"
#: The standard label order (sorted class names).
CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
#: Offline archive: ``<repo root>/../shared/data/cifar10/cifar10-jpg.tar.gz``.
DEFAULT_CIFAR10_ARCHIVE = (
    Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cifar10" / "cifar10-jpg.tar.gz"
)

_SPLITS = ("train", "test")
_SIDE = 32
_HUB_ALIASES = {"hub", "online", CIFAR10_HUB_ID}
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_FORMAT_VERSION = 1


# ---------------------------------------------------------------------------
# Pixels <-> [-2, 2]
# ---------------------------------------------------------------------------


def from_uint8(pixels: Tensor) -> Tensor:
    """Map ``uint8`` pixels 0..255 (any shape) to ``float32`` values ``4 p / 255 - 2`` in [-2, 2].

    Raises:
        ValueError: If ``pixels`` is not a ``uint8`` tensor.
    """
    if not torch.is_tensor(pixels) or pixels.dtype != torch.uint8:
        raise ValueError(f"`pixels` must be a uint8 tensor, got {getattr(pixels, 'dtype', type(pixels))}")
    return pixels.to(torch.float32) * (4.0 / 255.0) - 2.0


def to_uint8(x: Tensor) -> Tensor:
    """Map values in [-2, 2] (any shape) to ``uint8`` pixels ``round((x + 2) * 255 / 4)``, clamped to 0..255.

    Inverse of :func:`from_uint8` (exact on its outputs).

    Raises:
        ValueError: If ``x`` is not a floating-point tensor or holds NaN.
    """
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise ValueError(f"`x` must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    if torch.isnan(x).any():
        raise ValueError("`x` contains NaN values")
    return ((x.to(torch.float32) + 2.0) * (255.0 / 4.0)).round_().clamp_(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def _features():
    import datasets

    return datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASS_NAMES))})


def _check_image(data: bytes, where: str) -> None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # full decode: a truncated JPEG fails here, not at open()
            size = image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        # PIL raises UnidentifiedImageError (an OSError) for garbage, OSError for truncated files.
        raise ValueError(f"corrupt image file {where}: {type(error).__name__}: {error}") from None
    if size != (_SIDE, _SIDE):
        raise ValueError(f"image file {where} is {size[0]}x{size[1]}, expected {_SIDE}x{_SIDE}")


def _entry(relpath: str, where: str) -> tuple[str, str, str] | None:
    """``(split, class, file name)`` of an image path ``split/class/name``, or None if not an image."""
    parts = relpath.strip("/").split("/")
    if len(parts) != 3 or parts[0] not in _SPLITS or not parts[2].lower().endswith(_IMAGE_SUFFIXES):
        return None
    if parts[1] not in CLASS_NAMES:
        raise ValueError(f"{where}: unknown CIFAR-10 class folder {parts[1]!r} (expected one of {CLASS_NAMES})")
    return parts[0], parts[1], parts[2]


def _read_source(path: Path) -> dict[str, list[tuple[int, str, bytes]]]:
    """Images per split as ``(label, name, encoded bytes)``, sorted by (class, file name), all verified."""
    items: dict[str, list[tuple[str, str, bytes]]] = {split: [] for split in _SPLITS}
    if path.is_dir():
        for split in _SPLITS:
            for file in sorted((path / split).glob("*/*")) if (path / split).is_dir() else []:
                entry = _entry(file.relative_to(path).as_posix(), str(file))
                if entry is not None and file.is_file():
                    items[split].append((entry[1], entry[2], file.read_bytes()))
        where = lambda split, cls, name: str(path / split / cls / name)  # noqa: E731
    else:
        try:
            with tarfile.open(path, "r:*") as archive:
                for member in archive:
                    entry = _entry(member.name, f"{path}:{member.name}") if member.isfile() else None
                    if entry is not None:
                        items[entry[0]].append((entry[1], entry[2], archive.extractfile(member).read()))
        except (tarfile.TarError, OSError, EOFError) as error:
            raise ValueError(f"CIFAR-10 archive {path} is not a readable tar archive: {error}") from None
        where = lambda split, cls, name: f"{path}:{split}/{cls}/{name}"  # noqa: E731
    out = {}
    for split, entries in items.items():
        entries.sort(key=lambda e: (e[0], e[1]))
        for cls, name, data in entries:
            _check_image(data, where(split, cls, name))
        out[split] = [(CLASS_NAMES.index(cls), name, data) for cls, name, data in entries]
    return out


def _fingerprint(path: Path) -> str:
    """Identity of a source: resolved path, size and mtime of the archive (or of every file of a folder)."""
    digest = hashlib.sha256(f"cifar10-v{_FORMAT_VERSION}|{path.resolve()}".encode())
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for s in _SPLITS if (path / s).is_dir() for p in (path / s).rglob("*"))
    for file in files:
        stat = file.stat()
        digest.update(f"|{file.relative_to(path) if file != path else ''}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:20]


def _build(path: Path, target: Path) -> None:
    """Decode-check every image of ``path`` and save one dataset per split under ``target``."""
    import datasets
    import pyarrow as pa

    splits = _read_source(path)
    if not any(splits.values()):
        raise ValueError(f"CIFAR-10 source {path} holds no images under train/<class>/ or test/<class>/")
    features = _features()
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for split, entries in splits.items():
        if not entries:
            continue
        images = pa.StructArray.from_arrays(
            [pa.array([e[2] for e in entries], pa.binary()), pa.array([None] * len(entries), pa.string())],
            names=["bytes", "path"],
        )
        labels = pa.array([e[0] for e in entries], pa.int64())
        table = pa.table({"img": images, "label": labels}, schema=features.arrow_schema)
        info = datasets.DatasetInfo(features=features, description=f"CIFAR-10 {split} from {path}")
        datasets.Dataset(table, info=info, split=datasets.NamedSplit(split)).save_to_disk(str(tmp / split))
    try:
        os.rename(tmp, target)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.is_dir():
            raise


def load_cifar10(
    split: str = "train",
    source: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
):
    """Load a CIFAR-10 split as a ``datasets.Dataset`` shaped like ``uoft-cs/cifar10``.

    Columns: ``img`` (PIL image, RGB, 32x32) and ``label`` (``ClassLabel`` with
    names :data:`CLASS_NAMES`, the standard order). Rows are sorted by class,
    then file name.

    Source resolution:

    1. ``source`` if given: a ``.tar.gz`` archive or a folder laid out as
       ``train/<class>/*.jpg`` and ``test/<class>/*.jpg``, or ``"hub"`` /
       ``"uoft-cs/cifar10"`` for the Hugging Face Hub;
    2. else the environment variable ``DIFFEM_CIFAR10`` (same meaning);
    3. else :data:`DEFAULT_CIFAR10_ARCHIVE` if it exists;
    4. else ``datasets.load_dataset("uoft-cs/cifar10", split=split)`` (online).

    A local source is read once, every image is decoded to check it, and both
    splits are saved with ``save_to_disk`` in
    ``<cache_dir>/cifar10/<fingerprint>/`` (keyed by the source's path, size and
    modification time), so later loads are memory-mapped and fast.

    Arguments:
        split: ``"train"`` (50,000 images offline) or ``"test"`` (10,000).
        source: See above.
        cache_dir: Cache folder (default ``$DIFFEM_CACHE`` or ``~/.cache/diffem``).

    Returns:
        The ``datasets.Dataset``.

    Raises:
        ValueError: If ``split`` is not ``"train"`` / ``"test"``; if an image file is
            corrupt, truncated or not 32x32 (the message names the file); if a class
            folder is unknown or the archive is unreadable.
        FileNotFoundError: If ``source`` (or ``DIFFEM_CIFAR10``) names a missing path,
            or the source has no images for ``split``.
    """
    import datasets

    if split not in _SPLITS:
        raise ValueError(f"`split` must be 'train' or 'test', got {split!r}")
    origin = "`source`"
    if source is None and os.environ.get("DIFFEM_CIFAR10"):
        source, origin = os.environ["DIFFEM_CIFAR10"], "DIFFEM_CIFAR10"
    if source is None:
        if not DEFAULT_CIFAR10_ARCHIVE.is_file():
            return datasets.load_dataset(CIFAR10_HUB_ID, split=split)
        source = DEFAULT_CIFAR10_ARCHIVE
    if isinstance(source, str) and source in _HUB_ALIASES:
        return datasets.load_dataset(CIFAR10_HUB_ID, split=split)
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{origin}: CIFAR-10 source not found: {path}")
    target = resolve_cache_dir(cache_dir) / "cifar10" / _fingerprint(path)
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        _build(path, target)
    if not (target / split).is_dir():
        raise FileNotFoundError(
            f"{origin}: CIFAR-10 source {path} has no images for split {split!r} ({split}/<class>/*.jpg)"
        )
    return datasets.load_from_disk(str(target / split))


def images_to_tensor(dataset, column: str = "img") -> Tensor:
    """Stack CIFAR-10 images into a ``float32`` tensor ``(N, 3, 32, 32)`` in [-2, 2].

    Arguments:
        dataset: A ``datasets.Dataset`` (or mapping) with an image column of PIL
            images or ``(32, 32, 3)`` uint8 arrays, or a sequence of those images.
        column: The image column (``"img"``, as in ``uoft-cs/cifar10``).

    Returns:
        ``4 p / 255 - 2`` for pixels ``p``, shape ``(N, 3, 32, 32)``.

    Raises:
        ValueError: If the column is missing or an image is not 32x32 RGB.
    """
    from PIL import Image

    names = getattr(dataset, "column_names", None)
    if names is None and isinstance(dataset, dict):
        names = list(dataset)
    if names is not None:
        if column not in names:
            raise ValueError(f"`dataset` has no {column!r} column (columns: {names})")
        images = dataset[column]
    else:
        images = dataset
    arrays = []
    for i, image in enumerate(images):
        array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.uint8)
        if array.shape != (_SIDE, _SIDE, 3):
            raise ValueError(f"`dataset` image {i} has shape {array.shape}, expected ({_SIDE}, {_SIDE}, 3)")
        arrays.append(array)
    if not arrays:
        return torch.empty(0, 3, _SIDE, _SIDE)
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return from_uint8(pixels)


# ---------------------------------------------------------------------------
# Observations
# ---------------------------------------------------------------------------


def corrupt(
    x: Tensor,
    p: float,
    noise_std: float = 1e-3,
    seed: int = 0,
    indices: Sequence[int] | Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Observe images through a random pixel mask: :math:`y = m \odot (x + \sigma e)`.

    For image ``i`` with index ``indices[i]`` (default ``i``), a generator
    ``numpy.random.default_rng([seed, index])`` draws first the mask
    :math:`m = [u \ge p]`, :math:`u \sim \mathcal{U}(0, 1)^{1 \times H \times W}`
    (True = observed; shared over channels), then the noise
    :math:`e \sim \mathcal{N}(0, I_{C \times H \times W})`. The result for an image
    depends on ``(seed, index)`` only: ``corrupt(x[a:b], indices=range(a, b))``
    equals rows ``a:b`` of ``corrupt(x)``.

    Arguments:
        x: Clean images ``(N, C, H, W)`` in [-2, 2].
        p: Deletion probability of each pixel, in the open interval (0, 1).
        noise_std: :math:`\sigma \ge 0` (the paper: 1e-3).
        seed: Non-negative integer.
        indices: ``N`` non-negative integers, or ``None`` for ``0 .. N-1``.

    Returns:
        ``(y, mask)``: ``y`` ``(N, C, H, W)`` float32, zero where deleted;
        ``mask`` ``(N, 1, H, W)`` bool.

    Raises:
        ValueError: If ``p`` is not in (0, 1), ``noise_std`` is negative or not finite,
            ``seed`` is not a non-negative integer, ``x`` is not a finite 4-D tensor,
            or ``indices`` has the wrong length or negative entries.
    """
    if isinstance(p, bool) or not isinstance(p, (int, float, np.floating)) or not 0.0 < float(p) < 1.0:
        raise ValueError(f"`p` (pixel deletion probability) must be in the open interval (0, 1), got {p!r}")
    number = isinstance(noise_std, (int, float, np.floating)) and not isinstance(noise_std, bool)
    if not number or not 0.0 <= float(noise_std) < np.inf:
        raise ValueError(f"`noise_std` must be a finite number >= 0, got {noise_std!r}")
    seed = check_seed(seed)
    if not torch.is_tensor(x) or x.dim() != 4:
        raise ValueError(f"`x` must be a tensor of shape (N, C, H, W), got {getattr(x, 'shape', type(x))}")
    if not torch.isfinite(x).all():
        raise ValueError("`x` contains NaN or inf values")
    n, c, h, w = x.shape
    idx = image_indices(indices, n)
    mask = np.empty((n, 1, h, w), dtype=bool)
    noise = np.empty((n, c, h, w), dtype=np.float32)
    for row, index in enumerate(idx.tolist()):
        rng = np.random.default_rng([seed, index])
        mask[row] = rng.random((1, h, w)) >= p
        noise[row] = rng.standard_normal((c, h, w), dtype=np.float32)
    mask_t = torch.from_numpy(mask)
    y = (x.detach().to("cpu", torch.float32) + float(noise_std) * torch.from_numpy(noise)) * mask_t
    return y, mask_t


def _array_column(array: np.ndarray, feature):
    """Arrow storage of a C-contiguous array ``(N, *S)`` for an ``ArrayXD`` feature, built in one piece."""
    import pyarrow as pa

    values = pa.array(np.ascontiguousarray(array).reshape(-1))
    for size in reversed(array.shape[1:]):
        values = pa.ListArray.from_arrays(pa.array(np.arange(0, len(values) + 1, size, dtype=np.int32)), values)
    return pa.ExtensionArray.from_storage(feature(), values)


def make_observations(
    x,
    p: float,
    noise_std: float = 1e-3,
    seed: int = 0,
    indices: Sequence[int] | Tensor | None = None,
    path: str | os.PathLike | None = None,
):
    r"""A ``datasets.Dataset`` of masked observations, without the clean images.

    See :func:`corrupt` for the model and the per-image seeding.

    Arguments:
        x: Clean images ``(N, C, H, W)`` in [-2, 2], or a dataset with an ``img``
            column (converted with :func:`images_to_tensor`).
        p, noise_std, seed, indices: See :func:`corrupt`.
        path: If given, the dataset is also written there with ``save_to_disk``.

    Returns:
        A ``datasets.Dataset`` in ``torch`` format with exactly two columns:
        ``y`` (float32, ``(C, H, W)`` per row) and ``mask`` (bool, ``(1, H, W)``).

    Raises:
        The errors of :func:`corrupt` and :func:`images_to_tensor`.
    """
    import datasets
    import pyarrow as pa

    if not torch.is_tensor(x):
        x = images_to_tensor(x)
    y, mask = corrupt(x, p, noise_std, seed, indices)
    features = datasets.Features(
        {
            "y": datasets.Array3D(shape=tuple(y.shape[1:]), dtype="float32"),
            "mask": datasets.Array3D(shape=tuple(mask.shape[1:]), dtype="bool"),
        }
    )
    y_np, mask_np = y.numpy(), mask.numpy()
    try:
        if y_np.size >= 2**31:
            raise OverflowError("too large for 32-bit list offsets")
        table = pa.table(
            {"y": _array_column(y_np, features["y"]), "mask": _array_column(mask_np, features["mask"])},
            schema=features.arrow_schema,
        )
        ds = datasets.Dataset(table)
        if ds.features != features:
            raise TypeError("unexpected features")
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        ds = datasets.Dataset.from_dict({"y": y_np, "mask": mask_np}, features=features)
    ds = ds.with_format("torch")
    if path is not None:
        ds.save_to_disk(str(Path(path).expanduser()))
    return ds
