r"""Paper-scale cost on paper: FLOPs of one M-step step and one MMPS step of each `paper` network.

For every ``experiments/<name>/paper.yaml`` network (manifold MLP, MNIST DiT, CIFAR-10
U-Net, and the MRI pixel-unshuffle U-Net when :mod:`diffem.networks` has it), this script
counts with :class:`torch.utils.flop_counter.FlopCounterMode`, on the CPU at batch 1 (and
the forward at batch 2 too, checking that the count is linear in the batch: every counted
operation is), the FLOPs per sample of

- one M-step step: the denoising loss (:meth:`diffem.denoiser.Denoiser.loss`) forward and
  backward (the optimizer update is elementwise, not counted);
- one MMPS step: one call of :class:`diffem.posterior.MMPSDenoiser` with the profile's CG
  iterations (one forward and ``maxiter`` vector-Jacobian products) on the task's operator;
- one forward (an unconditional sampler step of the evaluation).

FlopCounterMode counts matrix products, convolutions and attention (2 FLOPs per
multiply-add); normalisations, activations and FFTs are not counted: they are
memory-bound and small beside the dense work. It then multiplies by the work of a lap
in the profile:

- E-step: ``N`` observations x sampler steps x (1 + Langevin corrections for ``pc``)
  MMPS calls (N: ``data.points`` / ``data.observations``; MRI: the profile's ~35,000
  training slices x ``data.duplicate``);
- M-step: ``ceil(epochs x N / batch)`` steps (or ``mstep.steps``) of ``mstep.batch_size``;
- evaluation: ``eval.samples`` x sampler steps x forwards on the laps the profile
  evaluates (:func:`diffem.em.evaluation.is_scheduled`); FID's Inception, the posterior
  metrics and lap 0 (a Gaussian prior) are left out;

and turns FLOPs into GPU-hours at a stated fraction (``--utilisation``, default 40 %) of the
dense bf16 tensor-core peak (A100 312 TFLOP/s, H100 SXM 989 TFLOP/s), with 4 GPUs taken as
4x one (data parallel, communication free): a projection, not a measurement.

Writes ``benchmarks/results/flops.json`` (every count and assumption),
``tables/paper_cost.md`` (the full table) and the block between the ``paper-cost`` markers
of docs/benchmarks.md (the summary). Usage::

    python benchmarks/flops.py [--utilisation 0.4] [--no-readme] [--from-json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffem.config import load_config  # noqa: E402
from diffem.denoiser import Denoiser  # noqa: E402
from diffem.em.evaluation import is_scheduled  # noqa: E402
from diffem.em.mstep import mstep_steps  # noqa: E402
from diffem.posterior import MMPSDenoiser  # noqa: E402

#: Dense bf16 tensor-core peaks in FLOP/s (NVIDIA data sheets, without sparsity).
PEAK_BF16 = {"A100": 312e12, "H100": 989e12}
#: The authors' compute (Rozet et al. 2024 as summarised in issue 12): 4 GPUs, up to 24 h a lap.
AUTHORS = "4 GPUs x up to 24 h a lap"
#: fastMRI knee single-coil training slices kept by the MRI `paper` profile (its own comment: ~35k).
MRI_SLICES = 35000
README_BEGIN, README_END = "<!-- paper-cost:begin -->", "<!-- paper-cost:end -->"
NAMES = {"manifold": "manifold MLP", "mnist": "MNIST DiT", "cifar10": "CIFAR-10 U-Net",
         "mri": "MRI pixel-unshuffle U-Net"}


class _GlobalOnly:
    """Stands in for FlopCounterMode's module tracker: totals only, no module hooks.

    The tracker's backward hooks fail under ``torch.autograd.grad`` with respect to a leaf
    input (what a vector-Jacobian product of MMPS is), and only the total is needed here.
    """

    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return None


def count_flops(fn) -> int:
    """Total FLOPs that ``fn()`` dispatches (matmuls, convolutions, attention), forward and backward."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    with counter:
        fn()
    return int(counter.get_total_flops())


