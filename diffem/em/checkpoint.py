"""Checkpointing of an EM run: lap folders, M-step checkpoints, lap records and the run's config.

Everything here writes atomically (a temporary name, then ``os.replace``), so a process
killed at any point leaves either the old or the new file, never half of one.

Run layout (``config.run_dir``; the names, paths and readers are :mod:`diffem.runs`')::

    config.yaml           the resolved configuration
    observations/         the observation set (y and operator parameters; no x)
    metrics.jsonl         one JSON record per saved lap (updated when its evaluation lands)
    lap_KK/               the prior after lap KK: a DiffusionPriorPipeline (EMA weights) whose
                          scheduler is the evaluation's, plus sampling.json with the E-step's
                          and the evaluation's sampler settings
    eval/lap_KK.pt        small evaluation artifacts (samples for figures)
    work/lap_KK/estep/    E-step chunks (removed once the lap is saved)
    work/lap_KK/mstep/    the last M-step checkpoint (removed once the lap is saved)

:func:`lap_dir` and :func:`is_complete` are :mod:`diffem.runs`' own, re-exported here.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable

import torch
import yaml

from ..config import ConfigError, EMConfig, config_to_dict
from ..pipeline import DiffusionPriorPipeline
from ..runs import LAP_RECORD_FILE, SAMPLING_FILE, is_complete, lap_dir, read_records
from ..scheduler import VEScheduler

__all__ = [
    "lap_dir",
    "is_complete",
    "atomic_torch_save",
    "atomic_write_text",
    "check_resume_config",
    "saved_record",
    "changed_keys",
    "save_lap",
    "sampling_settings",
    "LapRecords",
    "MStepCheckpoint",
]

#: Top-level config keys a resumed run may change (``eval`` and ``hub`` are whole sections:
#: evaluation and publishing do not change the prior; ``output_dir``: the run folder was moved or copied).
RESUMABLE_KEYS = ("laps", "eval", "hub", "output_dir")


def atomic_torch_save(obj, path: Path) -> None:
    """``torch.save`` to ``path`` through a temporary file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def check_resume_config(path: Path, config: EMConfig, eval_data_keys: Iterable[str] = ()) -> None:
    """Raise :class:`ConfigError` unless ``config`` may resume the run whose config is at ``path``.

    A resumed run may change ``laps``, the ``eval.*`` and ``hub.*`` keys, ``output_dir`` (a moved
    run folder) and the task's evaluation-only ``data.*`` keys, and nothing else: every other key
    changes what the saved laps mean.

    Arguments:
        path: The run's ``config.yaml`` (nothing to check when it does not exist yet).
        config: The configuration that would resume the run.
        eval_data_keys: The task's evaluation-only ``data.*`` keys
            (:attr:`diffem.tasks.Task.eval_data_keys`), given by the caller that built the task.
    """
    path = Path(path)
    if not path.exists():
        return
    old = yaml.safe_load(path.read_text()) or {}
    new = config_to_dict(config)
    allowed = {f"data.{k}" for k in eval_data_keys}
    changed = [k for k in changed_keys(old, new) if k.split(".")[0] not in RESUMABLE_KEYS and k not in allowed]
    if changed:
        raise ConfigError(
            f"{path} holds a different configuration (changed: {', '.join(changed)}); a resumed run may only "
            "change `laps`, `eval.*`, `hub.*`, `output_dir` and the evaluation's `data.*` keys "
            f"({', '.join(sorted(allowed)) or 'none for this experiment'}): resume with the same settings or "
            "choose another `output_dir`"
        )


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ; a key missing on one side (added to or removed from
    :class:`EMConfig` since the run started) counts as unchanged, except under ``data``
    (free-form task options: a key set on one side only changes the run); ``network`` is
    compared as a whole."""
    out = []
    for k in sorted(set(old) & set(new)):
        a, b = old[k], new[k]
        if isinstance(a, dict) and isinstance(b, dict) and k != "network":
            if k == "data":  # a data key added or removed (a default) changes the run
                out += [f"data.{j}" for j in sorted(set(a) ^ set(b))]
            out += changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def sampling_settings(config: EMConfig) -> dict:
    """The sampler settings a lap is saved with (``sampling.json``): the E-step's
    :class:`~diffem.spec.SamplerSpec` (:meth:`~diffem.spec.SamplerSpec.to_dict`) and the
    evaluation's unconditional sampler."""
    from ..spec import SamplerSpec

    v = config.eval
    return {"estep": SamplerSpec.from_estep(config.estep).to_dict(),
            "eval": {"method": v.method, "num_inference_steps": v.steps}}


