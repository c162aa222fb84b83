r"""Backbones of the denoiser: diffusers U-Nets for images, an MLP for vectors.

A backbone maps a preconditioned input and a noise embedding input
``c_noise = log(sigma)`` (a float tensor of shape ``(B,)``) to the network output
``F`` of EDM's preconditioning (see :mod:`diffem.denoiser`). Every backbone is a
diffusers ``ModelMixin`` so that priors save and load with ``save_pretrained`` /
``from_pretrained`` and publish to the Hugging Face Hub.

References:
    Karras et al., "Elucidating the Design Space of Diffusion-Based Generative
    Models" (EDM), arXiv:2206.00364; Rozet et al., arXiv:2405.13712, Appendix C.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from diffusers import ConfigMixin, DiTTransformer2DModel, ModelMixin, UNet2DModel
from diffusers.configuration_utils import register_to_config
from torch import Tensor, nn

__all__ = ["MLP", "DiT", "unet_config", "build_unet", "UNET_PRESETS", "PixelUnshuffleUNet", "UNSHUFFLE_PRESETS",
           "MaskConditionedUNet",
           "build_unshuffle_unet"]


class MLP(ModelMixin, ConfigMixin):
    r"""Multi-layer perceptron with a sinusoidal noise embedding, for vector data ``(B, d)``.

    ``h = [x, emb(c_noise)]`` then ``len(hidden_features)`` blocks of
    ``Linear -> SiLU -> LayerNorm``, then a linear read-out to ``d`` features
    (the paper's manifold network: 3 hidden layers of 256, SiLU, LayerNorm).

    Arguments:
        features: The data dimension ``d``.
        hidden_features: Widths of the hidden layers.
        emb_features: Size of the sinusoidal embedding of ``c_noise`` (even).
    """

    @register_to_config
    def __init__(self, features: int = 5, hidden_features: Sequence[int] = (256, 256, 256), emb_features: int = 64):
        super().__init__()
        if emb_features % 2:
            raise ValueError(f"`emb_features` must be even, got {emb_features}")
        freqs = torch.exp(torch.linspace(0, math.log(1e3), emb_features // 2))
        self.register_buffer("freqs", freqs, persistent=False)
        layers, width = [], features + emb_features
        for h in hidden_features:
            layers += [nn.Linear(width, h), nn.SiLU(), nn.LayerNorm(h)]
            width = h
        layers.append(nn.Linear(width, features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        """``x``: ``(B, d)``; ``c_noise``: ``(B,)`` float. Returns ``(B, d)``."""
        phase = c_noise[:, None].to(x.dtype) * self.freqs.to(x.dtype)
        emb = torch.cat((phase.sin(), phase.cos()), dim=-1)
        return self.net(torch.cat((x, emb), dim=-1))


#: Named U-Net sizes. ``paper`` follows the authors' CIFAR-10 U-Net as closely as
#: ``UNet2DModel`` allows: channels (128, 256, 384), 5 residual blocks per level
#: (``layers_per_block``), attention at 16x16 with 4 heads, dropout 0.1.
#: Differences: diffusers' middle block (two resnets at 8x8) is added, its attention
#: is removed (``add_attention=False``); the up path has ``layers_per_block + 1``
#: blocks per level; the noise embedding is diffusers' sinusoidal projection of
#: ``c_noise`` followed by its 2-layer MLP.
UNET_PRESETS: dict[str, dict] = {
    "tiny": dict(block_out_channels=(16, 32), layers_per_block=1, attention_levels=(), norm_num_groups=8),
    "cpu": dict(block_out_channels=(32, 64, 128), layers_per_block=1, attention_levels=(), norm_num_groups=16),
    "cpu-attn": dict(block_out_channels=(32, 64, 128), layers_per_block=1, attention_levels=(1,), norm_num_groups=16),
    "paper": dict(block_out_channels=(128, 256, 384), layers_per_block=5, attention_levels=(1,), norm_num_groups=32,
                  dropout=0.1, heads=4),
}


def unet_config(preset: str = "cpu", sample_size: int = 32, channels: int = 3, **overrides) -> dict:
    """The ``UNet2DModel`` keyword arguments of a named preset (see :data:`UNET_PRESETS`).

    Arguments:
        preset: ``"tiny"`` (tests), ``"cpu"`` (~1M parameters, no attention), ``"cpu-attn"``,
            or ``"paper"``.
        sample_size: Image height = width.
        channels: Image channels (input = output).
        overrides: Any preset key (``block_out_channels``, ``layers_per_block``,
            ``attention_levels``, ``norm_num_groups``, ``dropout``, ``heads``).

    Raises:
        ValueError: for an unknown preset or override key.
    """
    if preset not in UNET_PRESETS:
        raise ValueError(f"`preset` must be one of {sorted(UNET_PRESETS)}, got {preset!r}")
    spec = dict(dropout=0.0, heads=4) | UNET_PRESETS[preset]
    unknown = set(overrides) - set(spec)
    if unknown:
        raise ValueError(f"unknown U-Net option(s) {sorted(unknown)}; expected some of {sorted(spec)}")
    spec |= overrides
    channels_ = tuple(spec["block_out_channels"])
    attn = set(spec["attention_levels"])
    down = tuple("AttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(len(channels_)))
    up = tuple("AttnUpBlock2D" if i in attn else "UpBlock2D" for i in reversed(range(len(channels_))))
    head_dim = channels_[min(attn)] // spec["heads"] if attn else None
    return dict(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=channels_,
        layers_per_block=spec["layers_per_block"],
        down_block_types=down,
        up_block_types=up,
        attention_head_dim=head_dim,
        add_attention=False,
        norm_num_groups=spec["norm_num_groups"],
        dropout=spec["dropout"],
        time_embedding_type="positional",
        flip_sin_to_cos=True,
        freq_shift=0,
    )


def build_unet(preset: str = "cpu", sample_size: int = 32, channels: int = 3, seed: int = 0, **overrides) -> UNet2DModel:
    """A freshly initialised ``UNet2DModel`` of a preset, initialised from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DModel(**unet_config(preset, sample_size, channels, **overrides))


class DiT(DiTTransformer2DModel):
    r"""A diffusers ``DiTTransformer2DModel`` as an unconditional backbone ``(x, c_noise) -> F``.

    The noise embedding input is ``c_noise`` (a float tensor ``(B,)``) through DiT's
    timestep embedding; the class label is fixed to 0 (a single class) and DiT's label
    dropout (diffusers' ``LabelEmbedding``, 10 % by default, drawn from the global RNG)
    is off in every transformer block, so that training draws nothing from the global RNG.
    The output has the shape of ``x``, ``(B, C, H, W)``.
    """

    @classmethod
    def from_options(
        cls,
        channels: int,
        sample_size: int,
        patch_size: int = 2,
        num_layers: int = 4,
        num_attention_heads: int = 4,
        attention_head_dim: int = 32,
        norm_num_groups: int = 1,
    ) -> "DiT":
        """A small DiT for ``(channels, sample_size, sample_size)`` images."""
        if sample_size % patch_size:
            raise ValueError(f"`patch_size` ({patch_size}) must divide the image size ({sample_size})")
        return cls(
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=channels,
            out_channels=channels,
            num_layers=num_layers,
            sample_size=sample_size,
            patch_size=patch_size,
            num_embeds_ada_norm=1,
            norm_num_groups=norm_num_groups,
        )._without_label_dropout()

    def _without_label_dropout(self) -> "DiT":
        """Turn off the label dropout of every block's class embedder (the table keeps its size)."""
        for block in self.transformer_blocks:
            embedder = getattr(getattr(block.norm1, "emb", None), "class_embedder", None)
            if embedder is not None:
                embedder.dropout_prob = 0.0
        return self

    def forward(self, x: Tensor, c_noise: Tensor, **kwargs) -> Tensor:
        labels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        self._without_label_dropout()  # also for models built by from_pretrained / from_config
        return super().forward(x, timestep=c_noise.to(x.dtype), class_labels=labels, return_dict=False)[0]


#: Named sizes of :class:`PixelUnshuffleUNet` (MRI). ``paper`` is the authors' fastMRI network
#: (francois-rozet/diffusion-priors, experiments/fastmri/train.py): 4x4 unshuffle of 320x320
#: to 80x80x16, channels (128, 256, 384, 512), 3 blocks a level, attention with 4 heads at the
#: 4th level (10x10), dropout 0.1. ``cpu`` is the CPU profile's network at 64x64 (4x4 unshuffle
#: to 16x16x16; see experiments/mri/cpu.yaml for the measured costs behind it), ``tiny`` is for tests.
UNSHUFFLE_PRESETS: dict[str, dict] = {
    "tiny": dict(factor=2, block_out_channels=(16, 32), layers_per_block=1, attention_levels=(), norm_num_groups=8),
    "cpu": dict(factor=4, block_out_channels=(32, 64, 128), layers_per_block=1, attention_levels=(),
                norm_num_groups=16),
    "paper": dict(factor=4, block_out_channels=(128, 256, 384, 512), layers_per_block=3, attention_levels=(3,),
                  norm_num_groups=32, dropout=0.1, heads=4),
}


class MaskConditionedUNet(ModelMixin, ConfigMixin):
    r"""Ambient Diffusion's network: a ``UNet2DModel`` that sees a masked image and its mask.

    The U-Net takes ``(B, 2C, H, W)``, the masked input :math:`\tilde{A} x` and the mask
    :math:`\tilde{A}` stacked on the channels, and returns ``(B, C, H, W)``. Trained by
    :class:`~diffem.denoiser.AmbientLoss` with the mask of each training sample's further
    corruption; at sampling (``mask=None``) it uses its fixed ``sampling_mask`` buffer, one mask
    of survival probability ``sampling_survival`` drawn from ``sampling_mask_seed`` and shared
    by every sample (Ambient's fixed-mask sampler, ``same_for_all_batch``), so that samples
    depend on neither the batch size nor the process count. :class:`~diffem.denoiser.Denoiser`
    reads that buffer and masks ``x_t`` before its skip connection as well, as Ambient's EDM
    preconditioning does.

    Its config holds ``sample_size`` and ``in_channels`` of the *image* (``C``), so
    :func:`diffem.pipeline.event_shape_of` gives ``(C, H, W)``.

    Arguments:
        sample_size: Image side ``H = W``.
        in_channels: Image channels ``C``.
        unet_options: The U-Net's :func:`unet_config` keys besides its channels and size
            (``preset`` and any override).
        sampling_survival: Probability that a pixel (all its channels) is kept in the sampling
            mask, in (0, 1] (Ambient: :math:`(1 - p)(1 - \delta)`).
        sampling_mask_seed: Seed of the sampling mask.

    Raises:
        ValueError: if ``sampling_survival`` is outside (0, 1], or the U-Net options are invalid.

    References:
        Daras et al., "Ambient Diffusion: Learning Clean Distributions from Corrupted Data",
        NeurIPS 2023, arXiv:2305.19256, Sections 3.2 (training) and 3.3 (fixed-mask sampling).
    """

    @register_to_config
    def __init__(self, sample_size: int = 32, in_channels: int = 3, unet_options: dict | None = None,
                 sampling_survival: float = 0.36, sampling_mask_seed: int = 0):
        super().__init__()
        if not 0 < sampling_survival <= 1:
            raise ValueError(f"`sampling_survival` must be in (0, 1], got {sampling_survival!r}")
        options = dict(unet_options or {})
        preset = options.pop("preset", "cpu")
        config = unet_config(preset, sample_size, in_channels, **options)
        self.unet = UNet2DModel(**(config | {"in_channels": 2 * in_channels}))
        g = torch.Generator().manual_seed(int(sampling_mask_seed))
        keep = (torch.rand((1, 1, sample_size, sample_size), generator=g) < sampling_survival).float()
        self.register_buffer("sampling_mask", keep.expand(1, in_channels, sample_size, sample_size).clone())

    def forward(self, x: Tensor, c_noise: Tensor, mask: Tensor | None = None) -> Tensor:
        """``x``: ``(B, C, H, W)``; ``c_noise``: ``(B,)`` float; ``mask``: ``(B, C, H, W)`` of 0 / 1
        (default: the sampling mask). Returns ``(B, C, H, W)``."""
        mask = self.sampling_mask.to(x.dtype).expand_as(x) if mask is None else mask.to(x.dtype)
        return self.unet(torch.cat([x * mask, mask], dim=1), c_noise.to(x.dtype)).sample


def build_mask_conditioned_unet(options: dict, channels: int, size: int, seed: int, sampling_survival: float,
                                sampling_mask_seed: int = 0) -> MaskConditionedUNet:
    """A freshly initialised :class:`MaskConditionedUNet` of ``network`` options (``preset`` and U-Net
    overrides), its weights from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MaskConditionedUNet(size, channels, dict(options), float(sampling_survival), int(sampling_mask_seed))


class PixelUnshuffleUNet(ModelMixin, ConfigMixin):
    r"""A diffusers ``UNet2DModel`` between a pixel unshuffle and a pixel shuffle (MRI backbone).

    ``x`` ``(B, C, H, W)`` is rearranged into ``(B, C f^2, H/f, W/f)``
    (``torch.nn.PixelUnshuffle(f)``), passed through the U-Net with the noise embedding
    input ``c_noise`` (float ``(B,)``), and rearranged back (``PixelShuffle(f)``), so the
    U-Net works at ``1/f`` of the resolution: the authors' fastMRI network (Rozet et al.
    2024, Appendix C) turns 320x320 slices into 80x80x16 with ``f = 4``.

    Its config holds ``sample_size`` (``H = W``) and ``in_channels`` (``C``) of the *image*,
    so :func:`diffem.pipeline.event_shape_of` gives ``(C, H, W)``; it saves and loads with
    ``save_pretrained`` / ``from_pretrained`` like the other backbones.

    Arguments:
        sample_size: Image side ``H = W``, a multiple of ``factor``.
        in_channels: Image channels ``C`` (1 for magnitude MRI).
        factor: Unshuffle factor ``f``.
        block_out_channels, layers_per_block, attention_levels, norm_num_groups, dropout, heads:
            The inner U-Net, as in :func:`unet_config`.

    Raises:
        ValueError: if ``factor`` < 1 or does not divide ``sample_size``, or the U-Net options
            are inconsistent (from :func:`unet_config` / diffusers).
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int = 64,
        in_channels: int = 1,
        factor: int = 2,
        block_out_channels: Sequence[int] = (32, 64, 128),
        layers_per_block: int = 1,
        attention_levels: Sequence[int] = (),
        norm_num_groups: int = 16,
        dropout: float = 0.0,
        heads: int = 4,
    ):
        super().__init__()
        if int(factor) != factor or factor < 1:
            raise ValueError(f"`factor` must be an integer >= 1, got {factor!r}")
        if sample_size % factor:
            raise ValueError(f"`factor` ({factor}) must divide `sample_size` ({sample_size})")
        inner = dict(block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                     attention_levels=tuple(attention_levels), norm_num_groups=norm_num_groups, dropout=dropout,
                     heads=heads)
        # Every preset key is overridden, so the base preset's values are not used.
        self.unet = UNet2DModel(**unet_config("tiny", sample_size // factor, in_channels * factor**2, **inner))
        self.unshuffle = nn.PixelUnshuffle(factor)
        self.shuffle = nn.PixelShuffle(factor)

    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        """``x``: ``(B, C, H, W)``; ``c_noise``: ``(B,)`` float. Returns ``(B, C, H, W)``."""
        out = self.unet(self.unshuffle(x), c_noise.to(x.dtype)).sample
        return self.shuffle(out)


def build_unshuffle_unet(preset: str = "cpu", sample_size: int = 64, channels: int = 1, seed: int = 0,
                         **overrides) -> PixelUnshuffleUNet:
    """A freshly initialised :class:`PixelUnshuffleUNet` of a preset (:data:`UNSHUFFLE_PRESETS`), from ``seed``.

    Raises:
        ValueError: for an unknown preset or override key.
    """
    if preset not in UNSHUFFLE_PRESETS:
        raise ValueError(f"`preset` must be one of {sorted(UNSHUFFLE_PRESETS)}, got {preset!r}")
    spec = dict(dropout=0.0, heads=4) | UNSHUFFLE_PRESETS[preset]
    unknown = set(overrides) - set(spec)
    if unknown:
        raise ValueError(f"unknown network option(s) {sorted(unknown)}; expected some of {sorted(spec)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return PixelUnshuffleUNet(sample_size=sample_size, in_channels=channels, **(spec | overrides))
