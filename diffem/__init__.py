"""diffem: learning diffusion priors from corrupted observations by expectation-maximization.

A reproduction of Rozet et al., "Learning Diffusion Priors from Observations by
Expectation Maximization", NeurIPS 2024 (arXiv:2405.13712), on PyTorch and diffusers.

This namespace holds the maths and the pipeline (operators, priors, denoisers, posterior
samplers, schedulers); importing it loads neither the EM trainer nor ``datasets``. The EM loop
and its lap-0 Gaussian fit are :mod:`diffem.em` (``from diffem.em import fit_gaussian_em``);
the layers are described in ``docs/architecture.md``.
"""

from .denoiser import Denoiser
from .edm import edm_scheduler, make_scheduler
from .gaussian import GaussianPrior
from .linalg import conjugate_gradient
from .networks import DiT, MLP, build_unet, unet_config
from .operators import GaussianObservation, Identity, Mask, Projection, Scaled, SenseFourier, SubsampledFourier
from .pipeline import DiffusionPriorPipeline, DiffusionPriorPipelineOutput
from .posterior import DiffPIRDenoiser, DPSGuidance, MMPSDenoiser, PiGDMGuidance, TMPDDenoiser, make_posterior
from .sampling import sample, sample_posterior
from .scheduler import VEScheduler
from .vp import VPDenoiser

__version__ = "0.1.0"

__all__ = [
    "Denoiser",
    "DiffusionPriorPipeline",
    "DiffusionPriorPipelineOutput",
    "GaussianObservation",
    "GaussianPrior",
    "Identity",
    "DiT",
    "MLP",
    "MMPSDenoiser",
    "DPSGuidance",
    "DiffPIRDenoiser",
    "PiGDMGuidance",
    "TMPDDenoiser",
    "make_posterior",
    "Mask",
    "Projection",
    "Scaled",
    "SubsampledFourier",
    "SenseFourier",
    "VEScheduler",
    "VPDenoiser",
    "edm_scheduler",
    "make_scheduler",
    "build_unet",
    "conjugate_gradient",
    "sample",
    "sample_posterior",
    "unet_config",
]
