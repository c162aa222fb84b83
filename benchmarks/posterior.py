r"""Posterior sampling benchmark: MMPS, its covariance heuristics, DPS, PiGDM, TMPD, DiffPIR, and samplers.

Two parts, each writing a results JSON from which the table and the figure are built.

**Exact** (default). A Gaussian prior :math:`\mathcal{N}(\mu, D I + U U^T)` (rank 64, PPCA,
:meth:`diffem.gaussian.GaussianPrior.fit`) fitted to clean CIFAR-10 training images
(3x32x32, in [-2, 2]). For :math:`y = A x + e`, :math:`e \sim \mathcal{N}(0, \sigma_y^2 I)`, the
posterior is Gaussian and known (:meth:`GaussianPrior.posterior`, dense, float64). Held-out
test images give the observations. For each task, method, sampler and step count we draw
``--samples`` posterior samples per observation with the prior's exact denoiser and report

- ``mean_rel_error``: :math:`\lVert \bar{x} - m \rVert_2 / \lVert m \rVert_2`, with :math:`\bar{x}`
  the mean of the samples and :math:`m` the exact posterior mean;
- ``w2``: the Wasserstein-2 distance between the Gaussian fitted to the samples
  :math:`\mathcal{N}(\bar{x}, \hat{C})` and the exact posterior :math:`\mathcal{N}(m, S)`,

  .. math:: W_2^2 = \lVert \bar{x} - m \rVert^2 + \operatorname{tr} \hat{C} + \operatorname{tr} S
     - 2 \operatorname{tr} \big( S^{1/2} \hat{C} S^{1/2} \big)^{1/2}.

  In :math:`d = 3072` dimensions with :math:`n \le d` samples, :math:`\hat{C} = X^T X / (n - 1)`
  (``X`` the centred samples, ``(n, d)``) has rank :math:`< n`, and the non-zero eigenvalues of
  :math:`S^{1/2} \hat{C} S^{1/2}` are those of the :math:`n \times n` matrix
  :math:`X S X^T / (n - 1)`: the trace of the square root costs one ``(n, n)`` eigendecomposition,
  never a ``(d, d)`` matrix square root. Finite-sample noise puts a floor under both metrics:
  the row ``exact samples`` applies them to ``n`` exact posterior draws;
- ``nfe``: network (denoiser) evaluations per sample, counted, as forwards + vector-Jacobian
  products (VJPs), both also reported;
- ``seconds_per_sample``: wall time of the sampler call divided by the samples it drew
  (CPU, threads as given; a loaded shared machine makes these noisy).

**Learned** (``--prior LAP_DIR``): a saved :class:`~diffem.pipeline.DiffusionPriorPipeline`
(an EM lap) on held-out test images, the same tasks; PSNR and SSIM (torchmetrics, through
:mod:`diffem.metrics`) of the posterior samples and of their mean against the true images,
and seconds per sample. LPIPS needs network weights that are not available offline: not
reported.

Usage::

    python benchmarks/posterior.py                      # exact part: run, JSON, table, figure
    python benchmarks/posterior.py --report-only        # rebuild table and figure from the JSON
    python benchmarks/posterior.py --prior runs/cifar10-cpu/lap_03 --observations 64

References:
    Rozet et al. 2024, arXiv:2405.13712, Section 4 and Appendix E; Chung et al. 2023 (DPS),
    arXiv:2209.14687; Song et al. 2023 (PiGDM), ICLR; Boys et al. 2023 (TMPD), arXiv:2310.06721;
    Zhu et al. 2023 (DiffPIR), arXiv:2305.08995; Givens & Shortt 1984 (Gaussian W2).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffem.edm import network_evaluations  # noqa: E402
from diffem.gaussian import GaussianPrior  # noqa: E402
from diffem.random import derive_seed  # noqa: E402

DEFAULT_RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_TABLE = ROOT / "tables" / "posterior_benchmark.md"
DEFAULT_FIGURE = ROOT / "figures" / "posterior_benchmark.png"

TASKS = ("inpaint75", "box", "sr4", "deblur")
TASK_LABELS = {
    "inpaint75": "random inpainting, 75 % of pixels deleted",
    "box": "box inpainting, centred hole of half the side",
    "sr4": "x4 super-resolution (average pooling)",
    "deblur": "Gaussian deblurring (std 1 pixel, circular)",
}

#: name -> (guidance, options, sampler method). Samplers: the paper's DDPM (E-step) unless named.
METHODS = {
    "mmps": ("mmps", {"covariance": "tweedie", "maxiter": 1}, "ddpm"),
    "mmps_prior": ("mmps", {"covariance": "prior", "maxiter": 1}, "ddpm"),
    "mmps_sigma_t": ("mmps", {"covariance": "sigma_t", "maxiter": 1}, "ddpm"),
    "dps": ("dps", {}, "ddpm"),
    "pigdm": ("pigdm", {}, "ddpm"),
    "tmpd": ("tmpd", {}, "ddpm"),
    "diffpir": ("diffpir", {}, "ddpm"),
    "mmps_ddim": ("mmps", {"covariance": "tweedie", "maxiter": 1}, "ddim"),
    "mmps_edm_euler": ("mmps", {"covariance": "tweedie", "maxiter": 1}, "edm_euler"),
    "mmps_edm_dpmpp": ("mmps", {"covariance": "tweedie", "maxiter": 1}, "edm_dpmpp"),
    "mmps_cg4": ("mmps", {"covariance": "tweedie", "maxiter": 4}, "ddpm"),
    "mmps_cg4_edm_dpmpp": ("mmps", {"covariance": "tweedie", "maxiter": 4}, "edm_dpmpp"),
    "mmps_edm_sde": ("mmps", {"covariance": "tweedie", "maxiter": 1}, "edm_dpmpp_sde"),
    "mmps_cg4_edm_sde": ("mmps", {"covariance": "tweedie", "maxiter": 4}, "edm_dpmpp_sde"),
}
METHOD_LABELS = {
    "mmps": "MMPS, Tweedie (CG 1), DDPM",
    "mmps_prior": "MMPS, (I + Σt⁻¹)⁻¹, DDPM",
    "mmps_sigma_t": "MMPS, Σt = σ²I, DDPM",
    "dps": "DPS, DDPM",
    "pigdm": "ΠGDM, DDPM",
    "tmpd": "TMPD, DDPM",
    "diffpir": "DiffPIR, DDPM",
    "mmps_ddim": "MMPS, Tweedie (CG 1), DDIM",
    "mmps_edm_euler": "MMPS, Tweedie (CG 1), EDM Euler",
    "mmps_edm_dpmpp": "MMPS, Tweedie (CG 1), EDM DPM-Solver++(2M)",
    "mmps_cg4": "MMPS, Tweedie (CG 4), DDPM",
    "mmps_cg4_edm_dpmpp": "MMPS, Tweedie (CG 4), EDM DPM-Solver++(2M)",
    "mmps_edm_sde": "MMPS, Tweedie (CG 1), EDM SDE-DPM-Solver++(2M)",
    "mmps_cg4_edm_sde": "MMPS, Tweedie (CG 4), EDM SDE-DPM-Solver++(2M)",
    "exact": "exact samples (finite-sample floor)",
}
EDM_SAMPLERS = ("edm_euler", "edm_dpmpp", "edm_dpmpp_sde")

#: Rozet et al. 2024, Appendix E (FFHQ 256x256, DDIM 100 steps). Not found verbatim by this
#: project's offline search; left empty rather than invented.
PAPER_APPENDIX_E: dict = {}


# ----------------------------------------------------------------------------------------
# Counting network evaluations
# ----------------------------------------------------------------------------------------
class _CountVJP(torch.autograd.Function):
    """Identity whose backward counts one vector-Jacobian product of the wrapped denoiser."""

    @staticmethod
    def forward(ctx, x, counter):
        ctx.counter = counter
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.counter.vjps += 1
        return grad, None


class CountingDenoiser(nn.Module):
    """Wrap a denoiser; count its forward calls and the VJPs taken through it (per batch call)."""

    def __init__(self, denoiser):
        super().__init__()
        self.denoiser = denoiser
        self.forwards = 0
        self.vjps = 0

    def reset(self):
        self.forwards = self.vjps = 0

    def forward(self, x_t, sigma):
        self.forwards += 1
        out = self.denoiser(x_t, sigma)
        return _CountVJP.apply(out, self) if out.requires_grad else out


# ----------------------------------------------------------------------------------------
# Tasks and metrics
# ----------------------------------------------------------------------------------------
def make_operator(task: str, event_shape, n: int, generator: torch.Generator):
    """The operator of ``task`` for ``n`` observations: batch ``(n,)`` for random masks, ``()`` otherwise.

    Returns ``(operator, per_observation)`` where ``per_observation(i)`` is the operator of
    observation ``i`` with batch shape ``()`` (for the exact posterior).
    """
    from diffem.operators import GaussianBlur, Mask, SuperResolution

    C, H, W = event_shape
    if task == "inpaint75":
        mask = torch.rand(n, 1, H, W, generator=generator) >= 0.75  # keep 25 %
        return Mask(mask, channels=C), lambda i: Mask(mask[i], channels=C)
    if task == "box":
        op = Mask.box((H, W), (H // 2, W // 2), H // 4, W // 4, channels=C)
    elif task == "sr4":
        op = SuperResolution(4, (C, H, W))
    elif task == "deblur":
        op = GaussianBlur(1.0, (C, H, W))
    else:
        raise ValueError(f"unknown task {task!r}; known: {TASKS}")
    return op, lambda i: op


def repeat_operator(operator, per_obs: int):
    """Repeat a batch-``(n,)`` operator's parameters ``per_obs`` times each (``()`` operators unchanged)."""
    if tuple(operator.batch_shape) == ():
        return operator
    params = {k: v.repeat_interleave(per_obs, dim=0) for k, v in operator.parameters().items()}
    return operator._replace(**params)


