r"""MRI magnitude images for the accelerated-MRI experiment: fastMRI ``.h5`` files and offline brains.

Images live in [-2, 2] inside diffem. A volume :math:`v \ge 0` (a stack of magnitude
slices) is divided by its maximum over the kept slices and mapped linearly,

.. math:: x = 4 \, v / \max(v) - 2,

so that 0 (background) is -2 and the volume's maximum is 2 (Rozet et al. 2024, Section 5.3;
the authors' ``experiments/fastmri/data.py``). :func:`to_magnitude` is the inverse map to
[0, 1] magnitudes (the volume maximum is 1: PSNR / SSIM use data range 1, fastMRI's
convention of the volume's maximum as data range).

Sources (each a ``datasets.Dataset`` with the columns ``x`` float32 ``(1, S, S)`` in
[-2, 2], ``volume`` (a string naming the source volume), ``orientation`` (0, 1, 2: the
slicing axis of the volume) and ``slice`` (the index along that axis)):

- :func:`load_fastmri`: fastMRI single-coil knee files (Zbontar et al. 2018), read with
  h5py. The image is ``reconstruction_rss`` (``(slices, 320, 320)`` float32); slices
  ``10 .. 39`` of each volume are kept (the authors' ``[10:40]``; volumes with at most 10
  slices have none and are skipped). fastMRI's licence forbids redistribution: users pass a
  folder of their own copy.
- :func:`load_brain_slices`: the two offline brain volumes of ``../shared/data/mri/``
  (ICBM152 2009a, Colin27; see :data:`BRAIN_VOLUMES`), 2-D slices in the three
  orientations, near-empty slices dropped, padded to a square and resized to ``size``.

Held-out slab (:func:`load_brain_slices`, ``split="test"``)
    For each volume, a contiguous slab of axial slices (along the last, inferior-superior
    axis of the RAS-oriented volume) between the fractions ``holdout`` of that axis is the
    evaluation set. No training image contains a voxel of it: axial training slices lie
    outside the slab and ``gap`` voxels around it, and coronal / sagittal training slices are
    cut from the part of the volume *below* the slab (minus ``gap``), so they show the brain
    with its top cut off. Neighbouring slices (nearly identical images) therefore cannot
    leak from training into evaluation.

References:
    Zbontar et al., "fastMRI: An Open Dataset and Benchmarks for Accelerated MRI",
    arXiv:1811.08839. Rozet et al., "Learning Diffusion Priors from Observations by
    Expectation Maximization", NeurIPS 2024, arXiv:2405.13712, Section 5.3.
    Fonov et al., NeuroImage 54(1), 2011 (ICBM152 2009a); Holmes et al., J Comput Assist
    Tomogr 22(2), 1998 (Colin27).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..cache import resolve_cache_dir

__all__ = [
    "centred_ifft2",
    "images_from_kspace",
    "complex_volume",
    "synthetic_phase",
    "complex_images",
    "complex_magnitude",
    "magnitude_as_real",
    "simulated_coil_maps",
    "DEFAULT_MRI_DIR",
    "BRAIN_VOLUMES",
    "FASTMRI_KEYS",
    "FASTMRI_SLICES",
    "normalize_volume",
    "to_magnitude",
    "resize_images",
    "read_fastmri_file",
    "load_fastmri",
    "brain_volume_slices",
    "load_brain_slices",
    "images_of",
]

#: The offline MRI folder: ``<repo root>/../shared/data/mri``.
DEFAULT_MRI_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mri"
#: The offline brain volumes (NIfTI, read with nibabel): name -> file name.
BRAIN_VOLUMES = {
    "icbm152": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "colin27": "colin27_ch2_t1.nii.gz",
}
#: The keys a fastMRI single-coil file must hold for the loader (``reconstruction_rss``) and
#: for :func:`diffem.cli` ``reconstruct --h5`` (``kspace``).
FASTMRI_KEYS = ("kspace", "reconstruction_rss")
#: Kept slices of a fastMRI volume: ``[10, 40)`` (the authors' ``[10:40]``).
FASTMRI_SLICES = (10, 40)
_FORMAT_VERSION = 1


# ---------------------------------------------------------------------------
# Intensities
# ---------------------------------------------------------------------------


def normalize_volume(volume: np.ndarray | Tensor) -> Tensor:
    r"""Map a magnitude volume ``(N, H, W)`` (values >= 0) to ``4 v / max(v) - 2`` in [-2, 2], float32.

    Raises:
        ValueError: if ``volume`` is not 3-D, not finite, negative somewhere, or all zero.
    """
    v = torch.as_tensor(np.asarray(volume), dtype=torch.float32)
    if v.dim() != 3:
        raise ValueError(f"`volume` must have shape (N, H, W), got {tuple(v.shape)}")
    if not torch.isfinite(v).all():
        raise ValueError("`volume` contains NaN or inf values")
    if (v < 0).any():
        raise ValueError("`volume` must be a magnitude (>= 0) volume, found negative values")
    peak = float(v.max()) if v.numel() else 0.0
    if peak <= 0:
        raise ValueError("`volume` is all zero: it cannot be normalised by its maximum")
    return v * (4.0 / peak) - 2.0


def to_magnitude(x: Tensor) -> Tensor:
    """Inverse of the [-2, 2] map: ``|x + 2| / 4`` (any shape), 1 at the volume's maximum."""
    return (x + 2.0).abs() / 4.0


