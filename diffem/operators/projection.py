r"""Matrix operators: :class:`Projection`, one (per-sample) matrix :math:`A \in \mathbb{R}^{m \times d}`.

The manifold experiment observes each point through its own random 2x5 matrix with
unit-norm rows.

References:
    Rozet et al. 2024, arXiv:2405.13712, Section 5.1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import LinearOperator, check_finite

__all__ = ["Projection"]


class Projection(LinearOperator):
    r"""Matrix–vector products :math:`A x` with a (per-sample) matrix.

    Arguments:
        matrix: A float tensor of shape ``(*batch, m, d)``, ``batch`` equal to ``()``
            or ``(B,)``. Acts on ``x`` of shape ``(*batch, d)``; ``A.T`` on ``(*batch, m)``.

    ``A.pinv`` is the per-sample Moore-Penrose pseudo-inverse of the matrix
    (:func:`torch.linalg.pinv`, computed in the dtype of ``y``, singular values
    below its default ``rtol`` = max(m, d) * eps treated as zero).

    Raises:
        ValueError: if ``matrix`` is not floating point, not 2-D or 3-D, or not finite.
    """

    params = ("matrix",)

    def __init__(self, matrix: Tensor):
        if not torch.is_tensor(matrix):
            raise TypeError(f"`matrix` must be a torch.Tensor, got {type(matrix).__name__}")
        if not matrix.is_floating_point():
            raise ValueError(f"`matrix` must be floating point, got {matrix.dtype}")
        if matrix.dim() not in (2, 3):
            raise ValueError(f"`matrix` must have shape (m, d) or (B, m, d), got {tuple(matrix.shape)}")
        check_finite("matrix", matrix)
        self.matrix = matrix
        self.batch_shape = tuple(matrix.shape[:-2])
        self.in_shape = (matrix.shape[-1],)
        self.out_shape = (matrix.shape[-2],)

    def _forward(self, x: Tensor) -> Tensor:
        return (self.matrix.to(x.dtype) @ x[..., None])[..., 0]

    def _adjoint(self, y: Tensor) -> Tensor:
        return (self.matrix.to(y.dtype).mT @ y[..., None])[..., 0]

    def _pinv(self, y: Tensor) -> Tensor:
        return (torch.linalg.pinv(self.matrix.to(y.dtype)) @ y[..., None])[..., 0]