def gaussian_w2(samples: Tensor, mean: Tensor, cov: Tensor, cov_trace: float | None = None) -> float:
    r"""W2 between :math:`\mathcal{N}(\bar{x}, \hat{C})` of ``samples`` ``(n, d)`` and :math:`\mathcal{N}(m, S)`.

    Uses the ``(n, n)`` matrix :math:`X S X^T / (n-1)` for :math:`\operatorname{tr}(S^{1/2}\hat{C}S^{1/2})^{1/2}`
    (same non-zero eigenvalues); float64.
    """
    x = samples.double()
    n = x.shape[0]
    xbar = x.mean(0)
    X = x - xbar
    gram = X @ cov.double() @ X.mT / (n - 1)
    eig = torch.linalg.eigvalsh((gram + gram.mT) / 2).clamp_min(0)
    tr_s = float(cov.double().diagonal().sum()) if cov_trace is None else cov_trace
    tr_c = float(X.square().sum() / (n - 1))
    w2sq = float((xbar - mean.double()).square().sum()) + tr_c + tr_s - 2 * float(eig.sqrt().sum())
    return math.sqrt(max(w2sq, 0.0))


def covariance_error(samples: Tensor, cov: Tensor, cov_fro2: float | None = None) -> float:
    r"""``sqrt(max(e, 0))`` of :func:`covariance_error_squared`: the relative Frobenius error of the covariance."""
    return math.sqrt(max(covariance_error_squared(samples, cov, cov_fro2), 0.0))


