r"""Your own observations as an experiment: ``diffem train custom --data PATH_OR_ID``.

The observations are an observation dataset (:mod:`diffem.data.custom`: ``y``, the operator's
parameters, ``noise_std`` and the metadata ``operator`` / ``event_shape`` / ``data_range``),
mapped to diffem's ``[-2, 2]``. The last ``data.holdout`` fraction of them (in the dataset's
order) is held out: EM never trains on it, and the evaluation scores the prior on it.

The network follows the event shape (``network.kind: auto``): vectors get the MLP, images of
side <= 64 the diffusers U-Net (``network.preset``, as the CIFAR-10 experiment), larger images
the pixel-unshuffle U-Net (as the MRI experiment). ``mstep.augment`` adds flips and 1-pixel
shifts for images (only if the data are flip-invariant: off by default).

Evaluation without ground truth (:meth:`CustomTask.evaluate`, every evaluated lap): for the
first ``data.eval_observations`` training observations and as many held-out ones,
``data.posterior_samples`` posterior samples each with the E-step's sampler (Tweedie MMPS, the
E-step's steps and CG), and

- ``data_consistency_train`` / ``data_consistency_heldout``: the mean of
  :math:`\lVert A \hat x - y \rVert / \lVert y \rVert` over the samples, beside its noise floor
  ``noise_floor`` (:math:`\sigma_y \sqrt{m} / \lVert y \rVert`, ``m`` the observed entries: what a
  sample consistent with the data up to the noise reaches); the held-out one is the held-out observation likelihood
  proxy (observations the prior never trained on);
- ``posterior_spread``: the mean over observations and coordinates of the posterior standard
  deviation, data units;
- the E-step's discarded and outlier counts are in the lap's record already;
- artifacts for the report figure: prior samples, and posterior samples beside their
  observations (:math:`A^+ y`).

With a clean validation dataset (``data.validation`` / ``--validation``: the schema plus a column
``x``, :mod:`diffem.data.custom`), also ``psnr_posterior_mean``, ``ssim_posterior_mean``,
``psnr_posterior_sample`` and ``psnr_observation`` on its first ``data.eval_observations``
observations (images), or ``sinkhorn_validation``, the manifold experiment's Sinkhorn divergence
of the prior samples against its ``x`` (vectors). EM never sees it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from ..config import ConfigError
from ..observations import ObservationSet
from . import Task, draw_prior_samples

__all__ = ["CustomTask"]


class CustomTask(Task):
    name = "custom"
    data_defaults = dict(path=None, observations=None, holdout=0.1, eval_observations=16, posterior_samples=4,
                         validation=None)
    network_defaults = dict(kind="auto", preset="cpu", hidden=(256, 256, 256), emb_features=64, factor=2)
    eval_data_keys = ("eval_observations", "posterior_samples", "validation")

    def check(self):
        d = self.data
        if not d["path"]:
            raise ConfigError("config key `data.path`: give the observation dataset (`diffem train custom --data PATH`)")
        if not 0 <= float(d["holdout"]) < 1:
            raise ConfigError(f"config key `data.holdout` must be in [0, 1), got {d['holdout']!r}")
        for key in ("eval_observations", "posterior_samples"):
            if int(d[key]) < 0:
                raise ConfigError(f"config key `data.{key}` must be >= 0")
        if self.net["kind"] not in ("auto", "mlp", "unet", "unshuffle"):
            raise ConfigError(f"config key `network.kind` must be auto, mlp, unet or unshuffle, got {self.net['kind']!r}")
        data = self._dataset()  # every schema check, before any work
        n = len(data) if d["observations"] is None else int(d["observations"])
        if not 2 <= n <= len(data):
            raise ConfigError(f"config key `data.observations`: {n} requested, the dataset has {len(data)}")
        if n - self._holdout_count(n) < 2:
            raise ConfigError(f"config key `data.holdout`: {d['holdout']} of {n} observations leaves fewer than 2 to train on")
        if d["validation"]:
            val = self._validation_dataset()
            for name in ("operator", "event_shape", "data_range"):
                if getattr(val, name) != getattr(data, name):
                    raise ConfigError(f"config key `data.validation`: its metadata `{name}` ({getattr(val, name)}) differs "
                                      f"from the observation dataset's ({getattr(data, name)})")

    # -- data ------------------------------------------------------------------------------------
    def _dataset(self):
        if getattr(self, "_data", None) is None:
            from ..data.custom import load_observation_dataset

            self._data = load_observation_dataset(self.data["path"])
        return self._data

    def _validation_dataset(self):
        """The optional clean validation dataset (``data.validation``: the schema plus the column ``x``)."""
        if getattr(self, "_val", None) is None:
            from ..data.custom import load_observation_dataset

            self._val = load_observation_dataset(self.data["validation"], clean=True, key="data.validation")
        return self._val

    def validation_set(self) -> tuple[ObservationSet, Tensor]:
        """The validation observations and their clean signals ``(N, *event_shape)``, both in [-2, 2] units.

        Evaluation only: the trainer is handed :meth:`observations`, which never holds these.
        """
        from ..data.custom import to_model_units, to_observation_set

        val = self._validation_dataset()
        return to_observation_set(val), to_model_units(val.x, val.data_range)

    def _holdout_count(self, n: int) -> int:
        return int(math.floor(float(self.data["holdout"]) * n))

    def _all_observations(self) -> ObservationSet:
        """The first ``data.observations`` observations in [-2, 2] units (mapped once, then kept)."""
        if getattr(self, "_mapped", None) is None:
            from ..data.custom import to_observation_set

            obs = to_observation_set(self._dataset())
            n = len(obs) if self.data["observations"] is None else int(self.data["observations"])
            self._mapped = obs[:n]
        return self._mapped

    @property
    def event_shape(self) -> tuple:
        return tuple(self._dataset().event_shape)

    def observations(self, cache_dir: Path) -> ObservationSet:
        """The training observations (all but the held-out ones), in [-2, 2] units."""
        obs = self._all_observations()
        return obs[: len(obs) - self._holdout_count(len(obs))]

    def heldout_observations(self) -> ObservationSet:
        """The held-out observations (``data.holdout``): never trained on."""
        obs = self._all_observations()
        return obs[len(obs) - self._holdout_count(len(obs)):]

    # -- model -----------------------------------------------------------------------------------
    def network_kind(self) -> str:
        kind = self.net["kind"]
        if kind != "auto":
            return kind
        event = self.event_shape
        if len(event) == 1:
            return "mlp"
        return "unet" if max(event[1:]) <= 64 else "unshuffle"

    def backbone(self, seed: int) -> nn.Module:
        from ..networks import MLP, build_unet, build_unshuffle_unet

        kind, event = self.network_kind(), self.event_shape
        if kind == "mlp":
            if len(event) != 1:
                raise ConfigError(f"config key `network.kind`: the MLP needs vectors, the events have shape {event}")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return MLP(event[0], tuple(self.net["hidden"]), int(self.net["emb_features"]))
        if len(event) != 3 or event[1] != event[2]:
            raise ConfigError(f"config key `network.kind`: {kind!r} needs square images, the events have shape {event}")
        if kind == "unet":
            return build_unet(self.net["preset"], sample_size=event[1], channels=event[0], seed=seed)
        return build_unshuffle_unet(self.net["preset"], event[1], event[0], seed, factor=int(self.net["factor"]))

    def augment(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Flips and 1-pixel shifts of images when ``mstep.augment`` is on (the data must be flip-invariant)."""
        if not self.config.mstep.augment:
            return x
        if x.dim() != 4:
            raise ConfigError("config key `mstep.augment`: flips and shifts apply to images only")
        from .images import random_flip_shift

        return random_flip_shift(x, generator)

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate(self, pipeline, lap: int, generator_seed: int, progress: bool = True) -> dict:
        """Metrics that need no ground truth (module docstring)."""
        from ..pipeline import denoiser_of
        from ..random import make_generators
        from ..spec import SamplerSpec

        d, est = self.data, self.config.estep
        k, m = int(d["posterior_samples"]), int(d["eval_observations"])
        cfg = self.config.eval
        out: dict = {"eval_observations": m, "posterior_samples": k}
        prior = draw_prior_samples(pipeline, cfg.samples, cfg, generator_seed, progress) if cfg.samples > 0 else None
        artifacts: dict = {"prior": None if prior is None else prior[:64]}
        spec = SamplerSpec(method=est.method, steps=est.steps, maxiter=est.maxiter,
                           solver=est.solver if est.guidance == "mmps" else "cg")
        denoiser = denoiser_of(pipeline.unet)
        sets = {"train": self.observations(self.config.run_dir)[:m], "heldout": self.heldout_observations()[:m]}
        for index, (name, obs) in enumerate(sets.items()):
            if k == 0 or len(obs) == 0:
                out[f"data_consistency_{name}"] = None
                continue
            reps = torch.arange(len(obs)).repeat_interleave(k)
            x = spec.sample(denoiser, obs.y[reps].to(pipeline.device), obs.operator[reps].to(pipeline.device),
                            obs.event_shape, make_generators(generator_seed, index, indices=range(len(reps))),
                            noise_std=obs.noise_std, batch_size=est.batch_size).cpu().float()
            A = obs.operator[reps]
            y = obs.y[reps]
            norm = y.flatten(1).norm(dim=1)
            dc = (A(x) - y).flatten(1).norm(dim=1) / norm
            out[f"data_consistency_{name}"] = float(dc.mean())
            # the noise lives on the observed entries only: m = those of A A^T 1 (a mask's observed pixels,
            # a projection's rows, a Fourier mask's sampled k-space entries)
            m_obs = (A(A.T(torch.ones_like(y))).abs() > 1e-6).flatten(1).sum(1).double()
            out[f"noise_floor_{name}"] = float((obs.noise_std * m_obs.sqrt() / norm).mean())
            samples = x.reshape(len(obs), k, *obs.event_shape)
            if name == "train":
                out["posterior_spread"] = float(samples.std(1).mean()) if k > 1 else None
                artifacts |= {"posterior": samples[:, 0], "observed": _shown(obs)}
        if d["validation"]:
            out |= self._validation_metrics(spec, denoiser, prior, pipeline.device, generator_seed)
        self.artifacts = artifacts
        return out

    def _validation_metrics(self, spec, denoiser, prior, device, generator_seed: int) -> dict:
        """Scores against the optional clean validation set, as the experiments score theirs.

        Images: PSNR (and SSIM) of the posterior mean of ``data.posterior_samples`` samples, PSNR of one
        sample and of the observation :math:`A^+ y`, for the first ``data.eval_observations`` validation
        observations (data range 4 in [-2, 2] units, which equals the data's own range). Vectors: the
        manifold experiment's Sinkhorn divergence of the prior samples against the clean signals
        (split in two halves for its baseline term).
        """
        from ..metrics import psnr, ssim
        from ..random import make_generators

        obs, clean = self.validation_set()
        k, m = int(self.data["posterior_samples"]), min(int(self.data["eval_observations"]), len(obs))
        out: dict = {"validation_observations": m}
        if len(obs.event_shape) == 1:
            from ..ot import manifold_divergence

            half = len(clean) // 2
            if prior is None or half < 2:
                return out | {"sinkhorn_validation": None}
            value, dropped = manifold_divergence(prior, clean[:half], clean[half:2 * half], return_dropped=True)
            return out | {"sinkhorn_validation": float(value), "sinkhorn_validation_dropped": dropped}
        if k == 0 or m == 0:
            return out
        obs, clean = obs[:m], clean[:m]
        reps = torch.arange(m).repeat_interleave(k)
        x = spec.sample(denoiser, obs.y[reps].to(device), obs.operator[reps].to(device), obs.event_shape,
                        make_generators(generator_seed, 2, indices=range(m * k)), noise_std=obs.noise_std,
                        batch_size=self.config.estep.batch_size).cpu().float().reshape(m, k, *obs.event_shape)
        mean = x.mean(1).clamp(-2, 2)
        return out | {
            "psnr_posterior_mean": float(psnr(mean, clean).mean()),
            "ssim_posterior_mean": float(ssim(mean, clean, data_range=4.0).mean()),
            "psnr_posterior_sample": float(psnr(x[:, 0].clamp(-2, 2), clean).mean()),
            "psnr_observation": float(psnr(_shown(obs).clamp(-2, 2), clean).mean()),
        }

    @classmethod
    def card_facts(cls, data: dict, observations, fmt) -> dict | None:
        """The model card's description of a custom dataset, from its metadata (read from ``data.path``)."""
        try:
            from ..data.custom import load_observation_dataset

            ds = load_observation_dataset(data["path"])
        except Exception:  # noqa: BLE001 - the card is written elsewhere, maybe without the data: generic then
            return None
        noise = (f"{fmt(float(ds.noise_std.min()))} to {fmt(float(ds.noise_std.max()))}, one per observation (whitened "
                 "to one sigma_0 with `diffem.observations.whiten`)" if torch.is_tensor(ds.noise_std) else fmt(ds.noise_std))
        kind = {"mask": "`diffem.Mask`", "projection": "`diffem.Projection`", "fourier": "`diffem.SubsampledFourier`"}
        event = tuple(ds.event_shape)
        image = len(event) == 3
        return dict(
            datasets=[], pipeline_tag="unconditional-image-generation" if image else "other",
            task_type="unconditional-image-generation" if image else "other", dataset_type="custom",
            dataset_name=ds.name, dataset_split="train", kind="image" if image else "vector",
            event=f"{event} {'images' if image else 'vectors'} in [-2, 2] (the data range {list(ds.data_range)} mapped)",
            corruption=(f"{observations} observations y = A x + sigma_y e of the dataset `{ds.name}` with a "
                        f"{ds.operator} operator and noise std sigma_y = {noise} (in the data's own units)"),
            operator=kind[ds.operator],
            posterior="# y and A: your observations and their operator (diffem.data.custom.load_observation_dataset)",
        )


def _shown(obs: ObservationSet) -> Tensor:
    """The observations in signal space, :math:`A^+ y` (or :math:`A^T y` without a pseudo-inverse):
    the pseudo-inverse also undoes a whitening scale (:class:`diffem.operators.Scaled`)."""
    return obs.operator.pinv(obs.y) if obs.operator.has_pinv else obs.operator.T(obs.y)
