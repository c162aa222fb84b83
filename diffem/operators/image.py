r"""Image operators: pixel masks (random inpainting, boxes), super-resolution, Gaussian blur.

Each acts on images ``(*batch, C, H, W)`` and follows the batching rule of
:class:`~diffem.operators.base.LinearOperator`.

References:
    Chung et al., "Diffusion Posterior Sampling", ICLR 2023 (the SR x4, box inpainting and
    Gaussian deblurring tasks); Rozet et al. 2024, arXiv:2405.13712, Section 5.2 and Appendix E.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .base import LinearOperator, check_mask

__all__ = ["Mask", "SuperResolution", "GaussianBlur"]


class Mask(LinearOperator):
    r"""Pixel mask shared over channels: :math:`A x = m \odot x`, self-adjoint.

    Arguments:
        mask: A boolean tensor of shape ``(*batch, 1, H, W)`` with ``batch`` equal
            to ``()`` or ``(B,)``; ``True`` marks an observed pixel. It acts on
            images of shape ``(*batch, C, H, W)`` for any ``C`` given by ``channels``.
        channels: The number of image channels ``C`` (default 3).

    ``A.pinv = A`` (an orthogonal projection). Box inpainting: :meth:`box` and
    :meth:`random_box`.

    Raises:
        ValueError: if ``mask`` is not boolean, has the wrong number of dimensions,
            has a channel dimension other than 1, or observes nothing in a sample.
    """

    params = ("mask",)

    def __init__(self, mask: Tensor, channels: int = 3):
        check_mask("mask", mask, 3)
        if mask.shape[-3] != 1:
            raise ValueError(f"`mask` must have shape (*batch, 1, H, W), got {tuple(mask.shape)}")
        if channels < 1:
            raise ValueError(f"`channels` must be >= 1, got {channels}")
        self.mask = mask
        self.channels = int(channels)
        self.batch_shape = tuple(mask.shape[:-3])
        self.in_shape = self.out_shape = (self.channels, *mask.shape[-2:])

    def _forward(self, x: Tensor) -> Tensor:
        return x * self.mask.to(x.dtype)

    _adjoint = _forward
    # A = diag(m) with m in {0, 1} is an orthogonal projection: A^+ = A.
    _pinv = _forward

    @classmethod
    def box(
        cls,
        image_size: Sequence[int],
        box_size: Sequence[int],
        top: int | Tensor,
        left: int | Tensor,
        channels: int = 3,
    ) -> "Mask":
        r"""Box inpainting: every pixel observed except a rectangular hole per sample.

        Arguments:
            image_size: ``(H, W)`` in pixels.
            box_size: ``(h, w)``, the hole's size in pixels, ``1 <= h <= H``, ``1 <= w <= W``
                and not the whole image.
            top, left: The hole's upper-left corner, ints (one operator) or integer tensors
                of shape ``(B,)`` (one hole per sample); the hole must lie inside the image.
            channels: The number of image channels ``C``.

        Returns:
            A :class:`Mask` with mask shape ``(*batch, 1, H, W)``, ``False`` inside the hole.

        Raises:
            ValueError: if a size is not positive, the box covers the image or leaves it,
                or ``top`` / ``left`` have different or unsupported shapes.
        """
        H, W = _pair("image_size", image_size)
        h, w = _pair("box_size", box_size)
        if h > H or w > W or (h == H and w == W):
            raise ValueError(f"`box_size` {(h, w)} must fit inside `image_size` {(H, W)} and leave pixels observed")
        top, left = torch.as_tensor(top), torch.as_tensor(left)
        for name, v, limit in (("top", top, H - h), ("left", left, W - w)):
            if v.is_floating_point() or v.dtype == torch.bool or v.dim() > 1:
                raise ValueError(f"`{name}` must be an int or an integer tensor of shape (B,), got {v!r}")
            if ((v < 0) | (v > limit)).any():
                raise ValueError(f"`{name}` must lie in [0, {limit}] so that the box fits, got {v.tolist()}")
        if top.shape != left.shape:
            raise ValueError(f"`top` and `left` must have the same shape, got {tuple(top.shape)} and {tuple(left.shape)}")
        device = top.device
        rows = torch.arange(H, device=device)
        cols = torch.arange(W, device=device)
        in_rows = (rows >= top[..., None]) & (rows < top[..., None] + h)  # (*batch, H)
        in_cols = (cols >= left[..., None]) & (cols < left[..., None] + w)  # (*batch, W)
        hole = in_rows[..., :, None] & in_cols[..., None, :]
        return cls((~hole)[..., None, :, :], channels=channels)

    @classmethod
    def random_box(
        cls,
        image_size: Sequence[int],
        box_size: Sequence[int],
        generator: torch.Generator,
        batch: int | Sequence[int] = (),
        channels: int = 3,
    ) -> "Mask":
        """Box inpainting with a uniformly placed hole per sample (see :meth:`box`).

        The corners come from ``generator`` (required), one ``(top, left)`` pair per
        sample in order, so sample ``i`` does not depend on the batch size.
        """
        if not isinstance(generator, torch.Generator):
            raise ValueError("`generator` is required: pass a seeded torch.Generator")
        H, W = _pair("image_size", image_size)
        h, w = _pair("box_size", box_size)
        if h > H or w > W:
            raise ValueError(f"`box_size` {(h, w)} must fit inside `image_size` {(H, W)}")
        batch = (int(batch),) if isinstance(batch, int) else tuple(int(b) for b in batch)
        u = torch.rand(*batch, 2, generator=generator, device=generator.device, dtype=torch.float64)
        top = (u[..., 0] * (H - h + 1)).floor().long().clamp(max=H - h)
        left = (u[..., 1] * (W - w + 1)).floor().long().clamp(max=W - w)
        return cls.box((H, W), (h, w), top, left, channels=channels)


def _pair(name: str, value) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a pair of positive ints, got {value!r}") from None
    if a < 1 or b < 1 or (a, b) != tuple(value):
        raise ValueError(f"`{name}` must be a pair of positive ints, got {value!r}")
    return a, b


def _image_shape(name: str, value) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be (C, H, W), positive ints, got {value!r}") from None
    if len(shape) != 3 or min(shape) < 1 or shape != tuple(value):
        raise ValueError(f"`{name}` must be (C, H, W), positive ints, got {value!r}")
    return shape


class SuperResolution(LinearOperator):
    r"""Down-sampling by average pooling over ``factor x factor`` blocks (super-resolution).

    .. math:: (A x)_{c,i,j} = \frac{1}{f^2} \sum_{a,b < f} x_{c, f i + a, f j + b}

    Its adjoint spreads each value over its block divided by :math:`f^2`, so
    :math:`A A^T = I / f^2` and :math:`A^+ = f^2 A^T` (nearest-neighbour upsampling).
    It has no per-sample parameters: batch shape ``()``, shared by any leading batch.

    Arguments:
        factor: The down-sampling factor ``f`` >= 1 (4 for the usual x4 task).
        image_shape: ``(C, H, W)`` of ``x``, ``H`` and ``W`` divisible by ``f``;
            ``A(x)`` has shape ``(C, H / f, W / f)``.

    Raises:
        ValueError: if ``factor`` < 1 or does not divide ``H`` and ``W``.

    References:
        Chung et al., "Diffusion Posterior Sampling", ICLR 2023 (SR x4 task);
        Rozet et al. 2024, Appendix E.
    """

    def __init__(self, factor: int, image_shape: Sequence[int]):
        if isinstance(factor, bool) or int(factor) != factor or factor < 1:
            raise ValueError(f"`factor` must be an integer >= 1, got {factor!r}")
        C, H, W = _image_shape("image_shape", image_shape)
        f = int(factor)
        if H % f or W % f:
            raise ValueError(f"`factor` {f} must divide the image height and width {(H, W)}")
        self.factor = f
        self.batch_shape = ()
        self.in_shape = (C, H, W)
        self.out_shape = (C, H // f, W // f)

    def _forward(self, x: Tensor) -> Tensor:
        f = self.factor
        C, h, w = self.out_shape
        return x.reshape(*x.shape[:-3], C, h, f, w, f).mean(dim=(-3, -1))

    def _upsample(self, y: Tensor) -> Tensor:
        f = self.factor
        return y.repeat_interleave(f, dim=-2).repeat_interleave(f, dim=-1)

    def _adjoint(self, y: Tensor) -> Tensor:
        return self._upsample(y) / self.factor**2

    def _pinv(self, y: Tensor) -> Tensor:
        return self._upsample(y)

    def __repr__(self) -> str:
        return f"SuperResolution(factor={self.factor}, image_shape={self.in_shape})"


def _periodic_gaussian(n: int, std: Tensor, images: int = 3) -> Tensor:
    """The Gaussian of ``std`` pixels sampled on Z_n and periodised, normalised to sum 1, ``(*std.shape, n)``."""
    i = torch.arange(n, dtype=std.dtype, device=std.device)
    shifts = n * torch.arange(-images, images + 1, dtype=std.dtype, device=std.device)
    d = i[:, None] - shifts  # (n, 2 images + 1)
    k = torch.exp(-0.5 * (d / std[..., None, None]) ** 2).sum(-1)
    return k / k.sum(-1, keepdim=True)


class GaussianBlur(LinearOperator):
    r"""Gaussian deblurring: circular convolution with a Gaussian kernel, through the FFT.

    .. math:: A x = F^{-1} (\hat k \odot F x)

    per channel, where :math:`k = k_H \otimes k_W` is the separable Gaussian of
    standard deviation ``std`` pixels, periodised on the ``H x W`` torus and
    normalised to sum 1. It is symmetric (:math:`k[-i] = k[i]`), so :math:`\hat k` is real,
    :math:`\hat k(0) = 1 = \max |\hat k|`, and :math:`A^T = A`; its singular values are
    :math:`|\hat k|`.

    **Pseudo-inverse, with a cutoff.** A Gaussian's spectrum decays like
    :math:`\exp(-2 \pi^2 s^2 \nu^2)` and reaches round-off at high frequencies, so
    the exact :math:`A^+` would amplify noise there without bound. ``A.pinv`` is the
    truncated-SVD pseudo-inverse

    .. math:: A^+ y = F^{-1} \big( \hat k^{+} \odot F y \big), \quad
              \hat k^{+} = 1 / \hat k \text{ where } |\hat k| > \text{cutoff}, \; 0 \text{ elsewhere},

    i.e. the exact pseudo-inverse of :math:`A` with the frequencies where
    :math:`|\hat k| \le` ``cutoff`` removed (as ``torch.linalg.pinv(A, atol=cutoff)``).
    :math:`A^+ A A^+ = A^+` holds exactly; :math:`A A^+ A = A` up to
    ``cutoff * ||x||``, and exactly when ``cutoff`` is below :math:`\min |\hat k|`
    (:meth:`spectrum`).

    Arguments:
        std: The kernel's standard deviation in pixels, > 0: a float or a tensor of
            shape ``()`` (one operator) or ``(B,)`` (one per sample).
        image_shape: ``(C, H, W)`` of ``x`` (and of ``A(x)``).
        cutoff: The spectral cutoff of ``pinv`` in [0, 1), relative to
            :math:`\hat k(0) = 1` (default 1e-3).

    Raises:
        ValueError: if ``std`` is not positive and finite or has more than one
            dimension, or ``cutoff`` is outside [0, 1).

    References:
        Chung et al., "Diffusion Posterior Sampling", ICLR 2023 (Gaussian deblurring task);
        Hansen, Nagy & O'Leary, "Deblurring Images", SIAM 2006 (spectral filtering, Ch. 5).
    """

    params = ("std",)

    def __init__(self, std: float | Tensor, image_shape: Sequence[int], cutoff: float = 1e-3):
        std = torch.as_tensor(std)
        if not std.is_floating_point():
            std = std.to(torch.get_default_dtype())
        if std.dim() > 1:
            raise ValueError(f"`std` must be a float or a tensor of shape (B,), got shape {tuple(std.shape)}")
        if not (torch.isfinite(std).all() and (std > 0).all()):
            raise ValueError(f"`std` must be positive and finite, got {std.tolist()}")
        try:
            cutoff = float(cutoff)
        except (TypeError, ValueError):
            raise ValueError(f"`cutoff` must be a float in [0, 1), got {cutoff!r}") from None
        if not (0 <= cutoff < 1):
            raise ValueError(f"`cutoff` must be a float in [0, 1), got {cutoff!r}")
        self.std = std
        self.cutoff = cutoff
        self.batch_shape = tuple(std.shape)
        self.in_shape = self.out_shape = _image_shape("image_shape", image_shape)

    def spectrum(self, dtype: torch.dtype = torch.float64) -> Tensor:
        r"""The real transfer function :math:`\hat k`, shape ``(*batch, H, W)`` (unshifted FFT order)."""
        _, H, W = self.in_shape
        std = self.std.to(dtype)
        kh = torch.fft.fft(_periodic_gaussian(H, std)).real
        kw = torch.fft.fft(_periodic_gaussian(W, std)).real
        return kh[..., :, None] * kw[..., None, :]

    def _filter(self, x: Tensor, transfer: Tensor) -> Tensor:
        return torch.fft.ifft2(torch.fft.fft2(x) * transfer[..., None, :, :]).real

    def _forward(self, x: Tensor) -> Tensor:
        return self._filter(x, self.spectrum(x.dtype))

    _adjoint = _forward

    def _pinv(self, y: Tensor) -> Tensor:
        k = self.spectrum(y.dtype)
        keep = k.abs() > self.cutoff
        inverse = torch.where(keep, 1 / torch.where(keep, k, torch.ones_like(k)), torch.zeros_like(k))
        return self._filter(y, inverse)
