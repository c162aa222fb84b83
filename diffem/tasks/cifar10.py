r"""The CIFAR-10 experiment: a diffusion prior learned from masked, noisy images only.

Observations (Rozet et al. 2024, Section 5.2)

.. math:: y_i = m_i \odot (x_i + \sigma_y e_i), \qquad \sigma_y = 10^{-3},

where the mask :math:`m_i` (shared over RGB) deletes each pixel with probability
``data.drop_prob`` (the paper: 0.25, 0.5, 0.75); the forward operator is
:class:`~diffem.operators.Mask`. Pixels enter [-2, 2] only in :mod:`diffem.data.cifar10`.

Which images
    The offline loader sorts the train split by class, so "the first N images" would all
    be airplanes. The task therefore orders the 50,000 train images by one fixed
    permutation (``numpy.random.default_rng(0)``, independent of ``data.seed``) and
    observes the first ``data.observations`` of that order; mask and noise of the image
    at position ``i`` come from ``(data.seed, i)`` (:func:`diffem.data.cifar10.corrupt`).
    The FID reference is the first ``data.fid_reference`` clean train images in the same
    order (the paper compares against the train set). With the offline archive these are
    JPEG re-encodings: the reference set is named ``cifar10-train-jpeg`` in every metric
    line (``fid_reference_set``) and table.
    The real-images row (the FID / KID floor at the evaluation's sample count) uses the
    first ``eval.samples`` images of the *test* split in a fixed shuffled order (the same
    ``ORDER_SEED`` permutation scheme; at most its 10,000 images), named e.g.
    ``cifar10-test-jpeg``: real images that are neither observed nor in the reference set.

M-step augmentation (``mstep.augment: true``)
    :func:`random_flip_shift`: each posterior sample is flipped horizontally with
    probability 1/2 and shifted by ``(dy, dx)`` drawn uniformly from ``{-1, 0, 1}^2``,
    with *reflect* padding (the row / column that enters is the mirror image of the one
    next to the border, so no constant stripes appear). Every draw comes from the given
    ``torch.Generator``. (The authors' last public CIFAR script draws flips plus small hue
    and saturation jitter; the paper and this project's brief use flips and 1-pixel shifts.)

References:
    Rozet et al., "Learning Diffusion Priors from Observations by Expectation
    Maximization", NeurIPS 2024, arXiv:2405.13712, Section 5.2 and Appendix C.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor, nn

from ..config import ConfigError
from ..operators import LinearOperator, Mask
from .images import ImageTask, build_backbone, random_flip_shift

__all__ = ["Cifar10Task", "random_flip_shift", "ORDER_SEED"]

#: Seed of the fixed permutation of the train split (see the module docstring).
ORDER_SEED = 0
_HUB_NAMES = ("hub", "online", "uoft-cs/cifar10")  # sources that mean the Hugging Face Hub (diffem.data.cifar10)
_UNET_KEYS = ("block_out_channels", "layers_per_block", "attention_levels", "norm_num_groups", "dropout", "heads")


class Cifar10Task(ImageTask):
    """CIFAR-10 with random pixel masks; see the module docstring.

    ``data`` options: ``drop_prob`` (in (0, 1)), ``noise_std``, ``observations``,
    ``fid_reference``, ``posterior_observations``, ``posterior_samples``, ``source``
    (archive, folder, ``"hub"``, or null for ``$DIFFEM_CIFAR10`` / the offline archive /
    the Hub), ``seed`` (corruption). ``network`` options: ``kind: unet``, ``preset``
    (:data:`diffem.networks.UNET_PRESETS`) and any preset override.
    """

    name = "cifar10"
    channels, size = 3, 32
    data_defaults = ImageTask.common_data | dict(
        drop_prob=0.5, noise_std=1e-3, observations=50000, fid_reference=10000, seed=0
    )
    network_defaults = dict(kind="unet", preset="cpu") | {k: None for k in _UNET_KEYS}

    @classmethod
    def card_facts(cls, data: dict, observations, fmt) -> dict:
        """The model card's description of CIFAR-10 observations (:meth:`Task.card_facts <diffem.tasks.Task.card_facts>`)."""
        p, sigma = data.get("drop_prob"), data.get("noise_std")
        return dict(
            datasets=["uoft-cs/cifar10"], pipeline_tag="unconditional-image-generation",
            task_type="unconditional-image-generation", dataset_type="uoft-cs/cifar10",
            dataset_name="CIFAR-10", dataset_split="train", kind="image", event="(3, 32, 32) images in [-2, 2]",
            corruption=(f"{observations} CIFAR-10 train images, each observed as y = m * (x + sigma_y e) with a "
                        f"random pixel mask m deleting each pixel (all three channels) with probability {fmt(p)}, "
                        f"and noise std sigma_y = {fmt(sigma)} (data in [-2, 2])"),
            operator="`diffem.Mask` (per-image pixel mask, shared over RGB)",
            posterior=("from diffem import Mask\n"
                       "g = torch.Generator().manual_seed(0)\n"
                       f"mask = torch.rand(4, 1, 32, 32, generator=g) > {fmt(p)}  # True = observed pixel\n"
                       "A = Mask(mask, channels=3)\n"
                       f"y = A(x[:4] + {fmt(sigma)} * torch.randn(4, 3, 32, 32, generator=g))  # stand-ins for real y"),
        )

    def check(self):
        source = self.data["source"]
        if source is not None and str(source) in _HUB_NAMES:  # the Hub is not a path: let the base class check everything else
            self.data = self.data | {"source": None}
        super().check()
        self.data["source"] = source
        p = self.data["drop_prob"]
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < float(p) < 1:
            raise ConfigError(f"config key `data.drop_prob` must be in the open interval (0, 1), got {p!r}")
        if int(self.data["seed"]) < 0:
            raise ConfigError("config key `data.seed` must be >= 0")
        if int(self.data["posterior_observations"]) > int(self.data["observations"]):
            raise ConfigError("config key `data.posterior_observations` must be <= `data.observations`")
        env = os.environ.get("DIFFEM_CIFAR10")
        if source is None and env and env not in _HUB_NAMES and not os.path.exists(env):
            raise ConfigError(f"config key `data.source` is null and DIFFEM_CIFAR10 names a missing path `{env}`")
        if self.net.get("kind") != "unet":
            raise ConfigError(f"config key `network.kind` must be 'unet' for cifar10, got {self.net.get('kind')!r}")
        from ..networks import UNET_PRESETS, unet_config

        if self.net["preset"] not in UNET_PRESETS:
            raise ConfigError(f"config key `network.preset` must be one of {sorted(UNET_PRESETS)}, got {self.net['preset']!r}")
        try:
            unet_config(self.net["preset"], self.size, self.channels, **self._unet_overrides())
        except (TypeError, ValueError) as error:
            raise ConfigError(f"config key `network`: {error}") from None

    def _unet_overrides(self) -> dict:
        return {k: self.net[k] for k in _UNET_KEYS if self.net.get(k) is not None}

    # -- data ------------------------------------------------------------------------------------
    @property
    def fid_key(self) -> str:
        """Name of the FID reference set (and of its cached statistics)."""
        source = self.data["source"] or os.environ.get("DIFFEM_CIFAR10")
        from ..data.cifar10 import DEFAULT_CIFAR10_ARCHIVE

        if source is None:
            source = DEFAULT_CIFAR10_ARCHIVE if DEFAULT_CIFAR10_ARCHIVE.is_file() else "hub"
        if str(source) in _HUB_NAMES:
            return "cifar10-train"
        if str(source).endswith(("-jpg.tar.gz", "-jpg.tgz", "jpg.tar.gz")):
            return "cifar10-train-jpeg"
        return "cifar10-train-local"

    @property
    def real_images_key(self) -> str:
        """Name of the held-out real image set: the test split of the FID reference's source."""
        return self.fid_key.replace("-train", "-test")

    def real_images(self, n: int) -> Tensor:
        """The first ``n`` test images (at most 10,000) in a fixed shuffled order, ``(n, 3, 32, 32)`` in [-2, 2]."""
        from ..data.cifar10 import images_to_tensor, load_cifar10

        test = load_cifar10("test", source=self.data["source"])
        order = np.random.default_rng(ORDER_SEED).permutation(len(test))[: min(int(n), len(test))]
        return images_to_tensor(test.select(order.tolist()))

    def _train_split(self):
        if getattr(self, "_dataset", None) is None:
            from ..data.cifar10 import load_cifar10

            self._dataset = load_cifar10("train", source=self.data["source"])
            self._order = np.random.default_rng(ORDER_SEED).permutation(len(self._dataset))
        return self._dataset

    def clean_images(self, split: str) -> Tensor:
        """The first ``observations`` (``"train"``) or ``fid_reference`` (``"reference"``) train images, shuffled order."""
        from ..data.cifar10 import images_to_tensor

        if split not in ("train", "reference"):
            raise ValueError(f"`split` must be 'train' or 'reference', got {split!r}")
        ds = self._train_split()
        key = "observations" if split == "train" else "fid_reference"
        n = int(self.data[key])
        if n > len(ds):
            raise ConfigError(f"config key `data.{key}`: {n} requested, the train split has {len(ds)} images")
        cache = getattr(self, "_decoded", None)
        if cache is None or len(cache) < n:
            cache = self._decoded = images_to_tensor(ds.select(self._order[:n].tolist()))
        return cache[:n]

    def observe(self, x: Tensor):
        from ..data.cifar10 import make_observations

        return make_observations(x, float(self.data["drop_prob"]), float(self.data["noise_std"]), int(self.data["seed"]))

    def operator(self, dataset) -> LinearOperator:
        return Mask(dataset["mask"][:].bool(), channels=self.channels)

    # -- model -----------------------------------------------------------------------------------
    def backbone(self, seed: int) -> nn.Module:
        return build_backbone(dict(kind="unet", preset=self.net["preset"]) | self._unet_overrides(),
                              self.channels, self.size, seed)

    def _backbone_options(self) -> dict:
        return dict(kind="unet", preset=self.net["preset"]) | self._unet_overrides()

    def augment(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Flips and 1-pixel shifts (:func:`random_flip_shift`) when ``mstep.augment`` is on."""
        if not self.config.mstep.augment:
            return x
        return random_flip_shift(x, generator)

    def evaluate(self, pipeline, lap: int, generator_seed: int, progress: bool = True) -> dict:
        """The image task's metrics (FID, KID, real-images row, posterior PSNR), the reference set's
        name and the level; the per-lap artifacts also hold, for the report's figure, the clean
        images and the observations (deleted pixels at -2, black) whose posterior samples they show."""
        out = super().evaluate(pipeline, lap, generator_seed, progress)
        if "fid" in out:
            out["fid_reference_set"] = self.fid_key
        out["drop_prob"] = float(self.data["drop_prob"])
        posterior = self.artifacts.get("posterior")
        if posterior is not None:
            n = len(posterior)
            obs = self.observations(self.config.run_dir)[:n]
            mask = obs.operator.mask.expand_as(obs.y)
            self.artifacts["observed"] = torch.where(mask, obs.y, torch.full_like(obs.y, -2.0))
            self.artifacts["clean"] = self.clean_images("train")[:n]
        return out