def covariance_error_squared(samples: Tensor, cov: Tensor, cov_fro2: float | None = None) -> float:
    r"""Unbiased estimate of :math:`\lVert C - S \rVert_F^2 / \lVert S \rVert_F^2`, ``C`` the samples' covariance.

    :math:`\lVert C - S \rVert_F^2 = \lVert C \rVert_F^2 - 2 \operatorname{tr}(C S) + \lVert S \rVert_F^2`,
    with :math:`\operatorname{tr}(\hat{C}_A \hat{C}_B)` (the sample covariances of two independent halves)
    unbiased for :math:`\lVert C \rVert_F^2` and :math:`\operatorname{tr}(\hat{C} S)` for
    :math:`\operatorname{tr}(C S)`; all through ``(n, n)`` matrices. Returns the unbiased estimate of
    :math:`\lVert C - S \rVert_F^2 / \lVert S \rVert_F^2` (mean 0 for exact samples, so it can be negative).
    """
    x = samples.double()
    n = x.shape[0]
    half = n // 2
    xa, xb = x[:half] - x[:half].mean(0), x[half:] - x[half:].mean(0)
    cross = float((xa @ xb.mT).square().sum()) / ((xa.shape[0] - 1) * (xb.shape[0] - 1))
    X = x - x.mean(0)
    tr_cs = float(((X @ cov.double()) * X).sum()) / (n - 1)
    s2 = float(cov.double().square().sum()) if cov_fro2 is None else cov_fro2
    return (cross - 2 * tr_cs + s2) / s2


def mean_rel_error(samples: Tensor, mean: Tensor) -> float:
    return float((samples.double().mean(0) - mean.double()).norm() / mean.double().norm())


def hardware() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


# ----------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------
def load_images(args, fit: bool = True) -> tuple[Tensor | None, Tensor]:
    """``(fit images, held-out images)`` in [-2, 2]: CIFAR-10 train / test, or ``--images-file``.

    Random subsets (seeded by ``--seed``): the archive's rows are sorted by class.
    """
    rng = np.random.default_rng(args.seed)
    if args.images_file:
        data = torch.load(args.images_file)
        fit, test = data["fit"], data["test"]
        return fit[: args.fit_images], test[: args.observations]
    from diffem.data.cifar10 import images_to_tensor, load_cifar10

    fit_images = None
    if fit:
        train = load_cifar10("train")
        fit_idx = np.sort(rng.choice(len(train), size=min(args.fit_images, len(train)), replace=False))
        fit_images = images_to_tensor(train.select(fit_idx.tolist()))
    else:
        rng.choice(50000, size=args.fit_images, replace=False)  # same test images as the exact part
    test = load_cifar10("test")
    test_idx = np.sort(rng.choice(len(test), size=min(args.observations, len(test)), replace=False))
    return fit_images, images_to_tensor(test.select(test_idx.tolist()))


# ----------------------------------------------------------------------------------------
# Sampling one configuration
# ----------------------------------------------------------------------------------------
def run_sampler(counting, y, operator, noise_std, event_shape, method, steps, seed, batch_size):
    """Posterior samples ``(N, *event_shape)``, with the counts and the time of the run."""
    from diffem.edm import make_scheduler
    from diffem.posterior import make_posterior
    from diffem.sampling import sample

    guidance, options, sampler = METHODS[method]
    steps_run = steps + 1 if sampler in EDM_SAMPLERS else steps  # equal network evaluations
    counting.reset()
    out = []
    start = time.perf_counter()
    n = y.shape[0]
    for i in range(0, n, batch_size):
        j = min(i + batch_size, n)
        op = operator if tuple(operator.batch_shape) == () else operator[i:j]
        posterior = make_posterior(guidance, counting, y[i:j], op, noise_std, **options)
        g = torch.Generator().manual_seed(derive_seed(seed, i))
        out.append(sample(posterior, (j - i, *event_shape), make_scheduler(sampler), steps_run, g))
    seconds = time.perf_counter() - start
    batches = math.ceil(n / batch_size)
    forwards, vjps = counting.forwards / batches, counting.vjps / batches
    return torch.cat(out), {
        "sampler": sampler,
        "sampler_steps": steps_run,
        "forwards": forwards,
        "vjps": vjps,
        "nfe": forwards + vjps,
        "seconds_per_sample": seconds / n,
        "expected_forwards": network_evaluations(sampler, steps_run),
    }


