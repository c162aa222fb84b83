r"""Pseudoinverse-guided diffusion models (:math:`\Pi`GDM): a guidance step after each sampler step.

:math:`\Pi`GDM approximates :math:`p(x \mid x_t) \approx \mathcal{N}(\hat{x}, r_t^2 I)` with
:math:`r_t^2 = \sigma_t^2 / (1 + \sigma_t^2)` (the variance of :math:`x \mid x_t` for
:math:`x \sim \mathcal{N}(0, I)`), so that

.. math:: \nabla_{x_t} \log p(y \mid x_t) \approx J^T A^T v, \qquad
   (\sigma_y^2 I + r_t^2 A A^T) \, v = y - A \hat{x}

(their noisy-observation form; CG without network calls, exact in one iteration for a
pixel mask). After each sampler step to :math:`\sigma_s`, in VE units,

.. math:: x_s \leftarrow x_s + w \, J^T h, \qquad h = r_t^2 A^T v
   \;\xrightarrow{\sigma_y \to 0}\; A^+ (y - A \hat{x}),

which in the noiseless limit is the paper's pseudoinverse guidance
:math:`((A^+ y - A^+ A \hat{x})^T \partial \hat{x} / \partial x_t)^T` (their Algorithm 1,
with their VP weights expressed in VE units as in azula's ``PGDMSampler``).
``form="noiseless"`` uses that expression directly, with the operator's exact
pseudo-inverse ``A.pinv`` (:math:`A^+ \ne A^T` in general, e.g. for
:class:`~diffem.operators.SubsampledFourier` on real images) and ignores :math:`\sigma_y`.

The covariance :math:`r_t^2 I` is the paper's :math:`(I + \Sigma_t^{-1})^{-1}` heuristic
(:class:`~diffem.posterior.MMPSDenoiser` with ``covariance="prior"``); :math:`\Pi`GDM differs
from it by where and how strongly the guidance enters the step. The guidance
:math:`J^T A^T v` is the exact :math:`\nabla_{x_t} \log p(y \mid x_t)` when the prior is
:math:`\mathcal{N}(\mu, I)`.

Hyperparameters: ``weight`` :math:`w > 0`, default 1; ``form`` ``"noisy"`` (default) or
``"noiseless"``; the paper samples with DDIM (any scheduler works here).

Cost per step: one forward and one vector-Jacobian product (VJP); CG costs only operator
applications.

References:
    Song, Vahdat, Mardani & Kautz, "Pseudoinverse-Guided Diffusion Models for Inverse
    Problems", ICLR 2023 (openreview 9_gsMA8MRKQ), noisy form and Algorithm 1.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..linalg import conjugate_gradient
from ..operators import LinearOperator
from ._common import StepHook, check_maxiter, check_nonnegative, check_observation, check_tol, expand_as

__all__ = ["PiGDMGuidance"]

FORMS = ("noisy", "noiseless")


class PiGDMGuidance(StepHook):
    r""":math:`\Pi`GDM as a sampler step hook (see :class:`~diffem.posterior.DPSGuidance` for the protocol).

    Arguments:
        denoiser: The prior denoiser, differentiable in ``x_t``.
        y: Observations ``(B, *out_shape)``; operator: :math:`A`, batch shape ``(B,)``.
        noise_std: :math:`\sigma_y > 0`.
        maxiter, tol: CG iterations and relative tolerance on :math:`\sigma_y^2 I + r_t^2 A A^T`
            (``form="noisy"``).
        form: ``"noisy"`` (default) or ``"noiseless"`` (needs ``operator.pinv``).
        weight: Guidance weight :math:`w > 0` (default 1).

    Raises:
        ValueError: bad ``y`` / ``operator`` / ``noise_std`` / ``maxiter`` / ``tol``, unknown
            ``form``, ``weight <= 0``.
        TypeError: ``form="noiseless"`` with an operator without a pseudo-inverse.
    """

    def __init__(
        self,
        denoiser: Callable,
        y: Tensor,
        operator: LinearOperator,
        noise_std: float,
        maxiter: int = 1,
        tol: float = 0.0,
        form: str = "noisy",
        weight: float = 1.0,
    ):
        super().__init__()
        self.noise_std = check_observation(y, operator, noise_std)
        if form not in FORMS:
            raise ValueError(f"`form` must be one of {FORMS}, got {form!r}")
        if form == "noiseless" and not getattr(operator, "has_pinv", False):
            raise TypeError(
                f"PiGDM's noiseless form needs the operator's pseudo-inverse `pinv`, which "
                f"{type(operator).__name__} does not implement; use form='noisy'"
            )
        self.maxiter, self.tol = check_maxiter(maxiter), check_tol(tol)
        self.weight = check_nonnegative("weight", weight, strict=True)
        self.form = form
        self.denoiser, self.y, self.operator = denoiser, y, operator
        self._pending = None

    def direction(self, x_hat: Tensor, sigma: Tensor) -> Tensor:
        r""":math:`h = r_t^2 A^T (\sigma_y^2 I + r_t^2 A A^T)^{-1} (y - A \hat{x})` (or :math:`A^+ (y - A\hat{x})`), shape of ``x_hat``."""
        A = self.operator
        r = self.y - A(x_hat)
        if self.form == "noiseless":
            return A.pinv(r)
        r2 = sigma.square() / (1 + sigma.square())
        r2_y = expand_as(r2, r)
        v = conjugate_gradient(lambda p: self.noise_std**2 * p + r2_y * A(A.T(p)), r, maxiter=self.maxiter, tol=self.tol)
        return expand_as(r2, x_hat) * A.T(v)

    def step_correction(self, sigma_next=None) -> Tensor:
        r"""The update :math:`w J^T h` for the last call, shape of ``x_t`` (``sigma_next`` is not used)."""
        x_t, x_hat, sigma = self._take_pending()
        h = self.direction(x_hat.detach(), sigma)
        (grad,) = torch.autograd.grad(x_hat, x_t, h)
        return (self.weight * grad).detach()
