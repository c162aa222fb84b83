"""Experiments as tasks: observations, backbone, augmentation and metric of each.

A :class:`Task` turns a validated :class:`~diffem.config.EMConfig` into

- :meth:`Task.observations`: the observation set (``y``, the operator parameters and
  :math:`\\sigma_y`). It never holds the ground truth: the EM trainer only sees this.
- :meth:`Task.backbone`: a freshly initialised network.
- :meth:`Task.augment`: M-step data augmentation of posterior samples.
- :meth:`Task.evaluate`: the experiment's metric of a prior (the only place that
  reads ground truth, for evaluation).
- :meth:`Task.card_facts`: what a published prior's model card says about the experiment.

Task-specific keys live in ``config.data`` and ``config.network``; unknown keys
raise :class:`~diffem.config.ConfigError` naming the key.

:class:`~diffem.observations.ObservationSet` and the cross-process collectives of
:mod:`diffem.distributed` (``sharded_over``, ``sharded_gather``, ``all_ok``, ``PeerFailure``)
live below this layer; they are re-exported here for older imports.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Callable

import datasets
import torch
from torch import Tensor, nn

from ..config import ConfigError, EMConfig
from ..distributed import PeerFailure, all_ok, sharded_gather, sharded_over, sharding_accelerator
from ..observations import ObservationSet

__all__ = ["ObservationSet", "Task", "get_task", "task_class", "draw_prior_samples", "sharded_over", "sharded_gather",
           "all_ok", "PeerFailure", "load_or_build", "TASKS"]


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
    #: ``data.*`` keys that only the evaluation reads (held-out counts, posterior samples and
    #: their sampler): a resumed run and ``diffem evaluate --set`` may change them, as ``eval.*``.
    eval_data_keys: tuple[str, ...] = ()
    #: The largest |x_i| of the data (every task maps its data to [-2, 2]); E-step samples beyond
    #: ``estep.outlier_factor`` times this are outliers (:func:`diffem.em.estep.keep_samples`).
    data_bound: float = 2.0

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

    @classmethod
    def card_facts(cls, data: dict, observations, fmt: Callable[[object], str]) -> dict | None:
        """What the model card of a published prior of this experiment says about its data
        (:func:`diffem.hub.build_model_card`); ``None``: the card describes the experiment generically.

        A class method (the card is written from a run's ``config.yaml``, possibly on another
        machine: nothing is read, no path is checked).

        Arguments:
            data: The run's ``data`` options over :attr:`data_defaults` (what the run used).
            observations: The number of observations EM used (the lap record's, else the options').
            fmt: How the card writes a number (``fmt(0.25) == "0.25"``).

        Returns:
            ``datasets`` (Hub dataset ids), ``pipeline_tag``, ``task_type``, ``dataset_type``,
            ``dataset_name``, ``dataset_split``, ``kind``, ``event`` (what a sample is),
            ``corruption`` (one sentence on the observations), ``operator`` and ``posterior``
            (Python lines defining ``A`` and ``y`` for the card's posterior-sampling snippet).
        """
        return None

    def clean_signals(self) -> Tensor:
        """The clean signals ``(N, *event_shape)`` behind the ``N`` observations, in data units
        (``train_on: clean``, the oracle reference: ground truth a real user does not have).

        Raises:
            ConfigError: if the experiment has no ground truth to train on.
        """
        raise ConfigError(f"config key `train_on`: the {self.name} experiment has no clean signals to train on")

    def ambient_backbone(self, seed: int, sampling_survival: float) -> nn.Module:
        """A fresh mask-conditioned backbone (``train_on: ambient``); see :class:`~diffem.networks.MaskConditionedUNet`.

        Raises:
            ConfigError: if the experiment has none.
        """
        raise ConfigError(f"config key `train_on`: the {self.name} experiment has no mask-conditioned network")

    def training_signals(self, obs: ObservationSet) -> Tensor:
        """What the M-step trains on at every lap of a reference run (``config.train_on``), ``(N, *event_shape)``.

        - ``"clean"``: :meth:`clean_signals` (the oracle);
        - ``"observed"``: :math:`A^T y`, the observations as if they were clean (naive training; for a
          mask, the deleted pixels are 0);
        - ``"ambient"``: :math:`A^T y` and the mask :math:`A` stacked on the channels,
          ``(N, 2C, H, W)`` (mask operators only), for :class:`~diffem.denoiser.AmbientLoss`.

        Raises:
            ConfigError: for ``train_on: posterior`` (EM trains on E-step samples) or an unknown value.
            ValueError: if the result's shape is not ``(N, *obs.event_shape)``.
        """
        kind = self.config.train_on
        if kind == "clean":
            x = self.clean_signals()
        elif kind == "observed":
            x = obs.operator.T(obs.y)
        elif kind == "ambient":
            mask = getattr(obs.operator, "mask", None)
            if mask is None:
                raise ConfigError(f"config key `train_on`: 'ambient' needs a mask operator, the {self.name} "
                                  f"experiment's is {type(obs.operator).__name__}")
            y = obs.operator.T(obs.y)
            return torch.cat([y, mask.expand_as(y).to(y.dtype)], dim=1).float()
        else:
            raise ConfigError(f"config key `train_on`: {kind!r} has no fixed training signals (EM trains on posterior samples)")
        expected = (len(obs), *obs.event_shape)
        if tuple(x.shape) != expected:
            raise ValueError(f"train_on={kind!r}: the training signals have shape {tuple(x.shape)}, expected {expected}")
        return x.float()

    def estep_metrics(self, samples: Tensor, lap: int) -> dict:
        """Metrics of a lap's E-step posterior samples (those the M-step trains on), computed before
        they are discarded and stored in the lap's record at evaluated laps (default: none)."""
        return {}


def load_or_build(path: Path, build) -> datasets.Dataset:
    """Load a saved dataset, or build and save it (atomically: a killed build leaves nothing)."""
    if (path / "dataset_info.json").exists():
        return datasets.load_from_disk(str(path))
    ds = build()
    tmp = path.with_name(path.name + ".tmp")
    ds.save_to_disk(str(tmp))
    tmp.rename(path)
    return datasets.load_from_disk(str(path))


def draw_prior_samples(pipeline, n: int, eval_config, seed: int, progress: bool = True) -> Tensor:
    """``n`` prior samples ``(n, *event_shape)`` on the CPU with the evaluation sampler.

    Sample ``i`` draws from its own generator seeded with ``(seed, i)``, so the samples do
    not depend on ``eval_config.batch_size`` nor, inside :func:`sharded_over`, on the number
    of processes: process ``r`` of ``P`` draws samples ``[r m, (r + 1) m)`` with
    ``m = ceil(n / P)`` (the last one's extra indices are drawn and dropped) and every
    process receives all ``n``.
    """
    from ..random import make_generators
    from ..scheduler import VEScheduler

    pipeline.scheduler = VEScheduler(method=eval_config.method)
    acc = sharding_accelerator()
    processes, rank = (acc.num_processes, acc.process_index) if acc is not None else (1, 0)
    per = math.ceil(n / processes)
    out = []
    for i in range(rank * per, (rank + 1) * per, eval_config.batch_size):
        idx = range(i, min(i + eval_config.batch_size, (rank + 1) * per))
        gens = make_generators(seed, indices=idx)
        out.append(pipeline(len(idx), eval_config.steps, gens, progress=False).samples.cpu())
    x = torch.cat(out) if out else torch.empty(0, *pipeline.event_shape)
    if processes > 1:
        x = sharded_gather(acc, x)
    return x[:n]


#: Experiment name -> "module:class" (imported on demand).
TASKS = {
    "manifold": "diffem.tasks.manifold:ManifoldTask",
    "mnist": "diffem.tasks.mnist:MnistTask",
    "cifar10": "diffem.tasks.cifar10:Cifar10Task",
    "mri": "diffem.tasks.mri:MriTask",
    "custom": "diffem.tasks.custom:CustomTask",
}


def task_class(experiment: str) -> type[Task]:
    """The :class:`Task` subclass of ``experiment`` (imported on demand).

    Raises:
        ConfigError: if the experiment is unknown.
    """
    if experiment not in TASKS:
        raise ConfigError(f"config key `experiment`: unknown experiment {experiment!r} (known: {sorted(TASKS)})")
    module, name = TASKS[experiment].split(":")
    return getattr(importlib.import_module(module), name)


def get_task(config: EMConfig) -> Task:
    """The task of ``config.experiment``; raises :class:`ConfigError` for an unknown one."""
    task = task_class(config.experiment)(config)
    if config.mstep.augment and type(task).augment is Task.augment:
        raise ConfigError(f"config key `mstep.augment`: the {config.experiment} experiment has no augmentation")
    return task