# ----------------------------------------------------------------------------------------
# Exact part
# ----------------------------------------------------------------------------------------
def exact_benchmark(prior64: GaussianPrior, x_true: Tensor, args, log=print) -> dict:
    event_shape = tuple(x_true.shape[1:])
    n_obs, n_samp = x_true.shape[0], args.samples
    prior32 = GaussianPrior.from_parameters(
        prior64.mean.float(), prior64.factor.float(), prior64.diag.float(), event_shape
    )
    counting = CountingDenoiser(prior32)
    results = []
    floors = {}
    for task in args.tasks:
        g = torch.Generator().manual_seed(derive_seed(args.seed, TASKS.index(task)))
        operator, per_obs = make_operator(task, event_shape, n_obs, g)
        y = operator(x_true) + args.noise_std * torch.randn(operator(x_true).shape, generator=g)
        means, covs, traces, fro2 = [], [], [], []
        t0 = time.perf_counter()
        for i in range(n_obs):
            m, S = prior64.posterior(y[i].double(), per_obs(i), args.noise_std)
            means.append(m), covs.append(S), traces.append(float(S.diagonal().sum())), fro2.append(float(S.square().sum()))
        log(f"[{task}] exact posteriors: {time.perf_counter() - t0:.1f} s")
        # the finite-sample floor: n exact posterior samples per observation
        floor_w2, floor_err, floor_cov = [], [], []
        for i in range(n_obs):
            L = torch.linalg.cholesky(covs[i] + 1e-10 * torch.eye(covs[i].shape[0], dtype=torch.float64))
            z = torch.randn(n_samp, L.shape[0], generator=g, dtype=torch.float64)
            xs = means[i] + z @ L.mT
            floor_w2.append(gaussian_w2(xs, means[i], covs[i], traces[i]))
            floor_err.append(mean_rel_error(xs, means[i]))
            floor_cov.append(covariance_error(xs, covs[i], fro2[i]))
        floors[task] = {
            "w2": float(np.mean(floor_w2)),
            "mean_rel_error": float(np.mean(floor_err)),
            "cov_error": float(np.mean(floor_cov)),
            "posterior_std": float(np.mean([math.sqrt(t) for t in traces])),
        }
        ys = y.repeat_interleave(n_samp, dim=0)
        op_rep = repeat_operator(operator, n_samp)
        for method in args.methods:
            for steps in args.steps:
                if steps > min(args.steps) * 4 and args.long_methods is not None and method not in args.long_methods:
                    continue  # the longest runs only for --long-methods (CPU budget)
                seed = derive_seed(args.seed, TASKS.index(task), list(METHODS).index(method), steps)
                x, info = run_sampler(counting, ys, op_rep, args.noise_std, event_shape, method, steps, seed, args.batch_size)
                x = x.reshape(n_obs, n_samp, -1)
                finite = bool(torch.isfinite(x).all())
                w2 = [gaussian_w2(x[i], means[i], covs[i], traces[i]) if finite else float("nan") for i in range(n_obs)]
                err = [mean_rel_error(x[i], means[i]) if finite else float("nan") for i in range(n_obs)]
                cerr = [covariance_error(x[i], covs[i], fro2[i]) if finite else float("nan") for i in range(n_obs)]
                row = {"task": task, "method": method, "steps": steps, **info, "w2": float(np.mean(w2)),
                       "mean_rel_error": float(np.mean(err)), "cov_error": float(np.mean(cerr)), "finite": finite}
                results.append(row)
                log(f"[{task}] {method:16s} steps {steps:4d}  nfe {row['nfe']:6.0f}  "
                    f"err {row['mean_rel_error']:.4f}  cov {row['cov_error']:.3f}  W2 {row['w2']:.3f} (floor {floors[task]['w2']:.3f})  "
                    f"{row['seconds_per_sample'] * 1e3:.2f} ms/sample")
    return {
        "part": "exact",
        "config": {
            "observations": n_obs, "samples_per_observation": n_samp, "steps": list(args.steps),
            "long_methods": None if args.long_methods is None else list(args.long_methods),
            "noise_std": args.noise_std, "rank": args.rank, "fit_images": args.fit_images,
            "event_shape": list(event_shape), "seed": args.seed, "tasks": list(args.tasks),
            "methods": {m: {"guidance": METHODS[m][0], "options": METHODS[m][1], "sampler": METHODS[m][2]}
                        for m in args.methods},
            "data": "images file" if args.images_file else "CIFAR-10 (offline archive): fit on train, observations from test",
        },
        "hardware": hardware(),
        "floors": floors,
        "results": results,
    }


# ----------------------------------------------------------------------------------------
# Learned part
# ----------------------------------------------------------------------------------------
def learned_benchmark(denoiser, x_true: Tensor, args, log=print) -> dict:
    from diffem.metrics import psnr, ssim

    event_shape = tuple(x_true.shape[1:])
    n_obs, n_samp = x_true.shape[0], args.samples
    counting = CountingDenoiser(denoiser)
    results = []
    for task in args.tasks:
        g = torch.Generator().manual_seed(derive_seed(args.seed, TASKS.index(task)))
        operator, _ = make_operator(task, event_shape, n_obs, g)
        y = operator(x_true) + args.noise_std * torch.randn(operator(x_true).shape, generator=g)
        ys = y.repeat_interleave(n_samp, dim=0)
        op_rep = repeat_operator(operator, n_samp)
        truth = x_true.repeat_interleave(n_samp, dim=0)
        for method in args.methods:
            for steps in args.steps:
                seed = derive_seed(args.seed, TASKS.index(task), list(METHODS).index(method), steps)
                x, info = run_sampler(counting, ys, op_rep, args.noise_std, event_shape, method, steps, seed, args.batch_size)
                finite = bool(torch.isfinite(x).all())
                xc = x.clamp(-2, 2).nan_to_num(0.0)
                mean = xc.reshape(n_obs, n_samp, *event_shape).mean(1)
                row = {"task": task, "method": method, "steps": steps, **info, "finite": finite,
                       "psnr": float(psnr(xc, truth).mean()), "ssim": float(ssim(xc, truth, data_range=4.0).mean()),
                       "psnr_of_mean": float(psnr(mean, x_true).mean()),
                       "ssim_of_mean": float(ssim(mean, x_true, data_range=4.0).mean())}
                results.append(row)
                log(f"[{task}] {method:16s} steps {steps:4d}  PSNR {row['psnr']:.2f}  SSIM {row['ssim']:.3f}")
    return {
        "part": "learned",
        "config": {"prior": str(args.prior), "label": args.label, "observations": n_obs, "samples_per_observation": n_samp,
                   "steps": list(args.steps), "noise_std": args.noise_std, "seed": args.seed,
                   "tasks": list(args.tasks), "event_shape": list(event_shape),
                   "lpips": "not reported: its network weights are not available offline"},
        "hardware": hardware(),
        "results": results,
    }


