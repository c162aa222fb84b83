"""Write tables/cifar10_baselines.md and figures/cifar10_baselines.png: the CIFAR-10 references at equal compute.

    python experiments/cifar10-baselines/report.py [RUN_DIR ...] [--profile cpu] [--base cpu]
        [--results-dir experiments/cifar10-baselines/results] [--em-results experiments/cifar10/results]
        [--table tables/cifar10_baselines.md] [--figure figures/cifar10_baselines.png]

Each RUN_DIR is one row (what experiments/cifar10-baselines/run.sh just ran); its method is
read from its config: ``train_on: clean`` is the oracle, ``train_on: observed`` naive training,
``estep.guidance: dps`` EM with a DPS E-step, ``estep.guidance: mmps`` EM with MMPS (the
cifar10 experiment's own runs). A (method, level) without a run is taken from the committed
results: ``<results-dir>/<profile>-<method>-pNN/`` for the references, ``<em-results>/<base>-pNN/``
for EM-MMPS; otherwise it is "not run", never filled in. The table says where every row
comes from. Unless the profile is ``smoke``, each run's ``config.yaml``, ``metrics.jsonl`` and
``figure_images.pt`` are copied there (EM-MMPS runs to ``<em-results>``, where
tables/cifar10.md finds them).

Every number comes from the runs' ``metrics.jsonl``: the FID / KID of the last lap (the row at
equal compute: every method spends the same M-step steps), the wall time (E-step + M-step +
evaluation of every lap, lap 0 included), and the fraction of the naive -> oracle gap closed,
(FID_naive - FID_method) / (FID_naive - FID_oracle), and its KID version, at the same level.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))
from common import fmt, hardware, read_run, save_figure  # noqa: E402


def _cifar10_report():
    """experiments/cifar10/report.py as a module (its Level, figure images and mosaic are reused)."""
    spec = importlib.util.spec_from_file_location("cifar10_report", HERE.parent / "cifar10" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


C10 = _cifar10_report()
Level, level_tag, pct, FIGURE_IMAGES = C10.Level, C10.level_tag, C10.pct, C10.FIGURE_IMAGES

#: Method key -> the table's name and one line on what it is.
METHODS = {
    "oracle": ("oracle (clean images)", "the same network and M-step trained on the clean images behind the "
               "observations: no E-step, no lap 0 (ground truth EM never sees; the ceiling at this compute)"),
    "naive": ("naive (masked as clean)", "trained on A^T y, the masked images as if they were clean, deleted "
              "pixels 0 (mid-grey in [-2, 2] units): no E-step, no lap 0 (the floor EM must beat)"),
    "em-dps": ("EM, DPS E-step", "EM whose E-step is DPS (EMDiffusion's E-step, Bai et al. 2024) through "
               "`DPSGuidance`, from the lap-0 Gaussian (not EMDiffusion's 50 clean images)"),
    "ambient": ("Ambient Diffusion loss", "Daras et al. 2023's objective (`train_on: ambient`, "
                "`diffem.denoiser.AmbientLoss`): the U-Net also sees the mask (6 input channels), a further "
                "delta = 0.1 of the observed pixels is hidden from its input at every step and the loss is taken on "
                "all observed pixels; sampled with Ambient's fixed-mask sampler (one mask of survival "
                "(1 - p)(1 - delta) shared by the samples); no E-step, no lap 0. Its loss keeps the hidden pixels' "
                "irreducible error, which diffem's EDM weighting (1 / sigma^2 + 1, shared by every row) magnifies "
                "at small sigma: see its train loss"),
    "em-mmps": ("EM, MMPS E-step (diffem)", "the project's method: the cifar10 experiment's run at the level"),
}
#: Published CIFAR-10 numbers (method, level, FID, protocol).
PUBLISHED = [
    ("Rozet et al. 2024 (EM + MMPS)", 0.25, 5.88, "32 laps, ~60 M-parameter U-Net, 50k samples against the train set"),
    ("Rozet et al. 2024 (EM + MMPS)", 0.5, 6.76, "as above"),
    ("Rozet et al. 2024 (EM + MMPS)", 0.75, 13.18, "as above"),
    ("AmbientDiffusion (Daras et al. 2023)", 0.6, 28.88, "further corruption delta = 0.1; 50k samples against the "
     "train set (as quoted by Rozet et al. 2024)"),
    ("EMDiffusion (Bai et al. 2024)", 0.6, 21.08, "EM with a DPS E-step started from 50 clean images; 50k samples "
     "against the train set (Bai et al. 2024, Table 1)"),
]
NOT_IMPLEMENTED: dict[str, str] = {}
SHOWN = 16  # prior samples per method in the figure


def method_of(config: dict) -> str:
    """The row a run's config is: oracle, naive, em-dps or em-mmps."""
    train_on = config.get("train_on", "posterior")
    if train_on == "clean":
        return "oracle"
    if train_on == "observed":
        return "naive"
    if train_on == "ambient":
        return "ambient"
    guidance = config.get("estep", {}).get("guidance", "mmps")
    return {"dps": "em-dps", "mmps": "em-mmps"}.get(guidance, f"em-{guidance}")


