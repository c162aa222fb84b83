r"""A final data-consistency step: the posterior mean of an isotropic Gaussian around an estimate.

Given an estimate :math:`\hat x` (e.g. the mean of posterior samples) with a per-image variance
:math:`\tau^2` (e.g. the samples' mean variance), take :math:`x \sim \mathcal{N}(\hat x, \tau^2 I)`
as a prior and condition it on :math:`y = A x + \sigma_y e`:

.. math:: x_{dc} = \hat x + \tau^2 A^T (\sigma_y^2 I + \tau^2 A A^T)^{-1} (y - A \hat x),

solved by conjugate gradient (the system is symmetric positive definite; for a mask or a
single-coil Fourier mask :math:`A A^T` is a projector and one iteration is exact). It pulls
:math:`\hat x` towards the observation by as much as the estimate's own uncertainty allows:
with :math:`\tau \to \infty` it is the hard projection :math:`\hat x + A^+(y - A\hat x)` (for
:math:`A A^T = I` on its range), with :math:`\tau \to 0` it leaves :math:`\hat x` alone. Outside
the range of :math:`A^T` nothing moves. It is the same Gaussian conditioning as one MMPS
correction (Rozet et al. 2024, Eq. 11) with the denoiser's covariance replaced by :math:`\tau^2 I`;
it is *not* a sample of the posterior, and it forgets the prior's structure beyond :math:`\hat x`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..linalg import conjugate_gradient
from ..operators import LinearOperator
from ._common import check_observation

__all__ = ["data_consistency_step"]


def data_consistency_step(x_hat: Tensor, y: Tensor, operator: LinearOperator, noise_std: float, tau: Tensor | float,
                          maxiter: int = 8) -> Tensor:
    r"""The data-consistency step of the module docstring, per image.

    Arguments:
        x_hat: The estimates ``(B, *event_shape)``, data units.
        y: The observations ``(B, *out_shape)``.
        operator: :math:`A`, batch shape ``(B,)`` or ``()``.
        noise_std: :math:`\sigma_y > 0`, data units.
        tau: :math:`\tau > 0`, a float or ``(B,)``: the estimate's standard deviation, data units.
        maxiter: CG iterations (>= 1).

    Returns:
        :math:`x_{dc}`, the shape of ``x_hat``.

    Raises:
        ValueError: for mismatched shapes, ``noise_std <= 0`` or ``tau`` not positive and finite.
    """
    noise_std = check_observation(y, operator, noise_std)
    tau = torch.as_tensor(tau, dtype=x_hat.dtype, device=x_hat.device)
    if tau.dim() == 0:
        tau = tau.expand(len(x_hat))
    if tau.shape != (len(x_hat),) or not bool(torch.isfinite(tau).all() and (tau > 0).all()):
        raise ValueError(f"`tau` must be positive and finite, a float or ({len(x_hat)},), got shape {tuple(tau.shape)}")
    t2 = tau.square().reshape(-1, *([1] * (y.dim() - 1)))
    residual = y - operator(x_hat)
    v = conjugate_gradient(lambda p: noise_std**2 * p + t2 * operator(operator.T(p)), residual, maxiter=maxiter)
    return x_hat + tau.square().reshape(-1, *([1] * (x_hat.dim() - 1))) * operator.T(v)
