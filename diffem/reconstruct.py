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

References:
    Rozet et al., "Learning Diffusion Priors from Observations by Expectation
    Maximization", NeurIPS 2024, arXiv:2405.13712, Section 5.3;
    Zbontar et al., "fastMRI", arXiv:1811.08839.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .data.mri import read_fastmri_file, resize_images, to_magnitude
from .operators import SubsampledFourier
from .pipeline import DiffusionPriorPipeline, denoiser_of
from .random import make_generators
from .runs import prior_folder
from .spec import SamplerSpec
from .tasks.mri import EVAL_STREAM, observe_kspace

__all__ = ["magnitudes_from_kspace", "prepare_slice", "reconstruct", "reconstruct_command"]


def _magnitude(x: Tensor) -> Tensor:
    """Magnitudes ``(N, H, W)`` of images ``(N, 1, H, W)`` in [-2, 2] (:func:`diffem.data.mri.to_magnitude`)."""
    return to_magnitude(x.float())[:, 0]


def _centred_ifft2(k: np.ndarray) -> np.ndarray:
    return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))


def magnitudes_from_kspace(kspace: np.ndarray, crop: int = 320) -> np.ndarray:
    r"""Magnitude images ``(N, c, c)`` of fully sampled k-space ``(N, H, W)``: :math:`|\mathrm{IFFT2c}(k)|`,
    centre-cropped to ``c = min(crop, H, W)`` (how fastMRI's 320x320 reconstructions are made).

    Raises:
        ValueError: if ``kspace`` is not a finite complex array of shape ``(N, H, W)``.
    """
    if not np.iscomplexobj(kspace):
        raise ValueError(f"`kspace` must be complex, got dtype {kspace.dtype}")
    if kspace.ndim != 3:
        raise ValueError(f"`kspace` must have shape (slices, height, width), got {kspace.shape}")
    if not np.isfinite(kspace).all():
        raise ValueError("`kspace` contains NaN or inf values")
    image = np.abs(_centred_ifft2(kspace))
    h, w = image.shape[-2:]
    c = min(crop, h, w)
    top, left = (h - c) // 2, (w - c) // 2
    return image[:, top:top + c, left:left + c].astype(np.float32)


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
        kspace = read_fastmri_file(args.h5, "kspace")
        volume = magnitudes_from_kspace(kspace)
        return prepare_slice(pick(volume, args.h5), float(volume.max()), size), f"{args.h5}: 'kspace'"
    if args.nifti is not None:
        import nibabel as nib

        path = Path(args.nifti)
        if not path.is_file():
            raise FileNotFoundError(f"NIfTI file not found: {path}")
        volume = np.asarray(nib.as_closest_canonical(nib.load(str(path))).dataobj, dtype=np.float32)
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
    array = np.load(path)
    if np.iscomplexobj(array):
        raise ValueError(f"{path}: expected real magnitudes, got a complex array (use --h5 for k-space)")
    if array.ndim == 2:
        return prepare_slice(array, float(np.max(array)), size), str(path)
    if array.ndim == 3:
        return prepare_slice(pick(array, str(path)), float(np.max(array)), size), str(path)
    raise ValueError(f"{path}: expected a slice (height, width) or a volume (slices, height, width), got shape {array.shape}")


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
    if len(event) != 3 or event[0] != 1:
        raise ValueError(f"{folder}: the prior's samples have shape {event}: not an MRI prior (expected (1, S, S))")
    x, source = _read_input(args, event[-1])
    out = reconstruct(pipeline, x, args.acceleration, args.samples, args.seed, args.noise_std, args.steps, args.maxiter)
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

    summary = {"prior": str(folder), "input": source, "acceleration": args.acceleration,
               "effective_acceleration": out["effective_acceleration"], "samples": args.samples,
               "posterior_mean": score(out["mean"]), "zero_filled": score(out["zero_filled"]),
               "output_dir": str(target)}
    print(json.dumps(summary))
    return 0
