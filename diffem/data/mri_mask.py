r"""The fastMRI random column mask: which k-space columns an accelerated MRI scan observes.

The policy of the paper's MRI experiment (the authors' ``make_mask``, after Jalal et al. 2021),
at any image width: the centre columns around DC always, every other column kept independently
so that the expected kept fraction is about :math:`1 / R` at acceleration :math:`R`. The masks
feed :class:`~diffem.operators.SubsampledFourier` (``True`` = a sampled column, DC at ``W // 2``).

References:
    Rozet et al. 2024, arXiv:2405.13712, Section 5.3 and their ``experiments/fastmri/utils.py``;
    Jalal et al., "Robust Compressed Sensing MRI with Deep Generative Priors", NeurIPS 2021;
    Zbontar et al., "fastMRI", arXiv:1811.08839.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["column_mask", "column_mask_fraction"]


def _column_mask_parameters(width: int, acceleration: float) -> tuple[int, float]:
    """Half the number of centre columns and the keep probability of the others."""
    if isinstance(width, bool) or int(width) != width or width < 2:
        raise ValueError(f"`width` must be an integer >= 2, got {width!r}")
    try:
        R = float(acceleration)
    except (TypeError, ValueError):
        raise TypeError(f"`acceleration` must be a number >= 1, got {acceleration!r}") from None
    if not (R >= 1 and math.isfinite(R)):
        raise ValueError(f"`acceleration` must be a finite number >= 1, got {acceleration!r}")
    width = int(width)
    # The authors' mask at width 320: ceil(60 / R) columns either side of DC, the others kept
    # with probability 200 / (320 R - 120); its expected kept fraction is
    half_320 = math.ceil(60 / R)
    p_320 = 200 / (320 * R - 120)
    fraction = (2 * half_320 + p_320 * (320 - 2 * half_320)) / 320  # = 1 / R when R divides 60
    if width == 320:
        return half_320, p_320
    # At another width: the centre scaled (ceil(60 W / (320 R)) either side, at least 1) and the
    # keep probability chosen so that the expected kept fraction is the same.
    half = min(math.ceil(60 * width / (320 * R)), width // 2)
    rest = width - 2 * half
    p = 0.0 if rest == 0 else min(max((fraction * width - 2 * half) / rest, 0.0), 1.0)
    return half, p


def column_mask_fraction(width: int, acceleration: float) -> float:
    """The expected fraction of columns that :func:`column_mask` keeps (about ``1 / acceleration``).

    Exactly the fraction of the authors' 320-wide mask, unless the centre alone
    (rounded up to whole columns) exceeds it at a small ``width``.
    """
    half, p = _column_mask_parameters(width, acceleration)
    return (2 * half + p * (width - 2 * half)) / width


def column_mask(
    width: int,
    acceleration: float,
    generator: torch.Generator,
    batch: int | Sequence[int] = (),
) -> Tensor:
    r"""The fastMRI random column mask for :class:`SubsampledFourier`, seeded and replayable.

    At ``width`` 320 this is the authors' mask (their ``make_mask``, after Jalal et
    al. 2021): the :math:`2 \lceil 60/R \rceil` centre columns
    ``[W//2 - c, W//2 + c)`` (DC at ``W // 2``, one more column below it than
    above), and every other column kept independently with probability
    :math:`200 / (320 R - 120)`; the expected kept fraction is :math:`1/R` when
    ``R`` divides 60 (e.g. 80 columns at R = 4), slightly more otherwise. At another
    width the centre is :math:`c = \lceil 60 W / (320 R) \rceil` either side and the
    probability is rescaled so that the expected kept fraction is the same as at
    320 (:func:`column_mask_fraction`). The authors drew from numpy's global RNG;
    here every draw comes from ``generator``, one row of ``width`` uniforms per
    sample in order, so sample ``i`` does not depend on the batch size.

    Arguments:
        width: The number of k-space columns ``W`` (>= 2).
        acceleration: The nominal acceleration ``R`` >= 1.
        generator: A seeded :class:`torch.Generator` (required); the mask is on its device.
        batch: The batch shape, an int ``B`` or a tuple (default ``()``: one mask).

    Returns:
        A boolean tensor of shape ``(*batch, width)``, ``True`` = sampled column.

    Raises:
        ValueError: if ``width`` < 2, ``acceleration`` < 1 or not finite, or ``generator`` is missing.

    References:
        Rozet et al. 2024, Section 5.3 and their ``experiments/fastmri/utils.py``;
        Jalal et al., "Robust Compressed Sensing MRI with Deep Generative Priors", 2021.
    """
    half, p = _column_mask_parameters(width, acceleration)
    if not isinstance(generator, torch.Generator):
        raise ValueError("`generator` is required: pass a seeded torch.Generator")
    batch = (int(batch),) if isinstance(batch, int) else tuple(int(b) for b in batch)
    u = torch.rand(*batch, int(width), generator=generator, device=generator.device, dtype=torch.float64)
    mask = u < p
    centre = int(width) // 2
    mask[..., centre - half : centre + half] = True
    return mask