def build(name: str, config):
    """The profile's backbone, an event shape, and an operator factory ``batch -> (operator, y shape)``."""
    from diffem.data.mri_mask import column_mask
    from diffem.operators import Identity, Mask, Projection, SubsampledFourier

    g = torch.Generator().manual_seed(0)
    if name == "manifold":
        from diffem.networks import MLP

        d = config.data["features"] if "features" in config.data else 5
        net = MLP(d, tuple(config.network["hidden"]), config.network["emb_features"])
        rows = 2

        def operator(b):
            matrix = torch.randn(b, rows, d, generator=g)
            return Projection(matrix / matrix.norm(dim=-1, keepdim=True)), (rows,)

        return net, (d,), operator
    if name in ("cifar10", "mnist"):
        from diffem.tasks.images import build_backbone

        channels, size = (3, 32) if name == "cifar10" else (1, 28)
        net = build_backbone(dict(config.network), channels, size, seed=0)
        if name == "mnist":
            return net, (channels, size, size), lambda b: (Identity(), (channels, size, size))
        p = float(config.data.get("drop_prob", 0.5))
        return net, (channels, size, size), lambda b: (
            Mask(torch.rand(b, 1, size, size, generator=g) >= p, channels=channels), (channels, size, size))
    if name == "mri":
        from diffem.networks import build_unshuffle_unet

        size = int(config.data.get("size", 320))
        net = build_unshuffle_unet(config.network.get("preset", "paper"), size, 1, 0)
        acceleration = float(config.data.get("acceleration", 6))
        return net, (1, size, size), lambda b: (
            SubsampledFourier(column_mask(size, acceleration, g, batch=b)), (2, size, size))
    raise ValueError(f"unknown network {name!r}")


def per_sample_flops(name: str, config) -> dict:
    """FLOPs per sample of one M-step step, one MMPS step and one forward (batch 1; the forward also at 2)."""
    net, event, operator = build(name, config)
    denoiser = Denoiser(net.train())
    maxiter = int(config.estep.maxiter)
    noise_std = float(config.data.get("noise_std", 1e-2))
    out = {"params": sum(p.numel() for p in net.parameters()), "event_shape": list(event), "maxiter": maxiter}
    counts = {}
    for b in (1, 2):  # forward at both (linearity check), the costly M-step and MMPS steps at batch 1
        g = torch.Generator().manual_seed(b)
        x = torch.randn(b, *event, generator=g)
        sigma = torch.ones(b)

        def train_step():
            denoiser.zero_grad(set_to_none=True)
            denoiser.loss(x, g).backward()

        def forward():
            with torch.no_grad():
                denoiser(x, sigma)

        A, y_shape = operator(b)
        y = torch.randn(b, *y_shape, generator=g)
        posterior = MMPSDenoiser(denoiser, y, A, noise_std, maxiter=maxiter)

        def mmps_step():
            posterior(x, sigma)

        counts[b] = {"forward": count_flops(forward)}
        if b == 1:
            counts[b] |= {"mstep": count_flops(train_step), "mmps": count_flops(mmps_step)}
    one, two = counts[1]["forward"], counts[2]["forward"]
    if abs(two - 2 * one) > 1e-6 * two:
        raise RuntimeError(f"{name}: forward FLOPs are not linear in the batch ({one} at 1, {two} at 2)")
    for key in ("mstep", "mmps", "forward"):
        out[f"{key}_flops_per_sample"] = counts[1][key]
    out["mmps_over_forward"] = out["mmps_flops_per_sample"] / out["forward_flops_per_sample"]
    out["mstep_over_forward"] = out["mstep_flops_per_sample"] / out["forward_flops_per_sample"]
    return out


def lap_work(name: str, config) -> dict:
    """Samples and steps of one lap (and of the run's evaluations) in the `paper` profile."""
    d, e, m, ev = config.data, config.estep, config.mstep, config.eval
    if name == "manifold":
        n, source = int(d["points"]), "data.points"
    elif name == "mri":
        n = MRI_SLICES * int(d.get("duplicate", 1))
        source = f"~{MRI_SLICES} training slices (the profile's comment) x data.duplicate {d.get('duplicate', 1)}"
    else:
        n, source = int(d["observations"]), "data.observations"
    calls = 1 + (int(e.corrections) if e.method == "pc" else 0)
    eval_calls = 1 + (int(e.corrections) if ev.method == "pc" else 0)
    evaluations = sum(is_scheduled(config, lap) for lap in range(1, config.laps + 1))
    return {
        "observations": n, "observations_source": source, "laps": int(config.laps),
        "estep_method": e.method, "estep_steps": int(e.steps), "estep_calls_per_step": calls,
        "mstep_steps": int(mstep_steps(m, n)), "mstep_batch": int(m.batch_size),
        "eval_samples": int(ev.samples), "eval_steps": int(ev.steps), "eval_calls_per_step": eval_calls,
        "evaluations_after_lap_0": int(evaluations),
    }


