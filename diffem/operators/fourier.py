r"""The MRI forward operators: a column-subsampled, orthonormal, centred 2-D Fourier transform, and SENSE.

:class:`SubsampledFourier` maps an image to its masked k-space as two real channels
``(*batch, 2, H, W)``; its masks come from the fastMRI column-mask policy
(:func:`diffem.data.mri_mask.column_mask`). :class:`SenseFourier` is its multi-coil form. Both
take either a real magnitude image ``(*batch, 1, H, W)`` or a complex image stored as two real
channels (real, imaginary) ``(*batch, 2, H, W)`` (``complex_images=True``), as scanners give it.

References:
    Zbontar et al., "fastMRI", arXiv:1811.08839; Rozet et al. 2024, arXiv:2405.13712, Section 5.3.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import LinearOperator, check_mask

__all__ = ["SubsampledFourier", "SenseFourier", "fft2c", "ifft2c", "as_complex", "as_channels"]


def fft2c(image: Tensor) -> Tensor:
    """The centred orthonormal 2-D DFT over the last two axes (fastMRI's and sigpy's convention)."""
    return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(image, dim=(-2, -1)), norm="ortho"), dim=(-2, -1))


def ifft2c(kspace: Tensor) -> Tensor:
    """The inverse of :func:`fft2c`."""
    return torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(kspace, dim=(-2, -1)), norm="ortho"), dim=(-2, -1))


def as_complex(x: Tensor, complex_images: bool) -> Tensor:
    """An image ``(..., 1 or 2, H, W)`` as a complex ``(..., H, W)``: channel 0, or channels 0 + i 1."""
    if complex_images:
        return torch.complex(x[..., 0, :, :], x[..., 1, :, :])
    return x[..., 0, :, :].to(torch.complex128 if x.dtype == torch.float64 else torch.complex64)


def as_channels(z: Tensor, complex_images: bool) -> Tensor:
    """The inverse of :func:`as_complex` for the adjoints: ``(..., 2, H, W)`` (real, imaginary), or the
    real part ``(..., 1, H, W)`` (the adjoint of embedding real images in the complex ones)."""
    if complex_images:
        return torch.stack((z.real, z.imag), dim=-3)
    return z.real[..., None, :, :]


class SubsampledFourier(LinearOperator):
    r"""Column-subsampled, orthonormal, centred 2-D Fourier transform (MRI k-space).

    .. math:: A x = M \, S F S' x

    where :math:`F` is the orthonormal 2-D DFT, :math:`S` / :math:`S'` the
    ``fftshift`` / ``ifftshift`` permutations and :math:`M` keeps the sampled
    k-space columns. The complex output is returned as two real channels
    (real, imaginary), so ``A`` maps a real image ``(*batch, 1, H, W)`` to
    ``(*batch, 2, H, W)``. The adjoint is the real part of the centred inverse
    DFT of the masked k-space.

    **Pseudo-inverse.** Write :math:`F_c = S F S'` and :math:`k = y_0 + i y_1`.
    In the centred indexing the DC column is :math:`c_0 = \lfloor W/2 \rfloor`
    and column :math:`v` mirrors to :math:`\bar v = (2 c_0 - v) \bmod W`
    (likewise for rows). Let :math:`(P k)[u, v] = \overline{k[\bar u, \bar v]}`,
    a real-linear, orthogonal and symmetric involution. Since
    :math:`\overline{F_c^H k} = F_c^H P k`,

    .. math:: A A^T k = M F_c \operatorname{Re}(F_c^H M k)
              = \tfrac12 (M k + M P M k).

    This splits over the sampled columns:

    * a column :math:`v` whose mirror :math:`\bar v` is sampled too (DC always, and
      the Nyquist column :math:`v = 0` at even ``W``, which are their own mirrors):
      :math:`A A^T = \tfrac12 (I + P)`, the orthogonal projection onto
      Hermitian-symmetric k-space, eigenvalues 1 and 0 (the anti-Hermitian part,
      e.g. the imaginary part at the self-mirrored points, is never produced by a
      real image);
    * a column whose mirror is not sampled: :math:`M P M = 0` there, so
      :math:`A A^T = \tfrac12 I`;
    * an unsampled column: 0.

    Hence :math:`(A A^T)^+ = \tfrac12(I + P) M_2 + 2 M_1` (:math:`M_2`, :math:`M_1`:
    the sampled columns with / without their mirror), and since
    :math:`A^T P k = A^T k` for ``k`` supported on :math:`M_2`,

    .. math:: A^+ y = A^T \big( (M_2 + 2 M_1) \, y \big),

    i.e. the zero-filled reconstruction with the k-space columns whose mirror is
    missing counted twice. :math:`A^+ \ne A^T` unless the mask is symmetric.

    **Complex images** (``complex_images=True``, ``x`` of shape ``(*batch, 2, H, W)``: real and
    imaginary parts). Then :math:`A = M F_c` on :math:`\mathbb{C}^{HW} \cong \mathbb{R}^{2HW}`,
    with no conjugate symmetry: :math:`A A^T = M` is a projection, :math:`A^+ = A^T` (the
    zero-filled inverse FFT), the rank is :math:`2H` per sampled column and the effective
    acceleration equals the nominal ``R``.

    **Consequence** (real images). A real image's spectrum is conjugate-symmetric, so column
    :math:`v` also tells column :math:`\bar v`: the rank of ``A`` (real degrees of
    freedom observed) is :math:`H` per sampled self-mirrored column plus
    :math:`2H` per sampled pair :math:`\{v, \bar v\}` (whether one or both are
    sampled). With random columns the effective acceleration
    :math:`HW / \operatorname{rank} A` (:meth:`effective_acceleration`) is
    therefore milder than the nominal ``R`` = W / (sampled columns), by up
    to a factor 2.

    Arguments:
        mask: A boolean tensor of shape ``(*batch, W)``, ``batch`` equal to ``()``
            or ``(B,)``; ``True`` marks a sampled k-space column (centred indexing,
            DC at ``W // 2``; see :func:`column_mask`).
        height: The image height ``H`` (default: ``W``, square images).
        complex_images: ``x`` is complex, ``(*batch, 2, H, W)`` (real, imaginary); default: a real
            image ``(*batch, 1, H, W)``.

    References:
        Zbontar et al., "fastMRI", arXiv:1811.08839; Rozet et al. 2024, Section 5.3.
    """

    params = ("mask",)

    def __init__(self, mask: Tensor, height: int | None = None, complex_images: bool = False):
        check_mask("mask", mask, 1)
        self.mask = mask
        width = mask.shape[-1]
        self.height = int(width if height is None else height)
        self.complex_images = bool(complex_images)
        self.batch_shape = tuple(mask.shape[:-1])
        self.in_shape = (2 if self.complex_images else 1, self.height, width)
        self.out_shape = (2, self.height, width)

    def _forward(self, x: Tensor) -> Tensor:
        k = fft2c(as_complex(x, self.complex_images)) * self.mask[..., None, :].to(x.dtype)
        return torch.stack((k.real, k.imag), dim=-3)

    def _adjoint(self, y: Tensor) -> Tensor:
        k = torch.complex(y[..., 0, :, :], y[..., 1, :, :]) * self.mask[..., None, :].to(y.dtype)
        return as_channels(ifft2c(k), self.complex_images)

    def mirrored_mask(self) -> Tensor:
        r"""The mask of the mirror columns, ``(*batch, W)``: entry ``v`` is ``mask[(2 (W//2) - v) % W]``."""
        width = self.mask.shape[-1]
        mirror = (2 * (width // 2) - torch.arange(width, device=self.mask.device)) % width
        return self.mask[..., mirror]

    def _pinv(self, y: Tensor) -> Tensor:
        if self.complex_images:  # A A^T = M, a projection
            return self._adjoint(y)
        # A^+ y = A^T((M_2 + 2 M_1) y): weight 1 where the mirror column is sampled, 2 where not.
        weight = 2.0 - self.mirrored_mask().to(y.dtype)
        return self._adjoint(y * weight[..., None, None, :])

    def rank(self) -> Tensor:
        r"""The rank of ``A`` per sample, ``(*batch,)`` (int64).

        Real images: :math:`H` per sampled self-mirrored column (DC; Nyquist at even ``W``) plus
        :math:`2H` per distinct sampled pair :math:`\{v, \bar v\}`; see the class docstring.
        Complex images: :math:`2H` per sampled column.
        """
        if self.complex_images:
            return 2 * self.height * self.mask.sum(-1)
        m, mm = self.mask, self.mirrored_mask()
        width = m.shape[-1]
        mirror = (2 * (width // 2) - torch.arange(width, device=m.device)) % width
        self_mirrored = mirror == torch.arange(width, device=m.device)
        pairs = (m | mm) & ~self_mirrored  # each distinct pair {v, v̄} is counted at both v and v̄
        return self.height * ((m & self_mirrored).sum(-1) + pairs.sum(-1))

    def effective_acceleration(self) -> Tensor:
        r"""The effective acceleration ``dim(x) / rank(A)`` per sample, ``(*batch,)``.

        Real images: milder than the nominal ``W / mask.sum(-1)`` (down to half of it), because a
        real image's spectrum is conjugate-symmetric. Complex images: equal to it.
        """
        return self.in_shape[0] * self.height * self.mask.shape[-1] / self.rank().double()


class SenseFourier(LinearOperator):
    r"""Multi-coil (SENSE) MRI: coil images, their centred orthonormal 2-D DFT, a 2-D sampling mask.

    .. math:: (A x)_c = M \odot F_c (S_c \, x), \qquad c = 1, \dots, C,

    for an image :math:`x` (real ``(*batch, 1, H, W)``, or complex as two channels
    ``(*batch, 2, H, W)`` with ``complex_images=True``), complex coil sensitivities :math:`S_c`
    (``maps``) and a k-space sampling pattern :math:`M` (``mask``, any 2-D pattern: columns,
    variable density, ...). The output is the coils' masked k-space as real and imaginary
    channels, ``(*batch, C, 2, H, W)``. As a map from real images to :math:`\mathbb{R}^{2CHW}`,
    its adjoint is :math:`A^T y = \operatorname{Re} \sum_c \overline{S_c} \, F_c^H (M \odot y_c)`;
    on complex images it is the same sum without the real part, as two channels.

    :meth:`sense_combination` is the zero-filled SENSE image
    :math:`\operatorname{Re} \sum_c \overline{S_c} F_c^H y_c / \sum_c |S_c|^2` (the least-squares
    image of fully sampled data); it is not the pseudo-inverse of ``A`` under undersampling.

    Arguments:
        mask: Boolean ``(*batch, H, W)``; True marks a sampled k-space point (centred indexing, DC at
            ``(H // 2, W // 2)``). ``batch`` is ``()`` or ``(B,)``.
        maps: Complex ``(*batch, C, H, W)`` coil sensitivities (e.g. ESPIRiT, sigpy's
            ``mri.app.EspiritCalib``), the batch of ``mask``. Maps shared by a batch can be passed
            as an expanded view (``maps.expand(B, C, H, W)``), which costs no memory.
        complex_images: ``x`` is complex, ``(*batch, 2, H, W)``; default: real ``(*batch, 1, H, W)``.

    Raises:
        ValueError: if ``mask`` is not boolean or observes nothing, ``maps`` is not complex or its
            shape does not match the mask's, or a map is not finite.

    References:
        Pruessmann et al., "SENSE: sensitivity encoding for fast MRI", MRM 1999; Uecker et al.,
        "ESPIRiT", MRM 2014.
    """

    params = ("mask", "maps")

    def __init__(self, mask: Tensor, maps: Tensor, complex_images: bool = False):
        check_mask("mask", mask, 2)
        if not torch.is_tensor(maps) or not maps.is_complex():
            raise ValueError(f"`maps` must be a complex tensor (*batch, C, H, W), got "
                             f"{getattr(maps, 'dtype', type(maps).__name__)}")
        if maps.dim() != mask.dim() + 1 or maps.shape[:-3] != mask.shape[:-2] or maps.shape[-2:] != mask.shape[-2:]:
            raise ValueError(f"`maps` has shape {tuple(maps.shape)}, expected (*batch, C, H, W) with the batch and "
                             f"(H, W) of `mask` {tuple(mask.shape)}")
        if not bool(torch.isfinite(torch.view_as_real(maps)).all()):
            raise ValueError("`maps` contains NaN or inf values")
        self.mask, self.maps = mask, maps
        self.coils = int(maps.shape[-3])
        self.complex_images = bool(complex_images)
        h, w = mask.shape[-2:]
        self.batch_shape = tuple(mask.shape[:-2])
        self.in_shape = (2 if self.complex_images else 1, h, w)
        self.out_shape = (self.coils, 2, h, w)

    def _shared_maps_to(self, *args, **kwargs) -> Tensor:
        """``self.maps.to(...)`` with the shared (expanded, stride-0) axes kept expanded, so that a dtype
        change or a move to a device does not copy one map per observation."""
        maps, base = self.maps, self.maps
        for dim, stride in enumerate(maps.stride()):
            if stride == 0 and maps.shape[dim] > 1:
                base = base.narrow(dim, 0, 1)
        return base.to(*args, **kwargs).expand(maps.shape)

    def _maps(self, like: Tensor) -> Tensor:
        """The maps in the complex dtype of ``like`` (shared axes stay expanded)."""
        dtype = torch.complex128 if like.dtype == torch.float64 else torch.complex64
        return self.maps if self.maps.dtype == dtype else self._shared_maps_to(dtype)

    def _forward(self, x: Tensor) -> Tensor:
        coil = self._maps(x) * as_complex(x, self.complex_images)[..., None, :, :]  # (..., C, H, W)
        k = fft2c(coil) * self.mask[..., None, :, :].to(x.dtype)
        return torch.stack((k.real, k.imag), dim=-3)

    def _adjoint(self, y: Tensor) -> Tensor:
        k = torch.complex(y[..., 0, :, :], y[..., 1, :, :]) * self.mask[..., None, :, :].to(y.dtype)
        image = (self._maps(y).conj() * ifft2c(k)).sum(-3)
        return as_channels(image, self.complex_images)

    def sense_combination(self, y: Tensor) -> Tensor:
        """The zero-filled SENSE image ``(*batch, *in_shape)`` of coil k-space ``y`` ``(*batch, C, 2, H, W)``."""
        k = torch.complex(y[..., 0, :, :], y[..., 1, :, :])
        maps = self._maps(y)
        image = (maps.conj() * ifft2c(k)).sum(-3) / maps.abs().square().sum(-3).clamp_min(1e-12)
        return as_channels(image, self.complex_images)

    def to(self, *args, **kwargs) -> "SenseFourier":
        """Move to a device (and a float dtype: the maps take its complex counterpart); the mask stays boolean."""
        probe = torch.empty(0).to(*args, **kwargs)
        complex_dtype = {torch.float64: torch.complex128, torch.float32: torch.complex64,
                         torch.float16: torch.complex64, torch.bfloat16: torch.complex64}.get(probe.dtype)
        has_dtype = any(isinstance(a, torch.dtype) for a in args) or "dtype" in kwargs
        maps = self._shared_maps_to(probe.device, dtype=complex_dtype if has_dtype else None)
        return self._replace(mask=self.mask.to(probe.device), maps=maps)
