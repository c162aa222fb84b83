"""The CIFAR-10 oracle-size search (issue 25, section 3): where the `cpu` budget buys the most quality.

    python experiments/cifar10-baselines/oracle_search.py run [--profile cpu] [--only NAME ...] [--run-root runs] [--em]
    python experiments/cifar10-baselines/oracle_search.py report [--profile cpu]
        [--table tables/cifar10_oracle_search.md] [--figure figures/cifar10_oracle_search.png]

``run`` trains each setting of ``oracle_search.yaml`` (section ``--profile``) as a clean-data
oracle into ``RUN_ROOT/oracle-search-<profile>-<name>`` (resumable: a rerun skips finished
laps), times its trained U-Net's MMPS E-step step with ``benchmarks/mmps_step.py`` (at the
E-step's batch, CG and torch threads), and copies ``config.yaml``, ``metrics.jsonl`` and that
timing (``estep_timing.json``) to ``experiments/cifar10-baselines/results/oracle-search-<profile>/<name>/``.

``run --em`` runs the EM level itself at a setting's split (``RUN_ROOT/oracle-search-<profile>-em-<name>``,
results in ``em-<name>/``): the projection below, measured, and the EM FID the split buys.

``report`` builds the table and the figure from those result folders only. Per setting: the
last lap's FID and KID, the M-step's seconds a step, the oracle run's wall time, and the
projected wall time of an EM level with the same split,

    T_EM(s) = T_lap0 + T_E * e(s) / e(b) + T_M * m(s) / m(b) + T_V * v(s) / v(b),

where ``T_*`` are the committed EM run's (``anchor``) measured phases (lap 0; E-steps;
M-steps; evaluations of laps 1 to 3), ``b`` is the profile's own setting (``baseline``), and
``e``, ``m``, ``v`` are E-step step, M-step and evaluation seconds measured for ``s`` and
``b`` on the same host. A setting is feasible when ``T_EM`` is within ``budget_min`` or within
the anchor's own measured time (the profile as committed always fits); the table says
whether the best feasible one lowers the oracle FID by ``min_gain`` or more.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import yaml

from diffem.cli import main as cli_main

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))
from common import fmt, hardware, read_run, save_figure  # noqa: E402

TIMING_FILE = "estep_timing.json"


def load_search(profile: str, path: Path = HERE / "oracle_search.yaml") -> dict:
    """The ``profile`` section of the search file.

    Raises:
        SystemExit: for an unknown profile, or a ``baseline`` that is not one of the settings.
    """
    sections = yaml.safe_load(path.read_text())
    if profile not in sections:
        raise SystemExit(f"oracle_search.py: no profile {profile!r} in {path} (have {sorted(sections)})")
    search = sections[profile]
    names = [s["name"] for s in search["settings"]]
    if search["baseline"] not in names:
        raise SystemExit(f"oracle_search.py: baseline {search['baseline']!r} is not a setting ({names})")
    return search


def results_dir(profile: str) -> Path:
    """Where a profile's search results live (the small files the table is built from)."""
    return Path(os.environ.get("RESULTS_DIR", HERE / "results")) / f"oracle-search-{profile}"