def synthetic_phase(size: int, generator: torch.Generator, scale: float = 1.0) -> Tensor:
    r"""A smooth random phase map ``(size, size)`` in radians: a random quadratic polynomial.

    .. math:: \varphi(u, v) = \varphi_0 + a u + b v + s (c u^2 + d u v + e v^2),

    with :math:`u, v \in [-1, 1]` the centred pixel coordinates (rows, columns), the offset
    :math:`\varphi_0 \sim U(-\pi, \pi)`, the linear coefficients :math:`a, b \sim \mathcal N(0, s^2)`
    and the quadratic ones :math:`c, d, e \sim \mathcal N(0, s^2 / 4)` (``s = scale``). This is the
    low-order shape of an MRI image's phase (B0 inhomogeneity, coil and receiver phase, a shifted
    echo centre), without its high-frequency parts (flow, susceptibility); it gives the complex
    training images a realistic spectrum that is not conjugate-symmetric. The draws come from
    ``generator`` in the order offset, a, b, c, d, e.

    Raises:
        ValueError: if ``size`` < 2 or ``scale`` < 0.
    """
    if int(size) != size or size < 2:
        raise ValueError(f"`size` must be an integer >= 2, got {size!r}")
    if not scale >= 0:
        raise ValueError(f"`scale` must be >= 0, got {scale!r}")
    offset = (torch.rand((), generator=generator, dtype=torch.float64) * 2 - 1) * torch.pi
    coef = torch.randn(5, generator=generator, dtype=torch.float64) * float(scale)
    coef[2:] /= 2
    u = torch.linspace(-1, 1, int(size), dtype=torch.float64)
    uu, vv = torch.meshgrid(u, u, indexing="ij")
    phase = offset + coef[0] * uu + coef[1] * vv + coef[2] * uu**2 + coef[3] * uu * vv + coef[4] * vv**2
    return phase.float()


