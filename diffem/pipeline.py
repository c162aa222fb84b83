r"""The diffusion prior as a diffusers pipeline: unconditional and posterior sampling.

``DiffusionPriorPipeline(unet, scheduler)`` holds a backbone (a diffusers
``UNet2DModel``, a :class:`~diffem.networks.MLP`, or a :class:`~diffem.gaussian.GaussianPrior`
for lap 0) and a :class:`~diffem.scheduler.VEScheduler`. Called without an
observation it samples the prior :math:`q_\theta(x)`; with an observation ``y``,
an operator ``A`` and a noise level :math:`\sigma_y`, it samples the posterior
:math:`q_\theta(x \mid y)` with MMPS (Rozet et al. 2024, arXiv:2405.13712, Section 4).
Each EM lap is saved as one such pipeline folder (``save_pretrained``). Its scheduler is
the evaluation's (unconditional samples); ``sampling.json`` beside it holds the E-step's
sampler settings, so that posterior sampling can repeat the E-step exactly::

    pipe = DiffusionPriorPipeline.from_pretrained("runs/manifold-cpu/lap_08")
    settings = load_sampling_settings("runs/manifold-cpu/lap_08")["estep"]
    pipe.scheduler = estep_scheduler(settings)
    pipe(observation=y, operator=A, noise_std=0.01, generator=gens,
         num_inference_steps=settings["num_inference_steps"], maxiter=settings["maxiter"])
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from torch import Tensor

from .denoiser import Denoiser
from .gaussian import GaussianPrior
from .operators import LinearOperator, check_batch
from .posterior import MMPSDenoiser
from .sampling import sample
from .scheduler import VEScheduler

__all__ = [
    "DiffusionPriorPipeline",
    "DiffusionPriorPipelineOutput",
    "event_shape_of",
    "denoiser_of",
    "SAMPLING_FILE",
    "load_sampling_settings",
    "estep_scheduler",
]

#: The file of a saved lap that holds its E-step and evaluation sampler settings.
SAMPLING_FILE = "sampling.json"


def load_sampling_settings(folder) -> dict:
    """The sampler settings a lap was saved with, ``{"estep": {...}, "eval": {...}}``.

    ``estep``: ``method`` ("ddpm", "ddim", "pc"), ``num_inference_steps``, ``corrections``,
    ``delta`` (PC only), ``maxiter`` and ``tol`` (CG of MMPS), and the posterior method
    (``guidance``, ``covariance``, ``guidance_options``: keyword arguments of
    :func:`diffem.sampling.sample_posterior`); ``eval``: ``method`` and
    ``num_inference_steps`` of the evaluation's unconditional sampler.

    Raises:
        FileNotFoundError: for a folder saved without them (laps saved before they were recorded).
    """
    path = Path(folder) / SAMPLING_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: this lap was saved without its sampler settings")
    return json.loads(path.read_text())


def estep_scheduler(settings: dict) -> VEScheduler:
    """The scheduler of a settings mapping (``load_sampling_settings(folder)["estep"]``): a
    :class:`VEScheduler`, or a diffusers EDM scheduler for ``"edm_euler"`` / ``"edm_dpmpp"``
    (:func:`diffem.edm.make_scheduler`)."""
    from .edm import make_scheduler

    return make_scheduler(
        settings["method"], corrections=int(settings.get("corrections", 1)), delta=float(settings.get("delta", 0.1))
    )


@dataclass
class DiffusionPriorPipelineOutput(BaseOutput):
    """``samples``: ``(B, *event_shape)`` float tensor in data units (images in about [-2, 2])."""

    samples: Tensor


def event_shape_of(backbone) -> tuple:
    """The shape of one sample of a backbone: ``(C, H, W)`` for a U-Net, ``(d,)`` for an MLP."""
    if isinstance(backbone, GaussianPrior):
        return tuple(backbone.event_shape)
    config = backbone.config
    if "features" in config:
        return (config.features,)
    if "sample_size" in config and "in_channels" in config:
        size = config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (config.in_channels, h, w)
    raise ValueError(f"cannot infer the event shape of backbone {type(backbone).__name__}")


def denoiser_of(backbone):
    """The denoiser of a backbone: a :class:`GaussianPrior` is its own exact denoiser."""
    return backbone if isinstance(backbone, GaussianPrior) else Denoiser(backbone)


class DiffusionPriorPipeline(DiffusionPipeline):
    r"""Sample a diffusion prior, or its posterior given linear-Gaussian observations.

    Arguments:
        unet: The backbone (``UNet2DModel``, :class:`~diffem.networks.MLP`) or a
            :class:`~diffem.gaussian.GaussianPrior`.
        scheduler: A :class:`~diffem.scheduler.VEScheduler`.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet, scheduler: VEScheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load a saved lap folder, or a folder / Hub repo written by ``diffem publish``.

        A published prior (its ``model_index.json`` names diffem's re-export files) loads with
        diffem's own classes, without ``trust_remote_code`` and without executing any file of
        the repository (:func:`diffem.hub.load_published`, safetensors weights only), e.g.
        ``DiffusionPriorPipeline.from_pretrained("someone/diffem-cifar10", revision="lap-03")``.
        Anything else goes to diffusers' ``DiffusionPipeline.from_pretrained``.
        """
        from .hub import load_published

        pipe = load_published(pretrained_model_name_or_path, **kwargs)
        return pipe if pipe is not None else super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @property
    def event_shape(self) -> tuple:
        return event_shape_of(self.unet)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 64,
        generator: torch.Generator | list[torch.Generator] | None = None,
        observation: Tensor | None = None,
        operator: LinearOperator | None = None,
        noise_std: float | None = None,
        maxiter: int = 1,
        return_dict: bool = True,
        progress: bool = True,
    ):
        r"""Draw samples.

        Arguments:
            batch_size: Number of samples (ignored, and must match, when ``observation`` is given).
            num_inference_steps: Sampler steps (the scheduler's ``method``: DDPM, DDIM or PC).
            generator: A seeded ``torch.Generator`` or a list of ``batch_size`` of them (one per
                sample: the samples then do not depend on the batch size). Required.
            observation: ``y``, ``(B, *out_shape)``, for posterior sampling.
            operator: ``A``, batch shape ``(B,)``; required with ``observation``.
            noise_std: :math:`\sigma_y > 0`; required with ``observation``.
            maxiter: CG iterations of MMPS.

        Returns:
            :class:`DiffusionPriorPipelineOutput` with ``samples`` ``(B, *event_shape)``, or a tuple.

        Raises:
            ValueError: on a missing generator, a missing operator / noise level, or shapes
                that do not match.
        """
        if generator is None:
            raise ValueError("`generator` is required: pass a seeded torch.Generator or a list of them")
        denoiser = denoiser_of(self.unet)
        if observation is not None:
            if operator is None or noise_std is None:
                raise ValueError("`operator` and `noise_std` are required with `observation`")
            batch_size = observation.shape[0]
            check_batch(operator, batch_size)
            denoiser = MMPSDenoiser(denoiser, observation.to(self.device), operator.to(self.device), noise_std, maxiter)
        elif operator is not None or noise_std is not None:
            raise ValueError("`operator` and `noise_std` are only meaningful with `observation`")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"`generator` is a list of {len(generator)}, expected one per sample ({batch_size})")
        x = sample(
            denoiser,
            (batch_size, *self.event_shape),
            self.scheduler,
            num_inference_steps,
            generator,
            progress=progress,
            device=self.device,
        )
        if not return_dict:
            return (x,)
        return DiffusionPriorPipelineOutput(samples=x)
