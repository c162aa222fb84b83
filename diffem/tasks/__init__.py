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

import contextlib
import contextvars
import importlib
import math
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from torch import Tensor, nn

from ..config import ConfigError, EMConfig
from ..operators import LinearOperator

__all__ = ["ObservationSet", "Task", "get_task", "task_class", "draw_prior_samples", "sharded_over", "sharded_gather",
           "all_ok", "PeerFailure", "load_or_build", "TASKS"]


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
    #: ``data.*`` keys that only the evaluation reads (held-out counts, posterior samples and
    #: their sampler): a resumed run and ``diffem evaluate --set`` may change them, as ``eval.*``.
    eval_data_keys: tuple[str, ...] = ()

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


def load_or_build(path: Path, build) -> datasets.Dataset:
    """Load a saved dataset, or build and save it (atomically: a killed build leaves nothing)."""
    if (path / "dataset_info.json").exists():
        return datasets.load_from_disk(str(path))
    ds = build()
    tmp = path.with_name(path.name + ".tmp")
    ds.save_to_disk(str(tmp))
    tmp.rename(path)
    return datasets.load_from_disk(str(path))


_SHARDING: contextvars.ContextVar = contextvars.ContextVar("diffem_sharding", default=None)


@contextlib.contextmanager
def sharded_over(accelerator):
    """Within this context, :func:`draw_prior_samples` splits its samples over the processes of
    ``accelerator`` and gathers them (every process must then call it with the same arguments)."""
    token = _SHARDING.set(accelerator)
    try:
        yield
    finally:
        _SHARDING.reset(token)


class PeerFailure(RuntimeError):
    """Raised by :func:`sharded_gather` on every process when another process's sharded work failed."""


def all_ok(accelerator, ok: bool) -> bool:
    """Whether ``ok`` holds on every process of ``accelerator`` (one all-gather of a flag; none
    with one process)."""
    if accelerator.num_processes == 1:
        return ok
    flag = torch.tensor([1.0 if ok else 0.0], device=accelerator.device)
    return bool((accelerator.gather(flag) > 0).all())


def sharded_gather(accelerator, tensor: Tensor) -> Tensor:
    """Every process's ``tensor`` ``(m, ...)`` (same shape on each) as ``(P m, ...)`` on the CPU, in process order.

    Collectives must pair up across processes: a process whose sharded work raised before
    this gather must not leave the others waiting in it until the group's timeout. So the
    gather is preceded by :func:`all_ok` with ``True``; a process that failed calls
    ``all_ok(accelerator, False)`` instead (as :func:`diffem.em.evaluation.evaluate_lap`
    does), which pairs with that flag gather.

    Raises:
        PeerFailure: on every process that reached this gather, if another process failed.
    """
    if not all_ok(accelerator, True):
        raise PeerFailure("the sharded work failed on another process")
    return accelerator.gather(tensor.to(accelerator.device).contiguous()).cpu()


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
    acc = _SHARDING.get()
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
