r"""Moment matching posterior sampling (MMPS): a posterior denoiser from a prior denoiser.

For :math:`x_t = x + \sigma z` and observations :math:`y = A x + e`,
:math:`e \sim \mathcal{N}(0, \Sigma_y)`, Tweedie's formulas give

.. math:: \mathbb{E}[x \mid x_t] = d(x_t), \qquad
   \mathbb{V}[x \mid x_t] = \sigma^2 J, \quad J = \partial d(x_t) / \partial x_t.

Approximating :math:`p(x \mid x_t)` by :math:`\mathcal{N}(d(x_t), \sigma^2 J)` gives

.. math::
   \mathbb{E}[x \mid x_t, y] = d(x_t) + \sigma^2 J^T A^T v, \qquad
   (\Sigma_y + \sigma^2 A J A^T) \, v = y - A d(x_t),

where the symmetric positive definite system is solved by conjugate gradient and
every product with :math:`J^T` is one vector-Jacobian product of the denoiser
(:math:`J` is never formed; it is symmetric for an exact denoiser). One call costs
one forward and ``maxiter + 1`` vector-Jacobian products. The result replaces the
denoiser inside any sampler (DDPM, DDIM, predictor-corrector).

For a Gaussian prior the approximation is exact, so ``MMPSDenoiser`` returns the
exact :math:`\mathbb{E}[x \mid x_t, y]` once CG has converged.

References:
    Rozet et al., "Learning Diffusion Priors from Observations by Expectation
    Maximization", arXiv:2405.13712, Section 4, eq. (9)-(12).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from .linalg import conjugate_gradient
from .operators import LinearOperator, _check_noise_std, check_batch, check_finite

__all__ = ["MMPSDenoiser"]


class MMPSDenoiser(nn.Module):
    r"""Posterior denoiser :math:`(x_t, \sigma) \mapsto \mathbb{E}[x \mid x_t, y]` by MMPS.

    Arguments:
        denoiser: The prior denoiser, called as ``denoiser(x_t, sigma)`` with ``x_t``
            ``(B, *event_shape)`` and ``sigma`` ``(B,)``; differentiable in ``x_t``
            (a :class:`~diffem.denoiser.Denoiser` or a :class:`~diffem.gaussian.GaussianPrior`).
        y: Observations, ``(B, *out_shape)``, one per sample, finite.
        operator: The operator :math:`A`, batch shape ``(B,)`` (one per sample).
        noise_std: :math:`\sigma_y > 0` (:math:`\Sigma_y = \sigma_y^2 I`), data units.
        maxiter: Conjugate gradient iterations (the paper: 1 for CIFAR-10, 3 for MRI).
        tol: Relative CG tolerance (0: always ``maxiter`` iterations).

    Raises:
        ValueError: if ``y`` is not finite, ``operator`` does not have batch shape
            ``(B,)`` with ``B = len(y)``, ``noise_std <= 0`` or ``maxiter < 1``; at call
            time if ``A(x_t)`` does not have the shape of ``y``.
    """

    def __init__(
        self,
        denoiser: Callable[[Tensor, Tensor], Tensor],
        y: Tensor,
        operator: LinearOperator,
        noise_std: float,
        maxiter: int = 1,
        tol: float = 0.0,
    ):
        super().__init__()
        check_finite("y", y)
        check_batch(operator, y.shape[0])
        if operator.out_shape is not None and tuple(y.shape[1:]) != tuple(operator.out_shape):
            raise ValueError(f"`y` has shape {tuple(y.shape)}, expected ({y.shape[0]}, *{operator.out_shape}) to match A(x)")
        if int(maxiter) != maxiter or maxiter < 1:
            raise ValueError(f"`maxiter` must be an integer >= 1, got {maxiter!r}")
        self.denoiser = denoiser
        self.y = y
        self.operator = operator
        self.noise_std = _check_noise_std(noise_std)
        self.maxiter = int(maxiter)
        self.tol = float(tol)

    def forward(self, x_t: Tensor, sigma) -> Tensor:
        if x_t.shape[0] != self.y.shape[0]:
            raise ValueError(f"`x_t` has batch size {x_t.shape[0]}, expected {self.y.shape[0]} (one per observation)")
        sigma = torch.as_tensor(sigma, dtype=x_t.dtype, device=x_t.device)
        if sigma.dim() == 0:
            sigma = sigma.expand(x_t.shape[0])
        if not (sigma > 0).all():
            raise ValueError("`sigma` must be > 0")
        s2 = sigma.square().reshape(-1, *([1] * (self.y.dim() - 1)))
        A = self.operator

        with torch.enable_grad():
            x_t = x_t.detach().requires_grad_(True)
            x_hat = self.denoiser(x_t, sigma)
            y_hat = A(x_hat)
            if y_hat.shape != self.y.shape:
                raise ValueError(f"`y` has shape {tuple(self.y.shape)} but A(x) has shape {tuple(y_hat.shape)}")

            def vjp(v: Tensor) -> Tensor:
                return torch.autograd.grad(x_hat, x_t, v, retain_graph=True)[0]

            def matvec(v: Tensor) -> Tensor:
                return self.noise_std**2 * v + s2 * A(vjp(A.T(v)))

            v = conjugate_gradient(matvec, (self.y - y_hat).detach(), maxiter=self.maxiter, tol=self.tol)
            score = vjp(A.T(v))

        sigma2 = sigma.square().reshape(-1, *([1] * (x_t.dim() - 1)))
        return (x_hat + sigma2 * score).detach()
