r"""Linear observation operators A and the Gaussian observation model.

An observation is

.. math:: y = A x + e, \qquad e \sim \mathcal{N}(0, \sigma_y^2 I)

where the linear operator :math:`A` may differ per observation (a pixel mask per
image, a k-space mask per MRI slice, a 2x5 projection per manifold point).

Every operator is *batched with per-sample parameters*: its parameters carry a
batch shape, either ``()`` (one operator, shared by every sample: it applies to
``x`` with any leading shape) or ``(B,)`` (one operator per sample: ``x`` must
have exactly ``B`` samples). Nothing else is broadcast: a mismatch raises a
:class:`ValueError` naming the argument.

Each operator implements the forward map ``A(x)`` and its adjoint ``A.T(y)``,
with respect to the real Euclidean inner products of the input and output
spaces, so that :math:`\langle A x, y \rangle = \langle x, A^T y \rangle`.
Most also implement the Moore-Penrose pseudo-inverse ``A.pinv(y)``,
:math:`A^+ = A^T (A A^T)^+` (``A.has_pinv`` says whether one does).

The operators live in submodules, all re-exported here:

- :mod:`diffem.operators.base`: the protocol (:class:`LinearOperator`, :class:`FunctionOperator`),
  :class:`Identity`, :class:`Scaled` (one scale per observation: whitening), :class:`GaussianObservation` and
  the argument checks;
- :mod:`diffem.operators.image`: :class:`Mask` (pixel masks, boxes), :class:`SuperResolution`,
  :class:`GaussianBlur`;
- :mod:`diffem.operators.fourier`: :class:`SubsampledFourier` (MRI k-space) and :class:`SenseFourier` (multi-coil);
- :mod:`diffem.operators.projection`: :class:`Projection` (per-sample matrices).

The fastMRI column-mask policy (:func:`column_mask`, :func:`column_mask_fraction`) lives beside
the MRI data, in :mod:`diffem.data.mri_mask`; it is re-exported here too.

References:
    Rozet et al., "Learning Diffusion Priors from Observations by Expectation
    Maximization", NeurIPS 2024, arXiv:2405.13712, Section 3 and Appendix C.
"""

from ..data.mri_mask import column_mask, column_mask_fraction
from .base import (
    FunctionOperator,
    GaussianObservation,
    Identity,
    LinearOperator,
    Scaled,
    _check_noise_std,
    check_batch,
    check_finite,
    check_mask,
    check_noise_std,
)
from .fourier import SenseFourier, SubsampledFourier
from .image import GaussianBlur, Mask, SuperResolution
from .projection import Projection

__all__ = [
    "LinearOperator",
    "FunctionOperator",
    "Identity",
    "Scaled",
    "Mask",
    "Projection",
    "SubsampledFourier",
    "SenseFourier",
    "SuperResolution",
    "GaussianBlur",
    "GaussianObservation",
    "column_mask",
    "column_mask_fraction",
    "check_finite",
    "check_batch",
    "check_mask",
    "check_noise_std",
]
