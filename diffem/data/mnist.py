r"""MNIST digits and their noisy / masked observations.

Images are mapped from pixels :math:`p \in \{0, \dots, 255\}` to

.. math:: x = 4 p / 255 - 2 \in [-2, 2]

so that their standard deviation is close to 1 (the ``sigma_data = 1`` of the
EDM preconditioning). Observations follow the model

.. math:: y = m \odot (x + \sigma_y e), \qquad e \sim \mathcal{N}(0, I)

where :math:`m \in \{0, 1\}^{C \times H \times W}` is an optional random pixel
mask (:math:`m = 1` everywhere for the identity operator). The noise and the
mask of image :math:`i` are drawn from a generator seeded by ``(seed, i)``
only, so the observations do not depend on how the images are batched.

Sources, in order (see :func:`load_mnist`): an explicit ``source``, the
``DIFFEM_MNIST`` environment variable, the offline copy of the test split in
``<repo root>/../shared/data/mnist/`` (raw IDX files), and finally the Hugging
Face Hub dataset ``ylecun/mnist``.

References:
    LeCun, Cortes, Burges, "The MNIST database of handwritten digits",
    http://yann.lecun.com/exdb/mnist/ (IDX format described there).
    Rozet et al., "Learning Diffusion Priors from Observations by Expectation
    Maximization", NeurIPS 2024, arXiv:2405.13712.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import Sequence

import datasets
import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ._common import check_seed, image_indices
from .tables import numpy_to_dataset

__all__ = [
    "MNIST_HUB_ID",
    "DEFAULT_MNIST_DIR",
    "read_idx",
    "load_mnist",
    "images_to_tensor",
    "make_noisy_observations",
]

#: Hugging Face Hub id of the online MNIST dataset.
MNIST_HUB_ID = "ylecun/mnist"

#: Offline folder with the raw IDX files: ``<repo root>/../shared/data/mnist``.
DEFAULT_MNIST_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mnist"

_IMAGE_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
_LABEL_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
_SIDE = 28
_PREFIX = {"train": "train", "test": "t10k"}
_HUB_ALIASES = {"hub", "online", MNIST_HUB_ID}


def _features() -> datasets.Features:
    return datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=[str(i) for i in range(10)]),
        }
    )


def read_idx(path: str | os.PathLike, magic: int) -> np.ndarray:
    r"""Read an unsigned-byte IDX file (gzip-compressed or raw).

    The header is a big-endian 32-bit magic number (``2051`` for image files,
    ``2049`` for label files; its low byte is the number of dimensions) followed
    by one big-endian 32-bit size per dimension. The payload must hold exactly
    ``prod(sizes)`` bytes.

    Arguments:
        path: The file, compressed with gzip (detected from its first bytes) or not.
        magic: The expected magic number, 2051 (images) or 2049 (labels).

    Returns:
        A ``uint8`` array of shape ``sizes``, e.g. ``(N, 28, 28)`` or ``(N,)``.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is truncated, not valid gzip, has the wrong
            magic number, or its byte count does not match its header; the
            message names the file and what was expected.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MNIST IDX file not found: {path}")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as error:
            raise ValueError(
                f"MNIST IDX file {path} is not a valid gzip stream (truncated or corrupt): {error}"
            ) from None
    if len(raw) < 4:
        raise ValueError(f"MNIST IDX file {path} is truncated: {len(raw)} bytes, expected a 4-byte magic number")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"MNIST IDX file {path} has magic number {found}, expected {magic}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(
            f"MNIST IDX file {path} is truncated: {len(raw)} bytes, expected a header of {header} bytes"
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(raw) != expected:
        raise ValueError(
            f"MNIST IDX file {path} holds {len(raw)} bytes (decompressed), "
            f"expected exactly {expected} for dimensions {shape}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx(folder: Path, prefix: str, kind: str) -> Path | None:
    stem = f"{prefix}-{kind}"
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _load_folder(folder: Path, split: str) -> datasets.Dataset:
    if not folder.is_dir():
        raise FileNotFoundError(f"MNIST folder not found: {folder} (argument `source` / DIFFEM_MNIST)")
    prefix = _PREFIX[split]
    images_path = _find_idx(folder, prefix, "images-idx3-ubyte")
    labels_path = _find_idx(folder, prefix, "labels-idx1-ubyte")
    if images_path is None or labels_path is None:
        others = sorted(p.name for p in folder.glob("*ubyte*"))
        hint = ""
        if split == "train":
            hint = (
                " Only the test split (t10k-*) exists offline; for split='train' "
                f"use source='{MNIST_HUB_ID}' with internet access or add the train IDX files."
            )
        raise FileNotFoundError(
            f"MNIST split {split!r} not found in {folder}: expected {prefix}-images-idx3-ubyte[.gz] "
            f"and {prefix}-labels-idx1-ubyte[.gz], found {others}.{hint}"
        )
    images = read_idx(images_path, _IMAGE_MAGIC)
    labels = read_idx(labels_path, _LABEL_MAGIC)
    if images.shape[1:] != (_SIDE, _SIDE):
        raise ValueError(f"MNIST IDX file {images_path} has images of size {images.shape[1:]}, expected (28, 28)")
    if len(images) != len(labels):
        raise ValueError(
            f"MNIST IDX files {images_path} and {labels_path} disagree: "
            f"{len(images)} images but {len(labels)} labels"
        )
    if labels.size and labels.max() > 9:
        raise ValueError(f"MNIST IDX file {labels_path} holds label {int(labels.max())}, expected 0..9")
    return datasets.Dataset.from_dict(
        {
            "image": [Image.fromarray(image) for image in images],
            "label": labels.astype(np.int64),
        },
        features=_features(),
        split=datasets.Split.TRAIN if split == "train" else datasets.Split.TEST,
    )


def load_mnist(split: str = "test", source: str | os.PathLike | None = None) -> datasets.Dataset:
    r"""Load an MNIST split as a ``datasets.Dataset`` shaped like ``ylecun/mnist``.

    Columns: ``image`` (PIL image, mode ``L``, 28x28, pixels 0..255) and
    ``label`` (``ClassLabel`` with names ``"0"`` .. ``"9"``).

    Source resolution:

    1. ``source`` if given: a folder holding the IDX files
       (``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``,
       ``train-...`` for the train split), or ``"hub"`` / ``"ylecun/mnist"``
       for the Hugging Face Hub.
    2. else the environment variable ``DIFFEM_MNIST`` (same meaning);
    3. else the offline folder :data:`DEFAULT_MNIST_DIR` if it exists (it holds
       only the 10,000-image test split);
    4. else ``datasets.load_dataset("ylecun/mnist", split=split)`` (online).

    Arguments:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000 images).
        source: See above.

    Returns:
        The dataset, in IDX order.

    Raises:
        ValueError: If ``split`` is not ``"train"`` / ``"test"``, or an IDX file
            is truncated or has a wrong magic number (the message names the file).
        FileNotFoundError: If the source folder does not exist, or lacks the
            split's files (e.g. ``split="train"`` offline, where only the test
            split exists).
    """
    if split not in _PREFIX:
        raise ValueError(f"`split` must be 'train' or 'test', got {split!r}")
    if source is None:
        source = os.environ.get("DIFFEM_MNIST") or None
    if source is None:
        if DEFAULT_MNIST_DIR.is_dir():
            return _load_folder(DEFAULT_MNIST_DIR, split)
        source = MNIST_HUB_ID
    if isinstance(source, str) and source in _HUB_ALIASES:
        return datasets.load_dataset(MNIST_HUB_ID, split=split)
    return _load_folder(Path(source).expanduser(), split)


def images_to_tensor(ds: datasets.Dataset, pad_to: int | None = None) -> Tensor:
    r"""Stack the ``image`` column of an MNIST dataset into a tensor in [-2, 2].

    Pixels :math:`p \in [0, 255]` map to :math:`4 p / 255 - 2`. With ``pad_to``,
    each image is zero-padded *in pixel space* (value ``-2``) to
    ``pad_to x pad_to``, centred (the extra row / column, if odd, goes to the
    bottom / right), e.g. ``pad_to=32`` for U-Nets that like powers of two.

    Arguments:
        ds: A dataset (or mapping) with an ``image`` column of 28x28 grayscale
            PIL images or ``uint8`` arrays, e.g. from :func:`load_mnist`.
        pad_to: Output side length (``>= 28``), or ``None`` to keep 28.

    Returns:
        A ``float32`` tensor of shape ``(N, 1, S, S)`` with ``S = pad_to or 28``,
        values in [-2, 2].

    Raises:
        ValueError: If ``ds`` has no ``image`` column, an image is not 28x28
            grayscale, or ``pad_to`` is not an integer ``>= 28``.
    """
    if pad_to is not None and (isinstance(pad_to, bool) or not isinstance(pad_to, int) or pad_to < _SIDE):
        raise ValueError(f"`pad_to` must be None or an integer >= {_SIDE}, got {pad_to!r}")
    columns = getattr(ds, "column_names", None) or (list(ds.keys()) if hasattr(ds, "keys") else [])
    if "image" not in columns:
        raise ValueError(f"`ds` must have an 'image' column, got columns {columns}")
    images = ds["image"]
    arrays = []
    for i, image in enumerate(images):
        if isinstance(image, Image.Image):
            if image.mode != "L":
                image = image.convert("L")
            array = np.asarray(image, dtype=np.uint8)
        else:
            array = np.asarray(image)
        if array.shape != (_SIDE, _SIDE):
            raise ValueError(f"`ds` image {i} has shape {array.shape}, expected ({_SIDE}, {_SIDE}) grayscale")
        arrays.append(array)
    if not arrays:
        x = torch.empty(0, 1, _SIDE, _SIDE)
    else:
        x = torch.from_numpy(np.stack(arrays).astype(np.float32)).unsqueeze(1)
    x = x * (4.0 / 255.0) - 2.0
    if pad_to is not None and pad_to > _SIDE:
        total = pad_to - _SIDE
        before, after = total // 2, total - total // 2
        x = torch.nn.functional.pad(x, (before, after, before, after), value=-2.0)
    return x.contiguous()


def make_noisy_observations(
    x: Tensor,
    sigma_y: float,
    seed: int,
    mask_prob: float | None = None,
    indices: Sequence[int] | Tensor | None = None,
) -> datasets.Dataset:
    r"""Observe images through :math:`y = m \odot (x + \sigma_y e)`.

    For image ``i`` (``indices[i]``, by default its row number), the noise
    :math:`e \sim \mathcal{N}(0, I)` and then, if ``mask_prob`` is set, the
    mask :math:`m_j = [u_j \ge p]` with :math:`u_j \sim \mathcal{U}(0, 1)`
    (one per pixel, shared over channels) are drawn from
    ``numpy.random.default_rng([seed, index])``. So the observation of an image
    depends only on ``(seed, index)`` and not on batching: observing
    ``x[a:b]`` with ``indices=range(a, b)`` gives rows ``a:b`` of observing ``x``.

    The returned dataset never contains the clean images.

    Arguments:
        x: Clean images, shape ``(N, C, H, W)``, values in [-2, 2] (e.g. from
            :func:`images_to_tensor`).
        sigma_y: Noise standard deviation, ``> 0`` (the paper's CIFAR-10
            setting is 1e-3).
        seed: Non-negative integer seed.
        mask_prob: Probability of deleting a pixel, in [0, 1), or ``None`` for
            the identity operator (no ``mask`` column).
        indices: Per-image indices of length ``N`` (non-negative integers), or
            ``None`` for ``0 .. N-1``.

    Returns:
        A ``datasets.Dataset`` in ``torch`` format with column ``y``
        (``float32``, shape ``(C, H, W)`` per row) and, if ``mask_prob`` is set,
        ``mask`` (``float32`` zeros and ones, shape ``(1, H, W)``).

    Raises:
        ValueError: If ``x`` is not a finite 4-D tensor, ``sigma_y <= 0``,
            ``mask_prob`` is outside [0, 1), ``seed`` is not a non-negative
            integer, or ``indices`` has the wrong length or negative entries.
    """
    if not torch.is_tensor(x) or x.dim() != 4:
        raise ValueError(f"`x` must be a tensor of shape (N, C, H, W), got {getattr(x, 'shape', type(x))}")
    if not torch.isfinite(x).all():
        raise ValueError("`x` contains NaN or inf values")
    if isinstance(sigma_y, bool) or not isinstance(sigma_y, (int, float)) or not 0 < sigma_y < np.inf:
        raise ValueError(f"`sigma_y` must be a finite number > 0, got {sigma_y!r}")
    if mask_prob is not None and not (0.0 <= float(mask_prob) < 1.0):
        raise ValueError(f"`mask_prob` must be None or in [0, 1), got {mask_prob!r}")
    seed = check_seed(seed)
    n, c, h, w = x.shape
    idx = image_indices(indices, n)

    noise = np.empty((n, c, h, w), dtype=np.float32)
    mask = np.empty((n, 1, h, w), dtype=np.float32) if mask_prob is not None else None
    for row, index in enumerate(idx.tolist()):
        rng = np.random.default_rng([seed, index])
        noise[row] = rng.standard_normal((c, h, w), dtype=np.float32)
        if mask is not None:
            mask[row] = rng.random((1, h, w), dtype=np.float32) >= mask_prob

    y = x.detach().to("cpu", torch.float32) + float(sigma_y) * torch.from_numpy(noise)
    if mask is not None:
        y = y * torch.from_numpy(mask)
        return numpy_to_dataset({"y": y.numpy(), "mask": mask})
    return numpy_to_dataset({"y": y.numpy()})
