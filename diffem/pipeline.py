r"""The diffusion prior as a diffusers pipeline: unconditional and posterior sampling.

``DiffusionPriorPipeline(unet, scheduler)`` holds a backbone (a diffusers
``UNet2DModel``, a :class:`~diffem.networks.MLP`, or a :class:`~diffem.gaussian.GaussianPrior`
for lap 0) and a :class:`~diffem.scheduler.VEScheduler`. Called without an
observation it samples the prior :math:`q_\theta(x)`; with an observation ``y``,
an operator ``A`` and a noise level :math:`\sigma_y`, it samples the posterior
:math:`q_\theta(x \mid y)` with MMPS (Rozet et al. 2024, arXiv:2405.13712, Section 4).
Each EM lap is saved as one such pipeline folder (``save_pretrained``).
"""

from __future__ import annotations

from dataclasses import dataclass

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

__all__ = ["DiffusionPriorPipeline", "DiffusionPriorPipelineOutput", "event_shape_of", "denoiser_of"]


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
