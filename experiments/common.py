"""Helpers shared by the report scripts: read a run's outputs, describe the hardware."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import yaml


def read_run(run_dir: str | os.PathLike) -> tuple[dict, list[dict]]:
    """The resolved config and the metric records (one per lap, last record of a lap wins)."""
    run_dir = Path(run_dir)
    config_path, metrics_path = run_dir / "config.yaml", run_dir / "metrics.jsonl"
    if not config_path.exists() or not metrics_path.exists():
        raise FileNotFoundError(f"`{run_dir}` is not a finished run folder (needs config.yaml and metrics.jsonl)")
    config = yaml.safe_load(config_path.read_text())
    records: dict[int, dict] = {}
    for line in metrics_path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            records[record["lap"]] = record
    return config, [records[k] for k in sorted(records)]


def hardware() -> str:
    """A one-line description of the machine (CPU model and cores, or the GPU)."""
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
        threads = torch.get_num_threads()
    except ImportError:  # pragma: no cover
        threads = os.cpu_count()
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU only: {model}, {os.cpu_count()} cores, {threads} torch threads"


def fmt(value, digits: int = 3) -> str:
    """Format a number for a Markdown table ('-' for missing)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)
