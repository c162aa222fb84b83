"""The EM driver: runs the phases of each lap in order and keeps the run resumable.

Lap 0 (:mod:`.lap0`) fits a Gaussian prior; each later lap runs the E-step
(:mod:`.estep`) then the M-step (:mod:`.mstep`). Every lap is then, in this order:

1. saved (:func:`.checkpoint.save_lap`), its scratch work removed;
2. recorded in ``metrics.jsonl`` (``eval_status: "pending"`` if an evaluation is due);
3. handed to :meth:`EMTrainer.after_lap_saved` (the point where publishing hooks in);
4. evaluated (:mod:`.evaluation`), the record updated; a failure is recorded, never fatal.

Precision: ``precision`` (fp32 / bf16) is the accelerator's mixed precision, which wraps the
M-step's prepared objective in autocast; the E-step, lap 0 and the evaluation call the
network outside any autocast, in float32. It is recorded in ``config.yaml`` and every lap
record.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import yaml
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import InitProcessGroupKwargs, set_seed

from ..config import ConfigError, EMConfig, config_to_dict
from ..observations import ObservationSet
from ..pipeline import DiffusionPriorPipeline
from ..random import derive_seed
from .checkpoint import LapRecords, check_resume_config, is_complete, lap_dir, save_lap, saved_record
from .estep import OutlierError, estep_covariance, run_estep, screen_samples
from .evaluation import evaluate_lap, is_scheduled, needs_evaluation
from .lap0 import run_lap0
from .mstep import check_batch_split, mstep_steps, run_mstep
from .seeds import INIT

__all__ = ["EMTrainer", "run_em", "make_accelerator", "accelerator_kwargs", "describe_hardware", "PRECISIONS",
           "OutlierError"]

logger = get_logger(__name__)

#: ``precision`` config values -> accelerate's ``mixed_precision``.
PRECISIONS = {"fp32": "no", "bf16": "bf16"}


def describe_hardware(num_processes: int = 1) -> str:
    """One line naming the machine a run is measured on, stored in every lap's record.

    Wall times are only comparable on the same hardware: U-Net training steps were seen
    to take 2-3x longer on one 2-core "AMD EPYC" host than on another of the same name, so
    the CPU line also names the instruction set PyTorch dispatches to
    (``torch.backends.cpu.get_cpu_capability``, e.g. AVX2 or AVX512).

    Args:
        num_processes: processes of the run (``accelerate launch --num_processes``).

    Returns:
        e.g. ``"1 process(es) on 4 x NVIDIA H100 80GB HBM3"`` or
        ``"1 process(es) on CPU only: AMD EPYC, 2 cores, AVX2, 2 torch threads"``.
    """
    if torch.cuda.is_available():
        machine = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    else:
        model = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        machine = (f"CPU only: {model}, {os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}, "
                   f"{torch.get_num_threads()} torch threads")
    return f"{num_processes} process(es) on {machine}"


def accelerator_kwargs(config: EMConfig) -> dict:
    """The keyword arguments of the run's ``Accelerator`` (see :func:`make_accelerator`).

    ``mixed_precision`` from ``precision`` (fp32 -> "no", bf16 -> "bf16"), ``kwargs_handlers``
    with the process-group timeout of ``timeout_minutes`` (``InitProcessGroupKwargs``), and
    ``cpu=True`` without CUDA when a launcher set ``WORLD_SIZE > 1``.

    Raises:
        ConfigError: for a ``precision`` other than fp32 and bf16 (fp16 is refused, see
            :meth:`EMConfig.validate <diffem.config.EMConfig.validate>`).
    """
    if config.precision not in PRECISIONS:
        raise ConfigError(f"config key `precision` must be one of {sorted(PRECISIONS)}, got {config.precision!r}")
    timeout = InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=config.timeout_minutes))
    cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return dict(mixed_precision=PRECISIONS[config.precision], kwargs_handlers=[timeout], cpu=cpu)


def make_accelerator(config: EMConfig) -> Accelerator:
    """The run's ``Accelerator``: ``precision`` as mixed precision, the process-group timeout, and
    CPU processes that form a real process group.

    Without CUDA, a launcher's ``WORLD_SIZE > 1`` (``accelerate launch --multi_gpu
    --num_processes P`` runs torchrun) gives a multi-CPU run on gloo (``Accelerator(cpu=True)``);
    a plain ``Accelerator()`` would treat each process as a lone main process, and every
    process would build the observations and run every lap on its own.

    Raises:
        ConfigError: for an unsupported ``precision``.
    """
    return Accelerator(**accelerator_kwargs(config))


class EMTrainer:
    """Runs (or resumes) the laps of one configured experiment; see :mod:`diffem.em`.

    The trainer is handed its task and its after-lap hook by its caller (the EM loop imports
    neither the experiments nor the Hub): :func:`diffem.train.make_trainer` builds both from the
    config, as ``diffem train`` does.

    Arguments:
        config: A validated :class:`EMConfig`.
        task: The experiment (a :class:`diffem.tasks.Task`: its observations, backbone,
            augmentation, evaluation and data bound), built from ``config``.
        accelerator: An ``accelerate.Accelerator`` (default: :func:`make_accelerator`).
        progress: Show progress bars (main process only).
        after_lap: Called on the main process with the config once a lap and its record are
            saved, before its evaluation (:meth:`after_lap_saved`), e.g. to publish it; ``None``:
            nothing. Its failures are its own to handle (publishing logs them).
    """

    def __init__(self, config: EMConfig, task, accelerator: Accelerator | None = None, progress: bool = True,
                 after_lap: Callable[[EMConfig], None] | None = None):
        self.config = config
        self.task = task
        self.accelerator = accelerator or make_accelerator(config)
        self.progress = progress and self.accelerator.is_main_process
        self.after_lap = after_lap
        self.run_dir = config.run_dir
        self.work_dir = self.run_dir / "work"
        self.records = LapRecords(self.run_dir / "metrics.jsonl")

    # -- run folder ------------------------------------------------------------------------------
    def _prepare_run_dir(self) -> None:
        """Create the run folder and write ``config.yaml`` (what a resumed run may change: :func:`check_resume_config`)."""
        acc = self.accelerator
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            path = self.run_dir / "config.yaml"
            check_resume_config(path, self.config, self.task.eval_data_keys)
            path.write_text(yaml.safe_dump(config_to_dict(self.config), sort_keys=False))
        acc.wait_for_everyone()

    @property
    def is_reference(self) -> bool:
        """A reference run (``train_on`` "clean" or "observed"): no lap 0 and no E-step; every lap's
        M-step trains on the task's fixed :meth:`~diffem.tasks.Task.training_signals`."""
        return self.config.train_on != "posterior"

    def run_laps(self) -> list[int]:
        """The laps of the run: 0 (the Gaussian) to ``laps`` for EM, 1 to ``laps`` for a reference run."""
        return list(range(1 if self.is_reference else 0, self.config.laps + 1))

    def laps_done(self) -> list[int]:
        """Laps whose pipeline folder is complete."""
        return [k for k in self.run_laps() if is_complete(lap_dir(self.run_dir, k))]

    def observations(self) -> ObservationSet:
        """The observation set, built once by the main process (the others wait, then read it)."""
        acc = self.accelerator
        if acc.is_main_process:
            self.task.observations(self.run_dir)
        acc.wait_for_everyone()
        return self.task.observations(self.run_dir)

    def load_lap(self, lap: int) -> DiffusionPriorPipeline:
        """The saved prior of a finished lap, on the accelerator's device."""
        folder = lap_dir(self.run_dir, lap)
        if not is_complete(folder):
            raise FileNotFoundError(f"lap {lap} has no saved prior at {folder}")
        return DiffusionPriorPipeline.from_pretrained(folder).to(self.accelerator.device)

    # -- the run -----------------------------------------------------------------------------------
    def run(self) -> list[dict]:
        """Run (or resume) every lap; returns the lap records written by this call.

        On resume, saved laps whose due evaluation is missing (killed, or failed) are
        evaluated first, with the current ``eval.*`` keys.

        Raises:
            ValueError: before any work, if ``mstep.batch_size`` does not split over the processes.
        """
        acc = self.accelerator
        check_batch_split(self.config.mstep, acc.num_processes)  # not hours later, at the first M-step
        print(f"diffem: process {acc.process_index} of num_processes {acc.num_processes} "
              f"({acc.distributed_type.value}, {acc.device}, precision {self.config.precision})", file=sys.stderr, flush=True)
        self._prepare_run_dir()
        obs = self.observations()
        # Decided once, after a barrier, so that every process runs the same laps (and the
        # same sequence of barriers).
        done = set(self.laps_done())
        records = self.records.read()
        self.accelerator.wait_for_everyone()
        records = self._restore_records(done, records)
        out = []
        for lap in sorted(done):
            if needs_evaluation(self.config, records.get(lap), lap):
                out.append(self.evaluate(lap))
        ran = [lap for lap in self.run_laps() if lap not in done]
        for lap in ran:
            out.append(self.lap0(obs) if lap == 0 else self.lap(lap, obs))
        if ran:  # the last lap's evaluated record (and any upload that failed) reaches the Hub too
            self.after_lap_saved(ran[-1])
        return out

    def _restore_records(self, done: set[int], records: dict[int, dict]) -> dict[int, dict]:
        """Saved laps missing from ``metrics.jsonl`` (a kill between the save and the record) get the
        record saved with them back (:func:`~diffem.em.checkpoint.saved_record`), marked ``restored``;
        their due evaluation then runs as for any pending lap."""
        missing = sorted(k for k in done if k not in records)
        restored = {k: r | {"restored": True} for k in missing if (r := saved_record(self.run_dir, k)) is not None}
        if restored:
            logger.warning(f"laps {sorted(restored)} were saved without their metrics.jsonl record (a kill between "
                           "the two?): restored from their lap folders", main_process_only=True)
            if self.accelerator.is_main_process:
                for record in restored.values():
                    self.records.write(record)
            self.accelerator.wait_for_everyone()
        return records | restored

    def lap0(self, obs: ObservationSet) -> dict:
        """Lap 0: fit the Gaussian prior, then save, record and evaluate it."""
        start = time.perf_counter()
        prior, stats = run_lap0(self.accelerator, self.config, obs, progress=self.progress)
        record = {"lap": 0, "estep_time_s": time.perf_counter() - start, "mstep_time_s": 0.0} | stats
        return self._finish_lap(0, prior, record)

    def estep(self, lap: int, obs: ObservationSet) -> torch.Tensor:
        """All posterior samples of lap ``lap`` (see :func:`diffem.em.estep.run_estep`)."""
        folder = self.work_dir / f"lap_{lap:02d}" / "estep"
        return run_estep(self.accelerator, self.config, lap, obs, folder, lambda: self.load_lap(lap - 1), self.progress,
                         load_lap0=lambda: self.load_lap(0))

    def mstep(self, lap: int, samples: torch.Tensor) -> tuple[torch.nn.Module, dict]:
        """Train on the posterior samples (see :func:`diffem.em.mstep.run_mstep`)."""
        if lap == 1 and self.config.train_on == "ambient":
            # Ambient's fixed-mask sampler keeps each pixel with probability (1 - p)(1 - delta), p the
            # observations' deleted fraction.
            observed = float(samples[:, samples.shape[1] // 2:].mean())
            survival = observed * (1 - self.config.mstep.ambient_delta)
            backbone = self.task.ambient_backbone(derive_seed(self.config.seed, INIT), survival)
        elif lap == 1:
            backbone = self.task.backbone(derive_seed(self.config.seed, INIT))
        else:
            backbone = self.load_lap(lap - 1).unet
        folder = self.work_dir / f"lap_{lap:02d}" / "mstep"
        return run_mstep(self.accelerator, self.config, self.task, lap, samples, backbone, folder,
                         lap_dir(self.run_dir, lap - 1), progress=self.progress)

    def mstep_steps(self, n: int) -> int:
        """Optimizer steps of a lap on ``n`` samples."""
        return mstep_steps(self.config.mstep, n)

    def lap(self, lap: int, obs: ObservationSet) -> dict:
        """E-step then M-step (a reference run: the M-step alone); then save, record and evaluate the lap."""
        if self.is_reference:
            return self.reference_lap(lap, obs)
        start = time.perf_counter()
        samples = self.estep(lap, obs)
        estep_time = time.perf_counter() - start
        samples, discarded, outliers = screen_samples(samples, self.config, self.task.data_bound, lap,
                                                      lap_dir(self.run_dir, lap - 1))
        if len(samples) == 0:
            raise RuntimeError(
                f"lap {lap}: all {discarded} E-step samples were discarded (non-finite, or a coordinate outside "
                f"+-{self.config.estep.discard_outside}); the prior of lap {lap - 1} ({lap_dir(self.run_dir, lap - 1)}) "
                "is likely broken"
            )
        estep_metrics = self._estep_metrics(samples, lap)
        start = time.perf_counter()
        model, stats = self.mstep(lap, samples)
        record = {
            "lap": lap,
            "estep_time_s": estep_time,
            "mstep_time_s": time.perf_counter() - start,
            "estep_samples_per_s": len(obs) / max(estep_time, 1e-9),
            "observations": len(obs),
            "discarded_samples": discarded,
            "outlier_samples": outliers,
            "estep_covariance": estep_covariance(self.config, lap),
            # A fingerprint of the E-step (e.g. to compare runs on different process counts).
            "estep_sample_moments": [float(v) for v in (samples.double().mean(), samples.double().std(),
                                                        samples.min(), samples.max())] if len(samples) else None,
        } | estep_metrics | stats
        return self._finish_lap(lap, model, record)

    def reference_lap(self, lap: int, obs: ObservationSet) -> dict:
        """A reference run's lap: the M-step on the task's fixed training signals (``train_on``), with
        the same network, steps, schedule, augmentation and evaluation as EM's laps."""
        samples = self.task.training_signals(obs)
        start = time.perf_counter()
        model, stats = self.mstep(lap, samples)
        record = {"lap": lap, "train_on": self.config.train_on, "estep_time_s": 0.0,
                  "mstep_time_s": time.perf_counter() - start, "observations": len(obs)} | stats
        return self._finish_lap(lap, model, record)

    def _estep_metrics(self, samples: torch.Tensor, lap: int) -> dict:
        """The task's metrics of the E-step samples at evaluated laps, on the main process only (only
        it writes the record; the others go on to the M-step). A failure is recorded, never raised:
        a metric must not stop the run before its M-step."""
        if not (is_scheduled(self.config, lap) and self.accelerator.is_main_process):
            return {}
        try:
            return self.task.estep_metrics(samples, lap)
        except Exception as e:  # noqa: BLE001 - recorded in the lap's record
            logger.warning(f"lap {lap}: the E-step samples' metrics failed: {e!r}", main_process_only=True)
            return {"estep_metrics_error": repr(e)}

    # -- after a lap -------------------------------------------------------------------------------
    def _finish_lap(self, lap: int, model, record: dict) -> dict:
        """Save the lap, write its record, call :meth:`after_lap_saved`, then evaluate it."""
        acc = self.accelerator
        record |= {
            "processes": acc.num_processes,
            "precision": self.config.precision,
            "hardware": describe_hardware(acc.num_processes),
            "eval_status": "pending" if is_scheduled(self.config, lap) else "not scheduled",
        }
        if acc.is_main_process:  # the record is saved inside the lap folder too: one rename makes both
            save_lap(self.run_dir, lap, model, self.config, record)
            shutil.rmtree(self.work_dir / f"lap_{lap:02d}", ignore_errors=True)
        acc.wait_for_everyone()
        self._write_record(record)
        self.after_lap_saved(lap)
        if is_scheduled(self.config, lap):
            record = self._evaluated(lap, model, record)
        return record

    def after_lap_saved(self, lap: int) -> None:
        """Called on every process once ``lap_KK/`` and its record are saved, before its evaluation.

        The hook for work on a finished lap that must not wait for (or depend on) the
        evaluation, such as publishing it: the main process calls ``after_lap(config)``
        (:func:`diffem.train.make_trainer` passes the Hub upload of ``hub.repo_id``, which logs a
        failure and retries at the next lap).
        """
        if self.accelerator.is_main_process and self.after_lap is not None:
            self.after_lap(self.config)

    def _write_record(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            self.records.write(record)
        self.accelerator.wait_for_everyone()
        logger.info(json.dumps(record), main_process_only=True)

    def _evaluated(self, lap: int, model, record: dict) -> dict:
        metrics = evaluate_lap(self.accelerator, self.config, self.task, lap, model, self.run_dir, self.progress)
        record = {k: v for k, v in record.items() if k not in ("eval_error",)} | metrics
        self._write_record(record)
        return record

    def evaluate(self, lap: int) -> dict:
        """Evaluate a saved lap with the current ``eval.*`` keys and update (or create) its record."""
        if lap not in self.laps_done():
            raise FileNotFoundError(f"lap {lap} of `{self.run_dir}` has no saved prior (finished laps: {self.laps_done()})")
        record = self.records.get(lap) or {"lap": lap}
        return self._evaluated(lap, self.load_lap(lap).unet, record)

    def missing_evaluations(self) -> list[int]:
        """Saved laps due an evaluation whose record holds no successful one."""
        records = self.records.read()
        return [k for k in self.laps_done() if needs_evaluation(self.config, records.get(k), k)]


def run_em(config: EMConfig, task, progress: bool = True, after_lap: Callable[[EMConfig], None] | None = None) -> list[dict]:
    """Run (or resume) an EM experiment with ``task`` under :func:`make_accelerator`'s ``Accelerator``
    (``diffem.train.run_em`` builds the task from the config)."""
    accelerator = make_accelerator(config)
    set_seed(config.seed)
    records = EMTrainer(config, task, accelerator, progress=progress, after_lap=after_lap).run()
    accelerator.end_training()
    return records