def save_lap(run_dir: Path, lap: int, unet, config: EMConfig, record: dict | None = None) -> Path:
    """Save the prior of ``lap`` as a pipeline folder (call on the main process only).

    The pipeline's scheduler is the evaluation's (unconditional sampling);
    ``sampling.json`` beside it holds the E-step's settings (DDPM / PC steps, Langevin
    corrections, CG iterations) so that posterior sampling can repeat the E-step
    (:func:`diffem.pipeline.estep_scheduler`). ``record`` (the lap's training record) is saved
    inside the folder as ``lap_record.json``: the folder appears whole (one rename), so a
    saved lap always carries its E-step and M-step statistics (:func:`saved_record`).
    """
    final = lap_dir(run_dir, lap)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    DiffusionPriorPipeline(unet, VEScheduler(method=config.eval.method)).save_pretrained(tmp)
    (tmp / SAMPLING_FILE).write_text(json.dumps(sampling_settings(config), indent=2) + "\n")
    if record is not None:
        (tmp / LAP_RECORD_FILE).write_text(json.dumps(record) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def saved_record(run_dir: Path, lap: int) -> dict | None:
    """The training record saved with lap ``lap`` (:func:`save_lap`), or None (laps saved before it was)."""
    path = lap_dir(run_dir, lap) / LAP_RECORD_FILE
    return json.loads(path.read_text()) if path.is_file() else None


class LapRecords:
    """``metrics.jsonl``: one JSON record per lap, written when the lap is saved, updated later.

    Files written before records were updated in place may hold several lines for a lap;
    the last one wins (as in the report scripts).
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def read(self) -> dict[int, dict]:
        """``{lap: record}`` (:func:`diffem.runs.read_records`)."""
        return read_records(self.path)

    def get(self, lap: int) -> dict | None:
        return self.read().get(lap)

    def write(self, record: dict) -> None:
        """Insert or replace the record of ``record["lap"]`` (main process only)."""
        records = self.read()
        records[int(record["lap"])] = record
        atomic_write_text(self.path, "".join(json.dumps(records[k]) + "\n" for k in sorted(records)))


class MStepCheckpoint:
    """The resumable state of one lap's M-step in ``folder``: versioned ``checkpoint-SSSSSSSS/``
    folders (accelerate state, EMA weights) and ``state.json`` naming the last complete one.

    ``state.json`` is replaced atomically and always names a complete checkpoint, so a kill
    at any point leaves a loadable state.
    """

    def __init__(self, folder: Path, accelerator):
        self.folder = Path(folder)
        self.accelerator = accelerator
        self.state_file = self.folder / "state.json"

    def last(self) -> Path | None:
        """The last complete checkpoint folder, or None."""
        if not self.state_file.exists():
            return None
        return self.folder / json.loads(self.state_file.read_text())["checkpoint"]

    def load(self, ema) -> tuple[int, list]:
        """Restore the prepared objects and ``ema``; returns ``(step, log)`` (``(0, [])`` if none)."""
        if not self.state_file.exists():
            return 0, []
        saved = json.loads(self.state_file.read_text())
        path = self.folder / saved["checkpoint"]
        self.accelerator.load_state(str(path))
        # Saved by the main process from its device: map onto this process's (cuda:k, not cuda:0).
        ema.load_state_dict(torch.load(path / "ema.pt", map_location=self.accelerator.device, weights_only=False))
        return saved["step"], saved["losses"]

    def save(self, step: int, log: list, ema) -> Path:
        """Save after optimizer step ``step`` (every process calls this)."""
        acc = self.accelerator
        tmp = self.folder / "checkpoint.tmp"
        if acc.is_main_process:
            self.folder.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        name = f"checkpoint-{step:08d}"
        if acc.is_main_process:
            torch.save(ema.state_dict(), tmp / "ema.pt")
            shutil.rmtree(self.folder / name, ignore_errors=True)
            os.replace(tmp, self.folder / name)
            atomic_write_text(self.state_file, json.dumps({"step": step, "losses": log, "checkpoint": name}))
            for old in self.folder.glob("checkpoint-*"):
                if old.name != name:
                    shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return self.folder / name
