r"""Diffusion plug-and-play image restoration (DiffPIR): a proximal data step on :math:`\hat{x}`.

DiffPIR alternates the prior denoiser with the data subproblem

.. math:: \hat{x}_y = \arg\min_x \frac{1}{2\sigma_y^2} \lVert y - A x \rVert^2
   + \frac{\lambda}{2\sigma_t^2} \lVert x - \hat{x} \rVert^2
   = \hat{x} + \big(A^T A + \tfrac{\lambda \sigma_y^2}{\sigma_t^2} I\big)^{-1} A^T (y - A \hat{x}),

(their :math:`\rho_t = \lambda \sigma_y^2 / \bar{\sigma}_t^2`, with :math:`\bar{\sigma}_t` the
VE noise level), solved here by CG (operator applications only), and then takes the
sampler step from :math:`\hat{x}_y`. It is the posterior mean if
:math:`p(x \mid x_t) = \mathcal{N}(\hat{x}, (\sigma_t^2 / \lambda) I)`: for a prior
:math:`\mathcal{N}(\mu, c I)` exactly when :math:`\lambda = 1 + \sigma_t^2 / c`.

Hyperparameters: :math:`\lambda > 0` (default 7.0; the paper tunes it per task); the
paper's noise mix :math:`\zeta` is the sampler's choice here (:math:`\zeta = 0` is DDIM).

Cost per call: one forward, no vector-Jacobian product; ``maxiter`` CG iterations of
:math:`A^T A`.

References:
    Zhu, Zhang, Liang, Cao, Wen, Timofte & Van Gool, "Denoising Diffusion Models for
    Plug-and-Play Image Restoration", CVPR 2023 workshops, arXiv:2305.08995 (the data subproblem).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from ..linalg import conjugate_gradient
from ..operators import LinearOperator
from ._common import check_maxiter, check_nonnegative, check_observation, check_tol, expand_as, sigma_vector

__all__ = ["DiffPIRDenoiser"]


class DiffPIRDenoiser(nn.Module):
    r"""Posterior denoiser by DiffPIR's data step, a denoiser wrapper.

    Arguments:
        denoiser: The prior denoiser ``(x_t (B, *event), sigma (B,)) -> x_hat``.
        y: Observations ``(B, *out_shape)``; operator: :math:`A`, batch shape ``(B,)``.
        noise_std: :math:`\sigma_y > 0`.
        lmbda: The regularisation :math:`\lambda > 0` (default 7.0).
        maxiter, tol: CG iterations (default 8) and relative tolerance.

    Raises:
        ValueError: bad ``y`` / ``operator`` / ``noise_std`` / ``maxiter`` / ``tol``,
            ``lmbda <= 0``; at call time a bad ``x_t`` or ``sigma``.
    """

    def __init__(
        self,
        denoiser: Callable,
        y: Tensor,
        operator: LinearOperator,
        noise_std: float,
        lmbda: float = 7.0,
        maxiter: int = 8,
        tol: float = 0.0,
    ):
        super().__init__()
        self.noise_std = check_observation(y, operator, noise_std)
        self.lmbda = check_nonnegative("lmbda", lmbda, strict=True)
        self.maxiter, self.tol = check_maxiter(maxiter), check_tol(tol)
        self.denoiser, self.y, self.operator = denoiser, y, operator

    @torch.no_grad()
    def forward(self, x_t: Tensor, sigma) -> Tensor:
        sigma = sigma_vector(sigma, x_t, self.y.shape[0])
        A = self.operator
        x_hat = self.denoiser(x_t, sigma)
        rho = expand_as(self.lmbda * self.noise_std**2 / sigma.square(), x_hat)
        b = A.T(self.y - A(x_hat))
        delta = conjugate_gradient(lambda p: A.T(A(p)) + rho * p, b, maxiter=self.maxiter, tol=self.tol)
        return x_hat + delta
