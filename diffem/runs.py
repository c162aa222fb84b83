"""The run folder: its layout, and the one module that reads it.

A run (``diffem train``, :mod:`diffem.em`) writes everything into one folder::

    config.yaml           the resolved configuration (CONFIG_FILE)
    observations/         the observation set (y and operator parameters; no x) (OBSERVATIONS_DIR)
    metrics.jsonl         one JSON record per saved lap, updated when its evaluation lands (METRICS_FILE)
    lap_KK/               the prior after lap KK: a DiffusionPriorPipeline folder (model_index.json,
                          unet/, scheduler/) plus sampling.json, the E-step's and the evaluation's
                          sampler settings (SAMPLING_FILE), and lap_record.json, the lap's training
                          record as saved with it (LAP_RECORD_FILE)
    eval/lap_KK.pt        small evaluation artifacts (samples for figures) (EVAL_DIR)
    work/lap_KK/          E-step chunks and the last M-step checkpoint of an unfinished lap (WORK_DIR)
    hub_uploads.json      the ledger of ``diffem publish`` (:mod:`diffem.hub.publish`)

Readers (the report scripts, ``diffem publish``, ``diffem reconstruct``, the trainer on resume)
go through this module: :func:`lap_dir`, :func:`is_complete`, :func:`finished_laps`,
:func:`read_records`, :func:`read_run`, :func:`load_sampling_settings`, :func:`prior_folder`.
Writing stays with the trainer (:mod:`diffem.em.checkpoint`, atomic replaces), which takes its
names and paths from here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

__all__ = [
    "CONFIG_FILE",
    "METRICS_FILE",
    "SAMPLING_FILE",
    "LAP_RECORD_FILE",
    "OBSERVATIONS_DIR",
    "EVAL_DIR",
    "WORK_DIR",
    "PIPELINE_INDEX",
    "RunFolderError",
    "Run",
    "lap_name",
    "lap_dir",
    "is_complete",
    "finished_laps",
    "read_records",
    "read_config",
    "read_run",
    "load_sampling_settings",
    "prior_folder",
]

#: The resolved configuration of the run.
CONFIG_FILE = "config.yaml"
#: One JSON record per saved lap (the last line of a lap wins).
METRICS_FILE = "metrics.jsonl"
#: The file of a saved lap that holds its E-step and evaluation sampler settings.
SAMPLING_FILE = "sampling.json"
#: The lap's training record (E-step and M-step statistics), saved inside the lap folder with the
#: prior, so that a kill between the save and ``metrics.jsonl`` loses nothing (diffem.em.trainer).
LAP_RECORD_FILE = "lap_record.json"
#: The observation set (a ``datasets`` folder).
OBSERVATIONS_DIR = "observations"
#: Evaluation artifacts, ``eval/lap_KK.pt``.
EVAL_DIR = "eval"
#: Scratch work of unfinished laps, ``work/lap_KK/``.
WORK_DIR = "work"
#: The file that marks a pipeline folder (a lap folder is renamed into place with it, last).
PIPELINE_INDEX = "model_index.json"

_LAP = re.compile(r"lap_(\d+)")


class RunFolderError(ValueError):
    """A folder that is not a run folder, or a run file that does not parse; the message names the file."""


@dataclass
class Run:
    """What a run folder says: its config (plain data), one metrics record per lap, finished laps."""

    run_dir: Path
    config: dict
    config_text: str
    records: dict[int, dict]
    laps: list[int] = field(default_factory=list)


def lap_name(lap: int) -> str:
    """The folder name of a lap: ``lap_KK`` (``lap_03``)."""
    return f"lap_{lap:02d}"


def lap_dir(run_dir: Path, lap: int) -> Path:
    """The pipeline folder of a lap: ``run_dir/lap_KK``."""
    return Path(run_dir) / lap_name(lap)


def is_complete(folder: Path) -> bool:
    """Whether a lap folder was saved completely (it is renamed into place last)."""
    return (Path(folder) / PIPELINE_INDEX).exists()


def finished_laps(run_dir) -> list[int]:
    """Laps of ``run_dir`` with a saved pipeline (``lap_KK/model_index.json``), ascending."""
    laps = []
    for p in Path(run_dir).glob("lap_*"):
        m = _LAP.fullmatch(p.name)
        if m and p.is_dir() and (p / PIPELINE_INDEX).is_file():
            laps.append(int(m.group(1)))
    return sorted(laps)


def read_records(path) -> dict[int, dict]:
    """The records of a ``metrics.jsonl`` file, ``{lap: record}`` (``{}`` if it does not exist).

    Blank lines are skipped; of several lines of one lap (files written before records were
    updated in place), the last one wins; a line that is not a mapping with an integer
    ``lap`` is ignored.

    Raises:
        RunFolderError: for a line that is not JSON (naming the file and the line).
    """
    path = Path(path)
    records: dict[int, dict] = {}
    if not path.is_file():
        return records
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise RunFolderError(f"`{path}` line {i} is not JSON") from None
        if isinstance(record, dict) and isinstance(record.get("lap"), int):
            records[record["lap"]] = record  # a resumed lap's newer line wins
    return records


def read_config(run_dir) -> tuple[dict, str]:
    """The ``config.yaml`` of a run folder: ``(plain data, the file's text)``.

    Raises:
        RunFolderError: when ``run_dir`` has no ``config.yaml``, or it is not a YAML mapping.
    """
    config_file = Path(run_dir) / CONFIG_FILE
    if not config_file.is_file():
        raise RunFolderError(f"`{run_dir}` is not a run folder: no config.yaml (run `diffem train` first)")
    text = config_file.read_text()
    try:
        config = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise RunFolderError(f"`{config_file}` is not valid YAML: {e}") from None
    if not isinstance(config, dict):
        raise RunFolderError(f"`{config_file}` must hold a mapping")
    return config, text


def read_run(run_dir) -> Run:
    """Read ``config.yaml``, ``metrics.jsonl`` and the finished laps of a run folder.

    Raises:
        RunFolderError: when ``run_dir`` is not a run folder or its files do not parse.
    """
    run_dir = Path(run_dir)
    config, text = read_config(run_dir)
    return Run(run_dir, config, text, read_records(run_dir / METRICS_FILE), finished_laps(run_dir))


def load_sampling_settings(folder) -> dict:
    """The sampler settings a lap was saved with, ``{"estep": {...}, "eval": {...}}``.

    ``estep``: ``method`` ("ddpm", "ddim", "pc"), ``num_inference_steps``, ``corrections``,
    ``delta`` (PC only), ``maxiter`` and ``tol`` (CG of MMPS), and the posterior method
    (``guidance``, ``covariance``, ``guidance_options``: keyword arguments of
    :func:`diffem.sampling.sample_posterior`); ``eval``: ``method`` and
    ``num_inference_steps`` of the evaluation's unconditional sampler.

    Raises:
        FileNotFoundError: for a folder saved without them (laps saved before they were recorded).
    """
    path = Path(folder) / SAMPLING_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: this lap was saved without its sampler settings")
    return json.loads(path.read_text())


def prior_folder(path) -> Path:
    """The pipeline folder of ``path``: ``path`` itself if it is one (``model_index.json``), else,
    for a run folder, its last finished lap.

    Raises:
        FileNotFoundError: if ``path`` is not a folder, or neither a saved prior nor a run with a
            finished lap.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"prior folder not found: {path}")
    if is_complete(path):
        return path
    laps = finished_laps(path)
    if not laps:
        raise FileNotFoundError(f"{path} is neither a saved prior (model_index.json) nor a run with a finished lap")
    return lap_dir(path, laps[-1])
