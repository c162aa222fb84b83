r"""The accelerated-MRI experiment: a diffusion prior learned from undersampled k-space only.

Observations (Rozet et al. 2024, Section 5.3)

.. math:: y_i = M_i \odot \big(\mathrm{FFT2c}(x_i) + \sigma_y e_i\big), \qquad \sigma_y = 10^{-2},

with the centred orthonormal 2-D FFT and a random column mask :math:`M_i` drawn per slice at
acceleration ``data.acceleration`` (the paper: R = 6) by :func:`diffem.data.mri_mask.column_mask`
(the authors' fastMRI mask, scaled to the image width); the forward operator is
:class:`~diffem.operators.SubsampledFourier` (real and imaginary parts as two channels).
Unobserved columns of ``y`` are stored as 0 (the authors add noise there too; it carries no
information, since :math:`A^T` removes those entries, so the likelihood is the same). The
mask and noise of observation ``i`` come from one generator seeded with
``derive_seed(data.seed, 0, i)``; ``data.duplicate`` repeats every observation so that the
E-step draws that many posterior samples of it (the authors: 2).

Images
    ``data.kind: brain`` (the ``cpu`` / ``smoke`` profiles): slices of the two offline brain
    volumes (:func:`diffem.data.mri.load_brain_slices`): training slices in three
    orientations, evaluation slices from a held-out axial slab of each volume that no
    training image touches. ``data.kind: fastmri`` (``paper``): the ``reconstruction_rss``
    slices of a user's fastMRI single-coil folder ``data.path`` (training) and
    ``data.eval_path`` (evaluation, e.g. the validation set; when null, the last
    ``data.eval_volumes`` files of ``data.path`` are held out instead and never observed).

Evaluation (:meth:`MriTask.evaluate`, every evaluated lap, lap 0 included)
    ``data.eval_slices`` held-out slices (evenly spaced over the evaluation split), each
    observed at every acceleration of ``data.eval_accelerations`` through a fixed mask and
    noise (seeded by ``(data.seed, 1, R, slice)``: the same at every lap). Reported per
    ``R``: PSNR, SSIM and NMSE of the zero-filled image :math:`A^+ y` (the pseudo-inverse,
    which counts the k-space columns whose mirror is missing twice; see
    :meth:`SubsampledFourier.pinv <diffem.operators.SubsampledFourier.pinv>`), of one
    posterior sample and of the mean of ``data.posterior_samples`` samples (MMPS,
    ``data.posterior_method`` / ``posterior_steps`` / ``posterior_maxiter``), on magnitude
    images :math:`|x + 2| / 4` with data range 1 (the volume's maximum: fastMRI's convention;
    SSIM with fastMRI's 7x7 uniform window); the mean posterior standard deviation
    (magnitude units); the data consistency :math:`\lVert A \hat x - y \rVert / \lVert y \rVert`
    of each estimate (its floor is the noise: ``noise_floor``); the mean kept fraction of
    columns and the effective acceleration :math:`HW / \operatorname{rank} A` (milder than R:
    a real image's spectrum is conjugate-symmetric). ``eval.samples`` unconditional prior
    samples are drawn too (figures only).

References:
    Rozet et al., "Learning Diffusion Priors from Observations by Expectation
    Maximization", NeurIPS 2024, arXiv:2405.13712, Section 5.3 and Appendix C;
    Zbontar et al., "fastMRI", arXiv:1811.08839.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..config import ConfigError
from ..operators import SenseFourier, SubsampledFourier
from ..observations import ObservationSet
from . import Task, draw_prior_samples, load_or_build
from .images import random_flip_shift as flip_shift

__all__ = ["MriTask", "observe_kspace", "random_flip_shift", "TRAIN_STREAM", "EVAL_STREAM"]

_NET_KEYS = ("factor", "block_out_channels", "layers_per_block", "attention_levels", "norm_num_groups", "dropout",
             "heads")
#: The seed streams of the training observations and of the fixed evaluation observations
#: (:func:`observe_kspace`).
TRAIN_STREAM, EVAL_STREAM = 0, 1
#: The seed stream of the synthetic phase maps of complex images (``data.complex``).
PHASE_STREAM = 2


def kspace_operator(mask: Tensor, complex_images: bool = False, maps: Tensor | None = None):
    """The task's forward operator for column masks ``(N, W)``: :class:`SubsampledFourier`, or
    :class:`SenseFourier` with the coil maps ``maps`` ``(C, H, W)`` shared by every observation
    (an expanded view: no copy per observation) and the columns as a 2-D mask."""
    if maps is None:
        return SubsampledFourier(mask, complex_images=complex_images)
    n, w = mask.shape
    c, h, _ = maps.shape
    return SenseFourier(mask[:, None, :].expand(n, h, w), maps.expand(n, c, h, w), complex_images=complex_images)


def observe_kspace(x: Tensor, acceleration: float, noise_std: float, seed: int, stream: int, indices,
                   maps: Tensor | None = None) -> tuple[Tensor, Tensor]:
    r"""Observe images through random column masks: :math:`y = M \odot (\mathrm{FFT2c}(x) + \sigma e)`,
    or for coils, :math:`y_c = M \odot (\mathrm{FFT2c}(S_c x) + \sigma e_c)`.

    Image ``k`` (index ``indices[k]``) draws its mask (:func:`diffem.data.mri_mask.column_mask`)
    and then its noise from one generator seeded with ``derive_seed(seed, stream, index)``
    (the evaluation masks add ``round(100 R)`` to the keys), so an observation depends on
    ``(seed, stream, index)`` only, never on the batch.

    Arguments:
        x: Images ``(N, 1, H, W)`` in [-2, 2] (real magnitudes) or ``(N, 2, H, W)`` (complex:
            real and imaginary channels), square: ``H == W``.
        acceleration: The nominal acceleration ``R`` >= 1.
        noise_std: :math:`\sigma > 0` (data units).
        seed, stream: Non-negative integers.
        indices: ``N`` non-negative integers.
        maps: Optional coil sensitivities ``(C, H, W)`` complex (SENSE, :class:`SenseFourier`).

    Returns:
        ``(y, mask)``: ``y`` ``(N, 2, H, W)`` float32 (``(N, C, 2, H, W)`` with ``maps``), zero in
        unobserved columns; ``mask`` ``(N, W)`` bool.

    Raises:
        ValueError: for a non-square or non-4-D ``x``, a bad acceleration or noise level, maps of
            the wrong shape.
    """
    from ..data.mri_mask import column_mask
    from ..random import derive_seed

    if x.dim() != 4 or x.shape[1] not in (1, 2) or x.shape[2] != x.shape[3]:
        raise ValueError(f"`x` must have shape (N, 1 or 2, S, S), got {tuple(x.shape)}")
    if maps is not None and (maps.dim() != 3 or tuple(maps.shape[1:]) != tuple(x.shape[2:])):
        raise ValueError(f"`maps` must have shape (C, {x.shape[2]}, {x.shape[3]}), got {tuple(maps.shape)}")
    if not noise_std > 0:
        raise ValueError(f"`noise_std` must be > 0, got {noise_std!r}")
    n, _, h, w = x.shape
    indices = [int(i) for i in indices]
    if len(indices) != n:
        raise ValueError(f"`indices` has length {len(indices)}, expected {n}")
    extra = (int(round(100 * acceleration)),) if stream == EVAL_STREAM else ()
    coil_shape = () if maps is None else (int(maps.shape[0]),)
    masks, noises = [], []
    for i in indices:
        g = torch.Generator().manual_seed(derive_seed(seed, stream, *extra, i))
        masks.append(column_mask(w, acceleration, g))
        noises.append(torch.randn(*coil_shape, 2, h, w, generator=g))
    mask = torch.stack(masks)
    A = kspace_operator(mask, x.shape[1] == 2, maps)
    y = A(x.float()) + float(noise_std) * torch.stack(noises) * mask.view(n, *[1] * (len(coil_shape) + 2), w)
    return y, mask


def random_flip_shift(x: Tensor, generator: torch.Generator, shift: int = 4) -> Tensor:
    """Left-right flips (p = 1/2) and shifts of up to ``shift`` pixels (the authors' MRI augmentation).

    :func:`diffem.tasks.images.random_flip_shift` with shifts padding with the image's
    background value -2 (an MRI's empty surroundings), not by reflection. ``x``:
    ``(B, C, H, W)``; every draw comes from ``generator`` (``B`` uniforms, then ``2 B`` integers).
    """
    return flip_shift(x, generator, shift, pad_value=-2.0)


def _magnitude(x: Tensor) -> Tensor:
    """Magnitudes ``(N, H, W)`` in [0, 1] of real ``(N, 1, H, W)`` or complex ``(N, 2, H, W)`` images."""
    from ..data.mri import complex_magnitude, to_magnitude

    x = x.float()
    return (complex_magnitude(x) if x.shape[1] == 2 else to_magnitude(x))[:, 0]


def _display(x: Tensor) -> Tensor:
    """Images ``(..., C, H, W)`` as the figures show them: real ``(..., 1, H, W)`` in [-2, 2] (complex ones,
    ``C = 2``, by their magnitude)."""
    from ..data.mri import magnitude_as_real

    return magnitude_as_real(x) if x.shape[-3] == 2 else x


class MriTask(Task):
    """Accelerated MRI from undersampled k-space; see the module docstring.

    ``data`` options: ``kind`` (brain | fastmri), ``path`` (brain: the NIfTI folder, null for
    ``../shared/data/mri``; fastmri: the folder of training ``.h5`` files, required),
    ``eval_path``, ``eval_volumes``, ``size``, ``holdout``, ``gap``, ``min_foreground``,
    ``observations`` (null: all training slices), ``duplicate``, ``acceleration``,
    ``noise_std``, ``seed``, ``eval_accelerations``, ``eval_slices``, ``posterior_samples``,
    ``posterior_method``, ``posterior_steps``, ``posterior_maxiter``, ``posterior_batch_size``,
    ``shift`` (M-step augmentation), ``cache_dir``, ``complex`` (complex images as two channels:
    on the brains with a synthetic smooth phase, :func:`diffem.data.mri.synthetic_phase` of scale
    ``phase_scale``; on fastMRI from each file's ``kspace`` with the scanner's own phase,
    :func:`diffem.data.mri.complex_volume`), ``coils`` (1: single coil; more: SENSE with simulated birdcage maps,
    :func:`diffem.data.mri.simulated_coil_maps`). ``network`` options: ``preset``
    (:data:`diffem.networks.UNSHUFFLE_PRESETS`) and any preset override.
    """

    name = "mri"
    data_defaults = dict(
        kind="brain", path=None, eval_path=None, eval_volumes=4, size=64, holdout=[0.55, 0.65], gap=4,
        min_foreground=0.15, observations=None, duplicate=1, acceleration=6, noise_std=1e-2, seed=0,
        eval_accelerations=[4, 6, 8, 16, 32], eval_slices=8, posterior_samples=4, posterior_method="ddpm",
        posterior_steps=64, posterior_maxiter=5, posterior_batch_size=64, shift=4, cache_dir=None,
        complex=False, phase_scale=1.0, coils=1,
    )
    network_defaults = dict(preset="cpu") | {k: None for k in _NET_KEYS}
    # (not eval_path / eval_volumes: without eval_path, the held-out volumes leave the training set)
    eval_data_keys = ("eval_accelerations", "eval_slices", "posterior_samples", "posterior_method", "posterior_steps",
                      "posterior_maxiter", "posterior_batch_size")

    @classmethod
    def card_facts(cls, data: dict, observations, fmt) -> dict:
        """The model card's description of MRI observations (:meth:`Task.card_facts <diffem.tasks.Task.card_facts>`)."""
        size, R, sigma = data.get("size"), data.get("acceleration"), data.get("noise_std")
        complex_images, coils = bool(data.get("complex")), int(data.get("coils") or 1)
        fastmri = data.get("kind") == "fastmri"
        source = ("the offline brain volumes" if not fastmri
                  else "fastMRI single-coil knee slices (complex images from `kspace`)" if complex_images
                  else "fastMRI single-coil knee `reconstruction_rss` slices")
        return dict(
            datasets=[], pipeline_tag="unconditional-image-generation", task_type="unconditional-image-generation",
            dataset_type="fastmri" if data.get("kind") == "fastmri" else "mri-brain-volumes",
            dataset_name=f"MRI slices ({data.get('kind')}, {size}x{size})", dataset_split="eval", kind="image",
            event=(f"(2, {size}, {size}) complex images (real, imaginary) with magnitude in [0, 2]" if complex_images
                   else f"(1, {size}, {size}) magnitude images in [-2, 2]"),
            corruption=(f"{observations} MRI slices of {source}, {size}x{size} pixels"
                        + (" with a synthetic smooth phase" if complex_images and not fastmri else "")
                        + (f", each observed through {coils} simulated coils as y_c = M (FFT2c(S_c x) + sigma_y e_c)"
                           if coils > 1 else ", each observed as y = M (FFT2c(x) + sigma_y e)")
                        + f": a random column mask M of acceleration R = {fmt(R)} "
                        f"over the centred 2-D FFT, noise std sigma_y = {fmt(sigma)}"
                        + (f", every observation repeated {data.get('duplicate')} times"
                           if (data.get("duplicate") or 1) > 1 else "")),
            operator=(f"`diffem.SenseFourier` ({coils} coils, " if coils > 1 else "`diffem.SubsampledFourier` (")
            + ("complex images, " if complex_images else "") + "real and imaginary k-space as two channels)",
            posterior=(
                ("from diffem import SenseFourier\n"
                 f"mask = ...  # (4, {size}, {size}) bool: the observed k-space points\n"
                 f"maps = ...  # (4, {coils}, {size}, {size}) complex coil sensitivities (e.g. ESPIRiT)\n"
                 f"A = SenseFourier(mask, maps{', complex_images=True' if complex_images else ''})\n"
                 f"y = ...  # (4, {coils}, 2, H, W): each coil's real and imaginary k-space, zero where unobserved")
                if coils > 1 else
                ("from diffem import SubsampledFourier\n"
                 "from diffem.operators import column_mask\n"
                 f"mask = ...  # (4, {size}) bool: the observed k-space columns, e.g. from column_mask\n"
                 f"A = SubsampledFourier(mask{', complex_images=True' if complex_images else ''})\n"
                 "y = ...  # (4, 2, H, W): real and imaginary k-space, zero on unobserved columns")),
        )

    # -- options ---------------------------------------------------------------------------------
    def check(self):
        d = self.data
        if d["kind"] not in ("brain", "fastmri"):
            raise ConfigError(f"config key `data.kind` must be 'brain' or 'fastmri', got {d['kind']!r}")
        if d["kind"] == "fastmri":
            if d["path"] is None:
                raise ConfigError("config key `data.path` must name your fastMRI folder of .h5 files (kind: fastmri)")
            for key in ("path", "eval_path"):
                if d[key] is not None and not Path(d[key]).expanduser().is_dir():
                    raise ConfigError(f"config key `data.{key}`: folder `{d[key]}` does not exist")
        elif d["path"] is not None and not Path(d["path"]).expanduser().is_dir():
            raise ConfigError(f"config key `data.path`: folder `{d['path']}` does not exist")

        def integer(key, low):
            v = d[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"config key `data.{key}` must be an integer >= {low}, got {v!r}")

        for key, low in (("size", 8), ("gap", 0), ("duplicate", 1), ("seed", 0), ("eval_slices", 1),
                         ("posterior_samples", 1), ("posterior_steps", 1), ("posterior_maxiter", 1),
                         ("posterior_batch_size", 1), ("shift", 0), ("eval_volumes", 1), ("coils", 1)):
            integer(key, low)
        if not isinstance(d["complex"], bool):
            raise ConfigError(f"config key `data.complex` must be true or false, got {d['complex']!r}")
        ps = d["phase_scale"]
        if isinstance(ps, bool) or not isinstance(ps, (int, float)) or not ps >= 0:
            raise ConfigError(f"config key `data.phase_scale` must be a number >= 0 (radians), got {ps!r}")
        if d["observations"] is not None:
            integer("observations", 2)
        for key in ("acceleration", "noise_std", "min_foreground"):
            v = d[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"config key `data.{key}` must be a number, got {v!r}")
        if not d["acceleration"] >= 1:
            raise ConfigError(f"config key `data.acceleration` must be >= 1, got {d['acceleration']!r}")
        if not d["noise_std"] > 0:
            raise ConfigError(f"config key `data.noise_std` must be > 0, got {d['noise_std']!r}")
        rs = d["eval_accelerations"]
        if not isinstance(rs, (list, tuple)) or not rs or any(
                isinstance(r, bool) or not isinstance(r, (int, float)) or not r >= 1 for r in rs):
            raise ConfigError(f"config key `data.eval_accelerations` must be a list of numbers >= 1, got {rs!r}")
        h = d["holdout"]
        if not isinstance(h, (list, tuple)) or len(h) != 2 or not 0 <= float(h[0]) < float(h[1]) <= 1:
            raise ConfigError(f"config key `data.holdout` must be [start, stop] fractions with 0 <= start < stop <= 1, got {h!r}")
        if d["posterior_method"] not in ("ddpm", "ddim", "pc"):
            raise ConfigError(f"config key `data.posterior_method` must be ddpm, ddim or pc, got {d['posterior_method']!r}")
        from ..networks import UNSHUFFLE_PRESETS

        if self.net["preset"] not in UNSHUFFLE_PRESETS:
            raise ConfigError(f"config key `network.preset` must be one of {sorted(UNSHUFFLE_PRESETS)}, got {self.net['preset']!r}")
        factor = self._net_overrides().get("factor", UNSHUFFLE_PRESETS[self.net["preset"]]["factor"])
        if d["size"] % factor:
            raise ConfigError(f"config key `data.size` ({d['size']}) must be a multiple of the unshuffle factor {factor}")

    def _net_overrides(self) -> dict:
        return {k: self.net[k] for k in _NET_KEYS if self.net.get(k) is not None}

    @property
    def size(self) -> int:
        return int(self.data["size"])

    @property
    def complex_images(self) -> bool:
        """Whether x is complex, ``(2, S, S)`` (``data.complex``)."""
        return bool(self.data["complex"])

    @property
    def event_shape(self) -> tuple:
        return (2 if self.complex_images else 1, self.size, self.size)

    @property
    def coil_maps(self) -> Tensor | None:
        """The simulated coil maps ``(data.coils, S, S)`` complex64, or ``None`` for one coil."""
        if int(self.data["coils"]) < 2:
            return None
        if getattr(self, "_maps", None) is None:
            from ..data.mri import simulated_coil_maps

            self._maps = simulated_coil_maps(int(self.data["coils"]), self.size)
        return self._maps

    def operator(self, mask: Tensor):
        """The forward operator of column masks ``(N, S)`` (:func:`kspace_operator`)."""
        return kspace_operator(mask, self.complex_images, self.coil_maps)

    # -- data ------------------------------------------------------------------------------------
    def _slices(self, split: str):
        """The slice dataset of a split ("train" or "test"); clean images stay inside the task."""
        cache = getattr(self, "_datasets", None)
        if cache is None:
            cache = self._datasets = {}
        if split not in cache:
            from ..data import mri

            d = self.data
            if d["kind"] == "brain":
                cache[split] = mri.load_brain_slices(split, self.size, d["path"], tuple(d["holdout"]), d["gap"],
                                                     d["min_foreground"], cache_dir=d["cache_dir"])
            else:
                cache[split] = self._fastmri(split)
        return cache[split]

    def _fastmri(self, split: str):
        from ..data import mri

        d = self.data
        if d["eval_path"] is not None:
            folder = d["eval_path"] if split == "test" else d["path"]
            return mri.load_fastmri(folder, self.size, cache_dir=d["cache_dir"], complex_images=self.complex_images)
        files = sorted(p.name for p in Path(d["path"]).expanduser().glob("*.h5"))
        k = int(d["eval_volumes"])
        if len(files) <= k:
            raise ConfigError(f"config key `data.eval_volumes`: {k} held-out volumes leave no training volume "
                              f"among the {len(files)} files of `{d['path']}` (or set `data.eval_path`)")
        chosen = files[-k:] if split == "test" else files[:-k]
        return mri.load_fastmri(d["path"], self.size, files=chosen, cache_dir=d["cache_dir"],
                                complex_images=self.complex_images)

    def clean_images(self, split: str) -> Tensor:
        """Clean images ``(N, 1, S, S)`` in [-2, 2]: the observed training slices (``"train"``,
        the first ``data.observations``) or the evaluation slices (``"test"``)."""
        from ..data.mri import images_of

        if split not in ("train", "test"):
            raise ValueError(f"`split` must be 'train' or 'test', got {split!r}")
        ds = self._slices(split)
        if split == "test":
            idx = np.unique(np.linspace(0, len(ds) - 1, min(int(self.data["eval_slices"]), len(ds))).round().astype(int))
        else:
            n = self.data["observations"]
            n = len(ds) if n is None else int(n)
            if n > len(ds):
                raise ConfigError(f"config key `data.observations`: {n} requested, only {len(ds)} training slices")
            idx = np.arange(n)
        x = images_of(ds.select(idx.tolist()))
        if self.complex_images and self.data["kind"] == "brain":  # fastMRI's complex images carry their own phase
            return self._with_phase(x, split, idx)
        return x

    def _with_phase(self, x: Tensor, split: str, idx) -> Tensor:
        """Complex images ``(N, 2, S, S)``: slice ``idx[k]`` of ``split`` gets its own synthetic phase, seeded
        by ``derive_seed(data.seed, PHASE_STREAM, split, idx[k])`` (the same at every lap and run)."""
        from ..data.mri import complex_images, synthetic_phase
        from ..random import derive_seed

        split_key = 0 if split == "train" else 1
        phases = torch.stack([
            synthetic_phase(self.size, torch.Generator().manual_seed(derive_seed(int(self.data["seed"]), PHASE_STREAM,
                                                                                  split_key, int(i))),
                            float(self.data["phase_scale"]))
            for i in idx])
        return complex_images(x, phases)

    def clean_signals(self) -> Tensor:
        """The clean slices behind the observations, ``(N * data.duplicate, *event_shape)`` in [-2, 2]
        (``train_on: clean``, the oracle reference), in the observations' order."""
        x = self.clean_images("train")
        k = int(self.data["duplicate"])
        return x.repeat(k, 1, 1, 1) if k > 1 else x

    def observations(self, cache_dir: Path) -> ObservationSet:
        """The observation set (each observation ``data.duplicate`` times); saved once under
        ``cache_dir/observations`` with the columns ``y`` and ``mask`` only."""
        import datasets

        d = self.data

        def build():
            x = self.clean_images("train")
            maps = self.coil_maps
            y_feature = (datasets.Array3D(shape=(2, self.size, self.size), dtype="float32") if maps is None else
                         datasets.Array4D(shape=(len(maps), 2, self.size, self.size), dtype="float32"))
            features = datasets.Features({
                "y": y_feature,
                "mask": datasets.Sequence(datasets.Value("bool"), length=self.size),
            })

            def rows(start: int, stop: int):
                for i in range(start, stop, 64):
                    j = min(i + 64, stop)
                    y, mask = observe_kspace(x[i:j], float(d["acceleration"]), float(d["noise_std"]), int(d["seed"]),
                                             TRAIN_STREAM, range(i, j), maps=maps)
                    for k in range(j - i):
                        yield {"y": y[k].numpy(), "mask": mask[k].numpy()}

            scratch = Path(cache_dir) / "observations.build"
            return datasets.Dataset.from_generator(rows, features=features, gen_kwargs={"start": 0, "stop": len(x)},
                                                   cache_dir=str(scratch))

        path = Path(cache_dir) / "observations"
        ds = load_or_build(path, build).with_format("torch")
        import shutil

        shutil.rmtree(Path(cache_dir) / "observations.build", ignore_errors=True)
        y, mask = ds["y"][:], ds["mask"][:].bool()
        k = int(d["duplicate"])
        if k > 1:
            y, mask = y.repeat(k, *[1] * (y.dim() - 1)), mask.repeat(k, 1)
        return ObservationSet(y, self.operator(mask), float(d["noise_std"]), self.event_shape)

    # -- model -----------------------------------------------------------------------------------
    def backbone(self, seed: int) -> nn.Module:
        from ..networks import build_unshuffle_unet

        return build_unshuffle_unet(self.net["preset"], self.size, self.event_shape[0], seed, **self._net_overrides())

    def augment(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Flips and shifts of up to ``data.shift`` pixels (:func:`random_flip_shift`) when ``mstep.augment`` is on
        (complex images pad with their background 0, magnitude images with -2)."""
        if not self.config.mstep.augment:
            return x
        if self.complex_images:
            return flip_shift(x, generator, int(self.data["shift"]), pad_value=0.0)
        return random_flip_shift(x, generator, int(self.data["shift"]))

    # -- evaluation --------------------------------------------------------------------------------
    def evaluation_observations(self, acceleration: float) -> tuple[Tensor, Tensor]:
        """The fixed evaluation observations at one acceleration: ``(y (n, 2, S, S), mask (n, S))``
        (``y`` ``(n, C, 2, S, S)`` with coils)."""
        x = self.clean_images("test")
        return observe_kspace(x, float(acceleration), float(self.data["noise_std"]), int(self.data["seed"]),
                              EVAL_STREAM, range(len(x)), maps=self.coil_maps)

    def evaluate(self, pipeline, lap: int, generator_seed: int, progress: bool = True) -> dict:
        """Metrics of the prior ``pipeline`` on the held-out slices; see the module docstring.

        Returns a record with ``accelerations`` (a mapping ``"R"`` -> metrics) and, for the
        training acceleration, the headline ``psnr_posterior_mean`` / ``ssim_posterior_mean``.
        ``self.artifacts`` gets the images of the figures (per R: mask, zero-filled, two
        samples, std; ground truth; prior samples).
        """
        from ..metrics import nmse, psnr, ssim
        from ..pipeline import denoiser_of
        from ..random import make_generators
        from ..spec import SamplerSpec

        d = self.data
        x = self.clean_images("test")
        n, k = len(x), int(d["posterior_samples"])
        truth = _magnitude(x)
        denoiser = denoiser_of(pipeline.unet)
        device = pipeline.device

        def scores(estimate: Tensor) -> dict:
            m = _magnitude(estimate)
            return {"psnr": float(psnr(m, truth, data_range=1.0).mean()),
                    "ssim": float(ssim(m, truth, data_range=1.0, gaussian_kernel=False, kernel_size=7).mean()),
                    "nmse": float(nmse(m, truth).mean())}

        per_r, artifacts = {}, {"truth": _display(x), "accelerations": {}}
        for r_index, R in enumerate(d["eval_accelerations"]):
            y, mask = self.evaluation_observations(R)
            A = self.operator(mask)
            zero_filled = A.sense_combination(y) if isinstance(A, SenseFourier) else A.pinv(y)
            reps = torch.arange(n).repeat_interleave(k)
            gens = make_generators(generator_seed, r_index, indices=range(n * k))
            spec = SamplerSpec(method=d["posterior_method"], steps=int(d["posterior_steps"]),
                               maxiter=int(d["posterior_maxiter"]), noise_std=float(d["noise_std"]))
            samples = spec.sample(
                denoiser, y[reps].to(device), A[reps].to(device), self.event_shape, gens,
                batch_size=int(d["posterior_batch_size"]), device=device,
            ).cpu().float().reshape(n, k, *self.event_shape)
            mean = samples.mean(1)
            norm_y = y.flatten(1).norm(dim=1)

            def consistency(estimate: Tensor) -> float:
                return float(((A(estimate) - y).flatten(1).norm(dim=1) / norm_y).mean())

            noise_floor = float((float(d["noise_std"]) * (2 * int(d["coils"]) * self.size * mask.sum(1)).double().sqrt()
                                 / norm_y).mean())
            std = _magnitude(samples.flatten(0, 1)).reshape(n, k, self.size, self.size).std(1) if k > 1 else None
            entry = {}
            for name, est in (("zero_filled", zero_filled), ("posterior_sample", samples[:, 0]), ("posterior_mean", mean)):
                entry |= {f"{key}_{name}": value for key, value in scores(est).items()}
                entry[f"data_consistency_{name}"] = consistency(est)
            entry |= {
                "posterior_std": None if std is None else float(std.mean()),
                "noise_floor": noise_floor,
                "kept_fraction": float(mask.float().mean()),
                # SENSE: the nominal R (the coils' redundancy has no closed-form rank)
                "effective_acceleration": float(A.effective_acceleration().mean() if isinstance(A, SubsampledFourier)
                                                else (1 / mask.float().mean(1)).mean()),
            }
            per_r[f"{R:g}"] = entry
            artifacts["accelerations"][f"{R:g}"] = {
                "mask": mask, "zero_filled": _display(zero_filled), "samples": _display(samples[:, :2]),
                "mean": _display(mean), "std": std,
            }
        out: dict = {"accelerations": per_r, "eval_slices": n, "posterior_samples": k}
        train_r = f"{float(d['acceleration']):g}"
        if train_r in per_r:
            for key in ("psnr_posterior_mean", "ssim_posterior_mean", "psnr_zero_filled", "ssim_zero_filled"):
                out[key] = per_r[train_r][key]
        cfg = self.config.eval
        prior = draw_prior_samples(pipeline, cfg.samples, cfg, generator_seed, progress) if cfg.samples > 0 else None
        artifacts["prior"] = None if prior is None else _display(prior[:16].cpu())
        self.artifacts = artifacts
        return out
