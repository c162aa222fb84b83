"""Experiments as tasks: observations, backbone, augmentation and metric of each.

A :class:`Task` turns a validated :class:`~diffem.config.EMConfig` into

- :meth:`Task.observations`: the observation set (``y``, the operator parameters and
  :math:`\\sigma_y`). It never holds the ground truth: the EM trainer only sees this.
- :meth:`Task.backbone`: a freshly initialised network.
- :meth:`Task.augment`: M-step data augmentation of posterior samples.
- :meth:`Task.evaluate`: the experiment's metric of a prior (the only place that
  reads ground truth, for evaluation).

Task-specific keys live in ``config.data`` and ``config.network``; unknown keys
raise :class:`~diffem.config.ConfigError` naming the key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from torch import Tensor, nn

from .config import ConfigError, EMConfig
from .operators import LinearOperator, Projection

__all__ = ["ObservationSet", "Task", "ManifoldTask", "get_task", "TASKS"]


@dataclass
class ObservationSet:
    """Observations only: ``y`` ``(N, *out_shape)``, the operator (batch ``(N,)``), :math:`\\sigma_y`.

    By construction it has no field for the clean signal ``x``.
    """

    y: Tensor
    operator: LinearOperator
    noise_std: float
    event_shape: tuple

    def __len__(self) -> int:
        return self.y.shape[0]

    def __getitem__(self, index) -> "ObservationSet":
        return ObservationSet(self.y[index], self.operator[index], self.noise_std, self.event_shape)


def _options(section: str, given: dict, defaults: dict) -> dict:
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown config key `{section}.{unknown[0]}` (known: {', '.join(sorted(defaults))})")
    return defaults | given


class Task:
    """Base class of experiments; see the module docstring."""

    name = "task"
    data_defaults: dict = {}
    network_defaults: dict = {}

    def __init__(self, config: EMConfig):
        self.config = config
        self.data = _options("data", config.data, self.data_defaults)
        self.net = _options("network", config.network, self.network_defaults)
        self.check()

    def check(self) -> None:
        """Validate options (paths exist, ranges) before any work starts."""

    def observations(self, cache_dir: Path) -> ObservationSet:  # pragma: no cover - abstract
        raise NotImplementedError

    def backbone(self, seed: int) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def augment(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """M-step augmentation of a batch of posterior samples (default: none)."""
        return x

    def evaluate(self, pipeline, lap: int, generator_seed: int, progress: bool = True) -> dict:  # pragma: no cover
        raise NotImplementedError


def _load_or_build(path: Path, build) -> datasets.Dataset:
    """Load a saved dataset, or build and save it (atomically: a killed build leaves nothing)."""
    if (path / "dataset_info.json").exists():
        return datasets.load_from_disk(str(path))
    ds = build()
    tmp = path.with_name(path.name + ".tmp")
    ds.save_to_disk(str(tmp))
    tmp.rename(path)
    return datasets.load_from_disk(str(path))


class ManifoldTask(Task):
    """The paper's low-dimensional manifold experiment (Section 5.1).

    data: ``points`` (observations, 65,536 in the paper), ``features`` (5),
    ``noise_std`` (1e-2), ``eval_points`` (ground-truth points for the Sinkhorn
    divergence), ``curve_seed``. network: MLP ``hidden`` widths, ``emb_features``.
    """

    name = "manifold"
    data_defaults = dict(points=65536, features=5, noise_std=1e-2, eval_points=4096, curve_seed=0, sinkhorn_reg=1e-3, sinkhorn_maxiter=1024)
    network_defaults = dict(hidden=[256, 256, 256], emb_features=64)

    def check(self):
        for key in ("points", "features", "eval_points"):
            if int(self.data[key]) < 1:
                raise ConfigError(f"config key `data.{key}` must be >= 1")
        if not float(self.data["noise_std"]) > 0:
            raise ConfigError("config key `data.noise_std` must be > 0")

    def observations(self, cache_dir: Path) -> ObservationSet:
        from .data import manifold

        d = self.data

        def build():
            curve = manifold.ManifoldCurve(d["curve_seed"], features=d["features"])
            x = manifold.manifold_points(d["points"], d["curve_seed"], "train", curve=curve)
            A = manifold.random_projections(d["points"], self.config.seed)
            return manifold.make_observations(x, A, d["noise_std"], seed=self.config.seed)

        ds = _load_or_build(Path(cache_dir) / "observations", build).with_format("torch")
        return ObservationSet(ds["y"][:], Projection(ds["matrix"][:]), float(d["noise_std"]), (int(d["features"]),))

    def ground_truth(self, n: int, split: str = "eval") -> Tensor:
        """Ground-truth points for evaluation only (never given to the trainer)."""
        from .data import manifold

        return manifold.manifold_points(n, self.data["curve_seed"], split, features=self.data["features"])

    def backbone(self, seed: int) -> nn.Module:
        from .networks import MLP

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return MLP(self.data["features"], tuple(self.net["hidden"]), self.net["emb_features"])

    def evaluate(self, pipeline, lap: int, generator_seed: int, progress: bool = True) -> dict:
        from .ot import manifold_divergence

        cfg = self.config.eval
        n = cfg.samples
        x = draw_prior_samples(pipeline, n, cfg, generator_seed, progress)
        m = self.data["eval_points"]
        truth = self.ground_truth(2 * m, "eval")
        options = dict(reg=float(self.data["sinkhorn_reg"]), maxiter=int(self.data["sinkhorn_maxiter"]))
        if getattr(self, "_baseline", None) is None:
            from .ot import entropic_ot

            self._baseline = entropic_ot(truth[:m], truth[m:], **options)
        value = manifold_divergence(x, truth[:m], truth[m:], baseline=self._baseline, **options)
        return {"sinkhorn": float(value), "sinkhorn_baseline": self._baseline, "eval_samples": n, "eval_points": m}


def draw_prior_samples(pipeline, n: int, eval_config, seed: int, progress: bool = True) -> Tensor:
    """``n`` prior samples from a pipeline with the evaluation sampler, one generator per sample."""
    from .random import make_generators
    from .scheduler import VEScheduler

    pipeline.scheduler = VEScheduler(method=eval_config.method)
    out = []
    for i in range(0, n, eval_config.batch_size):
        idx = range(i, min(i + eval_config.batch_size, n))
        gens = make_generators(seed, indices=idx)
        out.append(pipeline(len(idx), eval_config.steps, gens, progress=False).samples.cpu())
    return torch.cat(out) if out else torch.empty(0)


TASKS = {"manifold": ManifoldTask}


def get_task(config: EMConfig) -> Task:
    """The task of ``config.experiment``; raises :class:`ConfigError` for an unknown one."""
    if config.experiment not in TASKS:
        raise ConfigError(f"config key `experiment`: unknown experiment {config.experiment!r} (known: {sorted(TASKS)})")
    return TASKS[config.experiment](config)
