r"""Per-image reconstruction metrics: PSNR, SSIM (torchmetrics) and NMSE.

Each compares an estimate ``x`` with its reference ``y`` image by image and returns one
value per image, shape ``(N,)``: average them (or not) in the caller.

References:
    Wang et al., "Image Quality Assessment: From Error Visibility to Structural
    Similarity", IEEE TIP 2004 (SSIM).
    Zbontar et al., "fastMRI: An Open Dataset and Benchmarks for Accelerated MRI",
    arXiv:1811.08839, Section 4.1 (NMSE, PSNR and SSIM as used for MRI).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["psnr", "ssim", "nmse"]


def _pair(x, y, min_dim: int = 1) -> None:
    if not (torch.is_tensor(x) and torch.is_tensor(y)):
        raise TypeError(f"`x` and `y` must be torch tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.shape != y.shape or x.dim() < min_dim:
        raise ValueError(f"`x` and `y` must have the same shape (N, ...), got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.is_complex() or y.is_complex() or not (x.is_floating_point() and y.is_floating_point()):
        raise TypeError(f"`x` and `y` must be real floating-point tensors, got {x.dtype} and {y.dtype}")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("`x` and `y` must be finite")


def _data_range(data_range) -> float:
    if isinstance(data_range, bool) or not isinstance(data_range, (int, float)) or not data_range > 0:
        raise ValueError(f"`data_range` must be a number > 0, got {data_range!r}")
    return float(data_range)


def _out_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def psnr(x: Tensor, y: Tensor, data_range: float = 4.0) -> Tensor:
    r"""Peak signal-to-noise ratio per image, :math:`10 \log_{10}(R^2 / \mathrm{MSE})`.

    Arguments:
        x: Images ``(N, ...)``, e.g. ``(N, C, H, W)`` in [-2, 2].
        y: Images of the same shape.
        data_range: ``R``, the span of the data (4 for [-2, 2]).

    Returns:
        ``(N,)`` float tensor in dB (``inf`` for identical images); float64 if ``x`` is.

    Raises:
        TypeError: If ``x`` or ``y`` is not a real floating-point tensor.
        ValueError: If shapes differ, ``x`` has no batch dimension, ``data_range <= 0``,
            or the inputs are not finite.
    """
    _pair(x, y)
    data_range = _data_range(data_range)
    mse = (x.double() - y.double()).reshape(len(x), -1).square().mean(dim=1)
    return (10.0 * torch.log10(data_range**2 / mse)).to(_out_dtype(x))


def nmse(x: Tensor, y: Tensor) -> Tensor:
    r"""Normalised mean squared error per image, :math:`\lVert x - y \rVert_2^2 / \lVert y \rVert_2^2`.

    The fastMRI convention (Zbontar et al. 2018, Eq. 2): ``y`` is the reference (ground
    truth), ``x`` the estimate; norms over every axis but the first. 0 for a perfect
    estimate, 1 for ``x = 0``.

    Arguments:
        x: Estimates ``(N, ...)``, e.g. ``(N, H, W)`` magnitudes or ``(N, C, H, W)``.
        y: References of the same shape, none of them all zero.

    Returns:
        ``(N,)`` float tensor (float64 if ``x`` is), computed in float64.

    Raises:
        TypeError: If ``x`` or ``y`` is not a real floating-point tensor.
        ValueError: If shapes differ, there is no batch dimension, inputs are not finite,
            or a reference image ``y[i]`` is zero everywhere (NMSE undefined).
    """
    _pair(x, y)
    dtype = _out_dtype(x)
    x, y = x.double().reshape(len(x), -1), y.double().reshape(len(y), -1)
    energy = y.square().sum(dim=1)
    if (energy == 0).any():
        zero = torch.nonzero(energy == 0).flatten().tolist()
        raise ValueError(f"`y` has all-zero images (indices {zero}): NMSE is undefined")
    return ((x - y).square().sum(dim=1) / energy).to(dtype)


def ssim(
    x: Tensor,
    y: Tensor,
    data_range: float,
    *,
    gaussian_kernel: bool = True,
    kernel_size: int = 11,
    sigma: float = 1.5,
) -> Tensor:
    r"""Structural similarity per image (torchmetrics' ``structural_similarity_index_measure``).

    SSIM (Wang et al. 2004) averages, over the local windows of each image,

    .. math:: \frac{(2 \mu_x \mu_y + C_1)(2 \sigma_{xy} + C_2)}
                   {(\mu_x^2 + \mu_y^2 + C_1)(\sigma_x^2 + \sigma_y^2 + C_2)},
              \qquad C_1 = (0.01 R)^2, \; C_2 = (0.03 R)^2,

    with window statistics under a Gaussian window (``sigma`` 1.5, ``kernel_size`` 11:
    Wang et al.'s choice) or a uniform ``kernel_size`` window (``gaussian_kernel=False``;
    fastMRI uses a 7x7 uniform window and ``R`` = the volume's maximum). torchmetrics
    (1.9) pads each image by reflection, so that every pixel has its window, and
    averages over pixels and channels.

    Arguments:
        x: Estimates ``(N, C, H, W)``, or ``(N, H, W)`` (one channel, e.g. MRI
            magnitudes); ``H, W >= kernel_size``.
        y: References of the same shape.
        data_range: ``R``, the span of the data (4 for diffem's [-2, 2]); values are
            not clamped.
        gaussian_kernel, kernel_size, sigma: The window (see above); ``kernel_size`` odd.

    Returns:
        ``(N,)`` float tensor, at most 1 (1 for identical images); float64 if ``x`` is.

    Raises:
        TypeError: If ``x`` or ``y`` is not a real floating-point tensor.
        ValueError: For different shapes, a shape other than ``(N, H, W)`` / ``(N, C, H, W)``,
            images smaller than the window, an even or non-positive ``kernel_size``,
            ``sigma <= 0``, ``data_range <= 0``, or non-finite inputs.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    _pair(x, y)
    data_range = _data_range(data_range)
    if x.dim() == 3:
        x, y = x[:, None], y[:, None]
    if x.dim() != 4:
        raise ValueError(f"`x` and `y` must have shape (N, H, W) or (N, C, H, W), got {tuple(x.shape)}")
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"`kernel_size` must be an odd positive integer, got {kernel_size!r}")
    if not (isinstance(sigma, (int, float)) and sigma > 0):
        raise ValueError(f"`sigma` must be a number > 0, got {sigma!r}")
    window = int(2 * int(3.5 * sigma + 0.5) + 1) if gaussian_kernel else kernel_size  # torchmetrics' Gaussian width
    if min(x.shape[-2:]) < window:
        raise ValueError(
            f"`x` and `y`: images of {tuple(x.shape[-2:])} pixels are smaller than the {window}-pixel window"
        )
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = structural_similarity_index_measure(
        x.to(dtype), y.to(dtype), gaussian_kernel=gaussian_kernel, sigma=float(sigma), kernel_size=kernel_size,
        reduction="none", data_range=data_range,
    )
    return out.to(dtype)
