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
  with :math:`\Sigma_x = I` (the paper's :math:`(I + \Sigma_t^{-1})^{-1}`, which is also
  the covariance of Song et al.'s :math:`\Pi`GDM) or :math:`\Sigma_x = D I + U U^T` of a
  given :class:`~diffem.gaussian.GaussianPrior`, applied by Woodbury:
  :math:`V = \sigma^2 I - \sigma^4 (\Sigma_x + \sigma^2 I)^{-1}`. Exact when the prior is
  Gaussian with covariance :math:`\Sigma_x`. One forward and one VJP per call.
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

from ..linalg import conjugate_gradient
from ..operators import LinearOperator
from ._common import check_maxiter, check_observation, check_tol, denoise_with_vjp, expand_as, sigma_vector

__all__ = ["MMPSDenoiser", "COVARIANCES"]

COVARIANCES = ("tweedie", "prior", "sigma_t")


class _PriorCovariance:
    r"""Apply :math:`(\Sigma_x^{-1} + \sigma^{-2} I)^{-1} = \sigma^2 I - \sigma^4 (\Sigma_x + \sigma^2 I)^{-1}`.

    :math:`\Sigma_x = D I + U U^T`: with :math:`U^T U = Q \Lambda Q^T` and :math:`W = U Q`
    (orthogonal columns, squared norms :math:`\Lambda`), Woodbury gives
    :math:`(a I + U U^T)^{-1} u = (u - W \mathrm{diag}(1 / (a + \Lambda)) W^T u) / a`,
    :math:`a = D + \sigma^2`, in :math:`O(d r)` per sample. ``prior=None`` is :math:`\Sigma_x = I`.
    """

    def __init__(self, prior, event_shape: tuple | None):
        if prior is None:
            self.w = None
            return
        from ..gaussian import GaussianPrior

        if not isinstance(prior, GaussianPrior):
            raise TypeError(f"`prior` must be a GaussianPrior (or None for Sigma_x = I), got {type(prior).__name__}")
        if event_shape is not None and math.prod(event_shape) != prior.features:
            raise ValueError(f"`prior` has {prior.features} features, but the operator acts on events of shape {event_shape}")
        factor = prior.factor.detach()
        lam, q = torch.linalg.eigh(factor.mT @ factor)
        self.w, self.lam, self.diag = factor @ q, lam.clamp_min(0), prior.diag.detach()

    def __call__(self, u: Tensor, s2: Tensor) -> Tensor:
        """``u`` ``(B, ...)``, ``s2`` = :math:`\\sigma^2` ``(B,)`` -> ``V u`` ``(B, ...)``."""
        if self.w is None:
            return expand_as(s2 / (1 + s2), u) * u
        flat = u.flatten(1).to(self.w.dtype)
        s2w = s2.to(self.w.dtype)
        a = self.diag + s2w  # (B,)
        coef = (flat @ self.w) / (a[:, None] + self.lam)
        solved = (flat - coef @ self.w.mT) / a[:, None]
        out = s2w[:, None] * flat - s2w[:, None] ** 2 * solved
        return out.reshape(u.shape).to(u.dtype)


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
        covariance: ``"tweedie"`` (default), ``"prior"`` or ``"sigma_t"`` (module docstring).
        prior: For ``covariance="prior"`` only: the :class:`~diffem.gaussian.GaussianPrior`
            whose covariance is :math:`\Sigma_x` (default ``None``: :math:`\Sigma_x = I`).

    Cost per call: one forward and ``maxiter`` VJPs (``"tweedie"``); one forward and one
    VJP (``"prior"``, ``"sigma_t"``; their CG needs no network call).

    Raises:
        ValueError: if ``y`` is not finite, ``operator`` does not have batch shape
            ``(B,)`` with ``B = len(y)``, ``noise_std <= 0``, ``maxiter < 1``, ``tol < 0``,
            ``covariance`` is unknown or ``prior`` is given with another covariance; at
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
    ):
        super().__init__()
        self.noise_std = check_observation(y, operator, noise_std)
        if covariance not in COVARIANCES:
            raise ValueError(f"`covariance` must be one of {COVARIANCES}, got {covariance!r}")
        if prior is not None and covariance != "prior":
            raise ValueError(f"`prior` (Sigma_x) is used only by covariance='prior', got covariance={covariance!r}")
        self.denoiser = denoiser
        self.y = y
        self.operator = operator
        self.maxiter = check_maxiter(maxiter)
        self.tol = check_tol(tol)
        self.covariance = covariance
        self._prior_cov = _PriorCovariance(prior, operator.in_shape) if covariance == "prior" else None

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

                _, score = conjugate_gradient(matvec, b, maxiter=self.maxiter, tol=self.tol, companion=True)
            else:
                if self.covariance == "sigma_t":

                    def cov(u: Tensor) -> Tensor:
                        return s2_x * u

                else:

                    def cov(u: Tensor) -> Tensor:
                        return self._prior_cov(u, sigma.square())

                def matvec(p: Tensor) -> Tensor:
                    return var_y * p + A(cov(A.T(p)))

                v = conjugate_gradient(matvec, b, maxiter=self.maxiter, tol=self.tol)
                score = vjp(A.T(v))

        return (x_hat + s2_x * score).detach()