def complex_images(x: Tensor, phases: Tensor) -> Tensor:
    r"""Complex images from [-2, 2] magnitude images and phase maps: ``2 m e^{i phi}`` as two channels.

    Arguments:
        x: ``(N, 1, S, S)`` in [-2, 2] (magnitude ``m = (x + 2) / 4`` in [0, 1]).
        phases: ``(N, S, S)`` radians (e.g. :func:`synthetic_phase`).

    Returns:
        ``(N, 2, S, S)`` float32 (real, imaginary), each in [-2, 2]; :func:`complex_magnitude`
        gives ``m`` back.

    Raises:
        ValueError: if the shapes disagree.
    """
    if x.dim() != 4 or x.shape[1] != 1 or tuple(phases.shape) != (x.shape[0], *x.shape[2:]):
        raise ValueError(f"`x` must be (N, 1, S, S) and `phases` (N, S, S), got {tuple(x.shape)} and {tuple(phases.shape)}")
    m = 2.0 * to_magnitude(x[:, 0])
    return torch.stack((m * torch.cos(phases), m * torch.sin(phases)), dim=1).float()


def complex_magnitude(x: Tensor) -> Tensor:
    r"""The magnitude in [0, 1] of complex images ``(..., 2, H, W)`` (:func:`complex_images`): ``|x_0 + i x_1| / 2``,
    ``(..., 1, H, W)``."""
    return torch.sqrt(x[..., 0:1, :, :].square() + x[..., 1:2, :, :].square()) / 2.0


def magnitude_as_real(x: Tensor) -> Tensor:
    """Complex images ``(..., 2, H, W)`` as the real [-2, 2] image of their magnitude, ``(..., 1, H, W)``
    (:func:`to_magnitude` of it is :func:`complex_magnitude`): what figures and metrics show."""
    return 4.0 * complex_magnitude(x) - 2.0


def simulated_coil_maps(coils: int, size: int) -> Tensor:
    r"""Simulated coil sensitivities ``(coils, size, size)`` complex64: sigpy's birdcage maps
    (``sigpy.mri.birdcage_maps``, coils on a ring of radius 1.5 around the field of view),
    normalised so that :math:`\sum_c |S_c|^2 = 1` at every pixel (as ESPIRiT's maps are), so the
    SENSE combination of fully sampled k-space is the image itself.

    Raises:
        ValueError: if ``coils`` < 2 or ``size`` < 2.
    """
    import sigpy.mri

    if int(coils) != coils or coils < 2:
        raise ValueError(f"`coils` must be an integer >= 2, got {coils!r}")
    if int(size) != size or size < 2:
        raise ValueError(f"`size` must be an integer >= 2, got {size!r}")
    maps = torch.as_tensor(sigpy.mri.birdcage_maps((int(coils), int(size), int(size))), dtype=torch.complex128)
    maps = maps / maps.abs().square().sum(0, keepdim=True).sqrt().clamp_min(1e-12)
    return maps.to(torch.complex64)