def project(flops: dict, work: dict, utilisation: float) -> dict:
    estep = work["observations"] * work["estep_steps"] * work["estep_calls_per_step"] * flops["mmps_flops_per_sample"]
    mstep = work["mstep_steps"] * work["mstep_batch"] * flops["mstep_flops_per_sample"]
    evaluation = (work["eval_samples"] * work["eval_steps"] * work["eval_calls_per_step"]
                  * flops["forward_flops_per_sample"])
    lap = estep + mstep
    run = lap * work["laps"] + evaluation * work["evaluations_after_lap_0"]
    hours = {}
    for gpu, peak in PEAK_BF16.items():
        rate = peak * utilisation
        for count in (1, 4):
            hours[f"{count}x{gpu}"] = {"lap_h": lap / (rate * count) / 3600, "run_h": run / (rate * count) / 3600}
    return {"estep_flops_per_lap": estep, "mstep_flops_per_lap": mstep, "eval_flops_each": evaluation,
            "lap_flops": lap, "run_flops": run, "gpu_hours": hours}


def _fmt_h(hours: float) -> str:
    if hours < 1 / 3600:
        return "< 1 s"
    if hours < 1 / 60:
        return f"{hours * 3600:.0f} s"
    if hours < 0.1:
        return f"{hours * 60:.1f} min"
    return f"{hours:.1f} h" if hours < 100 else f"{hours:.0f} h"


def _e(x: float) -> str:
    return f"{x:.2e}".replace("e+", "e")


