"""Wire an EM run from its config: the experiment's task and the Hub upload, handed to the EM loop.

:class:`~diffem.em.EMTrainer` imports neither the experiments (:mod:`diffem.tasks`) nor the Hub
(:mod:`diffem.hub`): they sit above it. This module, beside the CLI, builds both from the
config, as ``diffem train`` and ``diffem evaluate`` do:

>>> from diffem.config import load_config
>>> from diffem.train import make_trainer
>>> trainer = make_trainer(load_config("manifold", "smoke"))  # doctest: +SKIP
>>> records = trainer.run()  # doctest: +SKIP
"""

from __future__ import annotations

from .config import EMConfig
from .em import EMTrainer
from .em import run_em as _run_em
from .tasks import get_task

__all__ = ["make_trainer", "run_em", "hub_upload"]


def hub_upload(config: EMConfig):
    """The after-lap hook of ``config``: push the finished laps to ``hub.repo_id``
    (:func:`diffem.hub.push_after_lap`), or ``None`` without a repo id."""
    if not config.hub.repo_id:
        return None

    def push(cfg: EMConfig) -> None:
        from .hub import push_after_lap

        push_after_lap(cfg)

    return push


def make_trainer(config: EMConfig, accelerator=None, progress: bool = True) -> EMTrainer:
    """The :class:`~diffem.em.EMTrainer` of ``config``: its task (:func:`diffem.tasks.get_task`) and
    its Hub upload (:func:`hub_upload`).

    Raises:
        diffem.config.ConfigError: for an unknown experiment or a bad task option.
    """
    return EMTrainer(config, get_task(config), accelerator, progress=progress, after_lap=hub_upload(config))


def run_em(config: EMConfig, progress: bool = True) -> list[dict]:
    """Run (or resume) the EM experiment of ``config`` (:func:`diffem.em.run_em` with its task and hook)."""
    return _run_em(config, get_task(config), progress=progress, after_lap=hub_upload(config))
