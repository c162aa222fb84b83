"""The MNIST example: a diffusion prior learned from noisy digits only, y = x + sigma_y e.

Observations of the first ``data.observations`` digits of the MNIST split ``data.split``
(offline: the 10,000-image test set), ``Identity`` operator plus optional random pixel
mask (``data.mask_prob``); the FID reference is the last ``data.fid_reference`` digits of
the same split, which are never observed.
"""

from __future__ import annotations

from torch import Tensor

from ..config import ConfigError
from ..operators import Identity, LinearOperator, Mask
from .images import ImageTask

__all__ = ["MnistTask"]


class MnistTask(ImageTask):
    name = "mnist"
    channels, size = 1, 28
    fid_key = "mnist-test"
    data_defaults = ImageTask.common_data | dict(
        split="test", observations=8192, noise_std=1.0, mask_prob=None, fid_reference=1000, seed=0
    )
    network_defaults = dict(kind="dit", preset="cpu", patch_size=4, num_layers=4, num_attention_heads=4,
                            attention_head_dim=32)

    @classmethod
    def card_facts(cls, data: dict, observations, fmt) -> dict:
        """The model card's description of MNIST observations (:meth:`Task.card_facts <diffem.tasks.Task.card_facts>`)."""
        mp, sigma = data.get("mask_prob"), data.get("noise_std")
        masked = "" if mp is None else f", a random pixel mask deleting each pixel with probability {fmt(mp)},"
        return dict(
            datasets=["ylecun/mnist"], pipeline_tag="unconditional-image-generation",
            task_type="unconditional-image-generation", dataset_type="ylecun/mnist", dataset_name="MNIST",
            dataset_split=str(data.get("split", "test")), kind="image", event="(1, 28, 28) images in [-2, 2]",
            corruption=(f"{observations} MNIST digits of the `{data.get('split', 'test')}` split, each observed as "
                        f"y = x + sigma_y e{masked} with noise std sigma_y = {fmt(sigma)} (data in [-2, 2])"),
            operator="`diffem.Identity`" + ("" if mp is None else " / `diffem.Mask`"),
            posterior=("from diffem import Identity\n"
                       "g = torch.Generator().manual_seed(0)\n"
                       "A = Identity()\n"
                       f"y = A(x[:4] + {fmt(sigma)} * torch.randn(4, 1, 28, 28, generator=g))  # stand-ins for real y"),
        )

    def check(self):
        super().check()
        p = self.data["mask_prob"]
        if p is not None and not 0 < float(p) < 1:
            raise ConfigError("config key `data.mask_prob` must be in (0, 1) or null")
        if self.net.get("kind") == "unet":  # the U-Net comparison backbone takes only U-Net options
            self.net = {k: v for k, v in self.net.items() if k in ("kind", "preset")}
        else:
            self.net = {k: v for k, v in self.net.items() if k != "preset"}

    def _all(self) -> Tensor:
        if getattr(self, "_images", None) is None:
            from ..data.mnist import images_to_tensor, load_mnist

            self._images = images_to_tensor(load_mnist(self.data["split"], source=self.data["source"]))
        return self._images

    def clean_images(self, split: str) -> Tensor:
        x = self._all()
        if split == "train":
            return x
        n = int(self.data["fid_reference"])
        if n + int(self.data["observations"]) > len(x):
            raise ConfigError(
                f"config keys `data.observations` + `data.fid_reference` exceed the {len(x)} images of the split"
            )
        return x[len(x) - n :]

    def observe(self, x: Tensor):
        from ..data.mnist import make_noisy_observations

        return make_noisy_observations(x, float(self.data["noise_std"]), int(self.data["seed"]), self.data["mask_prob"])

    def operator(self, dataset) -> LinearOperator:
        if self.data["mask_prob"] is None:
            return Identity()
        return Mask(dataset["mask"][:] > 0.5, channels=1)
