r"""``diffem reconstruct``: one MRI slice of a user's scan, undersampled and reconstructed with a saved prior.

The application (its command line is in :mod:`diffem.cli`): read a slice (fastMRI ``.h5``
k-space, a NIfTI volume or a ``.npy`` array of magnitudes), map it to the prior's [-2, 2]
(:func:`prepare_slice`), undersample it retrospectively at acceleration :math:`R` through a
fastMRI column mask and noise (:func:`diffem.tasks.mri.observe_kspace`, the evaluation's seed
stream),

.. math:: y = M \odot \big(\mathrm{FFT2c}(x) + \sigma_y e\big),

draw posterior samples under the prior with MMPS (:func:`reconstruct`), and write the posterior
mean and standard deviation, the zero-filled image :math:`A^+ y`, the reference, the mask and
a figure (:func:`reconstruct_command`). The prior is a lap folder, or a run folder's last
finished lap (:func:`diffem.runs.prior_folder`).

``--kspace`` takes acquired, undersampled k-space as it is (:func:`read_kspace`: ``.npy``, fastMRI
``.h5`` single- or multi-coil, BART ``.cfl``): the mask is ``--mask`` or the nonzero pattern, coil
maps come from ESPIRiT on the calibration centre with the image phase absorbed (the prior is
real-valued), the centred block of k-space at the prior's size is the observation of
:class:`~diffem.operators.SenseFourier`, and the outputs sit beside sigpy's L1-wavelet
reconstruction of the same data with each one's data consistency per coil
(:func:`reconstruct_kspace`). Sampler settings default to the prior's own E-step
(``sampling.json``) in both paths, printed; ``--steps`` / ``--maxiter`` override.

Resize policy of the magnitude inputs (one for all three): pad to a square with the background,
resize to the prior's size.

References:
    Rozet et al., "Learning Diffusion Priors from Observations by Expectation
    Maximization", NeurIPS 2024, arXiv:2405.13712, Section 5.3;
    Zbontar et al., "fastMRI", arXiv:1811.08839.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .data.mri import (centred_ifft2, complex_magnitude, images_from_kspace, read_fastmri_file, resize_images,
                       to_magnitude)
from .operators import SenseFourier, SubsampledFourier
from .posterior import data_consistency_step
from .pipeline import DiffusionPriorPipeline, denoiser_of
from .random import make_generators
from .runs import prior_folder
from .spec import SamplerSpec
from .tasks.mri import EVAL_STREAM, observe_kspace

__all__ = ["magnitudes_from_kspace", "prepare_slice", "reconstruct", "reconstruct_command", "read_kspace",
           "centre_crop_kspace", "estimate_noise_std", "reconstruct_kspace"]


def _magnitude(x: Tensor) -> Tensor:
    """Magnitudes ``(N, H, W)`` of images ``(N, 1, H, W)`` in [-2, 2] (:func:`diffem.data.mri.to_magnitude`)."""
    return to_magnitude(x.float())[:, 0]


def magnitudes_from_kspace(kspace: np.ndarray, crop: int | None = 320) -> np.ndarray:
    r"""Magnitude images ``(N, c, c)`` of fully sampled k-space ``(N, H, W)``: :math:`|\mathrm{IFFT2c}(k)|`,
    centre-cropped to ``c = min(crop, H, W)`` (how fastMRI's 320x320 reconstructions are made), or
    ``(N, H, W)`` uncropped with ``crop=None`` (what ``diffem reconstruct --h5`` uses: one resize policy);
    :func:`diffem.data.mri.images_from_kspace` gives the complex images.

    Raises:
        ValueError: if ``kspace`` is not a finite complex array of shape ``(N, H, W)``.
    """
    return np.abs(images_from_kspace(kspace, crop)).astype(np.float32)


def prepare_slice(magnitude: np.ndarray, peak: float, size: int) -> Tensor:
    """A magnitude slice ``(H, W)`` (>= 0) as the prior's input ``(1, 1, size, size)`` in [-2, 2].

    ``4 v / peak - 2`` (``peak``: the volume's maximum), padded to a square and resized
    (:func:`diffem.data.mri.resize_images`).

    Raises:
        ValueError: if the slice is not 2-D, not finite or negative, or ``peak`` is not > 0.
    """
    v = np.asarray(magnitude)
    if v.ndim != 2:
        raise ValueError(f"the image must be a 2-D slice (height, width), got shape {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError("the image contains NaN or inf values")
    if (v < 0).any():
        raise ValueError("the image must hold magnitudes (>= 0); found negative values")
    if not peak > 0:
        raise ValueError(f"the volume's maximum must be > 0, got {peak!r}")
    x = torch.from_numpy(v.astype(np.float32)) * (4.0 / float(peak)) - 2.0
    return resize_images(x[None], size)[None]


@torch.no_grad()
def reconstruct(pipeline, x: Tensor, acceleration: float, samples: int = 4, seed: int = 0, noise_std: float = 1e-2,
                steps: int = 64, maxiter: int = 5, method: str = "ddpm", batch_size: int = 8) -> dict:
    r"""Undersample one slice retrospectively and sample its posterior under a saved prior.

    ``y = M (FFT2c(x) + noise_std e)`` with a column mask at ``acceleration`` and noise drawn
    from ``(seed, 1, round(100 R), 0)`` (:func:`~diffem.tasks.mri.observe_kspace`), then ``samples`` MMPS
    posterior samples (sample ``j`` from the generator ``(seed, j)``).

    Arguments:
        pipeline: A :class:`~diffem.pipeline.DiffusionPriorPipeline` of an MRI prior (event ``(1, S, S)``).
        x: The slice ``(1, 1, S, S)`` in [-2, 2] (:func:`prepare_slice`).

    Returns:
        A dict of ``(S, S)`` tensors in magnitude units (1 = the volume's maximum):
        ``reference``, ``zero_filled`` (:math:`A^+ y`), ``mean``, ``std``, ``samples``
        ``(samples, S, S)``, and ``mask`` ``(S,)`` bool, ``effective_acceleration`` (float).
    """
    if int(samples) != samples or samples < 1:
        raise ValueError(f"`samples` must be an integer >= 1, got {samples!r}")
    event = tuple(pipeline.event_shape)
    if len(event) != 3 or event[0] != 1 or event[1] != event[2]:
        raise ValueError(f"the prior's samples have shape {event}: not an MRI prior (expected (1, S, S))")
    if tuple(x.shape) != (1, *event):
        raise ValueError(f"`x` has shape {tuple(x.shape)}, expected (1, *{event})")
    y, mask = observe_kspace(x, float(acceleration), float(noise_std), int(seed), EVAL_STREAM, [0])
    A = SubsampledFourier(mask)
    reps = torch.zeros(int(samples), dtype=torch.long)
    device = pipeline.device
    spec = SamplerSpec(method=method, steps=int(steps), maxiter=int(maxiter), noise_std=float(noise_std))
    draws = spec.sample(
        denoiser_of(pipeline.unet), y[reps].to(device), A[reps].to(device), event,
        make_generators(int(seed), indices=range(int(samples))), batch_size=batch_size, device=device,
    ).cpu().float()
    magnitudes = _magnitude(draws)
    return {
        "reference": _magnitude(x)[0], "zero_filled": _magnitude(A.pinv(y))[0], "samples": magnitudes,
        "mean": _magnitude(draws.mean(0, keepdim=True))[0],
        "std": magnitudes.std(0) if samples > 1 else torch.zeros_like(magnitudes[0]),
        "mask": mask[0], "effective_acceleration": float(A.effective_acceleration()[0]),
    }


def _load_prior(prior_dir: Path):
    """The prior of a lap folder, or of a run folder's last finished lap (:func:`diffem.runs.prior_folder`)."""
    folder = prior_folder(prior_dir)
    return DiffusionPriorPipeline.from_pretrained(folder), folder


def _read_input(args, size: int) -> tuple[Tensor, str]:
    """The slice chosen by ``--h5`` / ``--nifti`` / ``--npy`` as ``(1, 1, size, size)`` in [-2, 2]."""
    def pick(volume: np.ndarray, what: str) -> np.ndarray:
        index = volume.shape[0] // 2 if args.slice is None else args.slice
        if not 0 <= index < volume.shape[0]:
            raise ValueError(f"--slice {index} is out of range: {what} has {volume.shape[0]} slices")
        return volume[index]

    if args.h5 is not None:
        import h5py

        try:
            with h5py.File(args.h5, "r") as handle:
                shape = handle["kspace"].shape if "kspace" in handle else None
        except OSError:
            shape = None  # read_fastmri_file says what is wrong
        if shape is not None and len(shape) == 4:
            raise ValueError(f"{args.h5}: 'kspace' has shape {shape}: multi-coil (slices, coils, H, W); --h5 takes "
                             "fully sampled single-coil k-space: give it to --kspace (coil maps by ESPIRiT)")
        kspace = read_fastmri_file(args.h5, "kspace")
        volume = magnitudes_from_kspace(kspace, crop=None)  # no crop: one policy for every input (pad, resize)
        return prepare_slice(pick(volume, args.h5), float(volume.max()), size), f"{args.h5}: 'kspace'"
    if args.nifti is not None:
        import nibabel as nib

        path = Path(args.nifti)
        if not path.is_file():
            raise FileNotFoundError(f"NIfTI file not found: {path}")
        try:
            volume = np.asarray(nib.as_closest_canonical(nib.load(str(path))).dataobj, dtype=np.float32)
        except Exception as e:  # noqa: BLE001 - nibabel raises many types for a corrupt or foreign file
            raise ValueError(f"{path}: not a readable NIfTI volume ({type(e).__name__}: {e})") from None
        if volume.ndim != 3:
            raise ValueError(f"{path}: expected a 3-D volume, got shape {volume.shape}")
        if args.axis not in (0, 1, 2):
            raise ValueError(f"--axis must be 0, 1 or 2, got {args.axis}")
        slices = np.moveaxis(volume, args.axis, 0)
        image = np.flip(pick(slices, str(path)).T, 0)  # rows: the next axis, top = its far end
        return prepare_slice(np.ascontiguousarray(image), float(volume.max()), size), str(path)
    path = Path(args.npy)
    if not path.is_file():
        raise FileNotFoundError(f"array file not found: {path}")
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as e:
        hint = " (an HDF5 file: use --h5 or --kspace)" if path.read_bytes()[:8] == b"\x89HDF\r\n\x1a\n" else ""
        raise ValueError(f"{path}: not a .npy array{hint}: {e}") from None
    if np.iscomplexobj(array):
        raise ValueError(f"{path}: expected real magnitudes, got a complex array (k-space: use --kspace)")
    if array.ndim == 2:
        return prepare_slice(array, float(np.max(array)), size), str(path)
    if array.ndim == 3:  # documented: the first axis is slices (coil data is complex k-space: --kspace)
        return prepare_slice(pick(array, str(path)), float(np.max(array)), size), f"{path} (first axis: slices)"
    raise ValueError(f"{path}: expected a slice (height, width) or a volume (slices, height, width), got shape {array.shape}")


def _sampler(folder: Path, args) -> SamplerSpec:
    """The prior's own E-step sampler (``sampling.json``), with ``--steps`` / ``--maxiter`` overriding; printed."""
    import sys

    from .pipeline import load_estep_spec

    try:
        saved = load_estep_spec(folder)
        where = f"the prior's E-step ({folder / 'sampling.json'})"
    except FileNotFoundError:
        saved = SamplerSpec(method="ddpm", steps=64, maxiter=5)
        where = "defaults (the prior has no sampling.json)"
    spec = SamplerSpec(method=saved.method if saved.method in ("ddpm", "ddim", "pc") else "ddpm",
                       steps=saved.steps if args.steps is None else int(args.steps),
                       maxiter=saved.maxiter if args.maxiter is None else int(args.maxiter),
                       solver=saved.solver if saved.guidance == "mmps" else "cg")
    flags = [f for f, v in (("--steps", args.steps), ("--maxiter", args.maxiter)) if v is not None]
    print(f"diffem reconstruct: sampler {_describe(spec)} from {where}" + (f", {' and '.join(flags)} from the flags"
                                                                            if flags else ""), file=sys.stderr)
    return spec


def _describe(spec: SamplerSpec) -> str:
    return f"MMPS {spec.method.upper()} {spec.steps} steps, {spec.solver.upper()} {spec.maxiter}"


def _kspace_command(pipeline, folder: Path, spec: SamplerSpec, args) -> int:
    """``diffem reconstruct PRIOR --kspace FILE``: see :func:`reconstruct_kspace`; writes the images, the
    summary JSON and a figure beside sigpy's L1-wavelet reconstruction of the same data."""
    import json

    kspace, source = read_kspace(args.kspace, args.slice)
    mask, mask_source = None, "the nonzero pattern of the k-space"
    if args.mask is not None:
        mask = np.load(args.mask, allow_pickle=False)
        if mask.dtype != bool:
            raise ValueError(f"{args.mask}: the mask must be boolean (True = sampled), got dtype {mask.dtype}")
        mask_source = str(args.mask)
    out = reconstruct_kspace(pipeline, kspace, mask, spec, args.samples, args.seed, args.noise_std,
                             dc_step=not args.no_dc_step)
    target = Path(args.output_dir)
    target.mkdir(parents=True, exist_ok=True)
    for name in ("mean", "std", "mean_dc", "samples", "zero_filled", "l1_wavelet", "mask"):
        if out[name] is not None:
            np.save(target / f"{'posterior_' + name if name in ('mean', 'std', 'mean_dc') else name}.npy", out[name].numpy())
    res = out["resolution"]
    low = max(res["grid"]) > res["prior"]
    note = (f"low-resolution reconstruction: the centred {res['prior']}x{res['prior']} block of the "
            f"{res['grid'][0]}x{res['grid'][1]} k-space grid (the prior's size)") if low else "full resolution"

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dc = out["data_consistency"]
    panels = [("sampling mask", out["mask"].float(), "gray", 1.0, None),
              ("zero-filled SENSE", out["zero_filled"], "gray", None, np.mean(dc["zero_filled"])),
              ("L1-wavelet (sigpy)", out["l1_wavelet"], "gray", None, np.mean(dc["l1_wavelet"])),
              ("posterior mean", out["mean"], "gray", None, np.mean(dc["posterior_mean"]))]
    if out["mean_dc"] is not None:
        panels.append(("mean + DC step", out["mean_dc"], "gray", None, np.mean(dc["posterior_mean_dc"])))
    panels.append(("posterior std", out["std"], "magma", None, None))
    vmax = float(out["zero_filled"].max())
    fig, axes = plt.subplots(1, len(panels), figsize=(2.4 * len(panels), 2.9))
    for ax, (title, image, cmap, top, consistency) in zip(axes, panels):
        ax.imshow(image.numpy(), cmap=cmap, vmin=0, vmax=top if top is not None or cmap != "gray" else vmax)
        label = title if consistency is None else f"{title}\nDC {consistency:.3f}"
        ax.set_title(label, fontsize=8), ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"{Path(args.kspace).name}: {kspace.shape[0]} coil(s), {100 * out['sampled_fraction']:.1f} % sampled; "
                 f"{note}; noise floor {np.mean(out['noise_floor']):.3f} (no ground truth)", fontsize=8)
    fig.tight_layout()
    fig.savefig(target / "reconstruction.png", dpi=120)
    plt.close(fig)
    summary = {"prior": str(folder), "input": source, "coils": int(kspace.shape[0]), "mask": mask_source,
               "coil_maps": out["maps_source"],
               "prior_images": "complex (2 channels)" if out["complex_prior"] else "magnitude (real)",
               "sampled_fraction": out["sampled_fraction"], "resolution": note, "sampler": _describe(spec),
               "noise_std_kspace": out["noise_std"], "noise_std_source": "--noise-std" if args.noise_std is not None
               else "estimated from the outer 10 % of k-space (1.4826 MAD)", "samples": args.samples,
               "data_consistency_per_coil": dc, "noise_floor_per_coil": out["noise_floor"],
               "dc_step": ("off (--no-dc-step)" if args.no_dc_step else "needs >= 2 samples: not applied"
                           if out["mean_dc"] is None else f"posterior_mean_dc.npy: the mean conditioned on y under "
                           f"N(mean, tau^2 I), tau = {out['dc_tau']:.4g} (prior units, the samples' mean std), 8 CG "
                           "iterations (diffem.posterior.data_consistency_step)"),
               "reference": "sigpy mri.app.L1WaveletRecon, lambda 0.005, the same data and coil maps",
               "output_dir": str(target)}
    (target / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))
    return 0


def reconstruct_command(args) -> int:
    """``diffem reconstruct PRIOR_DIR (--h5 F | --nifti F | --npy F) --acceleration R [--samples K]``.

    Writes ``posterior_mean.npy``, ``posterior_std.npy``, ``zero_filled.npy``, ``reference.npy``
    (magnitudes, 1 = the volume's maximum), ``mask.npy`` and ``reconstruction.png`` into
    ``--output-dir`` and prints a JSON summary (PSNR / SSIM against the fully sampled slice).

    Raises:
        ValueError: for a missing key, a wrong shape, non-finite k-space or a prior that is not an MRI prior.
        FileNotFoundError: for a missing prior or input file.
    """
    import json

    from .metrics import psnr, ssim

    pipeline, folder = _load_prior(Path(args.prior_dir))
    event = tuple(pipeline.event_shape)
    kspace = getattr(args, "kspace", None) is not None
    if len(event) != 3 or event[0] not in ((1, 2) if kspace else (1,)):
        raise ValueError(f"{folder}: the prior's samples have shape {event}: not an MRI prior (expected (1, S, S)"
                         + (", or (2, S, S) complex images" if kspace else "; complex priors (2, S, S) take --kspace")
                         + ")")
    spec = _sampler(folder, args)
    if kspace:
        return _kspace_command(pipeline, folder, spec, args)
    x, source = _read_input(args, event[-1])
    noise = 1e-2 if args.noise_std is None else args.noise_std
    out = reconstruct(pipeline, x, args.acceleration, args.samples, args.seed, noise, spec.steps, spec.maxiter,
                      method=spec.method)
    target = Path(args.output_dir)
    target.mkdir(parents=True, exist_ok=True)
    for name, key in (("posterior_mean", "mean"), ("posterior_std", "std"), ("zero_filled", "zero_filled"),
                      ("reference", "reference"), ("mask", "mask")):
        np.save(target / f"{name}.npy", out[key].numpy())

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("mask", out["mask"].float()[None].expand(event[-1], -1), "gray", 1.0),
              ("zero-filled", out["zero_filled"], "gray", None), ("posterior mean", out["mean"], "gray", None),
              ("posterior std", out["std"], "magma", None), ("fully sampled", out["reference"], "gray", None)]
    vmax = float(out["reference"].max())
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels), 2.6))
    for ax, (title, image, cmap, top) in zip(axes, panels):
        ax.imshow(image.numpy(), cmap=cmap, vmin=0, vmax=top if top is not None or cmap != "gray" else vmax)
        ax.set_title(title, fontsize=8), ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"R = {args.acceleration:g} ({args.samples} posterior samples)", fontsize=9)
    fig.tight_layout()
    fig.savefig(target / "reconstruction.png", dpi=120)
    plt.close(fig)

    ref = out["reference"][None]

    def score(image):
        return {"psnr": float(psnr(image[None], ref, data_range=1.0)[0]),
                "ssim": float(ssim(image[None], ref, data_range=1.0, gaussian_kernel=False, kernel_size=7)[0])}

    summary = {"prior": str(folder), "input": source, "sampler": _describe(spec), "acceleration": args.acceleration,
               "effective_acceleration": out["effective_acceleration"], "samples": args.samples,
               "posterior_mean": score(out["mean"]), "zero_filled": score(out["zero_filled"]),
               "output_dir": str(target)}
    print(json.dumps(summary))
    return 0


