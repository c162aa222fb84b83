"""Write tables/mri.md, figures/mri.png and figures/mri_laps.png from an MRI run.

    python experiments/mri/report.py RUN_DIR [--table tables/mri.md] [--figure figures/mri.png]
        [--laps-figure figures/mri_laps.png] [--results-dir experiments/mri/results] [--slice 6]
        [--cs <results-dir>/<profile>-cs.json]

RUN_DIR is a run folder (``config.yaml``, ``metrics.jsonl``, ``eval/lap_KK.pt``) or a
results folder written by this script (``config.yaml``, ``metrics.jsonl``,
``figure_data.pt``). Every number comes from ``metrics.jsonl``; the images come from the
per-lap evaluation artifacts (held-out slices: masks, zero-filled images, posterior samples,
means and standard deviations, ground truth). Unless the profile is ``smoke``, the run's
``config.yaml``, ``metrics.jsonl`` and the few images of the figures (``figure_data.pt``)
are copied to ``<results-dir>/<profile>/``, from which this script regenerates everything.

The references and variants run on the same held-out slices, masks and seeds (each a run folder
or a results folder, copied to ``<results-dir>/<profile>-<name>/`` like the main run; when not
given, read from there; absent: "not run"):

- ``--oracle``: the same U-Net trained on the clean training slices (``train_on: clean``), no E-step;
- ``--complex``: the EM prior of complex images (``data.complex: true``, a synthetic smooth phase);
- ``--multicoil``: the EM prior of complex images from simulated 8-coil SENSE k-space
  (``data.complex: true``, ``data.coils: 8``).

The compressed-sensing references (L1-wavelet and total variation, written by
``experiments/mri/compressed_sensing.py``) are read from ``--cs`` (default
``<results-dir>/<profile>-cs.json``, beside the results folder, which the copy above leaves
alone) and, for the figure, the reconstructions beside it (``<profile>-cs.pt``). Without the
JSON file their table cells say "not run"; without the ``.pt`` file the figure has no
compressed-sensing columns. A file of another profile or another number of held-out slices
is refused.
"""

from __future__ import annotations

import argparse
import json
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

from diffem.tasks.mri import MriTask  # noqa: E402

FIGURE_R = ("4", "8", "16", "32")  # the paper's figure rows
LAPS_R = "8"
FIGURE_DATA = "figure_data.pt"
CS_METHODS = {"l1_wavelet": "L1-wavelet", "total_variation": "TV"}  # compressed_sensing.py's keys, as shown
BEAT_CS_R = ("4", "8", "16")  # the accelerations of "Does the EM prior beat compressed sensing?"
NOT_RUN = "not run"
#: The reference and variant runs (``--<name>``): what each is, and the config it must have.
VARIANTS = {
    "oracle": ("oracle: the U-Net trained on the clean slices (no E-step)", lambda c: c.get("train_on") == "clean"),
    "complex": ("complex EM prior (synthetic phase)",
                lambda c: c["data"].get("complex") is True and (c["data"].get("coils") or 1) == 1),
    "multicoil": ("multi-coil complex EM prior (simulated SENSE)",
                  lambda c: c["data"].get("complex") is True and (c["data"].get("coils") or 1) > 1),
}


def _magnitude(x: torch.Tensor) -> torch.Tensor:
    return ((x.float() + 2).abs() / 4).squeeze()


def figure_data(run_dir: Path, records: list[dict], slice_index: int) -> dict | None:
    """The images of both figures for one held-out slice, from a run's artifacts or a results folder."""
    saved = run_dir / FIGURE_DATA
    if saved.exists():
        return _float(torch.load(saved, map_location="cpu"))
    arts = {}
    for r in records:
        path = run_dir / "eval" / f"lap_{r['lap']:02d}.pt"
        if path.exists():
            arts[r["lap"]] = torch.load(path, map_location="cpu", weights_only=False)
    if not arts:
        return None
    last = max(arts)
    i = min(slice_index, len(arts[last]["truth"]) - 1)
    out = {"slice": i, "last_lap": last, "truth": _magnitude(arts[last]["truth"][i]), "accelerations": {}, "laps": {}}
    for R, a in arts[last]["accelerations"].items():
        out["accelerations"][R] = {
            "mask": a["mask"][i].clone(),
            "zero_filled": _magnitude(a["zero_filled"][i]),
            "samples": torch.stack([_magnitude(s) for s in a["samples"][i]]),
            "mean": _magnitude(a["mean"][i]),
            "std": None if a.get("std") is None else a["std"][i].float().clone(),
        }
    for lap, art in sorted(arts.items()):
        a = art["accelerations"].get(LAPS_R)
        if a is not None:
            out["laps"][lap] = {"sample": _magnitude(a["samples"][i][0]), "mean": _magnitude(a["mean"][i]),
                                "std": None if a.get("std") is None else a["std"][i].float().clone(),
                                "zero_filled": _magnitude(a["zero_filled"][i])}
    return out


