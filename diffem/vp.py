r"""Pretrained variance-preserving (VP) diffusers checkpoints as diffem denoisers.

A diffusers DDPM / DDIM checkpoint (``UNet2DModel`` + ``DDPMScheduler`` or
``DDIMScheduler`` config) is trained on the VP process

.. math:: x^{vp}_t = \sqrt{\bar\alpha_t} \, x + \sqrt{1 - \bar\alpha_t} \, \epsilon,
   \qquad t \in \{0, \dots, T - 1\},

whereas diffem works with the variance-exploding (VE) process
:math:`x_t = x + \sigma z` (:mod:`diffem.denoiser`). Dividing by
:math:`\sqrt{\bar\alpha_t}` maps one onto the other:

.. math:: x^{ve} = x^{vp} / \sqrt{\bar\alpha}, \qquad
   \sigma = \sqrt{(1 - \bar\alpha) / \bar\alpha}, \qquad
   \bar\alpha = 1 / (1 + \sigma^2).

:class:`VPDenoiser` evaluates :math:`\mathbb{E}[x \mid x_t]` at any VE level
:math:`\sigma` by (1) computing :math:`\bar\alpha(\sigma)`, (2) scaling
:math:`x^{vp} = \sqrt{\bar\alpha} \, x^{ve}`, (3) conditioning the network on a
*continuous* timestep, interpolated linearly in :math:`\log \sigma` between the
scheduler's training timesteps (clamped to :math:`[0, T - 1]` outside their
range), and (4) converting the network output to :math:`\hat{x}` with the
prediction type's formula, using the exact :math:`\bar\alpha(\sigma)`:

- ``epsilon``: :math:`\hat{x} = (x^{vp} - \sqrt{1-\bar\alpha}\,\hat\epsilon) / \sqrt{\bar\alpha} = x^{ve} - \sigma \hat\epsilon`;
- ``v_prediction``: :math:`\hat{x} = \sqrt{\bar\alpha}\, x^{vp} - \sqrt{1-\bar\alpha}\, \hat{v}`;
- ``sample``: :math:`\hat{x} = \hat{x}_0`.

At a training timestep this is exactly the scheduler's own ``pred_original_sample``
(without clipping or thresholding, which would break Tweedie's formula). The map
is differentiable in :math:`x_t`, so MMPS (:class:`~diffem.posterior.MMPSDenoiser`),
the baselines and every sampler use it unchanged.

Data range. DDPM checkpoints (e.g. ``google/ddpm-cifar10-32``) are trained on
images in :math:`[-1, 1]`; diffem's images live in :math:`[-2, 2]`
(:func:`diffem.data.cifar10.from_uint8`). With ``data_scale = s`` (default 2) the
adapter works in diffem units: :math:`x_{\text{diffem}} = s \, x_{\text{ckpt}}`, so
a diffem noise level :math:`\sigma` is :math:`\sigma / s` in checkpoint units and
:math:`\hat{x}` is multiplied back by :math:`s`. Use ``data_scale=1`` to work in
the checkpoint's own :math:`[-1, 1]` units (then observations and
:math:`\sigma_y` must be in those units too).

References:
    Ho et al. 2020 (DDPM), arXiv:2006.11239; Song et al. 2021 (SDE), arXiv:2011.13456,
    Section 3.4 (VP and VE are the same process up to scaling); Karras et al. 2022 (EDM),
    arXiv:2206.00364, Section 2 and Appendix C; Salimans & Ho 2022 (v-prediction),
    arXiv:2202.00512.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from .denoiser import expand_as, sigma_vector

__all__ = ["VPDenoiser", "PREDICTION_TYPES"]

#: The prediction types the adapter understands (diffusers' names).
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _check_prediction_type(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"unsupported `prediction_type` {prediction_type!r} for a VP checkpoint; expected one of {PREDICTION_TYPES}"
        )
    return prediction_type


class VPDenoiser(nn.Module):
    r"""A VP network as a diffem denoiser :math:`(x_t, \sigma) \mapsto \mathbb{E}[x \mid x_t]`.

    Arguments:
        unet: The network, called as ``unet(x_vp, t)`` with ``x_vp`` ``(B, C, H, W)`` and a
            float timestep tensor ``t`` ``(B,)`` in ``[0, T - 1]``; returns a tensor or an
            output with a ``.sample`` field (diffusers ``UNet2DModel``).
        alphas_cumprod: :math:`\bar\alpha_t` of the training timesteps, ``(T,)``, decreasing,
            in (0, 1] (``scheduler.alphas_cumprod`` of a DDPM / DDIM scheduler).
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
        data_scale: :math:`s > 0`: diffem data = :math:`s` x checkpoint data (default 2:
            checkpoint :math:`[-1, 1]` to diffem :math:`[-2, 2]`).

    Shapes:
        ``x_t``: ``(B, C, H, W)`` in diffem units; ``sigma``: a float, 0-d or ``(B,)`` tensor,
        > 0, in diffem units. Returns ``(B, C, H, W)``.

    Raises:
        ValueError: for an unsupported ``prediction_type``, ``alphas_cumprod`` that is not a
            decreasing 1-d tensor in (0, 1], ``data_scale <= 0``, or (at call time) a
            ``sigma`` that is not positive or of the wrong shape.
    """

    def __init__(self, unet: nn.Module, alphas_cumprod: Tensor, prediction_type: str = "epsilon", data_scale: float = 2.0):
        super().__init__()
        _check_prediction_type(prediction_type)
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if alphas_cumprod.dim() != 1 or alphas_cumprod.numel() < 2:
            raise ValueError(f"`alphas_cumprod` must be a 1-d tensor of length >= 2, got shape {tuple(alphas_cumprod.shape)}")
        if not ((alphas_cumprod > 0) & (alphas_cumprod <= 1)).all() or not (alphas_cumprod.diff() < 0).all():
            raise ValueError("`alphas_cumprod` must be strictly decreasing with values in (0, 1]")
        if not data_scale > 0:
            raise ValueError(f"`data_scale` must be > 0, got {data_scale}")
        config = getattr(unet, "config", None)
        if config is not None and config.get("time_embedding_type", "positional") == "fourier":
            raise ValueError("a UNet with `time_embedding_type='fourier'` is a VE (score-SDE) model, not a VP one")
        self.unet = unet
        self.prediction_type = prediction_type
        self.data_scale = float(data_scale)
        self._round_timesteps = config is not None and config.get("time_embedding_type", "positional") == "learned"
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
        if not sigmas[0] > 0:
            raise ValueError("`alphas_cumprod[0]` must be < 1 (the first training level must be noisy)")
        self.register_buffer("alphas_cumprod", alphas_cumprod, persistent=False)
        self.register_buffer("log_sigmas", sigmas.log(), persistent=False)

    # -- sigma <-> timestep ---------------------------------------------------------------------
    @property
    def sigma_range(self) -> tuple[float, float]:
        """The VE noise levels of the first and last training timesteps, in diffem units."""
        s = self.log_sigmas.exp() * self.data_scale
        return float(s[0]), float(s[-1])

    def timestep(self, sigma: Tensor) -> Tensor:
        r"""Continuous timestep ``(B,)`` for VE levels ``sigma`` ``(B,)`` in diffem units.

        Linear interpolation in :math:`\log \sigma` between the training timesteps,
        clamped to ``[0, T - 1]``; rounded for a ``learned`` (embedding-table) time embedding.
        """
        log_sigma = (sigma.to(torch.float64) / self.data_scale).log()
        table = self.log_sigmas.to(log_sigma.device)
        n = table.numel()
        idx = torch.searchsorted(table, log_sigma.clamp(table[0], table[-1])).clamp(1, n - 1)
        lo, hi = table[idx - 1], table[idx]
        w = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
        t = (idx - 1).to(torch.float64) + w
        return t.round() if self._round_timesteps else t

    # -- denoiser ---------------------------------------------------------------------------------
    def forward(self, x_t: Tensor, sigma) -> Tensor:
        sigma = sigma_vector(sigma, x_t)
        s = self.data_scale
        sigma_ckpt = (sigma / s).to(torch.float64)
        alpha_bar = 1 / (1 + sigma_ckpt.square())
        a = expand_as(alpha_bar.sqrt().to(x_t.dtype), x_t)
        c = expand_as((1 - alpha_bar).sqrt().to(x_t.dtype), x_t)
        x_ve = x_t / s
        x_vp = a * x_ve
        t = self.timestep(sigma).to(torch.float32)
        out = self.unet(x_vp, t)
        out = getattr(out, "sample", out)
        if self.prediction_type == "epsilon":
            x0 = (x_vp - c * out) / a
        elif self.prediction_type == "v_prediction":
            x0 = a * x_vp - c * out
        else:
            x0 = out
        return s * x0

    # -- loading ------------------------------------------------------------------------------------
    @classmethod
    def from_scheduler(cls, unet: nn.Module, scheduler, data_scale: float = 2.0) -> "VPDenoiser":
        """The adapter of a ``unet`` and a diffusers VP scheduler (``DDPMScheduler``, ``DDIMScheduler``, ...).

        Reads ``scheduler.alphas_cumprod`` and ``scheduler.config.prediction_type``.

        Raises:
            ValueError: if the scheduler has no ``alphas_cumprod`` (not a VP scheduler) or an
                unsupported prediction type.
        """
        if not hasattr(scheduler, "alphas_cumprod"):
            raise ValueError(f"`scheduler` {type(scheduler).__name__} has no `alphas_cumprod`: not a VP scheduler")
        prediction_type = scheduler.config.get("prediction_type", "epsilon")
        return cls(unet, scheduler.alphas_cumprod, _check_prediction_type(prediction_type), data_scale)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        subfolder: str | None = None,
        scheduler_subfolder: str | None = None,
        data_scale: float = 2.0,
        **kwargs,
    ) -> "VPDenoiser":
        """Load a diffusers DDPM / DDIM checkpoint (a local folder, or a Hub repo id where the Hub is reachable).

        Arguments:
            path_or_repo_id: A folder saved by ``DDPMPipeline.save_pretrained`` (``unet/`` and
                ``scheduler/``) or by ``UNet2DModel.save_pretrained`` +
                ``DDPMScheduler.save_pretrained`` into one folder; or a repo id such as
                ``"google/ddpm-cifar10-32"``.
            subfolder: The UNet's subfolder (default: ``"unet"`` if it exists, else the root).
            scheduler_subfolder: The scheduler config's subfolder (default: ``"scheduler"`` if it
                exists, else the root).
            data_scale: See :class:`VPDenoiser`.
            kwargs: Passed to ``UNet2DModel.from_pretrained`` (e.g. ``torch_dtype``).

        Returns:
            The adapter in eval mode.

        Raises:
            ValueError: for an unsupported prediction type or a scheduler config that is not VP.
            OSError: if the folder / repo holds no UNet or no scheduler config.
        """
        import diffusers
        from diffusers import DDPMScheduler, UNet2DModel

        path = str(path_or_repo_id)

        def load_first(loader, candidates):
            errors = []
            for sub in candidates:
                try:
                    return loader(sub)
                except (OSError, EnvironmentError, ValueError) as error:  # missing files / folder
                    errors.append(f"{sub or '<root>'}: {error}")
            raise OSError(f"cannot load from {path!r}: " + " | ".join(errors))

        unet_subs = [subfolder] if subfolder is not None else ["unet", None]
        sched_subs = [scheduler_subfolder] if scheduler_subfolder is not None else ["scheduler", None]
        if Path(path).is_dir():  # locally, skip the subfolders that do not exist
            unet_subs = [s for s in unet_subs if s is None or (Path(path) / s).is_dir()] or unet_subs
            sched_subs = [s for s in sched_subs if s is None or (Path(path) / s).is_dir()] or sched_subs
        unet = load_first(lambda sub: UNet2DModel.from_pretrained(path, subfolder=sub, **kwargs), unet_subs)
        config = load_first(lambda sub: DDPMScheduler.load_config(path, subfolder=sub), sched_subs)
        config = dict(config)
        if "timesteps" in config and "num_train_timesteps" not in config:  # legacy GaussianDDPMScheduler
            config["num_train_timesteps"] = config.pop("timesteps")
        _check_prediction_type(config.get("prediction_type", "epsilon"))
        scheduler_cls = getattr(diffusers, str(config.get("_class_name", "")), None)
        if scheduler_cls is None or not hasattr(scheduler_cls, "from_config"):
            scheduler_cls = DDPMScheduler
        scheduler = scheduler_cls.from_config(config)
        return cls.from_scheduler(unet, scheduler, data_scale).eval()
