"""Helpers shared by the report scripts: read a run's outputs, describe the hardware."""

from __future__ import annotations

import os
from pathlib import Path

from diffem import runs


def read_run(run_dir: str | os.PathLike) -> tuple[dict, list[dict]]:
    """The resolved config and the metric records (one per lap, last record of a lap wins), read by
    :func:`diffem.runs.read_run`.

    Raises:
        FileNotFoundError: unless the folder holds ``config.yaml`` and ``metrics.jsonl``.
        diffem.runs.RunFolderError: if they do not parse.
    """
    run_dir = Path(run_dir)
    if not (run_dir / runs.CONFIG_FILE).exists() or not (run_dir / runs.METRICS_FILE).exists():
        raise FileNotFoundError(f"`{run_dir}` is not a finished run folder (needs config.yaml and metrics.jsonl)")
    run = runs.read_run(run_dir)
    return run.config, [run.records[k] for k in sorted(run.records)]


def hardware(records: list[dict] = ()) -> str:
    """The machine(s) the runs were measured on, from their records' ``hardware`` field.

    Records written before runs stored it fall back to the machine writing the report,
    said as such.
    """
    from diffem.em import describe_hardware

    if not records:
        return f"the machine writing this report: {describe_hardware()}"
    parts = sorted({r["hardware"] for r in records if r.get("hardware")})
    missing = sum(1 for r in records if not r.get("hardware"))
    if missing:
        which = "the runs" if missing == len(records) else f"{missing} of {len(records)} lap records"
        parts.append(f"not recorded by {which} (written before records named it); "
                     f"the machine writing this report: {describe_hardware()}")
    return "; ".join(parts)


def fmt(value, digits: int = 3) -> str:
    """Format a number for a Markdown table ('-' for missing)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def report_main(argv, doc: str, name: str, write_table, write_figure, experiment_dir) -> int:
    """The command line shared by the report scripts.

    ``report.py RUN_DIR [--table T] [--figure F]`` writes the table and the figure of a run
    (defaults: ``tables/<name>.md``, ``figures/<name>.png``) and, unless the run is a smoke
    run, copies its ``config.yaml`` and ``metrics.jsonl`` to
    ``experiments/<name>/results/<profile>/`` (the small files the table is built from).
    """
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    root = Path(experiment_dir).resolve().parents[1]
    parser.add_argument("--table", default=str(root / f"tables/{name}.md"))
    parser.add_argument("--figure", default=str(root / f"figures/{name}.png"))
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    config, records = read_run(run_dir)
    write_table(config, records, Path(args.table), run_dir)
    write_figure(config, records, Path(args.figure), run_dir)
    if config["profile"] != "smoke":
        results = Path(experiment_dir) / "results" / config["profile"]
        results.mkdir(parents=True, exist_ok=True)
        for file in (runs.CONFIG_FILE, runs.METRICS_FILE):
            (results / file).write_text((run_dir / file).read_text())
    print(f"wrote {args.table} and {args.figure}")
    return 0


def save_figure(fig, path, title: str, dpi: int = 110, fontsize: int = 10) -> None:
    """Title, lay out, write (creating the folder) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