# -- undersampled (multi-coil) k-space as acquired ------------------------------------------------------
def read_kspace(path: str | os.PathLike, slice_index: int | None = None) -> tuple[np.ndarray, str]:
    """Acquired k-space of one slice as ``(coils, H, W)`` complex64, and what was read.

    ``.npy``: a complex array ``(H, W)`` (one coil) or ``(coils, H, W)``; ``.h5``: fastMRI's
    ``kspace``, ``(slices, H, W)`` (single-coil) or ``(slices, coils, H, W)`` (multi-coil), slice
    ``slice_index`` (default: the middle one); ``.cfl`` / ``.hdr``: BART's format, ``(H, W)`` or
    ``(H, W, 1, coils)``.

    Raises:
        FileNotFoundError: for a missing file.
        ValueError: naming the file, for another format, a real array, another number of axes,
            an out-of-range slice or non-finite values.
    """
    path = Path(path)
    target = path.with_suffix(".cfl") if path.suffix == ".hdr" else path
    if not target.is_file():
        raise FileNotFoundError(f"k-space file not found: {target}")
    if path.suffix == ".npy":
        try:
            k = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"{path}: not a .npy array ({e})") from None
        what = str(path)
        if k.ndim == 2:
            k = k[None]
        elif k.ndim != 3:
            raise ValueError(f"{path}: k-space of shape {k.shape}; expected (H, W) or (coils, H, W)")
    elif path.suffix == ".h5":
        import h5py

        try:
            handle = h5py.File(path, "r")
        except OSError as e:
            raise ValueError(f"{path} is not a readable HDF5 file: {e}") from None
        with handle:
            if "kspace" not in handle:
                raise ValueError(f"{path} has no 'kspace' array (keys: {sorted(handle.keys())})")
            volume = handle["kspace"]
            if volume.ndim not in (3, 4):
                raise ValueError(f"{path}: 'kspace' has shape {volume.shape}; expected (slices, H, W) or "
                                 "(slices, coils, H, W)")
            index = volume.shape[0] // 2 if slice_index is None else int(slice_index)
            if not 0 <= index < volume.shape[0]:
                raise ValueError(f"--slice {index} is out of range: {path} has {volume.shape[0]} slices")
            k = volume[index]
        k = k[None] if k.ndim == 2 else k
        what = f"{path}: 'kspace' slice {index}"
    elif path.suffix in (".cfl", ".hdr"):
        header = path.with_suffix(".hdr")
        if not header.is_file():
            raise FileNotFoundError(f"BART header not found: {header}")
        lines = [line for line in header.read_text().splitlines() if not line.startswith("#")]
        dims = [int(v) for v in lines[0].split()]
        k = np.fromfile(target, dtype=np.complex64)
        if k.size != int(np.prod(dims)):
            raise ValueError(f"{target}: {k.size} values, the header says {dims}")
        k = k.reshape(dims, order="F")
        k = np.squeeze(k)
        k = k[None] if k.ndim == 2 else np.moveaxis(k, -1, 0)
        if k.ndim != 3:
            raise ValueError(f"{target}: k-space of dims {dims}; expected (H, W) or (H, W, 1, coils)")
        what = str(target)
    else:
        raise ValueError(f"{path}: unknown k-space format {path.suffix!r} (.npy, .h5 or .cfl / .hdr)")
    if not np.iscomplexobj(k):
        raise ValueError(f"{what}: k-space must be complex, got dtype {k.dtype} (magnitude images: --npy / --nifti)")
    if not np.isfinite(k).all():
        raise ValueError(f"{what}: k-space contains NaN or inf values")
    return np.ascontiguousarray(k.astype(np.complex64)), what