#: The label of a learned results file written before files carried one (the EM prior).
LEARNED_LABEL = "EM prior"


def learned_path(results_dir: Path, label: str) -> Path:
    """The results file of a learned prior: ``posterior_learned.json`` for the EM prior's default label,
    ``posterior_learned_<label>.json`` (label lower-cased, each run of other characters as one ``-``) otherwise."""
    if label == LEARNED_LABEL:
        return results_dir / "posterior_learned.json"
    slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
    return results_dir / f"posterior_learned_{slug}.json"


def _learned_comparison(learned: list[dict]) -> list[str]:
    """PSNR / SSIM of the posterior mean under each learned prior, side by side (rows both have)."""
    labels = [one["config"].get("label", LEARNED_LABEL) for one in learned]
    rows = [{(r["task"], r["method"], r["steps"]): r for r in one["results"]} for one in learned]
    keys = [k for k in rows[0] if all(k in other for other in rows[1:])]
    head = " | ".join(f"{lab}: PSNR / SSIM" for lab in labels)
    lines = ["## The learned priors side by side", "",
             "The posterior mean's PSNR (dB) / SSIM under each prior, on the same held-out images, operators, noise "
             f"and seeds; the last column is the first prior ({labels[0]}) minus the last ({labels[-1]}).", "",
             f"| task | method | steps | {head} | PSNR difference |", "|---|---|---|" + "---|" * len(labels) + "---|"]
    for k in keys:
        cells = " | ".join(f"{_fmt(r[k]['psnr_of_mean'], '.2f')} / {_fmt(r[k]['ssim_of_mean'], '.3f')}" for r in rows)
        diff = rows[0][k]["psnr_of_mean"] - rows[-1][k]["psnr_of_mean"]
        lines.append(f"| {k[0]} | {METHOD_LABELS.get(k[1], k[1])} | {k[2]} | {cells} | {_fmt(diff, '+.2f')} |")
    return lines + [""]


# ----------------------------------------------------------------------------------------
# Table and figure (from the JSON only)
# ----------------------------------------------------------------------------------------
def diverged(r: dict) -> bool:
    """A run whose samples left any sensible range (non-finite, or mean error > 10x the posterior mean's norm)."""
    return not r["finite"] or not r["mean_rel_error"] < 10


