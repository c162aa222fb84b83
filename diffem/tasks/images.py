"""Image experiments (MNIST, CIFAR-10): shared observation handling, backbones and metrics.

An :class:`ImageTask` builds its observation set once from clean images (which stay
inside the task), trains a U-Net or a transformer through :class:`~diffem.denoiser.Denoiser`,
and evaluates a prior by

- FID of ``eval.samples`` unconditional samples against ``data.fid_reference`` clean
  images (torch-fidelity, offline Inception weights: :mod:`diffem.metrics`);
- PSNR of the posterior mean (average of ``data.posterior_samples`` MMPS samples) of the
  first ``data.posterior_observations`` observations against their clean images.

Clean images are read only here, for building observations and for evaluation.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ..config import ConfigError
from ..operators import LinearOperator
from . import ObservationSet, Task, draw_prior_samples, load_or_build

__all__ = ["ImageTask", "build_backbone"]


def build_backbone(options: dict, channels: int, size: int, seed: int) -> nn.Module:
    """A fresh backbone from ``network`` options: ``kind`` (unet | dit), ``preset`` and overrides."""
    from ..networks import DiT, build_unet

    kind = options.get("kind", "unet")
    extra = {k: v for k, v in options.items() if k not in ("kind", "preset")}
    if kind == "unet":
        return build_unet(options.get("preset", "cpu"), sample_size=size, channels=channels, seed=seed, **extra)
    if kind == "dit":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return DiT.from_options(channels=channels, sample_size=size, **extra)
    raise ConfigError(f"config key `network.kind` must be 'unet' or 'dit', got {kind!r}")


class ImageTask(Task):
    """Base class of image experiments; subclasses define the data and the operator."""

    channels = 3
    size = 32
    common_data = dict(
        source=None,  # local path (archive / folder) or None for the default
        observations=50000,
        noise_std=1e-3,
        fid_reference=10000,  # clean images of the FID reference set
        posterior_observations=64,  # observations whose posterior-mean PSNR is reported
        posterior_samples=4,
    )

    def check(self):
        d = self.data
        if float(d["noise_std"]) <= 0:
            raise ConfigError("config key `data.noise_std` must be > 0")
        for key in ("observations", "fid_reference", "posterior_observations", "posterior_samples"):
            if int(d[key]) < 0:
                raise ConfigError(f"config key `data.{key}` must be >= 0")
        if d["source"] is not None and not Path(d["source"]).exists():
            raise ConfigError(f"config key `data.source`: path `{d['source']}` does not exist")
        if self.net.get("kind", "unet") not in ("unet", "dit"):
            raise ConfigError(f"config key `network.kind` must be 'unet' or 'dit', got {self.net.get('kind')!r}")

    # -- to define -----------------------------------------------------------------------------
    def clean_images(self, split: str) -> Tensor:  # pragma: no cover - abstract
        """Clean images ``(N, C, H, W)`` in [-2, 2] of a split ("train" or "reference")."""
        raise NotImplementedError

    def observe(self, x: Tensor):  # pragma: no cover - abstract
        """A ``datasets.Dataset`` of observations of ``x`` (no clean images in it)."""
        raise NotImplementedError

    def operator(self, dataset) -> LinearOperator:  # pragma: no cover - abstract
        raise NotImplementedError

    fid_key = "images"

    # -- shared ----------------------------------------------------------------------------------
    def observations(self, cache_dir: Path) -> ObservationSet:
        n = int(self.data["observations"])

        def build():
            x = self.clean_images("train")
            if n > len(x):
                raise ConfigError(f"config key `data.observations`: {n} requested, only {len(x)} images")
            return self.observe(x[:n])

        ds = load_or_build(Path(cache_dir) / "observations", build).with_format("torch")
        event = (self.channels, self.size, self.size)
        return ObservationSet(ds["y"][:], self.operator(ds), float(self.data["noise_std"]), event)

    def backbone(self, seed: int) -> nn.Module:
        return build_backbone(dict(self.net), self.channels, self.size, seed)

    def evaluate(self, pipeline, lap: int, generator_seed: int, progress: bool = True) -> dict:
        from ..metrics import fid, psnr
        from ..pipeline import denoiser_of
        from ..random import make_generators
        from ..sampling import sample_posterior

        cfg, d = self.config.eval, self.data
        out: dict = {}
        samples = draw_prior_samples(pipeline, cfg.samples, cfg, generator_seed, progress)
        if cfg.samples > 0 and int(d["fid_reference"]) > 0:
            reference = self.clean_images("reference")[: int(d["fid_reference"])]
            result = fid(samples, reference, cache_key=f"{self.fid_key}-{len(reference)}", batch_size=100)
            out |= {"fid": result["fid"], "isc": result["isc"], "fid_samples": result["num_samples"],
                    "fid_reference": result["num_reference"]}
        k, m = int(d["posterior_samples"]), int(d["posterior_observations"])
        posterior = None
        if k > 0 and m > 0:
            obs = self.observations(self.config.run_dir)[:m]
            clean = self.clean_images("train")[:m]
            est = self.config.estep
            reps = torch.arange(m).repeat_interleave(k)
            posterior = sample_posterior(
                denoiser_of(pipeline.unet), obs.y[reps].to(pipeline.device), obs.operator[reps].to(pipeline.device),
                obs.noise_std, obs.event_shape, steps=est.steps, maxiter=est.maxiter, method=est.method,
                generator=make_generators(generator_seed, 1, indices=range(m * k)), batch_size=est.batch_size,
            ).cpu().reshape(m, k, *obs.event_shape)
            out["psnr_posterior_mean"] = float(psnr(posterior.mean(1).clamp(-2, 2), clean).mean())
            out["psnr_posterior_sample"] = float(psnr(posterior[:, 0].clamp(-2, 2), clean).mean())
            out["psnr_observation"] = float(psnr(obs.operator.T(obs.y).clamp(-2, 2), clean).mean())
            out["posterior_observations"], out["posterior_samples"] = m, k
        self.artifacts = {"prior": samples[:32], "posterior": None if posterior is None else posterior[:16, 0]}
        return out