def centre_crop_kspace(kspace: np.ndarray, size: int) -> np.ndarray:
    """The centred ``size x size`` block of k-space ``(C, H, W)`` (zero-padded where the grid is smaller):
    the image at ``size x size`` of a lower resolution (or of the same field of view, finer-sampled)."""
    c, h, w = kspace.shape
    out = np.zeros((c, size, size), dtype=kspace.dtype)
    hc, wc = h // 2, w // 2
    sc = size // 2
    top, left = hc - sc, wc - sc
    src_r = slice(max(top, 0), min(top + size, h))
    src_c = slice(max(left, 0), min(left + size, w))
    dst_r = slice(src_r.start - top, src_r.stop - top)
    dst_c = slice(src_c.start - left, src_c.stop - left)
    out[:, dst_r, dst_c] = kspace[:, src_r, src_c]
    return out


def estimate_noise_std(kspace: np.ndarray, mask: np.ndarray, border: float = 0.1) -> float:
    """sigma of one real k-space component from the sampled points of the outer ``border`` of the grid
    (mostly noise at high frequency), by the median absolute value (robust: 1.4826 MAD).

    Raises:
        ValueError: if no sampled point lies in the border.
    """
    c, h, w = kspace.shape
    r = np.abs(np.arange(h) - h // 2)[:, None] / (h / 2)
    q = np.abs(np.arange(w) - w // 2)[None, :] / (w / 2)
    outer = (np.maximum(r, q) >= 1 - border) & mask
    if not outer.any():
        raise ValueError("no sampled k-space point in the outer border to estimate the noise: give --noise-std")
    values = np.concatenate([kspace[:, outer].real.ravel(), kspace[:, outer].imag.ravel()])
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


@torch.no_grad()
def reconstruct_kspace(pipeline, kspace: np.ndarray, mask: np.ndarray | None = None, spec: SamplerSpec | None = None,
                       samples: int = 4, seed: int = 0, noise_std: float | None = None, maps: np.ndarray | None = None,
                       batch_size: int = 8, dc_step: bool = True) -> dict:
    r"""Posterior samples of an image from acquired, undersampled k-space ``(coils, H, W)``.

    The centred ``S x S`` block of k-space (``S`` the prior's size: a lower-resolution image when
    the grid is larger) is the observation :math:`y_c = M F(S_c x) + e_c` of
    :class:`~diffem.operators.SenseFourier`, with coil maps from ESPIRiT on the calibration centre
    (sigpy's ``mri.app.EspiritCalib``; 1 for one coil) unless ``maps`` are given. Units: the
    zero-filled SENSE image's largest magnitude (``peak``) is 1, mapped to the prior's [-2, 2]
    (:math:`y' = 4 y / peak - 2 A 1`); :math:`\sigma_y` is estimated from the outer k-space
    (:func:`estimate_noise_std`) unless given (k-space units). A magnitude prior ``(1, S, S)`` models a
    real image: the zero-filled image's phase is absorbed into the maps, and what phase they do not
    absorb is left in the residual (its data consistency says how much). A complex prior ``(2, S, S)``
    (``data.complex``) models the phase itself: the maps stay ESPIRiT's, and the images are
    :math:`x = 2 y / peak`-scaled complex images (magnitudes shown).

    With ``dc_step`` (and >= 2 samples) the posterior mean also goes through a final data-consistency
    step (:func:`diffem.posterior.data_consistency_step`, 8 CG iterations): conditioned on ``y`` under
    :math:`\mathcal{N}(\bar x, \tau^2 I)` with :math:`\tau^2` the samples' mean variance, which pulls it
    towards the data by as much as the samples' spread allows (``mean_dc``; ``mean`` stays the raw mean).

    Returns:
        A dict: ``mean``, ``std``, ``samples`` ``(samples, S, S)``, ``zero_filled`` (SENSE), ``l1_wavelet``
        (sigpy, lambda 0.005, on the same data and maps) in magnitude units (1 = peak); ``mask`` ``(S, S)``;
        ``maps`` ``(C, S, S)``; ``noise_std`` (k-space units); ``mean_dc`` (or ``None``) and ``dc_tau`` (prior
        units) of the data-consistency step; ``data_consistency`` per coil and estimate,
        with ``noise_floor`` per coil; ``resolution`` (S, and the grid).
    """
    import sigpy.mri

    event = tuple(pipeline.event_shape)
    if len(event) != 3 or event[0] not in (1, 2) or event[1] != event[2]:
        raise ValueError(f"the prior's samples have shape {event}: not an MRI prior (expected (1, S, S) magnitude "
                         "or (2, S, S) complex images)")
    complex_prior = event[0] == 2
    s = event[-1]
    full_mask = np.abs(kspace).sum(0) > 0 if mask is None else np.asarray(mask, dtype=bool)
    if full_mask.shape != kspace.shape[1:]:
        raise ValueError(f"the mask has shape {full_mask.shape}, the k-space grid {kspace.shape[1:]}")
    sigma = estimate_noise_std(kspace, full_mask) if noise_std is None else float(noise_std)
    k = centre_crop_kspace(kspace * full_mask[None], s)
    m = centre_crop_kspace(full_mask[None].astype(np.complex64), s)[0].real > 0.5
    coils = k.shape[0]
    coil = centred_ifft2(k)  # the coils' zero-filled images, (C, S, S)
    maps_source = "given"
    if maps is None and coils == 1:
        maps, maps_source = np.ones((1, s, s), np.complex64), "one coil: sensitivity 1"
    elif maps is None:
        width = min(24, s)
        maps = sigpy.mri.app.EspiritCalib(k, calib_width=width, kernel_width=min(6, width // 2),
                                          show_pbar=False).run()
        maps_source = f"ESPIRiT (sigpy mri.app.EspiritCalib, calibration {width}x{width})"
        if not np.abs(maps).max() > 0:  # too small a calibration region: the coils' own low-resolution images
            maps = coil / np.sqrt((np.abs(coil) ** 2).sum(0, keepdims=True)).clip(1e-12)
            maps_source = "the coil images over their root sum of squares (ESPIRiT found no map at this size)"
    if maps_source != "given" and not complex_prior:
        # A magnitude prior models a real image: absorb the phase of the zero-filled SENSE image into the
        # maps, so that the image they combine to is real and non-negative (a smooth phase, estimated from the
        # centre of k-space, which the calibration region samples fully).
        phase = np.exp(1j * np.angle((np.conj(maps) * coil).sum(0)))
        maps = maps * phase[None]
        maps_source += ", image phase absorbed"
    elif maps_source != "given":
        maps_source += ", the image phase left to the complex prior"
    maps_t = torch.from_numpy(np.ascontiguousarray(maps)).to(torch.complex64)[None]
    A = SenseFourier(torch.from_numpy(m)[None], maps_t, complex_images=complex_prior)
    y = torch.from_numpy(np.stack([k.real, k.imag], axis=1).astype(np.float32))[None]  # (1, C, 2, S, S)
    peak = float(np.abs((np.conj(maps) * coil).sum(0)).max())  # of the zero-filled SENSE image
    if not peak > 0:
        raise ValueError("the k-space is empty (its zero-filled image is 0)")
    if complex_prior:  # x = 2 m e^{i phi} (diffem.data.mri.complex_images): no offset, half the magnitude scale
        y_prior, sigma_prior = 2 * y / peak, 2 * sigma / peak
    else:
        y_prior, sigma_prior = 4 * y / peak - 2 * A(torch.ones(1, *event)), 4 * sigma / peak
    show = (lambda x: complex_magnitude(x.float())[:, 0]) if complex_prior else _magnitude
    spec = spec or SamplerSpec(method="ddpm", steps=64, maxiter=1)
    spec = dataclasses.replace(spec, noise_std=None)
    reps = torch.zeros(int(samples), dtype=torch.long)
    draws = spec.sample(denoiser_of(pipeline.unet), y_prior[reps].to(pipeline.device), A[reps].to(pipeline.device),
                        event, make_generators(int(seed), indices=range(int(samples))), noise_std=sigma_prior,
                        batch_size=batch_size, device=pipeline.device).cpu().float()
    mean = draws.mean(0, keepdim=True)
    mean_dc, tau = None, None
    if dc_step and samples > 1:
        tau = float(draws.var(0).mean().sqrt().clamp_min(1e-6))
        mean_dc = data_consistency_step(mean, y_prior, A, sigma_prior, tau, maxiter=8)
    l1 = sigpy.mri.app.L1WaveletRecon(k, maps, 0.005, weights=m.astype(np.float32)[None], show_pbar=False).run()
    if complex_prior:
        l1_prior = torch.from_numpy(np.stack([l1.real, l1.imag]).astype(np.float32))[None] * (2 / peak)
    else:
        l1_prior = torch.from_numpy(np.real(l1).astype(np.float32))[None, None] * (4 / peak) - 2

    def consistency(x: Tensor) -> list[float]:
        r = (A(x) - y_prior).flatten(3).norm(dim=-1).square().sum(-1).sqrt()[0]  # (C,)
        norm = y_prior.flatten(3).norm(dim=-1).square().sum(-1).sqrt()[0]
        return (r / norm).tolist()

    norm = y_prior.flatten(3).norm(dim=-1).square().sum(-1).sqrt()[0]
    floor = (sigma_prior * float(np.sqrt(2 * m.sum())) / norm).tolist()
    zero_filled = A.sense_combination(y_prior)
    magnitudes = show(draws)
    return {
        "mean": show(mean)[0], "std": magnitudes.std(0) if samples > 1 else torch.zeros_like(magnitudes[0]),
        "samples": magnitudes, "zero_filled": show(zero_filled)[0], "l1_wavelet": show(l1_prior)[0],
        "mask": torch.from_numpy(m), "maps": maps, "maps_source": maps_source, "noise_std": sigma, "peak": peak,
        "data_consistency": {"posterior_mean": consistency(mean), "zero_filled": consistency(zero_filled),
                             "l1_wavelet": consistency(l1_prior)}
        | ({"posterior_mean_dc": consistency(mean_dc)} if mean_dc is not None else {}),
        "mean_dc": None if mean_dc is None else show(mean_dc)[0], "dc_tau": tau, "complex_prior": complex_prior,
        "noise_floor": floor, "resolution": {"prior": s, "grid": list(kspace.shape[1:])},
        "sampled_fraction": float(full_mask.mean()),
    }
