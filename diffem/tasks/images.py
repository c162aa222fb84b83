"""Image experiments (MNIST, CIFAR-10): shared observation handling, backbones and metrics.

An :class:`ImageTask` builds its observation set once from clean images (which stay
inside the task), trains a U-Net or a transformer through :class:`~diffem.denoiser.Denoiser`,
and evaluates a prior by

- FID and KID of ``eval.samples`` unconditional samples against ``data.fid_reference``
  clean images (torch-fidelity, offline Inception weights: :mod:`diffem.metrics`), with
  the Inception network on the pipeline's device;
- the same FID and KID of as many held-out real images (:meth:`ImageTask.real_images`,
  when the task has them): the metrics' floor at this sample count, computed once per
  run and kept in ``<run>/eval/real_images.json``;
- PSNR of the posterior mean (average of ``data.posterior_samples`` MMPS samples) of the
  first ``data.posterior_observations`` observations against their clean images.

Inside :func:`diffem.distributed.sharded_over` the Inception features are computed in shards,
one per process, on each process's device, and gathered in image order, so the metrics do
not depend on the process count.

Clean images are read only here, for building observations and for evaluation.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError
from ..operators import LinearOperator
from ..distributed import sharded_gather, sharding_accelerator
from ..observations import ObservationSet
from . import Task, draw_prior_samples, load_or_build

__all__ = ["ImageTask", "build_backbone", "random_flip_shift", "sharded_inception_features"]

#: File of the real-images row inside the run folder (computed once per run).
REAL_IMAGES_FILE = Path("eval") / "real_images.json"


def sharded_inception_features(images: Tensor, device, logits: bool = False) -> dict[str, Tensor]:
    """Inception features of ``images`` ``(N, C, H, W)`` (in [-2, 2] or uint8), split over the processes.

    Inside :func:`diffem.distributed.sharded_over`, process ``r`` of ``P`` computes the features
    of images ``[r m, (r + 1) m)`` (``m = ceil(N / P)``; the last shard is padded with its
    last image, dropped afterwards) on ``device``; the gathered ``(N, 2048)`` features (and
    ``(N, 1008)`` logits if asked) are on the CPU of every process, in image order.
    Outside that context: one pass over all images on ``device``.
    """
    from ..metrics import inception_features

    acc = sharding_accelerator()
    processes, rank = (acc.num_processes, acc.process_index) if acc is not None else (1, 0)
    n = len(images)
    if processes == 1:
        return inception_features(images, batch_size=100, device=device, logits=logits)
    per = math.ceil(n / processes)
    index = torch.arange(rank * per, (rank + 1) * per).clamp(max=n - 1)
    shard = inception_features(images[index], batch_size=100, device=device, logits=logits)
    return {k: sharded_gather(acc, v)[:n] for k, v in shard.items()}


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


def random_flip_shift(x: Tensor, generator: torch.Generator, shift: int = 1, pad_value: float | None = None) -> Tensor:
    """Random horizontal flips (p = 1/2) and random shifts of up to ``shift`` pixels.

    Arguments:
        x: Images ``(B, C, H, W)``.
        generator: The only source of randomness (a CPU ``torch.Generator``); draws ``B``
            uniforms for the flips, then ``2 B`` integers for the shifts.
        shift: Maximum shift in pixels along each axis (``< H, W``).
        pad_value: What a shift brings in: ``None`` reflects the image (CIFAR-10), a number
            pads with it (MRI: the background value -2).

    Returns:
        ``(B, C, H, W)``: image ``b`` flipped if drawn, then ``out[b, :, i, j] =
        x_pad[b, :, i + shift + dy_b, j + shift + dx_b]`` with ``dy, dx`` uniform in
        ``{-shift, ..., shift}``.
    """
    if x.dim() != 4:
        raise ValueError(f"`x` must have shape (B, C, H, W), got {tuple(x.shape)}")
    b, c, h, w = x.shape
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    offsets = torch.randint(-shift, shift + 1, (b, 2), generator=generator).to(x.device)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if shift == 0:
        return x
    pad = (shift, shift, shift, shift)
    padded = F.pad(x, pad, mode="reflect") if pad_value is None else F.pad(x, pad, value=float(pad_value))
    rows = offsets[:, 0, None] + shift + torch.arange(h, device=x.device)  # (B, H)
    cols = offsets[:, 1, None] + shift + torch.arange(w, device=x.device)  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


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
    eval_data_keys = ("fid_reference", "posterior_observations", "posterior_samples")

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

    def ambient_backbone(self, seed: int, sampling_survival: float) -> nn.Module:
        """The U-Net of ``network`` (``kind: unet`` only) as a :class:`~diffem.networks.MaskConditionedUNet`."""
        from ..networks import build_mask_conditioned_unet

        options = {k: v for k, v in self._backbone_options().items() if v is not None}
        if options.pop("kind", "unet") != "unet":
            raise ConfigError("config key `network.kind`: `train_on: ambient` needs a U-Net ('unet')")
        return build_mask_conditioned_unet(options, self.channels, self.size, seed, sampling_survival)

    def _backbone_options(self) -> dict:
        return dict(self.net)

    def clean_signals(self) -> Tensor:
        """The clean images behind the observations (the first ``data.observations`` train images), ``(N, C, H, W)``."""
        return self.clean_images("train")[: int(self.data["observations"])]

    def real_images(self, n: int) -> Tensor | None:
        """Up to ``n`` held-out real images ``(n', C, H, W)`` in [-2, 2] (never observed, not in the
        FID reference), for the real-images row; ``None`` if the task has none (the default)."""
        return None

    #: Name of the held-out real image set in the records (``real_images_set``).
    real_images_key = "held-out"

    def image_set_metrics(self, samples: Tensor, device) -> dict:
        """FID and KID of ``samples`` ``(N, C, H, W)`` against the reference set, plus the real-images row.

        Returns:
            ``fid``, ``isc`` (``None`` with the offline weights), ``kid``, ``kid_std``,
            ``kid_subset_size``, ``kid_subsets``, ``fid_samples`` (N), ``fid_reference`` (M);
            and, if :meth:`real_images` gives at least 2 images, ``real_fid``, ``real_kid``,
            ``real_kid_std``, ``real_kid_subset_size``, ``real_images`` (their count) and
            ``real_images_set``.
        """
        from ..metrics import (fid_from_features, has_inception_logits, isc_from_logits, kid_from_features,
                               reference_statistics, resolve_inception_weights)

        reference = self.clean_images("reference")[: int(self.data["fid_reference"])]
        ref_key = f"{self.fid_key}-{len(reference)}"
        ref = reference_statistics(reference, cache_key=ref_key, batch_size=100, device=device)
        logits = has_inception_logits(resolve_inception_weights())
        features = sharded_inception_features(samples, device, logits=logits)
        out = {"fid": fid_from_features(features["2048"], ref),
               "isc": isc_from_logits(features["logits_unbiased"])[0] if logits else None}
        out |= kid_from_features(features["2048"], ref["features"])
        out |= {"fid_samples": len(samples), "fid_reference": len(reference)}
        return out | self._real_images_row(len(samples), ref_key, ref, device)

    def _real_images_row(self, n: int, ref_key: str, ref: dict, device) -> dict:
        """FID / KID of ``n`` held-out real images: computed once, then read from the run folder."""
        from ..metrics import fid_from_features, kid_from_features

        path = Path(self.config.run_dir) / REAL_IMAGES_FILE
        key = {"requested": n, "reference": ref_key, "reference_fingerprint": ref["fingerprint"],
               "real_images_set": self.real_images_key}
        if path.is_file():
            cached = json.loads(path.read_text())
            if cached.get("key") == key:
                return cached["metrics"]
        real = self.real_images(n)
        if real is None or len(real) < 2:
            return {}
        features = sharded_inception_features(real, device)["2048"]
        kid = kid_from_features(features, ref["features"])
        metrics = {"real_fid": fid_from_features(features, ref), "real_kid": kid["kid"], "real_kid_std": kid["kid_std"],
                   "real_kid_subset_size": kid["kid_subset_size"], "real_images": len(real),
                   "real_images_set": self.real_images_key}
        acc = sharding_accelerator()
        if acc is None or acc.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"key": key, "metrics": metrics}, indent=1) + "\n")
            os.replace(tmp, path)
        return metrics

    def evaluate(self, pipeline, lap: int, generator_seed: int, progress: bool = True) -> dict:
        from ..metrics import psnr
        from ..pipeline import denoiser_of
        from ..random import make_generators
        from ..spec import SamplerSpec

        cfg, d = self.config.eval, self.data
        out: dict = {}
        samples = draw_prior_samples(pipeline, cfg.samples, cfg, generator_seed, progress)
        if cfg.samples > 1 and int(d["fid_reference"]) > 1:
            out |= self.image_set_metrics(samples, pipeline.device)
        k, m = int(d["posterior_samples"]), int(d["posterior_observations"])
        posterior = None
        if k > 0 and m > 0:
            obs = self.observations(self.config.run_dir)[:m]
            clean = self.clean_images("train")[:m]
            est = self.config.estep
            reps = torch.arange(m).repeat_interleave(k)
            # Tweedie MMPS with the E-step's sampler, steps and CG, whatever estep.covariance / guidance say
            # (README: known differences), so that the rows of an ablation are scored alike.
            spec = SamplerSpec(method=est.method, steps=est.steps, maxiter=est.maxiter,
                               solver=est.solver if est.guidance == "mmps" else "cg")
            posterior = spec.sample(
                denoiser_of(pipeline.unet), obs.y[reps].to(pipeline.device), obs.operator[reps].to(pipeline.device),
                obs.event_shape, make_generators(generator_seed, 1, indices=range(m * k)), noise_std=obs.noise_std,
                batch_size=est.batch_size,
            ).cpu().reshape(m, k, *obs.event_shape)
            out["psnr_posterior_mean"] = float(psnr(posterior.mean(1).clamp(-2, 2), clean).mean())
            out["psnr_posterior_sample"] = float(psnr(posterior[:, 0].clamp(-2, 2), clean).mean())
            out["psnr_observation"] = float(psnr(obs.operator.T(obs.y).clamp(-2, 2), clean).mean())
            out["posterior_observations"], out["posterior_samples"] = m, k
        self.artifacts = {"prior": samples[:32], "posterior": None if posterior is None else posterior[:16, 0]}
        return out