def _half(tree):
    """Floating-point tensors of a nested dict as float16 (masks and numbers unchanged)."""
    if isinstance(tree, dict):
        return {k: _half(v) for k, v in tree.items()}
    if torch.is_tensor(tree) and tree.is_floating_point():
        return tree.half()
    return tree


def _float(tree):
    if isinstance(tree, dict):
        return {k: _float(v) for k, v in tree.items()}
    if torch.is_tensor(tree) and tree.is_floating_point():
        return tree.float()
    return tree


def _shown(path: Path) -> str:
    """A path as the table shows it: relative to the repository when inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def read_cs(path: Path, config: dict, records: list[dict]) -> dict | None:
    """The compressed-sensing results of ``compressed_sensing.py`` (its JSON, with ``"images"``: the
    reconstructions ``{R: {method: (n, 1, S, S)}}`` of the ``.pt`` file beside it, or None), or None
    when ``path`` does not exist.

    Raises:
        SystemExit: if the file is of another profile, or of another number of held-out slices
            than the run's evaluation.
    """
    if not path.exists():
        return None
    cs = json.loads(path.read_text())
    if cs.get("profile") != config["profile"]:
        raise SystemExit(f"`{path}` holds compressed sensing of the {cs.get('profile')!r} profile, "
                         f"not of this run's {config['profile']!r}")
    n = _eval_slices(records)
    if n is not None and len(cs["test_slices"]) != n:
        raise SystemExit(f"`{path}` reconstructed {len(cs['test_slices'])} held-out slices, the run evaluated {n}")
    pt = path.with_suffix(".pt")
    cs["images"] = torch.load(pt, map_location="cpu") if pt.exists() else None
    for R, methods in (cs["images"] or {}).items():
        for method, images in methods.items():
            if len(images) != len(cs["test_slices"]):
                raise SystemExit(f"`{pt}` holds {len(images)} {method} images at R = {R}, "
                                 f"not the {len(cs['test_slices'])} test slices of `{path}`")
    cs["path"] = path
    return cs


def _cs_entry(cs: dict | None, R: str, method: str) -> dict | None:
    return None if cs is None else cs["accelerations"].get(R, {}).get(method)


def _better_cs(cs: dict | None, R: str) -> tuple[str, dict] | None:
    """The compressed-sensing method with the higher test PSNR at ``R`` and its entry, or None."""
    found = [(method, e) for method in CS_METHODS if (e := _cs_entry(cs, R, method)) is not None]
    return max(found, key=lambda item: item[1]["psnr"]) if found else None


def _verdict(mine: float, reference: float) -> str:
    return f"{'yes' if mine > reference else 'no'} ({fmt(mine)} vs {fmt(reference)})"


def _cs_note(cs: dict | None, cs_path: Path) -> str:
    if cs is None:
        return (f"L1-wavelet and TV (compressed sensing): {NOT_RUN} (no `{_shown(cs_path)}`; "
                "`python experiments/mri/compressed_sensing.py RUN_DIR` writes it).")
    lambdas = ", ".join(f"{lam:g}" for lam in cs["lambdas"])
    return (f"L1-wavelet and TV: compressed sensing with {cs['library']} (`mri.app.L1WaveletRecon`, "
            f"`mri.app.TotalVariationRecon`, {cs['max_iter']} iterations) of the same held-out slices through the "
            f"same masks and noise (`{_shown(cs['path'])}`, from `experiments/mri/compressed_sensing.py`); "
            f"the weight lambda of each method and R (last column) was chosen among {lambdas} by PSNR on a validation "
            f"set of {len(cs['validation_slices'])} clean held-out slices, disjoint from the test slices and from "
            "training: an advantage the EM prior, which never sees a clean image, does not have.")


# -- table ---------------------------------------------------------------------------------------
def _wall(records: list[dict]) -> float:
    return sum(r.get("estep_time_s", 0) + r.get("mstep_time_s", 0) + (r.get("eval_time_s") or 0) for r in records)


def _evaluated(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("accelerations")]


def _eval_slices(records: list[dict]) -> int | None:
    """The number of held-out slices the run evaluated (None before its first evaluation)."""
    return next((r["eval_slices"] for r in _evaluated(records) if r.get("eval_slices")), None)


def _settings(config: dict, records: list[dict]) -> list[str]:
    e, m, l0, net = (config[k] for k in ("estep", "mstep", "lap0", "network"))
    d = MriTask.data_defaults | config["data"]  # a config lists only the keys it sets
    obs = next((r.get("observations") for r in records if r.get("observations")), None)
    source = ("slices of two real brain MRI volumes (ICBM152 2009a average, Colin27), three orientations, "
              "near-empty slices dropped" if d["kind"] == "brain" else "fastMRI single-coil knee `reconstruction_rss` "
              "slices 10-39")
    steps = f"{m['epochs']:g} epochs" if m.get("epochs") else f"{m['steps']} steps"
    overrides = ", ".join(f"{k}={v}" for k, v in net.items() if k != "preset" and v is not None)
    lines = [
        f"- profile: `{config['profile']}`; {obs} observations y = M (FFT2c(x) + sigma_y e), sigma_y = {d['noise_std']}, "
        f"one random column mask M per slice at R = {d['acceleration']:g} (the fastMRI mask scaled to {d['size']} columns); "
        f"images: {source}, {d['size']}x{d['size']}, each volume divided by its maximum and mapped to [-2, 2]; "
        "the prior never sees a clean image",
        f"- evaluation: {records[0].get('eval_slices', d['eval_slices']) if records else d['eval_slices']} held-out "
        "slices" + (f" (a contiguous axial slab {d['holdout']} of each volume; no training slice touches it)"
                    if d["kind"] == "brain" else "") +
        f", observed at every R through fixed seeded masks (the same at every lap); {d['posterior_samples']} posterior "
        f"samples each (MMPS, {d['posterior_method'].upper()} {d['posterior_steps']} steps, CG {d['posterior_maxiter']})",
        "- metrics on magnitude images |x + 2| / 4 with the volume's maximum (1) as data range (fastMRI's convention): "
        "PSNR (dB), SSIM (7x7 uniform window, torchmetrics), NMSE; `zero-filled` is the pseudo-inverse A+ y "
        "(the zero-filled inverse FFT with the columns whose mirror is missing counted twice); "
        "`DC` is the data consistency ||A x - y|| / ||y|| (its noise floor is given); `std` the mean posterior "
        "standard deviation (magnitude units)",
        f"- lap 0: Gaussian of rank {l0['rank']} fitted by {l0['iterations']} EM iterations on {l0['observations']} "
        f"observations (MMPS E-step, {l0['steps']} steps, CG {l0['maxiter']}); {config['laps']} EM laps after it",
        f"- network: pixel-unshuffle U-Net `{net.get('preset')}`" + (f" ({overrides})" if overrides else ""),
        f"- E-step: MMPS, {e['method'].upper()} {e['steps']} steps, CG {e['maxiter']}, {d.get('duplicate', 1)} sample(s) "
        f"per observation; M-step: {steps} of batch {m['batch_size']} a lap, Adam {m['lr']:g}"
        + (f" -> {m['lr_end']:g}" if m.get("lr_end") else "") + f", clip {m['grad_clip']:g}, EMA {m['ema_decay']:g}, "
        + (f"flips and shifts of up to {d.get('shift')} px" if m.get("augment") else "no augmentation"),
        f"- hardware: {hardware(records)}",
        f"- wall time of the laps (E-step + M-step + evaluation): {_wall(records) / 60:.1f} min",
        "- the paper (Rozet et al. 2024, Section 5.3) published no MRI numbers, only a figure of posterior samples "
        "at R = 4, 8, 16, 32: this table has no published number to compare with (the compressed-sensing "
        "references are run here)",
        "- a real image's spectrum is conjugate-symmetric, so a sampled column also tells its mirror: the effective "
        "acceleration HW / rank(A) (column `R eff.`) is milder than the nominal R (fraction of columns kept), "
        "by up to a factor 2",
    ]
    return lines


def read_variant(name: str, path: Path, config: dict, records: list[dict]) -> dict | None:
    """A reference or variant run (:data:`VARIANTS`): ``{"config", "records", "path", "last"}`` (the last
    evaluated record), or None when ``path`` holds no run.

    Raises:
        SystemExit: if the run is of another profile, another number of held-out slices or not of its kind.
    """
    if not (path / "metrics.jsonl").exists():
        return None
    vconfig, vrecords = read_run(path)
    what, ok = VARIANTS[name]
    if vconfig.get("experiment") != "mri" or vconfig.get("profile") != config["profile"] or not ok(vconfig):
        raise SystemExit(f"`{path}` is not the {config['profile']!r} profile's {what} (config.yaml)")
    n = _eval_slices(records)
    evaluated = _evaluated(vrecords)
    if evaluated and n is not None and evaluated[-1].get("eval_slices") != n:
        raise SystemExit(f"`{path}` evaluated {evaluated[-1].get('eval_slices')} held-out slices, the main run {n}")
    return {"config": vconfig, "records": vrecords, "path": path, "last": evaluated[-1] if evaluated else None}


def _variant_cell(v: dict | None, R: str, key: str) -> str:
    if v is None or v["last"] is None:
        return NOT_RUN
    m = v["last"]["accelerations"].get(R)
    return NOT_RUN if m is None else fmt(m[key])


def _variant_lines(last: dict, config: dict, records: list[dict], variants: dict) -> list[str]:
    """The section on the oracle and the complex and multi-coil priors."""
    lines = ["", "## Beside the oracle, and complex and multi-coil k-space", "",
             "The last lap's posterior mean of each prior on the same held-out slices, masks and noise seeds; "
             "metrics on magnitudes. The complex priors learn complex images (the slices with a synthetic smooth "
             "phase, `diffem.data.mri.synthetic_phase`, scale 1 rad) from k-space with no conjugate symmetry, so "
             "their effective acceleration is the nominal R; their zero-filled image is the inverse FFT of the "
             "zero-filled k-space (multi-coil: the zero-filled SENSE combination).", ""]
    lines += ["| prior | what it learns from | R eff. at R = 6 | laps | wall time (min) | results |",
              "|---|---|---:|---:|---:|---|"]
    lines.append(f"| magnitude EM prior | {records[-1].get('observations') or ''} single-coil observations of real "
                 f"magnitude images | {fmt(last['accelerations'].get('6', {}).get('effective_acceleration'))} | "
                 f"{last['lap']} | {_wall(records) / 60:.1f} | main run |")
    for name in VARIANTS:
        v = variants.get(name)
        if v is None:
            lines.append(f"| {VARIANTS[name][0]} | {NOT_RUN} | | | | |")
            continue
        vd = MriTask.data_defaults | v["config"]["data"]
        source = ("the clean slices" if name == "oracle" else
                  f"observations of complex images through {vd['coils']} simulated coils (birdcage maps)"
                  if vd["coils"] > 1 else "single-coil observations of complex images")
        m6 = (v["last"] or {}).get("accelerations", {}).get("6", {})
        lines.append(f"| {VARIANTS[name][0]} | {source} | {fmt(m6.get('effective_acceleration'))} | "
                     f"{(v['last'] or {}).get('lap', '-')} | {_wall(v['records']) / 60:.1f} | `{_shown(v['path'])}` |")
    for metric, label in (("psnr", "PSNR (dB)"), ("ssim", "SSIM")):
        head = (f"| R | magnitude zero-filled | magnitude EM | oracle | complex zero-filled | complex EM | "
                f"multi-coil zero-filled SENSE | multi-coil EM |")
        lines += ["", f"{label}:", "", head, "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for R, m in last["accelerations"].items():
            lines.append(
                f"| {R} | {fmt(m[f'{metric}_zero_filled'])} | {fmt(m[f'{metric}_posterior_mean'])} | "
                f"{_variant_cell(variants.get('oracle'), R, f'{metric}_posterior_mean')} | "
                f"{_variant_cell(variants.get('complex'), R, f'{metric}_zero_filled')} | "
                f"{_variant_cell(variants.get('complex'), R, f'{metric}_posterior_mean')} | "
                f"{_variant_cell(variants.get('multicoil'), R, f'{metric}_zero_filled')} | "
                f"{_variant_cell(variants.get('multicoil'), R, f'{metric}_posterior_mean')} |")
    lines += ["", "Data consistency ||A x - y|| / ||y|| of the posterior mean against its noise floor (each prior's "
              "own observations):", "",
              "| R | magnitude EM | floor | oracle | complex EM | floor | multi-coil EM | floor |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for R, m in last["accelerations"].items():
        cells = [fmt(m["data_consistency_posterior_mean"]), fmt(m["noise_floor"]),
                 _variant_cell(variants.get("oracle"), R, "data_consistency_posterior_mean")]
        for name in ("complex", "multicoil"):
            cells += [_variant_cell(variants.get(name), R, "data_consistency_posterior_mean"),
                      _variant_cell(variants.get(name), R, "noise_floor")]
        lines.append(f"| {R} | " + " | ".join(cells) + " |")
    return lines


def write_table(config: dict, records: list[dict], path: Path, run_dir: Path, cs: dict | None = None,
                cs_path: Path | None = None, variants: dict | None = None) -> None:
    """The Markdown table; ``cs`` (:func:`read_cs`, None: "not run") adds the compressed-sensing references,
    ``cs_path`` is where they were looked for; ``variants`` (:func:`read_variant` by name) the oracle and
    the complex and multi-coil priors."""
    variants = variants or {}
    cs_path = cs_path or HERE / "results" / f"{config['profile']}-cs.json"
    evaluated = _evaluated(records)
    lines = ["# Accelerated MRI from undersampled k-space only: reconstructions of held-out slices by EM lap", "",
             "Generated by `experiments/mri/report.py` from the run's `metrics.jsonl`; do not edit by hand.", ""]
    lines += _settings(config, records)
    done = max((r["lap"] for r in records), default=-1)
    status = "done" if done >= config["laps"] else f"partial ({done} of {config['laps']} laps)"
    lines += ["", f"Run: `{run_dir}`, {status}.", ""]
    if not evaluated:
        lines.append("No evaluated lap.")
    else:
        first, last = evaluated[0], evaluated[-1]
        lines += [
            "## Summary: zero-filled, compressed sensing (L1-wavelet, TV), lap 0 (Gaussian) and the last lap "
            "(posterior mean)",
            "",
            f"| R | R eff. | kept columns | PSNR zero-filled | PSNR L1-wavelet | PSNR TV | PSNR lap {first['lap']} "
            f"| PSNR lap {last['lap']} | SSIM zero-filled | SSIM L1-wavelet | SSIM TV | SSIM lap {first['lap']} "
            f"| SSIM lap {last['lap']} | NMSE lap {last['lap']} | std lap {last['lap']} | lambda L1-wavelet / TV |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for R, m in last["accelerations"].items():
            f = first["accelerations"].get(R, {})
            ref = [_cs_entry(cs, R, method) for method in CS_METHODS]  # L1-wavelet, TV
            cells = lambda key: " | ".join(NOT_RUN if e is None else fmt(e[key]) for e in ref)  # noqa: E731
            lam = (NOT_RUN if all(e is None for e in ref)
                   else " / ".join(NOT_RUN if e is None else f"{e['lambda']:g}" for e in ref))
            lines.append(
                f"| {R} | {fmt(m.get('effective_acceleration'))} | {100 * m.get('kept_fraction', 0):.1f} % | "
                f"{fmt(m['psnr_zero_filled'])} | {cells('psnr')} | "
                f"{fmt(f.get('psnr_posterior_mean'))} | {fmt(m['psnr_posterior_mean'])} | "
                f"{fmt(m['ssim_zero_filled'])} | {cells('ssim')} | "
                f"{fmt(f.get('ssim_posterior_mean'))} | {fmt(m['ssim_posterior_mean'])} | "
                f"{fmt(m['nmse_posterior_mean'])} | {fmt(m.get('posterior_std'))} | {lam} |"
            )
        lines += ["", _cs_note(cs, cs_path)]
        lines += ["", f"## Does the last lap's posterior mean beat the zero-filled image and lap {first['lap']}?", "",
                  "| R | PSNR vs zero-filled | PSNR vs lap 0 | SSIM vs zero-filled | SSIM vs lap 0 |",
                  "|---:|---|---|---|---|"]
        for R in ("6", "8"):
            m, f = last["accelerations"].get(R), first["accelerations"].get(R)
            if m is None or f is None:
                continue
            psnr, ssim = m["psnr_posterior_mean"], m["ssim_posterior_mean"]
            lines.append(f"| {R} | {_verdict(psnr, m['psnr_zero_filled'])} | {_verdict(psnr, f['psnr_posterior_mean'])} | "
                         f"{_verdict(ssim, m['ssim_zero_filled'])} | {_verdict(ssim, f['ssim_posterior_mean'])} |")
        oracle = variants.get("oracle")
        lines += ["", "## Does the EM prior beat compressed sensing, and how far is it from the oracle?", "",
                  f"The last lap's (lap {last['lap']}) posterior mean against the better of L1-wavelet and TV by PSNR "
                  "at each R (its lambda chosen on clean validation slices, see the summary), and against the "
                  "oracle: the same U-Net and M-step steps trained on the clean slices, its posterior with the "
                  "same MMPS settings.", "",
                  "| R | better of L1-wavelet and TV (lambda) | PSNR | SSIM | oracle PSNR / SSIM | EM - oracle (dB) |",
                  "|---:|---|---|---|---|---:|"]
        for R in BEAT_CS_R:
            m = last["accelerations"].get(R)
            if m is None:
                continue
            o = None if oracle is None or oracle["last"] is None else oracle["last"]["accelerations"].get(R)
            ocells = (f"{NOT_RUN} | {NOT_RUN}" if o is None else
                      f"{fmt(o['psnr_posterior_mean'])} / {fmt(o['ssim_posterior_mean'])} | "
                      f"{m['psnr_posterior_mean'] - o['psnr_posterior_mean']:+.2f}")
            better = _better_cs(cs, R)
            if better is None:
                lines.append(f"| {R} | {NOT_RUN} | {NOT_RUN} | {NOT_RUN} | {ocells} |")
                continue
            method, e = better
            lines.append(f"| {R} | {CS_METHODS[method]} ({e['lambda']:g}) | {_verdict(m['psnr_posterior_mean'], e['psnr'])} "
                         f"| {_verdict(m['ssim_posterior_mean'], e['ssim'])} | {ocells} |")
        lines += _variant_lines(last, config, records, variants)
        lines += ["", "## Every evaluated lap", ""]
        for R in last["accelerations"]:
            lines += [
                f"### R = {R}", "",
                "| lap | prior | PSNR zero-filled | PSNR 1 sample | PSNR mean | SSIM zero-filled | SSIM 1 sample "
                "| SSIM mean | NMSE zero-filled | NMSE mean | std | DC zero-filled | DC 1 sample | DC mean | DC noise floor |",
                "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for r in evaluated:
                m = r["accelerations"].get(R)
                if m is None:
                    continue
                prior = "Gaussian (EM fit)" if r["lap"] == 0 else "diffusion (U-Net)"
                lines.append(
                    f"| {r['lap']} | {prior} | {fmt(m['psnr_zero_filled'])} | {fmt(m['psnr_posterior_sample'])} | "
                    f"{fmt(m['psnr_posterior_mean'])} | {fmt(m['ssim_zero_filled'])} | {fmt(m['ssim_posterior_sample'])} | "
                    f"{fmt(m['ssim_posterior_mean'])} | {fmt(m['nmse_zero_filled'])} | {fmt(m['nmse_posterior_mean'])} | "
                    f"{fmt(m.get('posterior_std'))} | {fmt(m['data_consistency_zero_filled'])} | "
                    f"{fmt(m['data_consistency_posterior_sample'])} | {fmt(m['data_consistency_posterior_mean'])} | "
                    f"{fmt(m['noise_floor'])} |"
                )
            lines.append("")
    lines += ["## Time per lap", "", "| lap | E-step (s) | M-step (s) | evaluation (s) | train loss |", "|---:|---:|---:|---:|---:|"]
    for r in records:
        lines.append(f"| {r['lap']} | {fmt(r.get('estep_time_s'))} | {fmt(r.get('mstep_time_s'))} | "
                     f"{fmt(r.get('eval_time_s'))} | {fmt(r.get('train_loss'))} |")
    lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


# -- figures -------------------------------------------------------------------------------------
def _show(ax, image, title=None, cmap="gray", vmax=None):
    ax.imshow(image.numpy(), cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
    ax.set_xticks([]), ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


def _blank(path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(4, 1.5))
    ax.text(0.5, 0.5, "no evaluation artifacts", ha="center", va="center")
    ax.axis("off")
    save_figure(fig, path, title)


def _psnr_label(ax, image, truth, prefix: str = "") -> None:
    """This slice's PSNR under a panel."""
    value = 10 * torch.log10(1 / (image.float() - truth).square().mean()).item()
    ax.set_xlabel(f"{prefix}{value:.1f} dB", fontsize=7, labelpad=2)