def time_estep(run_dir: Path, config: dict, threads: int, repeats: int) -> dict:
    """Seconds of one MMPS E-step step of the run's last-lap U-Net (``benchmarks/mmps_step.py``)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import mmps_step

    lap = run_dir / f"lap_{config['laps']:02d}"
    return mmps_step.main([
        "--prior", str(lap), "--batch", str(config["estep"]["batch_size"]), "--maxiter", str(config["estep"]["maxiter"]),
        "--threads", str(threads), "--repeats", str(repeats), "--warmup", "1", "--steps", str(config["estep"]["steps"]),
    ])


def run(args) -> int:
    search = load_search(args.profile)
    chosen = [s for s in search["settings"] if not args.only or s["name"] in args.only]
    unknown = set(args.only or ()) - {s["name"] for s in search["settings"]}
    if unknown:
        raise SystemExit(f"oracle_search.py: --only names no setting: {sorted(unknown)}")
    threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))
    for setting in chosen:
        if args.em:
            run_em_level(args, search, setting)
            continue
        run_dir = Path(args.run_root) / f"oracle-search-{args.profile}-{setting['name']}"
        sets = [f"data.drop_prob={search['level']}", *search["sets"], *setting["sets"]]
        print(f"== {setting['name']} -> {run_dir} (--set {' '.join(sets)})", flush=True)
        code = cli_main(["train", "cifar10", "--profile", search["base"], "--output-dir", str(run_dir),
                         *(["--no-progress"] if args.no_progress else []), "--set", *sets])
        if code != 0:
            raise SystemExit(f"oracle_search.py: `diffem train` failed for {setting['name']} (exit {code})")
        config, _ = read_run(run_dir)
        timing_path = run_dir / TIMING_FILE
        if not timing_path.exists():
            timing_path.write_text(json.dumps(time_estep(run_dir, config, threads, args.repeats), indent=1) + "\n")
        out = results_dir(args.profile) / setting["name"]
        out.mkdir(parents=True, exist_ok=True)
        for name in ("config.yaml", "metrics.jsonl", TIMING_FILE):
            (out / name).write_text((run_dir / name).read_text())
    return 0


def run_em_level(args, search: dict, setting: dict) -> None:
    """The EM level itself at a setting's split (lap 0, E-steps, M-steps, every evaluation of the profile):
    what the projection projects, measured. Results in ``<results>/em-<name>/``."""
    run_dir = Path(args.run_root) / f"oracle-search-{args.profile}-em-{setting['name']}"
    sets = [f"data.drop_prob={search['level']}", *setting["sets"]]
    print(f"== EM at {setting['name']} -> {run_dir} (--set {' '.join(sets)})", flush=True)
    code = cli_main(["train", "cifar10", "--profile", search["base"], "--output-dir", str(run_dir),
                     *(["--no-progress"] if args.no_progress else []), "--set", *sets])
    if code != 0:
        raise SystemExit(f"oracle_search.py: `diffem train` (EM) failed for {setting['name']} (exit {code})")
    out = results_dir(args.profile) / f"em-{setting['name']}"
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.yaml", "metrics.jsonl"):
        (out / name).write_text((run_dir / name).read_text())


def _em_level(folder: Path) -> dict | None:
    """The measured EM level of a setting (``em-<name>``), if it ran: wall time and last-lap FID / KID."""
    if not (folder / "metrics.jsonl").exists():
        return None
    _, records = read_run(folder)
    wall = sum(r["estep_time_s"] + r["mstep_time_s"] + r.get("eval_time_s", 0.0) for r in records)
    return {"wall_s": wall, "fid": records[-1]["fid"], "kid": records[-1]["kid"], "kid_std": records[-1]["kid_std"],
            "records": records}


def _row(name: str, folder: Path) -> dict:
    config, records = read_run(folder)
    timing = json.loads((folder / TIMING_FILE).read_text())
    last = records[-1]
    steps = sum(r["mstep_steps"] for r in records)
    mstep_s = sum(r["mstep_time_s"] for r in records)
    evals = [r["eval_time_s"] for r in records if r.get("eval_time_s")]
    return {
        "name": name, "preset": config["network"].get("preset", "cpu"), "params": timing["params"],
        "batch": config["mstep"]["batch_size"], "steps": steps, "laps": len(records),
        "fid": last["fid"], "kid": last["kid"], "kid_std": last["kid_std"],
        "mstep_s": mstep_s, "mstep_step_s": mstep_s / steps, "eval_s": evals[-1],
        "estep_step_s": timing["new_step_s"], "estep_batch": timing["batch"],
        "wall_s": mstep_s + sum(evals), "records": records, "em": _em_level(folder.parent / f"em-{name}"),
    }


def rows(profile: str) -> tuple[dict, list[dict], dict]:
    """The search section, one row per finished setting (with its projection), and the anchor's phases.

    Raises:
        SystemExit: if the baseline setting has no result (every projection is relative to it).
    """
    search = load_search(profile)
    found = [_row(s["name"], results_dir(profile) / s["name"]) for s in search["settings"]
             if (results_dir(profile) / s["name"] / TIMING_FILE).exists()]
    base = next((r for r in found if r["name"] == search["baseline"]), None)
    if base is None:
        raise SystemExit(f"oracle_search.py: no result for the baseline {search['baseline']!r} in {results_dir(profile)}")
    _, anchor = read_run(ROOT / search["anchor"])
    phases = {
        "lap0": sum(r["estep_time_s"] + r.get("eval_time_s", 0.0) for r in anchor if r["lap"] == 0),
        "estep": sum(r["estep_time_s"] for r in anchor if r["lap"] > 0),
        "mstep": sum(r["mstep_time_s"] for r in anchor),
        "eval": sum(r.get("eval_time_s", 0.0) for r in anchor if r["lap"] > 0),
    }
    phases["anchor_s"] = sum(phases.values())
    limit_s = max(60 * search["budget_min"], phases["anchor_s"])  # the profile's own setting always fits
    for r in found:
        r["projected_s"] = (phases["lap0"] + phases["estep"] * r["estep_step_s"] / base["estep_step_s"]
                            + phases["mstep"] * r["mstep_s"] / base["mstep_s"]
                            + phases["eval"] * r["eval_s"] / base["eval_s"])
        r["feasible"] = r["projected_s"] <= limit_s * (1 + 1e-9)
        r["gain"] = 1 - r["fid"] / base["fid"]
    if base["em"] is None:  # the profile's own EM level is the anchor run
        base["em"] = _em_level(ROOT / search["anchor"])
    return search, found, phases | {"limit_s": limit_s, "anchor_records": anchor}


def write_table(profile: str, path: Path) -> dict:
    """Write the Markdown table; returns the best feasible row."""
    search, found, phases = rows(profile)
    feasible = [r for r in found if r["feasible"]]
    best = min(feasible, key=lambda r: r["fid"])
    base = next(r for r in found if r["name"] == search["baseline"])
    lines = [
        f"# CIFAR-10 `{profile}`: the oracle-size search",
        "",
        "Which split of the budget between network size, M-step steps and batch gives the best clean-data "
        f"oracle? Each row is an oracle run (`train_on=clean`) of `experiments/cifar10/{search['base']}.yaml` "
        f"changed only by the row's settings ({len(found[0]['records'])} laps, the M-step steps split evenly), "
        f"scored at its last lap with the profile's protocol. Written by "
        "`experiments/cifar10-baselines/oracle_search.py report` from "
        f"`experiments/cifar10-baselines/results/oracle-search-{profile}/`.",
        "",
        "| setting | U-Net | parameters | batch | M-step steps | oracle FID | KID | FID vs profile | "
        "M-step s / step | MMPS s / step | oracle run (min) | EM level, projected (min) | fits | "
        "EM level, measured (min) | EM FID | EM KID |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in found:
        mark = " (profile)" if r is base else (" **best**" if r is best else "")
        change = "—" if r is base else f"{-100 * r['gain']:+.1f} %"
        e = r["em"]
        em = ("not run | | " if e is None else
              f"{e['wall_s'] / 60:.1f} | {e['fid']:.1f} | {e['kid']:.3f} ± {e['kid_std']:.3f}")
        lines.append(
            f"| `{r['name']}`{mark} | `{r['preset']}` | {r['params'] / 1e6:.2f} M | {r['batch']} | {r['steps']} | "
            f"{r['fid']:.1f} | {r['kid']:.3f} ± {r['kid_std']:.3f} | {change} | "
            f"{r['mstep_step_s']:.3f} | {r['estep_step_s']:.2f} | {r['wall_s'] / 60:.1f} | "
            f"{r['projected_s'] / 60:.1f} | {'yes' if r['feasible'] else 'no'} | {em} |")
    moved = best is not base and best["gain"] >= search["min_gain"]
    if best is base:
        verdict = f"**The profile's own setting, `{base['name']}`, is the best feasible one; the profile stays.**"
    else:
        verdict = (f"**The best feasible setting, `{best['name']}`, lowers the oracle FID by {100 * best['gain']:.1f} % "
                   f"({base['fid']:.1f} -> {best['fid']:.1f}): "
                   + (f"at least the {100 * search['min_gain']:.0f} % that moves the `{profile}` profile to it.**" if moved
                      else f"less than the {100 * search['min_gain']:.0f} % that would move the `{profile}` profile, "
                      "which stays.**"))
    lines += [
        "",
        verdict,
        "",
        f"- **Projection.** An EM level costs lap 0, the E-steps, the M-steps and the evaluations. The committed "
        f"EM run `{search['anchor']}` (the profile's setting at {100 * search['level']:.0f} % deleted) measured "
        f"{phases['lap0'] / 60:.1f} / {phases['estep'] / 60:.1f} / {phases['mstep'] / 60:.1f} / "
        f"{phases['eval'] / 60:.1f} min for them ({phases['anchor_s'] / 60:.1f} min in all). Each row scales each phase "
        "but lap 0 (which has no network) by its cost over the profile row's, both measured here: the M-step and "
        "evaluation seconds from the oracle runs' records, the MMPS E-step step from `benchmarks/mmps_step.py` "
        f"on the row's trained U-Net at the E-step's batch of {base['estep_batch']}. A row fits when its projection "
        f"is within {search['budget_min']} min, or within the profile's own measured level "
        f"({phases['limit_s'] / 60:.1f} min here).",
        "- **EM columns.** The EM level itself (lap 0 and 3 laps at the row's split, 75 % deleted, evaluated every "
        "lap), where it ran (`oracle_search.py run --em --only NAME`); the profile's row is the committed anchor run. "
        f"The host speed differs between runs: the profile's M-step took {base['mstep_step_s']:.3f} s a step in the "
        f"search against {phases['mstep'] / sum(r['mstep_steps'] for r in phases['anchor_records'] if r['lap'] > 0):.3f} "
        "s in the anchor, so compare a measured level with its projection scaled by that ratio.",
        f"- **Sample counts.** FID / KID of {base['records'][-1]['fid_samples']:,} samples against "
        f"{base['records'][-1]['fid_reference']:,} train images: FIDs this small-sample are biased upwards and "
        "comparable only with each other.",
        f"- **Hardware.** Search runs: {hardware([r['records'][-1] for r in found])}. Anchor: "
        f"{hardware(phases['anchor_records'])}. Runs shared the host with other work, so the seconds are as measured, "
        "with that noise.",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return best


def write_figure(profile: str, path: Path) -> None:
    """Oracle FID against the projected EM-level minutes, one point per setting, the budget as a line."""
    search, found, _ = rows(profile)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for r in found:
        ax.scatter(r["projected_s"] / 60, r["fid"], color="C0" if r["preset"] == "cpu" else "C1")
        ax.annotate(r["name"], (r["projected_s"] / 60, r["fid"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axvline(search["budget_min"], color="gray", linestyle="--", linewidth=1, label=f"budget {search['budget_min']} min")
    for preset, colour in (("cpu", "C0"), ("tiny", "C1")):
        ax.scatter([], [], color=colour, label=f"`{preset}` U-Net")
    ax.legend(fontsize=7, loc="upper right")
    ax.set_xlabel("EM level, projected wall time (min)")
    ax.set_ylabel("oracle FID (last lap)")
    save_figure(fig, path, f"CIFAR-10 `{profile}`: oracle FID against the cost of an EM level")


def report(args) -> int:
    suffix = "" if args.profile == "cpu" else f"_{args.profile}"
    table = Path(args.table or ROOT / f"tables/cifar10_oracle_search{suffix}.md")
    figure = Path(args.figure or ROOT / f"figures/cifar10_oracle_search{suffix}.png")
    best = write_table(args.profile, table)
    write_figure(args.profile, figure)
    print(f"wrote {table} and {figure}; best feasible: {best['name']} (FID {best['fid']:.1f})")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="train the settings' oracles and time their E-step")
    p_run.add_argument("--profile", default="cpu")
    p_run.add_argument("--only", nargs="+", default=None, metavar="NAME")
    p_run.add_argument("--run-root", default=os.environ.get("RUN_ROOT", "runs"))
    p_run.add_argument("--repeats", type=int, default=5, help="timed MMPS steps per setting")
    p_run.add_argument("--no-progress", action="store_true", help="no progress bars")
    p_run.add_argument("--em", action="store_true",
                       help="run the EM level at each chosen setting's split instead of its oracle (the projection, measured)")
    p_rep = sub.add_parser("report", help="write the table and the figure from the results")
    p_rep.add_argument("--profile", default="cpu")
    p_rep.add_argument("--table", default=None)
    p_rep.add_argument("--figure", default=None)
    args = parser.parse_args(argv)
    return run(args) if args.command == "run" else report(args)


if __name__ == "__main__":
    sys.exit(main())
