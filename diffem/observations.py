r"""The observation set: what EM sees of an experiment, and nothing else.

Observations :math:`y_i = A_i x_i + e_i`, :math:`e_i \sim \mathcal{N}(0, \sigma_y^2 I)`: the
``y``, the operator :math:`A` (batched, one per observation or one shared) and
:math:`\sigma_y`. By construction there is no field for the clean signal ``x``: the EM trainer
(:mod:`diffem.em`) is handed an :class:`ObservationSet` only, so ground truth cannot reach it.

References:
    Rozet et al., "Learning Diffusion Priors from Observations by Expectation Maximization",
    NeurIPS 2024, arXiv:2405.13712, Section 3.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .operators import LinearOperator, Scaled

__all__ = ["ObservationSet", "whiten"]


@dataclass
class ObservationSet:
    """Observations only: ``y`` ``(N, *out_shape)``, the operator (batch ``(N,)``), :math:`\\sigma_y`.

    By construction it has no field for the clean signal ``x``.
    """

    y: Tensor
    operator: LinearOperator
    noise_std: float
    event_shape: tuple

    def __len__(self) -> int:
        return self.y.shape[0]

    def __getitem__(self, index) -> "ObservationSet":
        return ObservationSet(self.y[index], self.operator[index], self.noise_std, self.event_shape)


def whiten(y: Tensor, operator: LinearOperator, noise_std: Tensor) -> tuple[Tensor, LinearOperator, float]:
    r"""Observations with one noise level each, rewritten with one shared :math:`\sigma_0`.

    :math:`y_i = A_i x_i + \sigma_i e_i` has the same likelihood of :math:`x_i` as
    :math:`w_i y_i = w_i A_i x_i + \sigma_0 e_i` with :math:`w_i = \sigma_0 / \sigma_i`, so the
    posterior, the E-step and every sampler are unchanged when they are given
    ``(w y, Scaled(A, w), sigma_0)``. :math:`\sigma_0` is the median of the :math:`\sigma_i` (the lower
    middle one for an even count, as :meth:`torch.Tensor.median` gives it).
    The data consistency :math:`\lVert A' x - y' \rVert / \lVert y' \rVert` of each observation
    and its noise floor :math:`\sigma_0 \sqrt{m} / \lVert y' \rVert` are those of the original.

    Arguments:
        y: ``(N, *out_shape)`` observations, data units.
        operator: Their operator, batch shape ``(N,)`` or ``()``.
        noise_std: ``(N,)`` :math:`\sigma_i`, finite and > 0, data units.

    Returns:
        ``(y', A', sigma_0)``: ``y'`` of ``y``'s shape, a :class:`~diffem.operators.Scaled` operator
        of batch ``(N,)`` and the shared noise level (a float).

    Raises:
        ValueError: if ``noise_std`` is not ``(N,)``, finite and positive.
    """
    noise_std = torch.as_tensor(noise_std, dtype=torch.float64)
    if noise_std.shape != (y.shape[0],):
        raise ValueError(f"`noise_std` has shape {tuple(noise_std.shape)}, expected ({y.shape[0]},): one per observation")
    if not bool(torch.isfinite(noise_std).all()) or not bool((noise_std > 0).all()):
        raise ValueError("`noise_std` must be finite and > 0 for every observation")
    sigma_0 = float(noise_std.median())
    scale = (sigma_0 / noise_std).to(y.dtype if y.is_floating_point() else torch.get_default_dtype())
    return scale.reshape(-1, *([1] * (y.dim() - 1))) * y, Scaled(operator, scale), sigma_0