def write_figure(data: dict | None, path: Path, cs: dict | None = None, oracle: dict | None = None) -> None:
    """The figure of one held-out slice per R; with ``cs``'s reconstructions (:func:`read_cs`), the
    L1-wavelet and TV images of the same slice (``data["slice"]`` indexes the evaluated slices); with
    ``oracle`` (the oracle run's :func:`figure_data`), its posterior sample of the slice."""
    title = "MRI: posterior samples of a held-out slice from undersampled k-space"
    if data is None:
        return _blank(path, title)
    rows = [R for R in FIGURE_R if R in data["accelerations"]]
    truth = data["truth"]
    vmax = float(truth.max())
    # A robust scale (the median over rows of each row's 99th percentile): one diverged sample must not darken the rest.
    stds = [data["accelerations"][R]["std"] for R in rows if data["accelerations"][R]["std"] is not None]
    std_max = float(torch.stack([s.flatten().quantile(0.99) for s in stds]).median()) if stds else 1.0
    images = (cs or {}).get("images")
    methods = list(CS_METHODS) if images else []
    cols = (["mask", "zero-filled (A+ y)"] + [f"{CS_METHODS[m]} (CS)" for m in methods]
            + ["sample 1", "sample 2", "posterior std"] + (["oracle sample"] if oracle else []) + ["ground truth"])
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(1.7 * len(cols), 1.85 * len(rows) + 0.4), squeeze=False)
    for row, R in zip(axes, rows):
        a = data["accelerations"][R]
        size = truth.shape[-1]
        mask_image = a["mask"].float()[None, :].expand(size, -1)
        _show(row[0], mask_image, vmax=1)
        _show(row[1], a["zero_filled"], vmax=vmax)
        _psnr_label(row[1], a["zero_filled"], truth)
        for j, method in enumerate(methods, start=2):
            recon = images.get(R, {}).get(method)
            if recon is None:
                row[j].axis("off")
                row[j].text(0.5, 0.5, NOT_RUN, ha="center", va="center", fontsize=8, transform=row[j].transAxes)
                continue
            image = _magnitude(recon[data["slice"]])
            _show(row[j], image, vmax=vmax)
            entry = _cs_entry(cs, R, method)
            _psnr_label(row[j], image, truth, "" if entry is None else f"lambda {entry['lambda']:g}: ")
        k = 2 + len(methods)
        for j, s in enumerate((0, min(1, len(a["samples"]) - 1))):
            _show(row[k + j], a["samples"][s], vmax=vmax)
            _psnr_label(row[k + j], a["samples"][s], truth)
        if a["std"] is not None:
            _show(row[k + 2], a["std"], cmap="magma", vmax=std_max)
        else:
            row[k + 2].axis("off")
        if oracle:
            o = oracle["accelerations"].get(R)
            if o is None:
                row[k + 3].axis("off")
            else:
                _show(row[k + 3], o["samples"][0], vmax=vmax)
                _psnr_label(row[k + 3], o["samples"][0], truth)
        _show(row[-1], truth, vmax=vmax)
        row[0].set_ylabel(f"R = {R}", fontsize=9)
    for ax, name in zip(axes[0], cols):
        ax.set_title(name, fontsize=8)
    save_figure(fig, path, f"{title} (lap {data['last_lap']}; PSNR of this slice under each image; std colour scale "
                           f"0-{std_max:.2f}, clipped)", dpi=130, fontsize=9)


