"""Evaluation of a saved lap: the experiment's metric, shared by every process.

Every process runs :meth:`Task.evaluate <diffem.tasks.Task.evaluate>` inside
:func:`diffem.tasks.sharded_over`: the prior samples are split over the processes (one
seeded generator per sample, as in the E-step) and gathered, so the statistics do not
depend on the process count and no process idles at a barrier while another evaluates.

An evaluation never loses a lap: it runs after the lap is saved, and an exception is
recorded in the lap's record (``eval_status: "failed"``, ``eval_error``) instead of
stopping the run; ``diffem evaluate RUN --missing`` (or resuming the run, possibly with
changed ``eval.*`` keys) fills it in later. A failure on one process fails the evaluation on
all of them without leaving any waiting in a collective: every sharded gather is preceded by
a flag gather (:func:`diffem.tasks.sharded_gather`), and the failing process answers that
flag with "failed" (:func:`diffem.tasks.all_ok`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import traceback
from pathlib import Path


from ..config import EMConfig
from ..distributed import PeerFailure, all_ok, sharded_over
from ..pipeline import DiffusionPriorPipeline
from ..random import derive_seed
from ..scheduler import VEScheduler
from .checkpoint import atomic_torch_save
from .seeds import EVAL

__all__ = ["is_scheduled", "needs_evaluation", "evaluate_lap"]

logger = logging.getLogger(__name__)


def is_scheduled(config: EMConfig, lap: int) -> bool:
    """Whether ``lap`` is evaluated: lap 0, the last lap, and every ``eval.every``-th lap
    (or laps 1, 2, 4, 8, ... with ``eval.powers_of_two``); never with ``eval.samples == 0``."""
    cfg = config.eval
    if cfg.samples == 0:
        return False
    scheduled = (lap & (lap - 1) == 0) if cfg.powers_of_two else lap % cfg.every == 0
    return lap == 0 or lap == config.laps or scheduled


def needs_evaluation(config: EMConfig, record: dict | None, lap: int) -> bool:
    """A scheduled lap whose record holds no successful evaluation (pending, failed or none)."""
    if not is_scheduled(config, lap):
        return False
    if record is None:
        return True
    if "eval_status" in record:
        return record["eval_status"] != "ok"
    return "eval_time_s" not in record  # records written before eval_status existed


def evaluate_lap(accelerator, config: EMConfig, task, lap: int, unet, run_dir: Path, progress: bool = False) -> dict:
    """Evaluate the prior ``unet`` of ``lap`` on every process; returns the record's evaluation fields.

    Returns:
        On success the task's metrics plus ``eval_status: "ok"``, ``eval_time_s`` and
        ``eval_settings`` (the ``eval.*`` keys used); on failure ``eval_status: "failed"``
        and ``eval_error`` (the exception, one line). Every process returns the same status.
    """
    acc = accelerator
    start = time.perf_counter()
    settings = dataclasses.asdict(config.eval)

    def failed(error: str) -> dict:
        return {"eval_status": "failed", "eval_error": error, "eval_settings": settings}

    elsewhere = "evaluation failed on another process"
    try:
        pipe = DiffusionPriorPipeline(unet, VEScheduler(method=config.eval.method)).to(acc.device)
        pipe.set_progress_bar_config(disable=True)
        with sharded_over(acc):
            metrics = task.evaluate(pipe, lap, derive_seed(config.seed, EVAL), progress=progress)
        out = dict(metrics) | {"eval_status": "ok", "eval_time_s": time.perf_counter() - start, "eval_settings": settings}
        artifacts = getattr(task, "artifacts", None)
        if artifacts is not None and acc.is_main_process:  # small tensors for figures (samples of this lap)
            (Path(run_dir) / "eval").mkdir(exist_ok=True)
            atomic_torch_save(artifacts, Path(run_dir) / "eval" / f"lap_{lap:02d}.pt")
    except PeerFailure:  # another process failed; the flag gather that told us paired with its all_ok(False)
        logger.error("evaluation of lap %d failed on another process", lap)
        return failed(elsewhere)
    except Exception as e:  # noqa: BLE001 - any evaluation failure is recorded, never fatal
        logger.error("evaluation of lap %d failed:\n%s", lap, traceback.format_exc())
        all_ok(acc, False)  # pairs with the gather the other processes stand at (a flag, or this final one)
        return failed(f"{type(e).__name__}: {e}".splitlines()[0][:500])
    # All processes agree: one failure fails the lap's evaluation everywhere.
    return out if all_ok(acc, True) else failed(elsewhere)
