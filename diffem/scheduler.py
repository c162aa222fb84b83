r"""Variance-exploding scheduler with DDPM, DDIM and predictor-corrector updates.

Time runs from :math:`t = 1` to :math:`0` on ``num_inference_steps`` uniform steps
and :math:`\sigma_t = \exp((1-t)\ln\sigma_{\min} + t\ln\sigma_{\max})`. With the
denoiser output :math:`\hat{x} = d(x_t, \sigma_t)` and the next level :math:`\sigma_s`:

- DDIM: :math:`x_s = x_t - (1 - \sigma_s/\sigma_t)(x_t - \hat{x})`;
- DDPM: :math:`x_s = x_t - \tau (x_t - \hat{x}) + \sigma_s \sqrt{\tau} \, \epsilon`,
  :math:`\tau = 1 - \sigma_s^2/\sigma_t^2` (the exact VE posterior :math:`q(x_s \mid x_t, \hat{x})`);
- PC: the DDIM predictor, then ``corrections`` Langevin corrector steps
  :math:`x_s \leftarrow x_s - \delta (x_s - d(x_s, \sigma_s)) + \sigma_s \sqrt{2\delta} \, \epsilon`.

After the last step (at :math:`\sigma_{\min}`) a final denoise returns
:math:`d(x, \sigma_{\min})`.

References:
    Ho et al. 2020 (DDPM), arXiv:2006.11239; Song et al. 2021 (DDIM), arXiv:2010.02502;
    Song et al. 2021 (predictor-corrector), arXiv:2011.13456; Rozet et al. 2024,
    arXiv:2405.13712, Appendix C.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from torch import Tensor

from .random import randn

__all__ = ["VEScheduler", "VESchedulerOutput"]

METHODS = ("ddpm", "ddim", "pc")


@dataclass
class VESchedulerOutput(BaseOutput):
    """``prev_sample``: the sample at the next (lower) noise level, ``(B, *event_shape)``."""

    prev_sample: Tensor


class VEScheduler(SchedulerMixin, ConfigMixin):
    r"""Variance-exploding scheduler on the exponential sigma grid.

    Arguments:
        sigma_min: Lowest noise level (data units), default ``1e-3``.
        sigma_max: Highest noise level, default ``1e2``.
        method: ``"ddpm"``, ``"ddim"`` or ``"pc"`` (predictor-corrector).
        corrections: Langevin corrections per step (``"pc"`` only).
        delta: Langevin step size :math:`\delta` (``"pc"`` only).

    Usage (diffusers style)::

        scheduler.set_timesteps(64)
        for i, sigma in enumerate(scheduler.sigmas[:-1]):
            x = scheduler.step(denoiser(x, sigma), i, x, generator=g, denoiser=denoiser).prev_sample
        x = denoiser(x, scheduler.sigmas[-1])  # final denoise
    """

    order = 1

    @register_to_config
    def __init__(
        self,
        sigma_min: float = 1e-3,
        sigma_max: float = 1e2,
        method: str = "ddpm",
        corrections: int = 1,
        delta: float = 0.1,
    ):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < `sigma_min` < `sigma_max`, got {sigma_min}, {sigma_max}")
        if method not in METHODS:
            raise ValueError(f"`method` must be one of {METHODS}, got {method!r}")
        if corrections < 0 or delta <= 0:
            raise ValueError(f"need `corrections` >= 0 and `delta` > 0, got {corrections}, {delta}")
        self.init_noise_sigma = sigma_max
        self.num_inference_steps = None
        self.sigmas = None
        self.timesteps = None

    def sigma(self, t: Tensor) -> Tensor:
        r""":math:`\sigma_t` for ``t`` in [0, 1]."""
        lo, hi = math.log(self.config.sigma_min), math.log(self.config.sigma_max)
        return torch.exp(lo + (hi - lo) * t)

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Set the grid: ``timesteps`` (``t`` from 1 down to ``1/steps``) and ``sigmas`` (``steps + 1`` levels, last ``sigma_min``)."""
        if int(num_inference_steps) != num_inference_steps or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be an integer >= 1, got {num_inference_steps!r}")
        n = int(num_inference_steps)
        t = torch.linspace(1, 0, n + 1, dtype=torch.float64)
        self.num_inference_steps = n
        self.timesteps = t[:-1].to(device=device, dtype=torch.float32)
        self.sigmas = self.sigma(t).to(device=device, dtype=torch.float32)

    def step(
        self,
        model_output: Tensor,
        timestep: int,
        sample: Tensor,
        generator=None,
        denoiser=None,
        return_dict: bool = True,
    ):
        r"""One update from ``sigmas[timestep]`` to ``sigmas[timestep + 1]``.

        Arguments:
            model_output: The denoiser's estimate :math:`\hat{x}` of :math:`\mathbb{E}[x \mid x_t]`,
                shape of ``sample``.
            timestep: The step index ``i`` in ``range(num_inference_steps)``.
            sample: :math:`x_t`, ``(B, *event_shape)``.
            generator: A ``torch.Generator`` or a list of them (one per block of samples,
                see :func:`diffem.random.randn`); required for ``"ddpm"`` and ``"pc"``.
            denoiser: The denoiser, required by the ``"pc"`` corrector.

        Returns:
            :class:`VESchedulerOutput` (or a tuple when ``return_dict=False``).
        """
        if self.sigmas is None:
            raise RuntimeError("call `set_timesteps` before `step`")
        i = int(timestep)
        if not 0 <= i < self.num_inference_steps:
            raise ValueError(f"`timestep` must be a step index in [0, {self.num_inference_steps}), got {timestep!r}")
        if model_output.shape != sample.shape:
            raise ValueError(f"`model_output` has shape {tuple(model_output.shape)}, expected {tuple(sample.shape)}")
        sigma_t, sigma_s = self.sigmas[i].to(sample.device), self.sigmas[i + 1].to(sample.device)
        method = self.config.method

        if method == "ddpm":
            if generator is None:
                raise ValueError("`generator` is required by the 'ddpm' update")
            tau = 1 - (sigma_s / sigma_t) ** 2
            eps = randn(sample.shape, generator, sample.dtype, sample.device)
            x = sample - tau * (sample - model_output) + sigma_s * tau.sqrt() * eps
        else:
            x = sample - (1 - sigma_s / sigma_t) * (sample - model_output)
            if method == "pc" and self.config.corrections > 0:
                if generator is None or denoiser is None:
                    raise ValueError("`generator` and `denoiser` are required by the 'pc' update")
                delta = self.config.delta
                for _ in range(self.config.corrections):
                    eps = randn(sample.shape, generator, sample.dtype, sample.device)
                    sig = sigma_s.expand(sample.shape[0])
                    x = x - delta * (x - denoiser(x, sig)) + sigma_s * math.sqrt(2 * delta) * eps

        if not return_dict:
            return (x,)
        return VESchedulerOutput(prev_sample=x)

    def __len__(self):
        return self.num_inference_steps or 0
