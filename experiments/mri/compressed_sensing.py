"""Compressed-sensing references for tables/mri.md: L1-wavelet and total-variation reconstructions (sigpy).

    python experiments/mri/compressed_sensing.py RUN_DIR [--lambdas 1e-4 3e-4 ... 1e-1]
        [--validation-slices 8] [--output experiments/mri/results/<profile>-cs.json]

Writes the metrics to the JSON file and the test reconstructions (``{R: {method: (n, 1, S, S)}}``,
float16, data units) beside it as ``<profile>-cs.pt``, for the report's figure.

RUN_DIR is an MRI run folder (or its committed results folder: only ``config.yaml`` is read). For
every acceleration of ``data.eval_accelerations`` the script reconstructs the same held-out slices,
through the same masks and noise as the table's EM rows (``MriTask.evaluation_observations``),
with sigpy's ``mri.app.L1WaveletRecon`` (Daubechies-4 wavelets) and ``mri.app.TotalVariationRecon``
on diffem's own operator and k-space: y = M (FFT2c(x) + sigma_y e) is sigpy's centred orthonormal
FFT, single coil (sensitivity 1), the column mask as its k-space weights. The image is real, so
its spectrum is conjugate-symmetric: each sampled column's mirror is filled in from it before the
complex solve (as the zero-filled A+ y counts it), and the real part of the solution is kept. The images are
reconstructed in intensity units u = (x + 2) / 4 (background 0; k-space shifted by the transform of
the constant -2), and scored as the EM rows are: PSNR, SSIM (7x7 uniform window) and NMSE of |u|
against the truth, data range 1, and the data consistency ||A x - y|| / ||y||.

The regularisation weight lambda of each method and R is the one of ``--lambdas`` with the best
mean PSNR on a validation set of clean slices: the held-out slab's slices that are not test
slices (disjoint from the test slices and from training, which never touches the slab), observed
with their own masks and noise. This choice sees clean images, which the EM prior never does: it
gives the baselines an advantage.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from diffem.config import config_from_dict  # noqa: E402
from diffem.metrics import nmse, psnr, ssim  # noqa: E402
from diffem.operators import SubsampledFourier  # noqa: E402
from diffem.runs import read_config  # noqa: E402
from diffem.tasks import get_task  # noqa: E402
from diffem.tasks.mri import EVAL_STREAM, observe_kspace  # noqa: E402

#: Seed stream of the validation observations (the training stream is 0, the test stream EVAL_STREAM).
VALIDATION_STREAM = EVAL_STREAM + 1
METHODS = ("l1_wavelet", "total_variation")
LAMBDAS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)


def reconstruct(method: str, y: torch.Tensor, mask: torch.Tensor, lamda: float, max_iter: int = 100) -> torch.Tensor:
    """Reconstructions ``(n, 1, S, S)`` in data units of observations ``y`` ``(n, 2, S, S)`` (real, imaginary
    k-space, diffem's operator) and column masks ``mask`` ``(n, S)``, by sigpy's app ``method``.

    Raises:
        ValueError: for an unknown method.
    """
    import sigpy.mri

    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}")
    n, s = y.shape[0], y.shape[-1]
    A = SubsampledFourier(mask)
    # intensity units u = (x + 2) / 4: A u = (A x + 2 A 1) / 4, with A x = y
    shift = A(torch.ones(n, 1, s, s))
    y_u = ((y + 2 * shift) / 4).double().numpy()
    # A real image's spectrum is conjugate-symmetric, X(-k) = conj X(k): a sampled column also gives its
    # mirror. Filling those in before the complex solve keeps the real part of the solution data-consistent
    # (otherwise a column whose mirror is unobserved loses half of itself to the real part).
    mirror = (s - np.arange(s)) % s  # index of -k in the centred FFT's ordering
    out = []
    for i in range(n):
        ksp = y_u[i, 0] + 1j * y_u[i, 1]
        sampled = mask[i].numpy().astype(bool)
        mirrored = np.conj(ksp[np.ix_(mirror, mirror)])
        extra = sampled[mirror] & ~sampled
        ksp = np.where(extra[None, :], mirrored, ksp)[None]  # (coils=1, S, S)
        weights = np.broadcast_to((sampled | extra)[None, :], (s, s)).astype(np.float64)[None]
        mps = np.ones_like(ksp)
        if method == "l1_wavelet":
            app = sigpy.mri.app.L1WaveletRecon(ksp, mps, lamda, weights=weights, max_iter=max_iter, show_pbar=False)
        else:
            app = sigpy.mri.app.TotalVariationRecon(ksp, mps, lamda, weights=weights, max_iter=max_iter, show_pbar=False)
        u = np.real(app.run())
        out.append(torch.from_numpy(np.ascontiguousarray(u)).float())
    return (torch.stack(out)[:, None] * 4 - 2).float()


def scores(estimate: torch.Tensor, truth: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> dict:
    """The EM rows' metrics (``MriTask.evaluate``) of ``estimate`` against ``truth`` (both data units)."""
    m, t = ((estimate + 2) / 4).abs(), ((truth + 2) / 4).abs()
    A = SubsampledFourier(mask)
    dc = (A(estimate) - y).flatten(1).norm(dim=1) / y.flatten(1).norm(dim=1)
    return {"psnr": float(psnr(m, t, data_range=1.0).mean()),
            "ssim": float(ssim(m, t, data_range=1.0, gaussian_kernel=False, kernel_size=7).mean()),
            "nmse": float(nmse(m, t).mean()), "data_consistency": float(dc.mean())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--lambdas", type=float, nargs="+", default=list(LAMBDAS))
    parser.add_argument("--validation-slices", type=int, default=8)
    parser.add_argument("--max-iter", type=int, default=100)
    parser.add_argument("--output", type=Path, default=None, help="default: experiments/mri/results/<profile>-cs.json")
    args = parser.parse_args(argv)

    config = config_from_dict(read_config(args.run_dir)[0])
    config.output_dir = str(args.run_dir)
    task = get_task(config)
    d = task.data
    truth = task.clean_images("test")
    ds = task._slices("test")
    test_idx = set(np.unique(np.linspace(0, len(ds) - 1, min(int(d["eval_slices"]), len(ds))).round().astype(int)))
    rest = [i for i in range(len(ds)) if i not in test_idx]
    if not rest:
        raise SystemExit("no held-out slice is left for validation (every slab slice is a test slice)")
    pick = np.unique(np.linspace(0, len(rest) - 1, min(args.validation_slices, len(rest))).round().astype(int))
    from diffem.data.mri import images_of

    val_idx = [rest[i] for i in pick]
    val = images_of(ds.select(val_idx))
    start = time.perf_counter()
    results: dict = {"run": str(args.run_dir), "profile": config.profile, "test_slices": sorted(int(i) for i in test_idx),
                     "validation_slices": [int(i) for i in val_idx], "lambdas": args.lambdas, "max_iter": args.max_iter,
                     "library": "sigpy " + __import__("sigpy").__version__, "accelerations": {}}
    reconstructions: dict = {}
    for R in d["eval_accelerations"]:
        y_val, m_val = observe_kspace(val, float(R), float(d["noise_std"]), int(d["seed"]), VALIDATION_STREAM,
                                      range(len(val)))
        y, mask = task.evaluation_observations(R)
        entry, images = {}, {}
        for method in METHODS:
            sweep = {f"{lam:g}": scores(reconstruct(method, y_val, m_val, lam, args.max_iter), val, y_val, m_val)["psnr"]
                     for lam in args.lambdas}
            best = max(sweep, key=sweep.get)
            est = reconstruct(method, y, mask, float(best), args.max_iter)
            entry[method] = {"lambda": float(best), "validation_psnr": sweep} | scores(est, truth, y, mask)
            images[method] = est.half()
            print(f"R = {R:g} {method}: lambda {best} (validation PSNR {sweep[best]:.2f}); test PSNR "
                  f"{entry[method]['psnr']:.2f} SSIM {entry[method]['ssim']:.3f}", flush=True)
        results["accelerations"][f"{R:g}"] = entry
        reconstructions[f"{R:g}"] = images
    results["time_s"] = time.perf_counter() - start
    output = args.output or HERE / "results" / f"{config.profile}-cs.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1) + "\n")
    torch.save(reconstructions, output.with_suffix(".pt"))
    print(f"wrote {output} ({results['time_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
