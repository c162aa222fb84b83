r"""What one M-step step and one E-step (MMPS) step of the `paper` profiles cost on this device, per variant.

    python benchmarks/gpu.py [--experiments cifar10 mri] [--variants fp32 tf32 bf16 bf16-cl bf16-compile]
        [--batch N] [--repeats 10] [--warmup 3] [--output benchmarks/results/gpu-<device>.json]
    python benchmarks/gpu.py --smoke        # tiny networks on the CPU, seconds (the test suite runs it)

For each experiment the network is the `paper` profile's own (``diffem.tasks`` builds it from
``experiments/<name>/paper.yaml``), and for each variant the script times, after ``--warmup``
untimed calls, the median over ``--repeats`` of:

- ``mstep_step_s``: one optimizer step of the M-step's objective (``diffem.denoiser.DenoisingLoss``:
  noise draw, forward, backward, gradient clipping at 1, Adam (fused on CUDA), EMA update with
  ``torch._foreach`` ops) on the profile's per-process batch (``--batch`` replaces it), with the
  noise drawn on the device;
- ``estep_step_s``: one MMPS posterior-denoiser call (``diffem.posterior.MMPSDenoiser``, the
  profile's CG iterations: one forward and ``maxiter`` VJPs; the sampler's update is negligible) on the E-step's
  batch of synthetic observations of the profile's operator (a random pixel mask for CIFAR-10,
  a random column mask of the Fourier operator for MRI);
- ``peak_memory_gib``: the largest CUDA allocation of the variant (CUDA only).

Variants: ``fp32`` (TF32 off), ``tf32`` (TF32 matmuls and convolutions), ``bf16`` (bf16 autocast,
as ``precision: bf16``), ``bf16-cl`` (and channels_last), ``bf16-compile`` (and ``torch.compile``
of the network). The projection of a lap, ``lap_h``, is ``mstep_steps x mstep_step_s`` plus
``observations x estep.steps x estep_step_s / estep_batch`` (one process; divide by the process
count for data parallelism). Prints one JSON object per (experiment, variant) and writes them all
to ``--output``. Numbers are for the device named in each row: compare rows of one device only.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("fp32", "tf32", "bf16", "bf16-cl", "bf16-compile")
#: Observations per experiment in the paper profile (CIFAR-10 train set; fastMRI single-coil knee slices x 2).
OBSERVATIONS = {"cifar10": 50_000, "mri": 2 * 34_742}


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _setup(experiment: str, smoke: bool):
    """The profile's config and task (for its network). The MRI `paper` profile reads a fastMRI folder
    the benchmark does not need: its network is built with ``data.kind=brain`` (same network keys)."""
    from diffem.config import load_config
    from diffem.tasks import get_task

    overrides = ["data.kind=brain"] if (experiment == "mri" and not smoke) else []
    config = load_config(experiment, "smoke" if smoke else "paper", overrides=overrides)
    return config, get_task(config)


def _operator(experiment: str, event_shape, n: int, g: torch.Generator):
    from diffem.operators import Mask, SubsampledFourier

    if experiment == "cifar10":
        _, h, w = event_shape
        return Mask(torch.rand(n, 1, h, w, generator=g) > 0.75, channels=event_shape[0])
    size = event_shape[-1]
    return SubsampledFourier(torch.rand(n, size, generator=g) < 1 / 6)


def bench(experiment: str, variant: str, device, batch: int | None, warmup: int, repeats: int, smoke: bool) -> dict:
    from diffem.denoiser import Denoiser, DenoisingLoss
    from diffem.pipeline import event_shape_of
    from diffem.posterior import MMPSDenoiser

    config, task = _setup(experiment, smoke)
    torch.backends.cuda.matmul.allow_tf32 = variant != "fp32"
    torch.backends.cudnn.allow_tf32 = variant != "fp32"
    bf16 = variant.startswith("bf16")
    net = task.backbone(0).to(device)
    if variant in ("bf16-cl", "bf16-compile") and device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    model = torch.compile(net) if variant == "bf16-compile" else net
    event = event_shape_of(net)
    g = torch.Generator(device).manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # -- M-step step
    b = batch or config.mstep.batch_size
    objective = DenoisingLoss(Denoiser(model))
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-5, fused=device.type == "cuda")
    ema = [p.detach().clone() for p in params]
    x = torch.randn(b, *event, device=device, generator=g)

    def mstep():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            sigma, z = Denoiser.draw_noise(x, g)
            loss = objective(x, sigma=sigma, noise=z)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - 0.999)

    mstep_s = _median_time(mstep, device, warmup, repeats)
    del optimizer

    # -- E-step step
    e = batch or config.estep.batch_size
    A = _operator(experiment, event, e, torch.Generator().manual_seed(1)).to(device)
    y = A(torch.randn(e, *event, device=device, generator=g)).detach()
    denoiser = Denoiser(model).eval()
    mmps = MMPSDenoiser(denoiser, y, A, 1e-2, maxiter=config.estep.maxiter)
    x_t = torch.randn(e, *event, device=device, generator=g)
    sigma = torch.ones(e, device=device)  # the cost does not depend on the noise level

    def estep():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            mmps(x_t, sigma)

    estep_s = _median_time(estep, device, warmup, repeats)
    steps = math.ceil(config.mstep.epochs * OBSERVATIONS[experiment] / config.mstep.batch_size) if config.mstep.epochs \
        else config.mstep.steps
    lap_s = steps * mstep_s * (config.mstep.batch_size / b) + OBSERVATIONS[experiment] * config.estep.steps * estep_s / e
    return {
        "experiment": experiment, "profile": config.profile, "variant": variant,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "parameters_m": sum(p.numel() for p in net.parameters()) / 1e6, "mstep_batch": b, "estep_batch": e,
        "estep_maxiter": config.estep.maxiter, "mstep_step_s": mstep_s, "estep_step_s": estep_s,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "lap_h": lap_s / 3600, "smoke": smoke,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", nargs="+", default=["cifar10", "mri"], choices=sorted(OBSERVATIONS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--batch", type=int, default=None, help="replaces the profiles' per-process batches")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="the smoke profiles' tiny networks on the CPU, batch 4")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        args.batch, args.repeats, args.warmup = args.batch or 4, min(args.repeats, 2), min(args.warmup, 1)
        args.variants = [v for v in args.variants if v in ("fp32", "bf16")]
    rows = []
    for experiment in args.experiments:
        for variant in args.variants:
            row = bench(experiment, variant, device, args.batch, args.warmup, args.repeats, args.smoke)
            rows.append(row)
            print(json.dumps(row), flush=True)
    name = "smoke" if args.smoke else (torch.cuda.get_device_name(device).replace(" ", "_") if device.type == "cuda" else "cpu")
    output = args.output or ROOT / "benchmarks" / "results" / f"gpu-{name}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