class Row(Level):
    """One (method, level): a :class:`Level` of the cifar10 report with its method."""

    def __init__(self, method: str, p: float, *args, **kwargs):
        super().__init__(p, *args, **kwargs)
        self.method = method

    @property
    def last(self) -> dict | None:
        """The record of the last lap with an FID."""
        scored = [r for r in self.records if r.get("fid") is not None]
        return scored[-1] if scored else None

    @property
    def wall_s(self) -> float:
        return sum(r.get("estep_time_s", 0) + r.get("mstep_time_s", 0) + r.get("eval_time_s", 0) for r in self.records)

    @property
    def mstep_steps(self) -> int:
        return sum(int(r.get("mstep_steps", 0)) for r in self.records)


def _committed(folder: Path, method: str, p: float | None = None) -> Row | None:
    if (folder / "config.yaml").exists() and (folder / "metrics.jsonl").exists():
        config, records = read_run(folder)
        return Row(method, float(config["data"]["drop_prob"]) if p is None else p, folder, config, records,
                   source="committed")
    return None


def collect(run_dirs: list[Path], results_dir: Path, em_results: Path, profile: str, base: str,
            levels: list[float], naive_levels: list[float], oracle_level: float,
            laps: int | None = None) -> dict[tuple[str, float], Row]:
    """Rows by (method, level): this report's runs, else committed results, else absent. With ``laps`` (the
    base profile's), a run of another lap count (e.g. the ablation's shared run, trained to lap 1) is left
    out: the rows are at equal compute."""
    found: dict[tuple[str, float], Row] = {}
    for run_dir in run_dirs:
        if not ((run_dir / "config.yaml").exists() and (run_dir / "metrics.jsonl").exists()):
            continue  # not started
        config, records = read_run(run_dir)
        if laps is not None and int(config["laps"]) != laps:
            print(f"report: `{run_dir}` runs {config['laps']} laps, the profile {laps}: not at equal compute, left out",
                  file=sys.stderr)
            continue
        if not records or max(r["lap"] for r in records) < int(config["laps"]) or records[-1].get("fid") is None:
            print(f"report: `{run_dir}` has not finished its last lap's evaluation: left out", file=sys.stderr)
            continue
        if config.get("experiment") != "cifar10":
            raise ValueError(f"`{run_dir}` is a {config.get('experiment')!r} run, not cifar10")
        method = method_of(config)
        p = float(config["data"]["drop_prob"])
        found[(method, p)] = Row(method, p, run_dir, config, records, source="run")
    wanted = [("oracle", oracle_level)] + [("naive", p) for p in naive_levels]
    wanted += [(m, p) for m in ("em-dps", "ambient") for p in levels]
    wanted += [("em-mmps", p) for p in sorted(set(levels) | set(naive_levels))]  # EM beside naive at every level
    for method, p in wanted:
        if (method, p) in found:
            continue
        if method == "em-mmps":
            row = _committed(em_results / f"{base}-{level_tag(p)}", method)
        elif method == "oracle":
            row = _committed(results_dir / f"{profile}-oracle", method)
        else:
            row = _committed(results_dir / f"{profile}-{method}-{level_tag(p)}", method)
        if row is not None:
            found[(method, p)] = row
    return found


