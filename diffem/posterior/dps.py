r"""Diffusion posterior sampling (DPS): a gradient step on the residual norm after each sampler step.

Chung et al. add, after each ancestral (DDPM) step of a variance-preserving (VP) model,

.. math:: x_s \leftarrow x_s - \zeta \, \nabla_{x_t^{VP}} \lVert y - A \hat{x}(x_t) \rVert_2 ,

with the norm of each sample's own residual (never one norm over the batch). With
:math:`x^{VP} = x^{VE} / \sqrt{1 + \sigma^2}` the same update in the variance-exploding
(VE) units of this package is

.. math:: x_s \leftarrow x_s - \zeta \sqrt{(1 + \sigma_t^2)(1 + \sigma_s^2)} \,
   \nabla_{x_t} \lVert y - A \hat{x}(x_t) \rVert_2 , \qquad
   \nabla_{x_t} \lVert r \rVert_2 = -J^T A^T r / \lVert r \rVert_2 ,

so that the published step sizes carry over. The step does not use :math:`\sigma_y`
(the paper's Gaussian-noise algorithm). DPS is not exact even for a Gaussian prior.

Hyperparameter: :math:`\zeta \ge 0`, default 1.0 (as azula's ``DPSSampler``; the paper
tunes its step size per task).

Cost per step: one forward and one vector-Jacobian product (VJP).

References:
    Chung et al., "Diffusion Posterior Sampling for General Noisy Inverse Problems",
    ICLR 2023, arXiv:2209.14687, Algorithm 1.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..operators import LinearOperator
from ._common import StepHook, check_nonnegative, check_observation, expand_as, sigma_vector

__all__ = ["DPSGuidance"]


class DPSGuidance(StepHook):
    r"""DPS as a sampler step hook.

    A step hook is called like a denoiser, ``x_hat = hook(x_t, sigma)`` (the prior's
    :math:`\hat{x}`, shape of ``x_t``), and after the sampler has moved to the next level
    :math:`\sigma_s` the sampler adds ``hook.step_correction(sigma_s)`` (shape of ``x_t``)
    to its new sample. :func:`diffem.sampling.sample` does this for every scheduler.

    Arguments:
        denoiser: The prior denoiser ``(x_t (B, *event), sigma (B,)) -> x_hat``, differentiable.
        y: Observations ``(B, *out_shape)``; operator: :math:`A`, batch shape ``(B,)``.
        noise_std: :math:`\sigma_y > 0` (validated, unused by the DPS step).
        zeta: The step size :math:`\zeta \ge 0` (default 1.0).

    Raises:
        ValueError: bad ``y`` / ``operator`` / ``noise_std``; ``zeta < 0``; at call time a bad
            ``x_t`` or ``sigma``; ``step_correction`` without a preceding call.
    """

    def __init__(self, denoiser: Callable, y: Tensor, operator: LinearOperator, noise_std: float, zeta: float = 1.0):
        super().__init__()
        self.noise_std = check_observation(y, operator, noise_std)
        self.zeta = check_nonnegative("zeta", zeta)
        self.denoiser, self.y, self.operator = denoiser, y, operator
        self._pending = None

    def step_correction(self, sigma_next) -> Tensor:
        r"""The DPS update :math:`-\zeta \sqrt{(1+\sigma_t^2)(1+\sigma_s^2)} \nabla_{x_t} \lVert y - A\hat{x} \rVert`
        for the last call, shape of ``x_t``; ``sigma_next`` is :math:`\sigma_s` (float, 0-d or ``(B,)``)."""
        x_t, x_hat, sigma = self._take_pending()
        sigma_s = sigma_vector(sigma_next, x_t, x_t.shape[0])
        r = (self.y - self.operator(x_hat.detach())).detach()
        norm = r.flatten(1).norm(dim=1).clamp_min(torch.finfo(r.dtype).tiny)
        # grad of ||y - A x_hat(x_t)|| w.r.t. x_t, per sample: -J^T A^T r / ||r||
        cot = -self.operator.T(r / expand_as(norm, r))
        (grad,) = torch.autograd.grad(x_hat, x_t, cot)
        scale = ((1 + sigma.square()) * (1 + sigma_s.square())).sqrt()
        return (-self.zeta * expand_as(scale, grad) * grad).detach()
