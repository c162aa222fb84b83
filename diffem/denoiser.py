r"""Preconditioned denoiser and its denoising score matching loss.

Variance-exploding noise :math:`x_t = x + \sigma_t z`, with

.. math:: \sigma_t = \exp\big((1 - t) \ln \sigma_{\min} + t \ln \sigma_{\max}\big),
   \quad \sigma_{\min} = 10^{-3}, \; \sigma_{\max} = 10^{2}.

The denoiser :math:`d_\theta(x_t, \sigma) \approx \mathbb{E}[x \mid x_t]` wraps a backbone
:math:`F_\theta` with EDM's preconditioning for :math:`\sigma_{\text{data}} = 1`:

.. math::
    d_\theta(x_t, \sigma) = c_{\text{skip}} x_t + c_{\text{out}} F_\theta(c_{\text{in}} x_t, c_{\text{noise}}),
    \quad c_{\text{skip}} = \frac{1}{\sigma^2 + 1}, \;
    c_{\text{out}} = \frac{\sigma}{\sqrt{\sigma^2 + 1}}, \;
    c_{\text{in}} = \frac{1}{\sqrt{\sigma^2 + 1}}, \;
    c_{\text{noise}} = \ln \sigma.

Training draws :math:`t \sim \text{Beta}(3, 3)` and minimises
:math:`(1/\sigma_t^2 + 1) \, \lVert d_\theta(x + \sigma_t z, \sigma_t) - x \rVert^2` (averaged
over dimensions).

References:
    Karras et al., arXiv:2206.00364 (EDM), Table 1; Rozet et al., arXiv:2405.13712, Appendix C.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["Denoiser", "DenoisingLoss", "AmbientLoss", "SIGMA_MIN", "SIGMA_MAX", "sigma_of_t", "sample_beta33"]

SIGMA_MIN = 1e-3
SIGMA_MAX = 1e2


def sigma_of_t(t: Tensor, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX) -> Tensor:
    r"""The noise schedule :math:`\sigma_t = \exp((1-t)\ln\sigma_{\min} + t\ln\sigma_{\max})`, ``t`` in [0, 1]."""
    return torch.exp((1 - t) * math.log(sigma_min) + t * math.log(sigma_max))


def sample_beta33(n: int, generator: torch.Generator, device=None, dtype=torch.float32) -> Tensor:
    r"""``n`` draws of :math:`t \sim \text{Beta}(3, 3)` from an explicit ``generator``.

    Uses the order statistic identity: the 3rd smallest of 5 i.i.d. uniforms is Beta(3, 3).
    """
    u = torch.rand(n, 5, generator=generator, device=generator.device, dtype=dtype)
    return u.sort(dim=1).values[:, 2].to(device)


def sigma_vector(sigma, x_t: Tensor) -> Tensor:
    """Noise levels ``sigma`` as a ``(B,)`` tensor of ``x_t``'s dtype and device, ``B = x_t.shape[0]``.

    Arguments:
        sigma: A float, a 0-d tensor (expanded to ``(B,)``) or a ``(B,)`` tensor, in data units.
        x_t: The noisy batch ``(B, ...)`` the levels belong to.

    Raises:
        ValueError: ``sigma`` has another shape, or a level is not > 0.
    """
    b = x_t.shape[0]
    sigma = torch.as_tensor(sigma, dtype=x_t.dtype, device=x_t.device)
    if sigma.dim() == 0:
        sigma = sigma.expand(b)
    elif sigma.shape != (b,):
        raise ValueError(f"`sigma` must be a scalar or have shape ({b},), got {tuple(sigma.shape)}")
    if not (sigma > 0).all():
        raise ValueError("`sigma` must be > 0")
    return sigma


def expand_as(s: Tensor, like: Tensor) -> Tensor:
    """A per-sample ``(B,)`` tensor reshaped to ``(B, 1, ..., 1)`` to broadcast against ``like`` ``(B, ...)``."""
    return s.reshape(-1, *([1] * (like.dim() - 1)))


class Denoiser(nn.Module):
    r"""EDM-preconditioned denoiser :math:`d_\theta(x_t, \sigma) \approx \mathbb{E}[x \mid x_t]`.

    Arguments:
        backbone: A network called as ``backbone(x, c_noise)`` with ``x`` of shape
            ``(B, *event_shape)`` and ``c_noise`` a float tensor ``(B,)``, returning a
            tensor of the same shape as ``x`` or an output with a ``.sample`` field
            (diffusers ``UNet2DModel``: ``c_noise`` is passed as a float tensor, never
            truncated to integer timesteps).

    Shapes:
        ``x_t``: ``(B, *event_shape)`` in data units (images in [-2, 2] plus noise);
        ``sigma``: a float, a 0-d tensor or ``(B,)``, in data units, > 0.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x_t: Tensor, sigma, mask: Tensor | None = None) -> Tensor:
        """``mask``: for a mask-conditioned backbone (:class:`~diffem.networks.MaskConditionedUNet`)
        only, the mask ``(B, *event_shape)`` of 0 / 1 it sees ``x_t`` through (default: its
        sampling mask); ``x_t`` is masked before the skip connection too."""
        sigma = sigma_vector(sigma, x_t)
        s = expand_as(sigma, x_t)
        c_skip = 1 / (s**2 + 1)
        c_out = s / (s**2 + 1).sqrt()
        c_in = 1 / (s**2 + 1).sqrt()
        fixed = getattr(self.backbone, "sampling_mask", None)
        if mask is None and fixed is None:
            out = self.backbone(c_in * x_t, sigma.log())
            out = getattr(out, "sample", out)
            return c_skip * x_t + c_out * out
        if fixed is None:
            raise ValueError("`mask` is for a mask-conditioned backbone (MaskConditionedUNet) only")
        mask = fixed.to(x_t.dtype).expand_as(x_t) if mask is None else mask.to(x_t.dtype)
        x_t = x_t * mask
        out = self.backbone(c_in * x_t, sigma.log(), mask=mask)
        out = getattr(out, "sample", out)
        return c_skip * x_t + c_out * out

    @staticmethod
    def draw_noise(x: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        r"""The training noise of a clean batch ``x`` ``(B, *event_shape)``, from ``generator``.

        Draws :math:`t \sim \text{Beta}(3,3)` then :math:`z \sim \mathcal{N}(0, I)`, in that
        order, and returns ``(sigma, z)``: the noise levels :math:`\sigma_t` ``(B,)`` in data
        units and ``z`` of the shape of ``x``. Drawing a global batch's noise once and slicing
        it per process keeps a multi-process M-step equal to a 1-process one.

        Raises:
            ValueError: if ``generator`` is None.
        """
        if generator is None:
            raise ValueError("`generator` is required: pass a seeded torch.Generator")
        t = sample_beta33(x.shape[0], generator, device=x.device, dtype=x.dtype)
        z = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
        return sigma_of_t(t), z

    def loss(self, x: Tensor, generator: torch.Generator | None = None, *, sigma: Tensor | None = None,
             noise: Tensor | None = None) -> Tensor:
        r"""Weighted denoising score matching loss of a clean batch ``x`` ``(B, *event_shape)``.

        The noise is either drawn from ``generator`` (:meth:`draw_noise`) or given: ``sigma``
        ``(B,)`` (data units, > 0) and ``noise`` ``z`` of the shape of ``x``. Returns the scalar
        mean over the batch of
        :math:`(1/\sigma^2 + 1) \cdot \text{mean}((d_\theta(x + \sigma z, \sigma) - x)^2)`
        (Karras et al. 2022, EDM weighting with :math:`\sigma_\text{data} = 1`).

        Raises:
            ValueError: if neither ``generator`` nor both ``sigma`` and ``noise`` are given, or
                their shapes do not match ``x``.
        """
        if sigma is None and noise is None:
            sigma, noise = self.draw_noise(x, generator)
        elif sigma is None or noise is None:
            raise ValueError("pass both `sigma` and `noise`, or neither (then `generator`)")
        else:
            if noise.shape != x.shape:
                raise ValueError(f"`noise` must have the shape of `x` {tuple(x.shape)}, got {tuple(noise.shape)}")
            sigma = sigma_vector(sigma, x)
        x_t = x + expand_as(sigma, x) * noise
        error = (self(x_t, sigma) - x).square().flatten(1).mean(dim=1)
        return ((1 / sigma**2 + 1) * error).mean()


class AmbientLoss(nn.Module):
    r"""Ambient Diffusion's training objective on masked observations (Daras et al. 2023, Eq. 3.2).

    For an observation :math:`y = A x` (``y``: :math:`A^T y`, zeros where deleted; ``mask``:
    :math:`A`), a further-corrupted mask :math:`\tilde{A} = B A` (``further``: ``mask`` with an
    extra fraction :math:`\delta` of the observed pixels removed) and noise :math:`\sigma z`,

    .. math:: \ell = \left(\frac{1}{\sigma^2} + 1\right)
       \frac{\lVert A \, (d_\theta(\tilde{A}(y + \sigma z), \tilde{A}, \sigma) - y) \rVert^2}{\lVert A \rVert_0}

    averaged over the batch: the network sees the further-corrupted noisy image and is scored on
    every observed pixel (those it did not see included), with EDM's weighting as
    :meth:`Denoiser.loss`. Needs a mask-conditioned backbone
    (:class:`~diffem.networks.MaskConditionedUNet`).

    Shapes: ``y``, ``mask``, ``further``, ``noise``: ``(B, C, H, W)`` (masks of 0 / 1); ``sigma``:
    ``(B,)`` in data units.

    Raises:
        ValueError: if the shapes differ.

    References:
        Daras et al., "Ambient Diffusion: Learning Clean Distributions from Corrupted Data",
        NeurIPS 2023, arXiv:2305.19256.
    """

    def __init__(self, denoiser: Denoiser):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, y: Tensor, mask: Tensor, further: Tensor, sigma: Tensor, noise: Tensor) -> Tensor:
        for name, t in (("mask", mask), ("further", further), ("noise", noise)):
            if t.shape != y.shape:
                raise ValueError(f"`{name}` must have the shape of `y` {tuple(y.shape)}, got {tuple(t.shape)}")
        sigma = sigma_vector(sigma, y)
        x_t = y + expand_as(sigma, y) * noise
        d = self.denoiser(x_t, sigma, mask=further)
        mask = mask.to(y.dtype)
        error = (mask * (d - y)).square().flatten(1).sum(1) / mask.flatten(1).sum(1).clamp(min=1)
        return ((1 / sigma**2 + 1) * error).mean()


class DenoisingLoss(nn.Module):
    """``forward(x, generator)`` = ``denoiser.loss(x, generator)``: the training objective as a module.

    Wrapping the loss in a module lets accelerate / DDP wrap the whole objective, so that
    gradients are all-reduced across processes.
    """

    def __init__(self, denoiser: Denoiser):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x: Tensor, generator: torch.Generator | None = None, *, sigma: Tensor | None = None,
                noise: Tensor | None = None) -> Tensor:
        return self.denoiser.loss(x, generator, sigma=sigma, noise=noise)
