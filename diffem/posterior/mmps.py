r"""Moment matching posterior sampling (MMPS): a posterior denoiser from a prior denoiser.

For :math:`x_t = x + \sigma z` and observations :math:`y = A x + e`,
:math:`e \sim \mathcal{N}(0, \Sigma_y)`, Tweedie's formulas give

.. math:: \mathbb{E}[x \mid x_t] = d(x_t), \qquad
   \mathbb{V}[x \mid x_t] = \sigma^2 J, \quad J = \partial d(x_t) / \partial x_t.

Approximating :math:`p(x \mid x_t)` by :math:`\mathcal{N}(d(x_t), V)` gives

.. math::
   \mathbb{E}[x \mid x_t, y] = d(x_t) + \sigma^2 J^T A^T v, \qquad
   (\Sigma_y + A V A^T) \, v = y - A d(x_t),

where the symmetric positive definite system is solved by conjugate gradient (CG) and
every product with :math:`J^T` is one vector-Jacobian product (VJP) of the denoiser
(:math:`J` is never formed; it is symmetric for an exact denoiser). The result replaces
the denoiser inside any sampler (DDPM, DDIM, predictor-corrector).

Covariance :math:`V` (``covariance``), the paper's ablation (Section 5.2):

- ``"tweedie"``: :math:`V = \sigma^2 J` (MMPS). CG from :math:`v_0 = 0` builds
  :math:`v = \sum_k \alpha_k p_k` and each matvec computes :math:`w_k = J^T A^T p_k`, so
  :math:`J^T A^T v = \sum_k \alpha_k w_k` is accumulated inside CG
  (:func:`~diffem.linalg.conjugate_gradient` with ``companion=True``): one forward and
  ``maxiter`` VJPs per call. Exact for a Gaussian prior once CG has converged.
- ``"prior"``: :math:`V = (\Sigma_x^{-1} + \Sigma_t^{-1})^{-1}`, :math:`\Sigma_t = \sigma^2 I`,
  with :math:`\Sigma_x = I` (the paper's :math:`(I + \Sigma_t^{-1})^{-1}`, the authors'
  ``heuristic: ones``, which is also the covariance of Song et al.'s :math:`\Pi`GDM) or, given a
  :class:`~diffem.gaussian.GaussianPrior`, its :math:`\Sigma_x = D I + U U^T`
  (:meth:`~diffem.gaussian.GaussianPrior.conditional_covariance`, by Woodbury:
  :math:`V = \sigma^2 I - \sigma^4 (\Sigma_x + \sigma^2 I)^{-1}`). Exact when the prior is
  Gaussian with covariance :math:`\Sigma_x`. One forward and one VJP per call.
- ``"sigma_x"``: ``"prior"`` with a required GaussianPrior, the authors' ``heuristic: cov_x``
  (the manifold experiment: the lap-0 Gaussian's :math:`\Sigma_x`, fixed for every lap). Its
  system :math:`\Sigma_y + A V A^T` is symmetric positive definite, so CG solves it exactly.
- ``"sigma_t"``: :math:`V = \Sigma_t = \sigma^2 I`. Exact in the limit
  :math:`\sigma^2 \ll` the prior's variances (:math:`J \to I`). One forward and one VJP.

The output is :math:`d(x_t) + \sigma^2 J^T A^T v` in every case; only the system changes
(as in the authors' code, ``priors/diffusion.py``, ``PosteriorDenoiser``).

References:
    Rozet et al., "Learning Diffusion Priors from Observations by Expectation
    Maximization", arXiv:2405.13712, Section 4, eq. (9)-(12) and Section 5.2.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from ..linalg import SOLVERS, solve
from ..operators import LinearOperator
from ._common import check_maxiter, check_observation, check_tol, denoise_with_vjp, expand_as, sigma_vector

__all__ = ["MMPSDenoiser", "COVARIANCES"]

#: MMPS covariance names (the registry :mod:`diffem.spec` and the config read).
COVARIANCES = ("tweedie", "prior", "sigma_t", "sigma_x")


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
        covariance: ``"tweedie"`` (default), ``"prior"``, ``"sigma_t"`` or ``"sigma_x"`` (module docstring).
        prior: For ``covariance="prior"`` (optional, default ``None``: :math:`\Sigma_x = I`) and
            ``"sigma_x"`` (required): the :class:`~diffem.gaussian.GaussianPrior` whose
            covariance is :math:`\Sigma_x`.
        solver: The linear solve of :math:`(\Sigma_y + A V A^T) v = y - A \hat{x}`: ``"cg"``
            (conjugate gradient, the paper's; exact for a symmetric positive definite system)
            or ``"gmres"`` (:func:`diffem.linalg.gmres`, for the non-symmetric
            :math:`\Sigma_y + \sigma^2 A J A^T` of a learned Jacobian; azula's default). Same
            cost: ``maxiter`` matvecs.

    Cost per call: one forward and ``maxiter`` VJPs (``"tweedie"``); one forward and one
    VJP (``"prior"``, ``"sigma_t"``; their CG needs no network call).

    Raises:
        ValueError: if ``y`` is not finite, ``operator`` does not have batch shape
            ``(B,)`` with ``B = len(y)``, ``noise_std <= 0``, ``maxiter < 1``, ``tol < 0``,
            ``covariance`` or ``solver`` is unknown, ``prior`` is given with another covariance than
            ``"prior"`` / ``"sigma_x"`` (or missing for ``"sigma_x"``), or its feature count
            does not match the operator's input; at
            call time if ``x_t`` or ``sigma`` have the wrong shape or ``sigma <= 0``.
        TypeError: if ``prior`` is not a GaussianPrior.
    """

    def __init__(
        self,
        denoiser: Callable[[Tensor, Tensor], Tensor],
        y: Tensor,
        operator: LinearOperator,
        noise_std: float,
        maxiter: int = 1,
        tol: float = 0.0,
        covariance: str = "tweedie",
        prior=None,
        solver: str = "cg",
    ):
        super().__init__()
        if solver not in SOLVERS:
            raise ValueError(f"`solver` must be one of {SOLVERS}, got {solver!r}")
        self.noise_std = check_observation(y, operator, noise_std)
        if covariance not in COVARIANCES:
            raise ValueError(f"`covariance` must be one of {COVARIANCES}, got {covariance!r}")
        if prior is not None and covariance not in ("prior", "sigma_x"):
            raise ValueError(f"`prior` (Sigma_x) is used only by covariance='prior' or 'sigma_x', got covariance={covariance!r}")
        if covariance == "sigma_x" and prior is None:
            raise ValueError("covariance='sigma_x' needs `prior`: the GaussianPrior whose covariance is Sigma_x")
        if prior is not None:
            from ..gaussian import GaussianPrior

            if not isinstance(prior, GaussianPrior):
                raise TypeError(f"`prior` must be a GaussianPrior (or None for Sigma_x = I), got {type(prior).__name__}")
            if operator.in_shape is not None and math.prod(operator.in_shape) != prior.features:
                raise ValueError(f"`prior` has {prior.features} features, but the operator acts on events of shape {operator.in_shape}")
        self.denoiser = denoiser
        self.y = y
        self.operator = operator
        self.maxiter = check_maxiter(maxiter)
        self.tol = check_tol(tol)
        self.covariance = covariance
        self.prior = prior
        self.solver = solver

    def forward(self, x_t: Tensor, sigma) -> Tensor:
        sigma = sigma_vector(sigma, x_t, self.y.shape[0])
        s2_y = expand_as(sigma.square(), self.y)
        s2_x = expand_as(sigma.square(), x_t)
        A, var_y = self.operator, self.noise_std**2

        with torch.enable_grad():
            x_hat, y_hat, vjp = denoise_with_vjp(self.denoiser, x_t, sigma, A, self.y)
            b = (self.y - y_hat).detach()

            if self.covariance == "tweedie":

                def matvec(p: Tensor) -> tuple[Tensor, Tensor]:
                    w = vjp(A.T(p))  # J^T A^T p, reused for J^T A^T v
                    return var_y * p + s2_y * A(w), w

                _, score = solve(self.solver, matvec, b, maxiter=self.maxiter, tol=self.tol, companion=True)
            else:
                if self.covariance == "sigma_t":

                    def cov(u: Tensor) -> Tensor:
                        return s2_x * u

                elif self.prior is None:  # Sigma_x = I: V = sigma^2 / (1 + sigma^2) I

                    def cov(u: Tensor) -> Tensor:
                        return (s2_x / (1 + s2_x)) * u

                else:

                    def cov(u: Tensor) -> Tensor:
                        return self.prior.conditional_covariance(u, sigma)

                def matvec(p: Tensor) -> Tensor:
                    return var_y * p + A(cov(A.T(p)))

                v = solve(self.solver, matvec, b, maxiter=self.maxiter, tol=self.tol)
                score = vjp(A.T(v))

        return (x_hat + s2_x * score).detach()