def _oracle(found: dict) -> Row | None:
    rows = [r for (m, _), r in found.items() if m == "oracle" and r.ran]
    return rows[0] if rows else None


def gap_closed(method_value, naive_value, oracle_value) -> float | None:
    """(naive - method) / (naive - oracle): 0 at naive, 1 at the oracle (None if undefined)."""
    if None in (method_value, naive_value, oracle_value) or naive_value == oracle_value:
        return None
    return (naive_value - method_value) / (naive_value - oracle_value)


def _kid(record: dict | None) -> str:
    if record is None or record.get("kid") is None:
        return "-"
    return f"{record['kid']:.4f} ± {record.get('kid_std', 0.0):.4f}"


def _source(row: Row | None, method: str) -> str:
    if row is None or not row.ran:
        return NOT_IMPLEMENTED.get(method, "not run")
    where = "this run" if row.source == "run" else "committed"
    return f"{where} (`{C10._rel(row.folder)}`)"


def _pct_or_dash(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f} %"


def write_table(found: dict, path: Path, profile: str, levels: list[float], naive_levels: list[float]) -> None:
    oracle = _oracle(found)
    o_rec = oracle.last if oracle else None
    ran = [r for r in found.values() if r.ran]
    lines = [
        "# CIFAR-10 references at equal compute: is EM the limit, or the compute?",
        "",
        "Written by `experiments/cifar10-baselines/report.py` from the runs' `metrics.jsonl` "
        f"(`bash reproduce.sh cifar10-baselines --profile {profile}`; `REPORT_ONLY=1` rebuilds it from the committed "
        "results). Every row is a run of the cifar10 experiment's profile "
        f"`{ran[0].config['profile'] if ran else '?'}` changed only by its method's keys: the same network, the same "
        "M-step (steps, batch, schedule, augmentation) at every lap, the same "
        f"{ran[0].config['data']['observations'] if ran else '?'} observations and the same FID / KID protocol. "
        "The row at equal compute is each run's last lap.",
        "",
        "What each row is:",
        "",
    ]
    lines += [f"- **{name}**: {what}." for name, what in METHODS.values()]
    lines += [
        "",
        "Gap closed: (FID_naive - FID_method) / (FID_naive - FID_oracle) at the same level (0 %: no better than "
        "training on the masked images; 100 %: as good as the clean images), and the same with KID. Wall time: "
        "E-step + M-step + evaluation of every lap (lap 0 included), on the hardware below.",
        "",
    ]
    for p in levels:
        naive = found.get(("naive", p))
        n_rec = naive.last if naive else None
        em_wall = found[("em-mmps", p)].wall_s if ("em-mmps", p) in found else None
        lines += [
            f"## {pct(p)} of the pixels deleted",
            "",
            "| method | FID | KID | gap closed (FID) | gap closed (KID) | M-step steps | train loss (last lap) | wall time (min) | wall / EM-MMPS | source |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        gaps = {}
        for method in METHODS:
            row = oracle if method == "oracle" else found.get((method, p))
            rec = row.last if row is not None and row.ran else None
            if rec is None:
                lines.append(f"| {METHODS[method][0]} | - | - | - | - | - | - | - | - | {_source(row, method)} |")
                continue
            fid_gap = gap_closed(rec["fid"], n_rec and n_rec["fid"], o_rec and o_rec["fid"])
            kid_gap = gap_closed(rec.get("kid"), n_rec and n_rec.get("kid"), o_rec and o_rec.get("kid"))
            if method in ("oracle", "naive"):
                fid_gap = kid_gap = None
            ratio = f"{row.wall_s / em_wall:.2f}" if em_wall else "-"
            if fid_gap is not None:
                gaps[method] = (fid_gap, kid_gap)
            lines.append(
                f"| {METHODS[method][0]} | {rec['fid']:.1f} | {_kid(rec)} | {_pct_or_dash(fid_gap)} | "
                f"{_pct_or_dash(kid_gap)} | {row.mstep_steps} | {fmt(rec.get('train_loss'))} | {row.wall_s / 60:.1f} | "
                f"{ratio} | {_source(row, method)} |"
            )
        if "em-mmps" in gaps:
            ours = gaps["em-mmps"]
            for method, (fg, kg) in gaps.items():
                if method == "em-mmps":
                    continue
                worse = [name for name, a, b in (("FID", ours[0], fg), ("KID", ours[1], kg))
                         if a is not None and b is not None and a < b]
                if worse:
                    lines += ["", f"**EM-MMPS closes less of the gap than {METHODS[method][0]}** at this level by "
                              f"{' and '.join(worse)} (measured; see the rows above)."]
        if oracle is not None and oracle.ran:
            lines += ["", f"The oracle is one run (its clean images do not depend on the level); it is repeated at every level."]
        lines.append("")

    lines += [
        "## Naive training and EM at every level",
        "",
        "| deleted | naive FID | naive KID | EM-MMPS FID | EM-MMPS KID | EM - naive (FID) | source (naive; EM) |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in sorted(set(naive_levels)):
        naive, em = found.get(("naive", p)), found.get(("em-mmps", p))
        n_rec = naive.last if naive is not None and naive.ran else None
        e_rec = em.last if em is not None and em.ran else None
        diff = f"{e_rec['fid'] - n_rec['fid']:+.1f}" if n_rec and e_rec else "-"
        lines.append(
            f"| {pct(p)} | {fmt(n_rec and n_rec['fid'], 4)} | {_kid(n_rec)} | {fmt(e_rec and e_rec['fid'], 4)} | "
            f"{_kid(e_rec)} | {diff} | {_source(naive, 'naive')}; {_source(em, 'em-mmps')} |"
        )
    if o_rec is not None:
        lines += ["", f"Oracle: FID {o_rec['fid']:.1f}, KID {_kid(o_rec)}."]
        per_lap = [r for r in oracle.records if r.get("fid") is not None]
        if len(per_lap) > 1:
            lines.append("Oracle by lap (256 more M-step steps each): " + ", ".join(
                f"lap {r['lap']} FID {r['fid']:.1f}" for r in per_lap) + ".")
    real = [r for row in ran for r in row.records if r.get("real_fid") is not None]
    if real:
        r = real[-1]
        lines.append(f"Real images at the same counts ({r['real_images']} held-out test images against the same "
                     f"reference set): FID {r['real_fid']:.1f}, the floor of this protocol.")
    lines += [
        "",
        "## Published numbers (other protocols: not comparable with the rows above)",
        "",
        "| method | deleted | FID | protocol |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {pct(p)} | {fid:g} | {proto} |" for name, p, fid, proto in PUBLISHED]
    if ran:
        ev, d = ran[0].config["eval"], ran[0].config["data"]
        lines += [
            "",
            f"This table's FID / KID: {ev['samples']} unconditional samples ({ev['method'].upper()} {ev['steps']} steps) "
            f"against {d['fid_reference']} clean train images (the offline JPEG copy); such small-sample FIDs are "
            "biased upwards and comparable only with each other.",
        ]
    dps = [r for r in ran if r.method == "em-dps"]
    if dps:
        lines.append(f"EM-DPS step size zeta = {dps[0].config['estep']['dps_zeta']:g}, chosen by "
                     "`experiments/cifar10-baselines/dps_zeta.py` on the data consistency of E-step samples under "
                     "the lap-0 Gaussian (no clean image; `results/dps_zeta-*.json`).")
    lines += ["", f"Hardware: {hardware([r for row in ran for r in row.records])}.", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def write_figure(found: dict, path: Path, p: float, per_row: int = 8) -> None:
    """A grid of prior samples (the last lap's) per method at level ``p``."""
    oracle = _oracle(found)
    rows = [(m, oracle if m == "oracle" else found.get((m, p))) for m in METHODS]
    fig, axes = plt.subplots(1, len(rows), figsize=(2.6 * len(rows), 2.1), squeeze=False)
    for ax, (method, row) in zip(axes[0], rows):
        im = row.figure_images() if row is not None and row.ran else None
        if not im or "prior" not in im:
            C10._blank(ax, f"{METHODS[method][0]}:\n{_source(row, method)}")
            continue
        samples = im["prior"][:SHOWN]
        tiles = [list(samples[i: i + per_row // 2]) for i in range(0, len(samples), per_row // 2)]
        ax.imshow(C10._mosaic(tiles).numpy(), interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        fid = row.last["fid"] if row.last else None
        ax.set_title(f"{METHODS[method][0]}\nlap {im['prior_lap']}, FID {fid:.0f}", fontsize=8)
    save_figure(fig, path, f"CIFAR-10, {pct(p)} deleted: prior samples per method at equal compute", dpi=130)


def save_results(found: dict, results_dir: Path, em_results: Path) -> None:
    """Copy each run's config, records and figure images to the committed results (not smoke runs)."""
    for (method, p), row in found.items():
        if not (row.ran and row.source == "run" and row.config["profile"] != "smoke"):
            continue
        profile = row.config["profile"]
        if method == "em-mmps":
            target = em_results / f"{profile}-{level_tag(p)}"
        elif method == "oracle":
            target = results_dir / f"{profile}-oracle"
        else:
            target = results_dir / f"{profile}-{method}-{level_tag(p)}"
        target.mkdir(parents=True, exist_ok=True)
        for name in ("config.yaml", "metrics.jsonl"):
            (target / name).write_text((row.folder / name).read_text())
        images = row.figure_images()
        if images is not None:
            torch.save(images, target / FIGURE_IMAGES)


def main(argv=None) -> int:
    import yaml

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="*", type=Path)
    parser.add_argument("--profile", default="cpu", help="the overlay experiments/cifar10-baselines/<profile>.yaml")
    parser.add_argument("--base", default=None, help="the cifar10 profile of EM-MMPS (default: the overlay's)")
    parser.add_argument("--results-dir", type=Path, default=HERE / "results")
    parser.add_argument("--em-results", type=Path, default=ROOT / "experiments" / "cifar10" / "results")
    parser.add_argument("--table", type=Path, default=ROOT / "tables" / "cifar10_baselines.md")
    parser.add_argument("--figure", type=Path, default=ROOT / "figures" / "cifar10_baselines.png")
    args = parser.parse_args(argv)
    overlay = yaml.safe_load((HERE / f"{args.profile}.yaml").read_text())
    base = args.base or overlay["base"]
    levels = [float(p) for p in overlay["levels"]]
    naive_levels = [float(p) for p in overlay["naive_levels"]]
    base_laps = yaml.safe_load((ROOT / "experiments" / "cifar10" / f"{base}.yaml").read_text())["laps"]
    found = collect(args.run_dirs, args.results_dir, args.em_results, args.profile, base, levels, naive_levels,
                    float(overlay["oracle_level"]), laps=int(base_laps))
    write_table(found, args.table, args.profile, levels, naive_levels)
    write_figure(found, args.figure, max(levels))
    save_results(found, args.results_dir, args.em_results)
    status = ", ".join(f"{m} {pct(p)}: {r.source}" for (m, p), r in sorted(found.items()))
    print(f"wrote {args.table} and {args.figure} ({status or 'no runs'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