def _fmt(v, spec):
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def write_table(exact: dict | None, learned: list[dict], path: Path, source_names: dict) -> None:
    """The Markdown table: the exact part, then each learned prior (`learned`: their results, the EM prior first)."""
    lines = ["# Posterior sampling benchmark", ""]
    lines.append(f"Written by `benchmarks/posterior.py` from {', '.join(f'`{v}`' for v in source_names.values())}; "
                 "do not edit by hand.")
    lines.append("")
    if exact is not None:
        c = exact["config"]
        lines += [
            "## Exact: Gaussian prior, known posterior",
            "",
            f"Prior: PPCA rank {c['rank']} fitted to {c['fit_images']} images ({c['data']}), "
            f"event shape {tuple(c['event_shape'])}, data in [-2, 2]. Observations: {c['observations']} held-out images "
            f"per task, σ_y = {c['noise_std']}, {c['samples_per_observation']} posterior samples per observation "
            f"(reduced to fit a CPU budget: {exact.get('wall_seconds', float('nan')) / 60:.0f} min of wall time in all, one "
            "thread on a shared 2-core machine; metrics are averages over the observations). Every method uses the "
            "prior's exact denoiser, so differences are the method's and the sampler's alone.",
            "",
            "- **err**: ‖x̄ − m‖ / ‖m‖, mean of the samples vs the exact posterior mean.",
            "- **W2**: Wasserstein-2 between the Gaussian fitted to the samples and the exact posterior, "
            "tr((S^½ Ĉ S^½)^½) from the eigenvalues of the n×n matrix X S Xᵀ/(n−1) (X: centred samples), "
            "never a 3072×3072 square root. With n = 256 ≪ d = 3072 the sample covariance has rank < n, which "
            "biases W2 upwards (see the *exact samples* row, the finite-sample floor); a sampler with too little "
            "spread can score *below* that floor. Read W2 together with **cov err**.",
            "- **cov err**: an unbiased estimate of ‖C − S‖_F / ‖S‖_F (C: the covariance of the samples, S: the "
            "exact one), from tr(Ĉ_A Ĉ_B) of two independent halves of the samples (unbiased for ‖C‖²_F) and "
            "tr(Ĉ S); about 0 for exact samples, whatever n.",
            "- **NFE**: network evaluations per sample, counted: forwards + vector-Jacobian products. "
            "DDPM / DDIM with N steps make N + 1 forwards; the EDM samplers are run with N + 1 steps "
            "(N + 1 forwards) so that they use the same number of evaluations.",
            "- **ms**: wall milliseconds per sample on this CPU "
            f"({exact['hardware']['cpu']}, {exact['hardware']['threads']} threads, shared with other jobs).",
            "- Sampler: the paper's DDPM (the E-step's) unless the method names another. Hyperparameters: the "
            "posterior methods' defaults (DPS ζ = 1, DiffPIR λ = 7, ΠGDM and MMPS CG 1 unless stated)."
            + ("" if not c.get("long_methods") else
               f" To fit the CPU budget, the largest step count ({max(c['steps'])}) was run only for: "
               + ", ".join(METHOD_LABELS.get(m, m) for m in c["long_methods"]) + ".")
            + "".join(" Appended run: " + "; ".join(
                f"{METHOD_LABELS.get(m, m)} at steps "
                + ", ".join(str(k) for k in sorted({r['steps'] for r in exact['results'] if r['method'] == m}))
                for m in a["methods"]) + "." for a in c.get("appended", [])),
            "- **diverged**: samples that left any sensible range (mean error > 10, i.e. ‖x̄ − m‖ > 10 ‖m‖); "
            "the JSON keeps the raw numbers. MMPS with (I + Σt⁻¹)⁻¹ (Σ_x = I) keeps the output x̂ + σ² Jᵀ Aᵀ v: "
            "along a prior direction of variance λ, with the observation exact, it moves x̂ by "
            "λ(1 + σ²)/(λ + σ²) times the residual instead of once, so a prior with variances ≫ 1 (images in "
            "[-2, 2] have a leading variance in the hundreds) overshoots at large σ and the sampler diverges.",
            "",
        ]
        for task in c["tasks"]:
            fl = exact["floors"][task]
            lines.append(f"### {TASK_LABELS.get(task, task)}")
            lines.append("")
            lines.append(f"Exact posterior: mean over observations of √(tr S) = {fl['posterior_std']:.3f}.")
            lines.append("")
            lines.append("| method | steps | NFE (fwd + VJP) | err | cov err | W2 | ms / sample |")
            lines.append("|---|---|---|---|---|---|---|")
            for method in c["methods"]:
                for s in c["steps"]:
                    r = next((r for r in exact["results"] if r["task"] == task and r["method"] == method and r["steps"] == s), None)
                    if r is None:
                        continue
                    if diverged(r):
                        lines.append(
                            f"| {METHOD_LABELS.get(method, method)} | {s} | {_fmt(r['nfe'], '.0f')} "
                            f"({_fmt(r['forwards'], '.0f')} + {_fmt(r['vjps'], '.0f')}) | diverged "
                            f"({_fmt(r['mean_rel_error'], '.1e')}) | diverged | diverged | {_fmt(r['seconds_per_sample'] * 1e3, '.1f')} |"
                        )
                        continue
                    lines.append(
                        f"| {METHOD_LABELS.get(method, method)} | {s} | {_fmt(r['nfe'], '.0f')} "
                        f"({_fmt(r['forwards'], '.0f')} + {_fmt(r['vjps'], '.0f')}) | {_fmt(r['mean_rel_error'], '.4f')} | "
                        f"{_fmt(r.get('cov_error'), '.3f')} | {_fmt(r['w2'], '.2f')} | {_fmt(r['seconds_per_sample'] * 1e3, '.1f')} |"
                    )
            lines.append(f"| {METHOD_LABELS['exact']} | | | {_fmt(fl['mean_rel_error'], '.4f')} | "
                         f"{_fmt(fl.get('cov_error'), '.3f')} | {_fmt(fl['w2'], '.2f')} | |")
            lines.append("")
        lines += _headlines(exact)
    if learned:
        for one in learned:
            c = one["config"]
            lines += [
                f"## Learned prior: {c.get('label', LEARNED_LABEL)}",
                "",
                f"Prior: `{c['prior']}`; {c['observations']} held-out images, σ_y = {c['noise_std']}, "
                f"{c['samples_per_observation']} samples per observation. PSNR (dB) and SSIM of the samples "
                "and of their mean against the true images (data range 4). LPIPS: " + c["lpips"] + ".",
                "",
                "| task | method | steps | NFE | PSNR | SSIM | PSNR of mean | SSIM of mean | ms |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for r in one["results"]:
                lines.append(
                    f"| {r['task']} | {METHOD_LABELS.get(r['method'], r['method'])} | {r['steps']} | {_fmt(r['nfe'], '.0f')} | "
                    f"{_fmt(r['psnr'], '.2f')} | {_fmt(r['ssim'], '.3f')} | {_fmt(r['psnr_of_mean'], '.2f')} | "
                    f"{_fmt(r['ssim_of_mean'], '.3f')} | {_fmt(r['seconds_per_sample'] * 1e3, '.1f')} |"
                )
            lines.append("")
        if len(learned) > 1:
            lines += _learned_comparison(learned)
    else:
        lines += [
            "## Learned prior",
            "",
            "Not run: no trained CIFAR-10 prior exists in this checkout. "
            "`python benchmarks/posterior.py --prior LAP_DIR` runs it on a saved lap (PSNR / SSIM on held-out "
            "test images); no learned numbers are claimed here.",
            "",
        ]
    lines += [
        "## The paper's Appendix E (for orientation only)",
        "",
        "Rozet et al. (2024), Appendix E compares MMPS with DPS, ΠGDM, TMPD and DiffPIR on FFHQ 256x256 "
        "with a pretrained model and DDIM, 100 steps (LPIPS / PSNR / SSIM). "
        + ("Its numbers: see below." if PAPER_APPENDIX_E else
           "This project's offline search could not retrieve that table verbatim, so its numbers are not "
           "reproduced here rather than guessed; the setting (FFHQ, a learned prior, perceptual metrics) is not "
           "comparable with the exact Gaussian benchmark above anyway."),
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


#: (DDPM reference, samplers compared with it): the same MMPS configuration under other samplers.
SAMPLER_FAMILIES = (
    ("mmps", ("mmps_edm_sde", "mmps_edm_dpmpp", "mmps_edm_euler", "mmps_ddim")),
    ("mmps_cg4", ("mmps_cg4_edm_sde", "mmps_cg4_edm_dpmpp")),
)


def _headlines(exact: dict) -> list[str]:
    """Closest methods to exact per step count; other samplers' NFE to match the DDPM sampler's best."""
    c = exact["config"]
    out = ["### Headlines (computed from the results)", ""]
    for task in c["tasks"]:
        rows = [r for r in exact["results"] if r["task"] == task and not diverged(r)]
        fl = exact["floors"][task]
        parts = []
        for s in c["steps"]:
            cand = [r for r in rows if r["steps"] == s]
            if cand:
                by_cov = min(cand, key=lambda r: r["cov_error"])
                by_err = min(cand, key=lambda r: r["mean_rel_error"])
                parts.append(f"{s} steps: cov err {METHOD_LABELS.get(by_cov['method'], by_cov['method'])} "
                             f"({by_cov['cov_error']:.3f}), mean err {METHOD_LABELS.get(by_err['method'], by_err['method'])} "
                             f"({by_err['mean_rel_error']:.4f})")
        out.append(f"- **{task}** (exact samples: cov err {fl['cov_error']:.3f}, mean err {fl['mean_rel_error']:.4f}), "
                   "closest to exact at " + "; ".join(parts) + ".")
        for reference, others in SAMPLER_FAMILIES:
            ddpm = [r for r in rows if r["method"] == reference]
            if not ddpm:
                continue
            target = min(ddpm, key=lambda r: r["cov_error"])
            tol = max(0.05 * target["cov_error"], fl["cov_error"], 0.01)
            for other in others:
                e = sorted((r for r in rows if r["method"] == other), key=lambda r: r["nfe"])
                if not e:
                    continue
                reach = next((r for r in e if r["cov_error"] <= target["cov_error"] + tol), None)
                head = (f"  - {METHOD_LABELS[other]} vs {METHOD_LABELS[reference]} (best: cov err {target['cov_error']:.3f} "
                        f"at {target['nfe']:.0f} NFE)")
                if reach is not None:
                    out.append(f"{head}: within {tol:.3f} of it at {reach['nfe']:.0f} NFE "
                               f"({target['nfe'] / reach['nfe']:.1f}x fewer), mean err {reach['mean_rel_error']:.4f} "
                               f"vs {target['mean_rel_error']:.4f}.")
                else:
                    best = min(e, key=lambda r: r["cov_error"])
                    out.append(f"{head}: not within {tol:.3f} at the step counts run (best {best['cov_error']:.3f} "
                               f"at {best['nfe']:.0f} NFE).")
    out.append("")
    return out


def write_figure(exact: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    c = exact["config"]
    tasks = c["tasks"]
    metrics = (("mean_rel_error", "mean rel. error"), ("cov_error", "cov err (unbiased)"), ("w2", "Gaussian W2"))
    fig, axes = plt.subplots(len(metrics), len(tasks), figsize=(3.6 * len(tasks), 2.8 * len(metrics)), squeeze=False)
    for col, task in enumerate(tasks):
        for row, (key, label) in enumerate(metrics):
            ax = axes[row][col]
            for method in c["methods"]:
                rows = sorted((r for r in exact["results"] if r["task"] == task and r["method"] == method
                               and not diverged(r)), key=lambda r: r["nfe"])
                if rows:
                    style = "--" if METHODS.get(method, ("", {}, "ddpm"))[2] != "ddpm" else "-"
                    color = plt.get_cmap("tab20")(list(METHODS).index(method) % 20 if method in METHODS else 19)
                    ax.plot([r["nfe"] for r in rows], [max(r[key], 1e-4) for r in rows], style, marker="o", ms=3,
                            color=color, label=METHOD_LABELS.get(method, method))
            if exact["floors"][task][key] > 1e-3:  # (an unbiased cov err of exact samples can be ~0)
                ax.axhline(exact["floors"][task][key], color="k", lw=0.8, ls=":", label=METHOD_LABELS["exact"])
            ax.set_xscale("log")
            ax.set_yscale("log" if key != "w2" else "linear")
            ax.xaxis.set_major_locator(FixedLocator([20, 50, 100, 200, 500, 1000]))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
            if row == 0:
                ax.set_title(task)
            if row == len(metrics) - 1:
                ax.set_xlabel("network evaluations per sample")
            if col == 0:
                ax.set_ylabel(label)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.suptitle("Posterior sampling on a Gaussian prior (CIFAR-10 PPCA): error vs network evaluations", fontsize=10)
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------
def merge_results(old: dict, new: dict) -> dict:
    """``old`` with ``new``'s rows added (a row of the same task, method and steps replaced).

    Both runs must share the data, observations, samples, noise and seed (same exact posteriors).
    """
    keys = ("observations", "samples_per_observation", "noise_std", "rank", "fit_images", "event_shape", "seed", "data")
    for k in keys:
        if old["config"][k] != new["config"][k]:
            raise ValueError(f"--append: the results to merge differ in {k}: {old['config'][k]!r} vs {new['config'][k]!r}")
    key = lambda r: (r["task"], r["method"], r["steps"])  # noqa: E731
    rows = {key(r): r for r in old["results"]}
    rows.update({key(r): r for r in new["results"]})
    merged = dict(old)
    c = dict(old["config"])
    c["methods"] = {**old["config"]["methods"], **new["config"]["methods"]}
    c["tasks"] = [t for t in TASKS if t in set(old["config"]["tasks"]) | set(new["config"]["tasks"])]
    c["steps"] = sorted(set(old["config"]["steps"]) | set(new["config"]["steps"]))
    c.setdefault("appended", []).append({"methods": list(new["config"]["methods"]), "steps": new["config"]["steps"],
                                         "tasks": new["config"]["tasks"], "wall_seconds": new.get("wall_seconds")})
    merged["config"] = c
    order = {m: i for i, m in enumerate(METHODS)}
    merged["results"] = sorted(rows.values(), key=lambda r: (TASKS.index(r["task"]), order.get(r["method"], 99), r["steps"]))
    merged["floors"] = {**old["floors"], **new["floors"]}
    merged["wall_seconds"] = (old.get("wall_seconds") or 0) + (new.get("wall_seconds") or 0)
    return merged


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prior", default=None, help="a saved pipeline folder (EM lap): run the learned part")
    p.add_argument("--label", default=None,
                   help=f"the learned prior's name in the table (default {LEARNED_LABEL!r}); each label has its own "
                        "results file, so an oracle prior's rows sit beside the EM prior's")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--steps", nargs="+", type=int, default=[16, 64, 256])
    p.add_argument("--long-methods", nargs="+", default=None, choices=list(METHODS),
                   help="run step counts > 4x the smallest only for these methods (default: all)")
    p.add_argument("--observations", type=int, default=4)
    p.add_argument("--samples", type=int, default=None,
                   help="posterior samples per observation (default: 256 exact, 1 learned)")
    p.add_argument("--fit-images", type=int, default=4096)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--noise-std", type=float, default=1e-2)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--images-file", default=None,
                   help="a torch file {'fit': (N,C,H,W), 'test': (M,C,H,W)} in [-2, 2] instead of CIFAR-10 (tests)")
    p.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--table", type=Path, default=DEFAULT_TABLE)
    p.add_argument("--figure", type=Path, default=DEFAULT_FIGURE)
    p.add_argument("--report-only", action="store_true", help="rebuild the table and figure from the results JSON")
    p.add_argument("--append", action="store_true",
                   help="merge this run's rows into the existing exact results JSON (same data and seed)")
    args = p.parse_args(argv)
    if args.samples is None:
        args.samples = 1 if args.prior else 256
    if args.label is None:
        args.label = LEARNED_LABEL
    if not args.label.strip():
        p.error("--label must not be empty")
    for name in ("observations", "samples", "fit_images", "rank", "batch_size", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.samples < 2 and not args.prior:
        p.error("--samples must be >= 2 for the exact part (a covariance is estimated)")
    if any(s < 1 for s in args.steps):
        p.error("--steps must be >= 1")
    if not args.noise_std > 0:
        p.error("--noise-std must be > 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    exact_path = args.results_dir / "posterior_exact.json"
    this_learned = learned_path(args.results_dir, args.label)
    if not args.report_only:
        args.results_dir.mkdir(parents=True, exist_ok=True)
        if args.prior is None:
            t0 = time.perf_counter()
            fit, test = load_images(args)
            prior = GaussianPrior.fit(fit.double(), args.rank)
            print(f"PPCA rank {args.rank} on {len(fit)} images: {time.perf_counter() - t0:.1f} s")
            results = exact_benchmark(prior, test, args)
            results["wall_seconds"] = time.perf_counter() - t0
            if args.append and exact_path.exists():
                results = merge_results(json.loads(exact_path.read_text()), results)
            exact_path.write_text(json.dumps(results, indent=1))
        else:
            from diffem.pipeline import DiffusionPriorPipeline, denoiser_of

            pipe = DiffusionPriorPipeline.from_pretrained(args.prior)
            denoiser = denoiser_of(pipe.unet).eval()
            for p_ in denoiser.parameters():
                p_.requires_grad_(False)
            _, test = load_images(args, fit=False)
            results = learned_benchmark(denoiser, test.to(torch.float32), args)
            this_learned.write_text(json.dumps(results, indent=1))
    exact = json.loads(exact_path.read_text()) if exact_path.exists() else None
    learned_files = sorted(args.results_dir.glob("posterior_learned*.json"), key=lambda f: (f.name != "posterior_learned.json", f.name))
    learned = [json.loads(f.read_text()) for f in learned_files]
    if exact is None and not learned:
        print(f"no results in {args.results_dir}", file=sys.stderr)
        return 1
    sources = {k: os.path.relpath(p, ROOT) if str(p).startswith(str(ROOT)) else str(p)
               for k, p in (("exact", exact_path), *((f"learned ({f.stem})", f) for f in learned_files)) if p.exists()}
    write_table(exact, learned, args.table, sources)
    if exact is not None:
        write_figure(exact, args.figure)
    print(f"wrote {args.table}" + (f" and {args.figure}" if exact is not None else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