def tables(results: dict) -> tuple[str, str]:
    """(summary for docs/benchmarks.md, full Markdown for tables/paper_cost.md)."""
    u = results["utilisation"]
    head = ["| network (paper profile) | params | M-step step, GFLOP per sample | MMPS step, GFLOP per sample "
            "(CG k) | PFLOP per lap (E + M) | 1x A100 | 4x A100 | 1x H100 | 4x H100 | authors |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    rows = []
    for name, r in results["networks"].items():
        f, p = r["flops"], r["projection"]
        cells = [f"{_fmt_h(p['gpu_hours'][k]['lap_h'])} a lap, {_fmt_h(p['gpu_hours'][k]['run_h'])} a run"
                 for k in ("1xA100", "4xA100", "1xH100", "4xH100")]
        rows.append(f"| {NAMES[name]} ({r['work']['laps']} laps) | {f['params'] / 1e6:.2f} M "
                    f"| {f['mstep_flops_per_sample'] / 1e9:.3g} | {f['mmps_flops_per_sample'] / 1e9:.3g} "
                    f"(CG {f['maxiter']}) | {p['lap_flops'] / 1e15:.3g} | " + " | ".join(cells) + f" | {AUTHORS} |")
    missing = [NAMES[n] for n in results["skipped"]]
    assumptions = [
        f"- GPU time = FLOPs / ({u:.0%} x dense bf16 peak): A100 {PEAK_BF16['A100'] / 1e12:.0f} TFLOP/s, "
        f"H100 {PEAK_BF16['H100'] / 1e12:.0f} TFLOP/s; 4 GPUs = 4x one (data parallel, no communication cost). "
        "The `paper` profiles set `precision: fp32`: at fp32 / TF32 the peaks are 2x (TF32) to 16x (fp32 without "
        "tensor cores) lower, so multiply accordingly",
        "- FLOPs counted by `torch.utils.flop_counter.FlopCounterMode` on the CPU at batch 1 and scaled to the "
        "profiles' batches (linear in the batch, checked on the forward): matmuls, convolutions and attention, "
        "2 FLOPs per multiply-add; normalisations, "
        "activations, FFTs and the optimizer are not counted",
        "- a lap = E-step (one MMPS call per observation, sampler step and Langevin correction) + M-step "
        "(denoising loss forward + backward); a run = laps x lap + the scheduled evaluations (unconditional "
        "samples, one forward a step); lap 0 (Gaussian prior), Inception and posterior metrics are left out",
        "- MMPS costs one forward and `maxiter` vector-Jacobian products (`diffem.posterior.MMPSDenoiser`)",
        "- the authors' figure is wall time on their hardware (4 GPUs, up to 24 h a lap, per issue 12), "
        "not a FLOP count",
    ]
    if missing:
        assumptions.append(f"- not counted: {', '.join(missing)} ({'; '.join(results['skipped'].values())})")
    summary = "\n".join(head + rows + [""] + assumptions)
    work_rows = ["| network | observations N (source) | E-step: steps x calls, CG | M-step: steps x batch a lap "
                 "| evaluations after lap 0 (samples x steps) | E-step PFLOP a lap | M-step PFLOP a lap "
                 "| eval PFLOP each | run PFLOP | MMPS / forward | M-step / forward |",
                 "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results["networks"].items():
        w, f, p = r["work"], r["flops"], r["projection"]
        work_rows.append(
            f"| {NAMES[name]} | {w['observations']} ({w['observations_source']}) | {w['estep_method'].upper()} "
            f"{w['estep_steps']} x {w['estep_calls_per_step']}, CG {f['maxiter']} | {w['mstep_steps']} x "
            f"{w['mstep_batch']} | {w['evaluations_after_lap_0']} ({w['eval_samples']} x {w['eval_steps']}) "
            f"| {p['estep_flops_per_lap'] / 1e15:.3g} | {p['mstep_flops_per_lap'] / 1e15:.3g} "
            f"| {p['eval_flops_each'] / 1e15:.3g} | {p['run_flops'] / 1e15:.3g} | {f['mmps_over_forward']:.2f} "
            f"| {f['mstep_over_forward']:.2f} |")
    full = "\n".join([
        "# Paper-scale cost, projected from FLOP counts",
        "",
        "Generated by `benchmarks/flops.py` (results: `benchmarks/results/flops.json`); do not edit by hand.",
        f"Counted with torch {results['torch']} on {results['machine']}. No GPU was available to measure a real step "
        "beside the projection.",
        "",
        "## GPU-hours per lap and per run",
        "",
        summary,
        "",
        "## Work per lap (from the `paper` profiles)",
        "",
        *work_rows,
        "",
    ])
    return summary, full


def write_readme_block(readme: Path, summary: str) -> None:
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise RuntimeError(f"{readme} has no {README_BEGIN} ... {README_END} block")
    start, end = text.index(README_BEGIN) + len(README_BEGIN), text.index(README_END)
    block = ("\n<!-- written by benchmarks/flops.py; do not edit by hand -->\n" + summary
             + "\n\nDetails: [tables/paper_cost.md](tables/paper_cost.md).\n")
    readme.write_text(text[:start] + block + text[end:])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--utilisation", type=float, default=0.4, help="fraction of the dense bf16 peak")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "flops.json")
    parser.add_argument("--table", type=Path, default=ROOT / "tables" / "paper_cost.md")
    parser.add_argument("--readme", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite docs/benchmarks.md's block")
    parser.add_argument("--only", nargs="*", default=None, help="networks to count (default: all)")
    parser.add_argument("--from-json", action="store_true",
                        help="rewrite the table and README block from the existing --json results, counting nothing")
    args = parser.parse_args(argv)
    if not 0 < args.utilisation <= 1:
        parser.error("--utilisation must be in (0, 1]")
    if args.from_json:
        results = json.loads(args.json.read_text())
        summary, full = tables(results)
        args.table.write_text(full)
        if not args.no_readme:
            write_readme_block(args.readme, summary)
        print(full)
        return results
    torch.manual_seed(0)
    results = {"utilisation": args.utilisation, "peak_bf16_flops": PEAK_BF16, "torch": torch.__version__,
               "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads", "networks": {}, "skipped": {}}
    for name in args.only or list(NAMES):
        if name == "mri":
            import diffem.networks as networks

            if not hasattr(networks, "build_unshuffle_unet"):
                results["skipped"][name] = "diffem.networks has no pixel-unshuffle U-Net yet"
                continue
        config = load_config(name, "paper")
        flops = per_sample_flops(name, config)
        work = lap_work(name, config)
        results["networks"][name] = {"flops": flops, "work": work, "projection": project(flops, work, args.utilisation)}
        print(f"{name}: {flops['params'] / 1e6:.2f} M params, M-step {flops['mstep_flops_per_sample'] / 1e9:.3g} "
              f"GFLOP, MMPS {flops['mmps_flops_per_sample'] / 1e9:.3g} GFLOP, forward "
              f"{flops['forward_flops_per_sample'] / 1e9:.3g} GFLOP per sample", flush=True)
    summary, full = tables(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    args.table.parent.mkdir(parents=True, exist_ok=True)
    args.table.write_text(full)
    if not args.no_readme:
        write_readme_block(args.readme, summary)
    print(full)
    return results


if __name__ == "__main__":
    main()
