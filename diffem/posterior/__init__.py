r"""Posterior sampling methods: one interface, two kinds of method.

Every method turns a prior denoiser :math:`d(x_t, \sigma) \approx \mathbb{E}[x \mid x_t]`
and linear-Gaussian observations :math:`y = A x + e`, :math:`e \sim \mathcal{N}(0, \sigma_y^2 I)`,
into a module called like a denoiser, ``posterior(x_t, sigma)`` with ``x_t``
``(B, *event_shape)`` and ``sigma`` ``(B,)`` (data units), so that it works in every
sampler:

- denoiser wrappers return a corrected :math:`\hat{x}` (:class:`MMPSDenoiser` and its
  covariance heuristics, :class:`TMPDDenoiser`, :class:`DiffPIRDenoiser`);
- step hooks return the prior's :math:`\hat{x}` and, after the sampler has stepped to
  :math:`\sigma_s`, give ``posterior.step_correction(sigma_s)`` to add to the new sample
  (:class:`DPSGuidance`, :class:`PiGDMGuidance`). A sampler supports both kinds by
  adding the correction when the module has a ``step_correction`` method
  (:func:`diffem.sampling.sample` does).

:func:`make_posterior` builds any of them by name (``GUIDANCES``) with validated options.

=========  =====================  ===============================  ===================
method     kind                   network cost per step            reference
=========  =====================  ===============================  ===================
mmps       denoiser wrapper       1 forward + maxiter VJPs         arXiv:2405.13712
dps        step hook              1 forward + 1 VJP                arXiv:2209.14687
pigdm      step hook              1 forward + 1 VJP                ICLR 2023 (Song)
tmpd       denoiser wrapper       1 forward + 2 VJPs               arXiv:2310.06721
diffpir    denoiser wrapper       1 forward                        arXiv:2305.08995
=========  =====================  ===============================  ===================
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from ..operators import LinearOperator
from .dc import data_consistency_step
from .diffpir import DiffPIRDenoiser
from .dps import DPSGuidance
from .mmps import COVARIANCES, MMPSDenoiser
from .pigdm import PiGDMGuidance
from .tmpd import TMPDDenoiser

__all__ = [
    "COVARIANCES",
    "GUIDANCES",
    "GUIDANCE_OPTIONS",
    "DPSGuidance",
    "DiffPIRDenoiser",
    "MMPSDenoiser",
    "data_consistency_step",
    "PiGDMGuidance",
    "TMPDDenoiser",
    "make_posterior",
]

_CLASSES = {
    "mmps": MMPSDenoiser,
    "dps": DPSGuidance,
    "pigdm": PiGDMGuidance,
    "tmpd": TMPDDenoiser,
    "diffpir": DiffPIRDenoiser,
}
GUIDANCES = tuple(_CLASSES)

#: The keyword options each method accepts (besides denoiser, y, operator, noise_std).
GUIDANCE_OPTIONS = {
    "mmps": ("maxiter", "tol", "covariance", "prior", "solver"),
    "dps": ("zeta",),
    "pigdm": ("maxiter", "tol", "form", "weight"),
    "tmpd": (),
    "diffpir": ("maxiter", "tol", "lmbda"),
}


def make_posterior(
    guidance: str,
    denoiser: Callable[[Tensor, Tensor], Tensor],
    y: Tensor,
    operator: LinearOperator,
    noise_std: float,
    **options,
) -> nn.Module:
    r"""The posterior module of method ``guidance`` (one of ``GUIDANCES``).

    Arguments:
        guidance: ``"mmps"``, ``"dps"``, ``"pigdm"``, ``"tmpd"`` or ``"diffpir"``.
        denoiser: The prior denoiser; y: ``(B, *out_shape)``; operator: batch shape ``(B,)``;
            noise_std: :math:`\sigma_y > 0`.
        options: The method's options, ``GUIDANCE_OPTIONS[guidance]`` (e.g. ``maxiter``,
            ``covariance`` for MMPS; ``zeta`` for DPS; ``lmbda`` for DiffPIR).

    Raises:
        ValueError: an unknown method name, or an option the method does not take; and the
            method's own checks (negative step sizes, unknown covariance, ...).
    """
    if guidance not in _CLASSES:
        raise ValueError(f"`guidance` must be one of {GUIDANCES}, got {guidance!r}")
    unknown = sorted(set(options) - set(GUIDANCE_OPTIONS[guidance]))
    if unknown:
        allowed = ", ".join(GUIDANCE_OPTIONS[guidance]) or "none"
        raise ValueError(f"`{unknown[0]}` is not an option of guidance {guidance!r} (its options: {allowed})")
    return _CLASSES[guidance](denoiser, y, operator, noise_std, **options)
