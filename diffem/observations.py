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

from torch import Tensor

from .operators import LinearOperator

__all__ = ["ObservationSet"]


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