def write_laps_figure(data: dict | None, path: Path) -> None:
    title = f"MRI: one held-out slice at R = {LAPS_R} across EM laps"
    if data is None or not data.get("laps"):
        return _blank(path, title)
    laps = sorted(data["laps"])
    truth = data["truth"]
    vmax = float(truth.max())
    fig, axes = plt.subplots(2, len(laps) + 2, figsize=(1.7 * (len(laps) + 2), 4.4), squeeze=False)
    first = data["laps"][laps[0]]
    _show(axes[0, 0], truth, "ground truth", vmax=vmax)
    _show(axes[1, 0], first["zero_filled"], "\nzero-filled", vmax=vmax)
    axes[0, 1].axis("off"), axes[1, 1].axis("off")
    axes[0, 1].text(0.5, 0.5, "one posterior\nsample", ha="center", va="center", fontsize=8)
    axes[1, 1].text(0.5, 0.5, "posterior mean", ha="center", va="center", fontsize=8)
    for j, lap in enumerate(laps):
        entry = data["laps"][lap]
        err = lambda x: 10 * torch.log10(1 / (x - truth).square().mean()).item()  # noqa: E731
        name = "Gaussian" if lap == 0 else "U-Net"
        _show(axes[0, j + 2], entry["sample"], f"lap {lap} ({name})\n{err(entry['sample']):.1f} dB", vmax=vmax)
        _show(axes[1, j + 2], entry["mean"], f"\n{err(entry['mean']):.1f} dB", vmax=vmax)
    save_figure(fig, path, title + " (PSNR of this slice)", dpi=130, fontsize=9)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--table", type=Path, default=ROOT / "tables" / "mri.md")
    parser.add_argument("--figure", type=Path, default=ROOT / "figures" / "mri.png")
    parser.add_argument("--laps-figure", type=Path, default=None, help="default: <figure stem>_laps.png")
    parser.add_argument("--results-dir", type=Path, default=HERE / "results")
    parser.add_argument("--slice", type=int, default=6, help="held-out slice shown in the figures (index among the evaluated ones)")
    parser.add_argument("--cs", type=Path, default=None,
                        help="compressed-sensing results of experiments/mri/compressed_sensing.py (the .pt of "
                             "reconstructions beside it) (default: <results-dir>/<profile>-cs.json; "
                             "absent: their rows say 'not run')")
    for name, (what, _) in VARIANTS.items():
        parser.add_argument(f"--{name}", type=Path, default=None,
                            help=f"the {what} run (default: <results-dir>/<profile>-{name}; absent: 'not run')")
    args = parser.parse_args(argv)
    laps_figure = args.laps_figure or args.figure.with_name(args.figure.stem + "_laps" + args.figure.suffix)
    config, records = read_run(args.run_dir)
    if config.get("experiment") != "mri":
        raise SystemExit(f"`{args.run_dir}` is a {config.get('experiment')!r} run, not mri")
    cs_path = args.cs or args.results_dir / f"{config['profile']}-cs.json"
    cs = read_cs(cs_path, config, records)
    data = figure_data(args.run_dir, records, args.slice)
    variants, variant_data = {}, {}
    for name in VARIANTS:
        path = getattr(args, name) or args.results_dir / f"{config['profile']}-{name}"
        variants[name] = read_variant(name, path, config, records)
        if variants[name] is not None:
            variant_data[name] = figure_data(path, variants[name]["records"], args.slice)
    write_table(config, records, args.table, args.run_dir, cs, cs_path, variants)
    write_figure(data, args.figure, cs, variant_data.get("oracle"))
    write_laps_figure(data, laps_figure)
    if config["profile"] != "smoke":
        copies = [(args.run_dir, args.results_dir / config["profile"], data)]
        copies += [(v["path"], args.results_dir / f"{config['profile']}-{name}", variant_data[name])
                   for name, v in variants.items() if v is not None]
        for source, target, images in copies:
            if target.resolve() == source.resolve():
                continue
            target.mkdir(parents=True, exist_ok=True)  # only these files are written: <profile>-cs.* beside it stay
            for name in ("config.yaml", "metrics.jsonl"):
                (target / name).write_text((source / name).read_text())
            if images is not None:  # float16: the figures need no more, and the file stays small
                torch.save(_half(images), target / FIGURE_DATA)
    print(f"wrote {args.table}, {args.figure} and {laps_figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
