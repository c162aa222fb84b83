r"""Tweedie moment projected diffusion (TMPD): MMPS with a diagonal observation covariance.

Like MMPS, TMPD approximates :math:`p(x \mid x_t) \approx \mathcal{N}(\hat{x}, \sigma^2 J)`
(Tweedie), but replaces the observation covariance :math:`\sigma_y^2 I + \sigma^2 A J A^T`
by a diagonal matrix, its row sums :math:`c = \sigma^2 A J A^T \mathbf{1}` (one VJP), so
that no linear solve is needed. In VE units the posterior denoiser is

.. math:: \mathbb{E}[x \mid x_t, y] \approx \hat{x} + \sigma^2 J^T A^T
   \big[ (y - A \hat{x}) \oslash (\sigma_y^2 + c) \big].

Exact when :math:`A J A^T` is diagonal (then row sums are the diagonal), e.g. a pixel
mask with a prior of diagonal covariance: there it equals MMPS and the exact posterior
mean for a Gaussian prior. Row sums of an imperfect learned Jacobian may be negative;
they are clamped at 0.

Hyperparameters: none (the paper's diagonal TMPD).

Cost per call: one forward and two vector-Jacobian products (VJPs).

References:
    Boys, Girolami, Pidstrigach, Reich, Mosca & Akyildiz, "Tweedie Moment Projected
    Diffusions for Inverse Problems", arXiv:2310.06721 (the diagonal, row-sum approximation).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from ..operators import LinearOperator
from ._common import check_observation, denoise_with_vjp, expand_as, sigma_vector

__all__ = ["TMPDDenoiser"]


class TMPDDenoiser(nn.Module):
    r"""Posterior denoiser :math:`(x_t, \sigma) \mapsto` TMPD's :math:`\mathbb{E}[x \mid x_t, y]`, a denoiser wrapper.

    Arguments:
        denoiser: The prior denoiser ``(x_t (B, *event), sigma (B,)) -> x_hat``, differentiable.
        y: Observations ``(B, *out_shape)``; operator: :math:`A`, batch shape ``(B,)``.
        noise_std: :math:`\sigma_y > 0`.

    Raises:
        ValueError: bad ``y`` / ``operator`` / ``noise_std``; at call time a bad ``x_t`` or ``sigma``.
    """

    def __init__(self, denoiser: Callable, y: Tensor, operator: LinearOperator, noise_std: float):
        super().__init__()
        self.noise_std = check_observation(y, operator, noise_std)
        self.denoiser, self.y, self.operator = denoiser, y, operator

    def forward(self, x_t: Tensor, sigma) -> Tensor:
        sigma = sigma_vector(sigma, x_t, self.y.shape[0])
        A = self.operator
        with torch.enable_grad():
            x_hat, y_hat, vjp = denoise_with_vjp(self.denoiser, x_t, sigma, A, self.y)
            c = expand_as(sigma.square(), self.y) * A(vjp(A.T(torch.ones_like(self.y))))
            u = (self.y - y_hat).detach() / (self.noise_std**2 + c.clamp_min(0))
            score = vjp(A.T(u))
        return (x_hat + expand_as(sigma.square(), x_t) * score).detach()
