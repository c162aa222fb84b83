"""Forking a run: a new run that shares the first laps of another, then goes its own way.

``fork_run(source, lap, output_dir, overrides)`` copies the source run's observations, laps
``0..lap`` (pipelines, evaluation artifacts and records) into ``output_dir`` and writes the
new configuration there, so that ``diffem train`` on it resumes at lap ``lap + 1``. Only keys
that act after lap ``lap`` may change: the E-step's and M-step's (``estep.*``, ``mstep.*``,
``precision``), ``laps`` and the evaluation and publishing keys. The data, network, lap 0
and seed define the copied laps and must stay.

This is how the covariance ablation shares laps 0 and 1 between its rows (issue 24): the
E-step of lap 1 samples under the lap-0 Gaussian, whose exact covariance is used whatever
``estep.covariance`` says, so laps 0 and 1 do not depend on the heuristic; a copy is the
same files a fresh run computes, without recomputing them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from ..config import ConfigError, EMConfig, config_from_dict, config_to_dict, load_config
from .checkpoint import LapRecords, changed_keys, atomic_write_text, is_complete, lap_dir
from .estep import estep_covariance

__all__ = ["fork_run", "FORKABLE_SECTIONS", "FORK_FILE"]

#: Config sections (or top-level keys) a fork may change: they act only on later laps.
FORKABLE_SECTIONS = ("estep", "mstep", "precision", "timeout_minutes", "laps", "eval", "hub", "output_dir")
#: The file a fork writes in its run folder: ``{"source", "lap", "changed"}``.
FORK_FILE = "fork.json"


def _value(tree: dict, key: str):
    """The value of a dotted ``key`` in a nested mapping (None when absent)."""
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def fork_run(source, lap: int, output_dir, overrides: list[str] | None = None, eval_data_keys=()) -> EMConfig:
    """Create the run ``output_dir`` from laps ``0..lap`` of the run ``source``.

    Arguments:
        source: A run folder (``config.yaml``, ``observations/``, ``lap_KK/``, ``metrics.jsonl``).
        lap: The last lap to share, ``>= 0``; it must be saved (complete) in ``source``.
        output_dir: The new run folder; it must not exist yet (or be an identical earlier fork,
            which is then left as it is, so that a driver may call this again on resume).
        overrides: ``["estep.covariance=sigma_t", ...]``, dotted keys as ``diffem train --set``.
        eval_data_keys: The task's evaluation-only ``data.*`` keys, which may change too.

    Returns:
        The new run's validated :class:`~diffem.config.EMConfig`.

    Raises:
        ConfigError: ``source`` is not a run folder, lap ``lap`` is not saved there, an override
            changes a key the copied laps depend on, or ``output_dir`` holds another run.
    """
    source, output_dir = Path(source), Path(output_dir)
    if not (source / "config.yaml").exists():
        raise ConfigError(f"`{source}` is not a run folder (no config.yaml)")
    if lap < 0 or not is_complete(lap_dir(source, lap)):
        raise ConfigError(f"lap {lap} of `{source}` is not saved (fork a finished lap)")
    old = yaml.safe_load((source / "config.yaml").read_text()) or {}
    # The overrides parse as `diffem train --set` parses them; the comparison is the resume check's
    # (a key added to the config since the source ran is unchanged, except under `data`).
    config = load_config(path=source / "config.yaml", overrides=list(overrides or []))
    config.output_dir = str(output_dir)
    after = config_to_dict(config)
    allowed = {f"data.{k}" for k in eval_data_keys}
    changed = [k for k in changed_keys(old, after) if k != "output_dir"]
    refused = [k for k in changed if k.split(".")[0] not in FORKABLE_SECTIONS and k not in allowed]
    if refused:
        raise ConfigError(f"a fork may change only keys that act after lap {lap} ({', '.join(FORKABLE_SECTIONS)} and "
                          f"the evaluation's data keys), not {', '.join(refused)}")
    meta = {"source": str(source), "lap": lap, "changed": {k: _value(after, k) for k in changed}}
    if output_dir.exists():
        existing = output_dir / FORK_FILE
        if existing.exists() and json.loads(existing.read_text()) == meta:
            return config
        raise ConfigError(f"`{output_dir}` exists and is not this fork of `{source}` at lap {lap}: choose another folder")
    tmp = output_dir.with_name(output_dir.name + ".fork-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copytree(source / "observations", tmp / "observations")
    for k in range(lap + 1):
        shutil.copytree(lap_dir(source, k), lap_dir(tmp, k))
        art = source / "eval" / f"lap_{k:02d}.pt"
        if art.exists():
            (tmp / "eval").mkdir(exist_ok=True)
            shutil.copy2(art, tmp / "eval" / art.name)
    records = LapRecords(source / "metrics.jsonl").read()
    out = LapRecords(tmp / "metrics.jsonl")
    source_config = config_from_dict(old | {"output_dir": str(source)})
    for k in range(lap + 1):
        if k in records:
            record = records[k] | {"copied_from": str(source)}
            if k >= 1 and "estep_covariance" not in record:  # records written before it was recorded
                record["estep_covariance"] = estep_covariance(source_config, k)
            out.write(record)
    (tmp / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    atomic_write_text(tmp / FORK_FILE, json.dumps(meta, indent=1) + "\n")
    tmp.rename(output_dir)
    return config