def resize_images(images: Tensor, size: int) -> Tensor:
    """Pad ``(N, H, W)`` images to a centred square with their minimum, then resize to ``(N, size, size)``.

    Downsampling uses antialiased bilinear interpolation (``torch.nn.functional.interpolate``,
    ``antialias=True``), so fine detail is averaged rather than aliased; the output is clamped
    to the input's range (float rounding only).

    Raises:
        ValueError: if ``images`` is not 3-D or ``size`` < 2.
    """
    if images.dim() != 3:
        raise ValueError(f"`images` must have shape (N, H, W), got {tuple(images.shape)}")
    if int(size) != size or size < 2:
        raise ValueError(f"`size` must be an integer >= 2, got {size!r}")
    n, h, w = images.shape
    side = max(h, w)
    fill = float(images.min()) if images.numel() else 0.0
    top, left = (side - h) // 2, (side - w) // 2
    padded = F.pad(images, (left, side - w - left, top, side - h - top), value=fill)
    if side == size:
        return padded.clone()
    out = F.interpolate(padded[:, None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[:, 0]
    return out.clamp(fill, float(images.max()))  # no rounding overshoot outside the input's range


# ---------------------------------------------------------------------------
# fastMRI
# ---------------------------------------------------------------------------


def read_fastmri_file(path: str | os.PathLike, key: str = "reconstruction_rss") -> np.ndarray:
    """Read one array of a fastMRI ``.h5`` file, checked.

    Arguments:
        path: The ``.h5`` file.
        key: ``"reconstruction_rss"`` (``(slices, H, W)`` float, magnitudes) or ``"kspace"``
            (``(slices, H, W)`` complex).

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if the file is not HDF5, lacks ``key`` (the message names the file, the key
            and the keys present), or the array is not 3-D, has the wrong dtype or is not finite.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"fastMRI file not found: {path}")
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise ValueError(f"{path} is not a readable HDF5 file: {error}") from None
    with handle:
        if key not in handle:
            raise ValueError(f"{path} has no {key!r} array (keys: {sorted(handle.keys())})")
        array = handle[key][()]
    if array.ndim != 3:
        raise ValueError(f"{path}: {key!r} has shape {array.shape}, expected (slices, height, width)")
    if key == "kspace":
        if not np.iscomplexobj(array):
            raise ValueError(f"{path}: 'kspace' has dtype {array.dtype}, expected complex")
    elif not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{path}: {key!r} has dtype {array.dtype}, expected float")
    if not np.isfinite(array).all():
        raise ValueError(f"{path}: {key!r} contains NaN or inf values")
    return array


def centred_ifft2(k: np.ndarray) -> np.ndarray:
    """The centred orthonormal inverse 2-D FFT over the last two axes (k-space centre in the middle)."""
    return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))


def images_from_kspace(kspace: np.ndarray, crop: int | None = 320) -> np.ndarray:
    r"""Complex images ``(N, c, c)`` of fully sampled single-coil k-space ``(N, H, W)``: :math:`\mathrm{IFFT2c}(k)`,
    centre-cropped to ``c = min(crop, H, W)`` (how fastMRI's 320x320 reconstructions are made), or
    ``(N, H, W)`` uncropped with ``crop=None``.

    Raises:
        ValueError: if ``kspace`` is not a finite complex array of shape ``(N, H, W)``.
    """
    if not np.iscomplexobj(kspace):
        raise ValueError(f"`kspace` must be complex, got dtype {kspace.dtype}")
    if kspace.ndim != 3:
        raise ValueError(f"`kspace` must have shape (slices, height, width), got {kspace.shape}")
    if not np.isfinite(kspace).all():
        raise ValueError("`kspace` contains NaN or inf values")
    image = centred_ifft2(kspace)
    if crop is None:
        return image
    h, w = image.shape[-2:]
    c = min(crop, h, w)
    top, left = (h - c) // 2, (w - c) // 2
    return image[:, top:top + c, left:left + c]


def complex_volume(kspace: np.ndarray, size: int) -> Tensor:
    r"""A fastMRI volume's complex images from its k-space, ``(N, 2, size, size)`` (real, imaginary) in [-2, 2].

    :func:`images_from_kspace` (cropped to 320, as fastMRI's own reconstructions), normalised by the
    volume's largest magnitude and scaled as :func:`complex_images` scales them, :math:`x = 2 z / \max |z|`
    (magnitude in [0, 2], the phase the scanner's), and resized channel by channel when not ``size``.

    Raises:
        ValueError: for k-space that is not finite complex ``(N, H, W)``, or all zero.
    """
    z = images_from_kspace(kspace)
    peak = float(np.abs(z).max())
    if not peak > 0:
        raise ValueError("`kspace` is all zero")
    x = torch.from_numpy(np.stack([z.real, z.imag], axis=1).astype(np.float32)) * (2.0 / peak)
    n, _, c, _ = x.shape
    if c != size:
        x = resize_images(x.reshape(2 * n, c, c), size).reshape(n, 2, size, size)
    return x


def _fastmri_complex_rows(files: Sequence[str], size: int):
    lo, hi = FASTMRI_SLICES
    for file in files:
        kspace = read_fastmri_file(file, "kspace")
        if kspace.shape[0] <= lo:
            continue
        x = complex_volume(kspace[lo:hi], size)
        for k in range(len(x)):
            yield {"x": x[k].numpy(), "volume": Path(file).stem, "orientation": 0, "slice": lo + k}


def _fastmri_rows(files: Sequence[str], size: int):
    lo, hi = FASTMRI_SLICES
    for file in files:
        rss = read_fastmri_file(file)
        if rss.shape[0] <= lo:
            continue  # fewer than 11 slices: no kept slice (the authors' rule)
        kept = rss[lo:hi]
        x = normalize_volume(np.abs(kept))
        if x.shape[-2:] != (size, size):
            x = resize_images(x, size)
        for k in range(len(x)):
            yield {"x": x[k][None].numpy(), "volume": Path(file).stem, "orientation": 0, "slice": lo + k}


def _features(size: int, channels: int = 1):
    import datasets

    return datasets.Features(
        {
            "x": datasets.Array3D(shape=(channels, size, size), dtype="float32"),
            "volume": datasets.Value("string"),
            "orientation": datasets.Value("int32"),
            "slice": datasets.Value("int32"),
        }
    )


def _fingerprint(tag: str, files: Sequence[Path], **options) -> str:
    digest = hashlib.sha256(f"mri-v{_FORMAT_VERSION}|{tag}|{sorted(options.items())}".encode())
    for file in files:
        stat = file.stat()
        digest.update(f"|{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:20]


def _build(target: Path, generator, gen_kwargs: dict, features):
    """Write a dataset with ``Dataset.from_generator`` to ``target`` (atomically) and load it."""
    import shutil

    import datasets

    if not (target / "dataset_info.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = target.with_name(f"{target.name}.build-{os.getpid()}")
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(scratch, ignore_errors=True), shutil.rmtree(tmp, ignore_errors=True)
        try:
            ds = datasets.Dataset.from_generator(generator, features=features, gen_kwargs=gen_kwargs,
                                                 cache_dir=str(scratch), keep_in_memory=False)
        except datasets.exceptions.DatasetGenerationError as error:
            shutil.rmtree(scratch, ignore_errors=True)
            cause = error.__cause__
            if isinstance(cause, (ValueError, FileNotFoundError)):  # a bad input file: say which
                raise cause from None
            raise
        ds.save_to_disk(str(tmp))
        del ds
        shutil.rmtree(scratch, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(target))


def load_fastmri(
    folder: str | os.PathLike,
    size: int = 320,
    files: Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    complex_images: bool = False,
):
    """fastMRI single-coil knee slices as a ``datasets.Dataset`` (columns: see the module docstring).

    With ``complex_images`` the ``x`` column holds ``(2, size, size)`` complex images from each file's
    ``kspace`` (:func:`complex_volume`: the scanner's own phase) instead of its ``reconstruction_rss``.

    Every ``*.h5`` file of ``folder`` (sorted by name; or the given ``files`` names inside it)
    contributes its slices ``10 .. 39`` of ``reconstruction_rss``, normalised per volume by
    their maximum (:func:`normalize_volume`) and resized to ``size`` if it is not the
    native 320. The dataset is built once with ``Dataset.from_generator`` into
    ``<cache_dir>/mri/fastmri-<fingerprint>`` (keyed by the files' paths, sizes and
    modification times and ``size``) and memory-mapped afterwards.

    Raises:
        FileNotFoundError: if ``folder`` does not exist or holds no ``.h5`` file.
        ValueError: if a file is not HDF5 or lacks a valid ``reconstruction_rss``
            (see :func:`read_fastmri_file`), or no volume has more than 10 slices.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"fastMRI folder not found: {folder}")
    paths = sorted(folder.glob("*.h5")) if files is None else [folder / f for f in files]
    if not paths:
        raise FileNotFoundError(f"fastMRI folder {folder} holds no .h5 file")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"fastMRI file not found: {p}")
    tag = "fastmri-complex" if complex_images else "fastmri"
    target = resolve_cache_dir(cache_dir) / "mri" / f"{tag}-{_fingerprint(tag, paths, size=size)}"
    rows = _fastmri_complex_rows if complex_images else _fastmri_rows
    ds = _build(target, rows, {"files": tuple(str(p) for p in paths), "size": int(size)},
                _features(size, 2 if complex_images else 1))
    if len(ds) == 0:
        raise ValueError(f"no fastMRI volume of {folder} has more than {FASTMRI_SLICES[0]} slices")
    return ds


# ---------------------------------------------------------------------------
# Offline brain volumes
# ---------------------------------------------------------------------------


def _read_nifti(path: Path) -> np.ndarray:
    import nibabel as nib

    image = nib.as_closest_canonical(nib.load(str(path)))  # RAS: axes 0 L->R, 1 P->A, 2 I->S
    volume = np.asarray(image.dataobj, dtype=np.float32)
    if volume.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D volume, got shape {volume.shape}")
    return volume


def brain_volume_slices(
    volume: np.ndarray,
    size: int,
    split: str,
    holdout: tuple[float, float] = (0.55, 0.65),
    gap: int = 4,
    min_foreground: float = 0.15,
    threshold: float = 0.1,
) -> list[tuple[int, int, Tensor]]:
    """Slices of one RAS volume ``(X, Y, Z)`` as ``(orientation, index, image (S, S) in [-2, 2])``.

    The volume is normalised by its maximum (:func:`normalize_volume` on the whole volume).
    A slice is kept if more than ``min_foreground`` of its pixels exceed ``threshold`` times
    the volume maximum (brain, not background). Each slice is padded to a square and resized
    (:func:`resize_images`) and rotated so that anterior / superior is up.

    Arguments:
        volume: ``(X, Y, Z)`` magnitudes >= 0 (RAS orientation).
        size: Output side ``S``.
        split: ``"train"`` or ``"test"`` (see the module docstring on the held-out slab).
        holdout: ``(start, stop)`` fractions of the ``Z`` axis of the held-out slab.
        gap: Voxels on each side of the slab excluded from training as well.

    Raises:
        ValueError: for a bad ``split``, ``holdout`` or a non-3-D volume.
    """
    if split not in ("train", "test"):
        raise ValueError(f"`split` must be 'train' or 'test', got {split!r}")
    lo_f, hi_f = holdout
    if not 0 <= lo_f < hi_f <= 1:
        raise ValueError(f"`holdout` must be fractions 0 <= start < stop <= 1, got {holdout!r}")
    vol = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))
    if vol.dim() != 3:
        raise ValueError(f"`volume` must be 3-D, got shape {tuple(vol.shape)}")
    x = normalize_volume(vol)
    nz = x.shape[2]
    z0, z1 = int(round(lo_f * nz)), max(int(round(hi_f * nz)), int(round(lo_f * nz)) + 1)
    below = max(z0 - gap, 0)

    def keep(images: Tensor) -> Tensor:
        magnitude = to_magnitude(images)
        return (magnitude > threshold).flatten(1).float().mean(1) > min_foreground

    out = []

    def add(orientation: int, indices, images: Tensor):
        images = resize_images(images, size)
        ok = keep(images)
        for i, image, k in zip(indices, images, ok.tolist()):
            if k:
                out.append((orientation, int(i), image))

    # Axial slices (orientation 2): images (X, Y) -> rotate so that anterior is up.
    axial = x.permute(2, 1, 0).flip(1)  # (Z, Y, X), anterior at the top row
    if split == "test":
        idx = list(range(z0, z1))
        add(2, idx, axial[z0:z1])
        return out
    idx = [z for z in range(nz) if z < z0 - gap or z >= z1 + gap]
    add(2, idx, axial[idx])
    if below > 0:
        part = x[:, :, :below]
        # Coronal slices (orientation 1): (X, Z) images, superior up.
        coronal = part.permute(1, 2, 0).flip(1)  # (Y, Z, X)
        add(1, range(coronal.shape[0]), coronal)
        # Sagittal slices (orientation 0): (Y, Z) images, superior up, anterior left.
        sagittal = part.permute(0, 2, 1).flip(1).flip(2)  # (X, Z, Y)
        add(0, range(sagittal.shape[0]), sagittal)
    return out


def _brain_rows(paths: Sequence[str], names: Sequence[str], size: int, split: str, holdout, gap: int,
                min_foreground: float):
    for path, name in zip(paths, names):
        volume = _read_nifti(Path(path))
        for orientation, index, image in brain_volume_slices(volume, size, split, tuple(holdout), gap, min_foreground):
            yield {"x": image[None].numpy(), "volume": name, "orientation": orientation, "slice": index}


def load_brain_slices(
    split: str = "train",
    size: int = 64,
    source: str | os.PathLike | None = None,
    holdout: tuple[float, float] = (0.55, 0.65),
    gap: int = 4,
    min_foreground: float = 0.15,
    cache_dir: str | os.PathLike | None = None,
):
    """Slices of the two offline brain volumes as a ``datasets.Dataset`` (see the module docstring).

    Rows are ordered by volume (:data:`BRAIN_VOLUMES` order), orientation (axial, coronal,
    sagittal for ``"train"``) and slice index. Built once into
    ``<cache_dir>/mri/brain-<fingerprint>`` and memory-mapped afterwards.

    Arguments:
        split: ``"train"`` (every orientation, outside the held-out slab) or ``"test"``
            (the axial slices of the held-out slab of each volume).
        size: Image side (e.g. 64).
        source: The folder of the NIfTI files (default :data:`DEFAULT_MRI_DIR`).
        holdout, gap, min_foreground: See :func:`brain_volume_slices`.
        cache_dir: Cache folder (default ``$DIFFEM_CACHE`` or ``~/.cache/diffem``).

    Raises:
        FileNotFoundError: if the folder or one of :data:`BRAIN_VOLUMES` is missing.
        ValueError: for a bad ``split``, ``size`` or ``holdout``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"`split` must be 'train' or 'test', got {split!r}")
    if int(size) != size or size < 8:
        raise ValueError(f"`size` must be an integer >= 8, got {size!r}")
    folder = Path(source).expanduser() if source is not None else DEFAULT_MRI_DIR
    if not folder.is_dir():
        raise FileNotFoundError(f"MRI folder not found: {folder}")
    paths = [folder / f for f in BRAIN_VOLUMES.values()]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"brain volume not found: {p} (see ../shared/data/README.md)")
    lo, hi = (float(h) for h in holdout)
    if not 0 <= lo < hi <= 1:
        raise ValueError(f"`holdout` must be fractions 0 <= start < stop <= 1, got {holdout!r}")
    options = dict(split=split, size=int(size), holdout=(lo, hi), gap=int(gap), min_foreground=float(min_foreground))
    target = resolve_cache_dir(cache_dir) / "mri" / f"brain-{_fingerprint('brain', paths, **options)}"
    # Tuples, not lists: `Dataset.from_generator` would shard list arguments.
    kwargs = dict(paths=tuple(str(p) for p in paths), names=tuple(BRAIN_VOLUMES), size=int(size), split=split,
                  holdout=(lo, hi), gap=int(gap), min_foreground=float(min_foreground))
    return _build(target, _brain_rows, kwargs, _features(int(size)))


def images_of(dataset) -> Tensor:
    """The ``x`` column of a slice dataset as one float32 tensor ``(N, 1, S, S)`` in [-2, 2]."""
    if "x" not in dataset.column_names:
        raise ValueError(f"`dataset` has no 'x' column (columns: {dataset.column_names})")
    return torch.as_tensor(np.asarray(dataset.with_format("numpy")["x"]), dtype=torch.float32)
