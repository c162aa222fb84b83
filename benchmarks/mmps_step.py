r"""Seconds per MMPS sampling step: the new form, the old form and the network floor, in one run.

One MMPS sampling step is one call of :class:`diffem.posterior.MMPSDenoiser` followed by one
:class:`diffem.scheduler.VEScheduler` DDPM update. The new form accumulates
:math:`J^T A^T v` inside conjugate gradient (CG) and costs one forward of the denoiser and
``maxiter`` vector-Jacobian products (VJPs). The old form (the straightforward one, kept
here for the comparison) solves for :math:`v` and then takes one more VJP:
one forward and ``maxiter + 1`` VJPs. The floor is the network work of the new form
alone, measured by hand with ``torch.autograd.grad``: one forward and ``maxiter`` VJPs.

- ``new_over_old = new_step_s / old_step_s``: the speed-up (target <= 0.75 at CG 1);
- ``new_over_floor = new_step_s / forward_plus_vjps_s``: the overhead of our own code
  (operator applications, CG bookkeeping, the scheduler); it should stay close to 1.

The three measurements are interleaved within each repeat, in a rotating order (so that a
change of machine load hits all of them), and the medians over ``--repeats`` are reported
after ``--warmup`` calls of each. Both forms are checked to agree before timing.

Usage::

    python benchmarks/mmps_step.py --preset cpu --batch 64 --maxiter 1 --size 32 --repeats 10
    python benchmarks/mmps_step.py --prior runs/cifar10-cpu-p50/lap_03 --batch 256   # a trained prior's U-Net

Prints one JSON object: preset, params, batch, maxiter, device, threads, new_step_s,
old_step_s, forward_plus_vjps_s, new_over_old, new_over_floor, max_abs_difference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from diffem.denoiser import Denoiser
from diffem.linalg import conjugate_gradient
from diffem.networks import UNET_PRESETS, build_unet
from diffem.operators import GaussianObservation, Mask
from diffem.posterior import MMPSDenoiser
from diffem.scheduler import VEScheduler


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu", choices=sorted(UNET_PRESETS))
    parser.add_argument("--prior", default=None,
                        help="a lap folder or published prior whose U-Net is timed instead of a fresh --preset one "
                             "(its sample size and channels replace --size and --channels)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--maxiter", type=int, default=1)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=256, help="sampler grid; the step timed is the middle one")
    parser.add_argument("--noise-std", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(args.seed)

    if args.prior is not None:
        from diffem.pipeline import load_prior

        unet = load_prior(args.prior).unet
        args.preset = f"prior {args.prior}"
        args.size, args.channels = unet.config.sample_size, unet.config.in_channels
    else:
        unet = build_unet(args.preset, sample_size=args.size, channels=args.channels, seed=args.seed)
    unet = unet.to(device).eval()
    denoiser = Denoiser(unet)
    params = sum(p.numel() for p in unet.parameters())

    B, C, H, W = args.batch, args.channels, args.size, args.size
    mask = torch.rand(B, 1, H, W, generator=g) < 0.5  # drop 50 % of the pixels
    A = Mask(mask, channels=C).to(device)
    x = (torch.rand(B, C, H, W, generator=g) * 4 - 2).to(device)
    y = GaussianObservation(A, args.noise_std).sample(x, generator=g)
    posterior = MMPSDenoiser(denoiser, y, A, args.noise_std, maxiter=args.maxiter)

    scheduler = VEScheduler(method="ddpm")
    scheduler.set_timesteps(args.steps, device=device)
    i = args.steps // 2
    sigma = scheduler.sigmas[i].expand(B)
    x_t = x + sigma[0] * torch.randn(x.shape, generator=g).to(device)
    step_gen = torch.Generator(device).manual_seed(args.seed + 1)

    s2 = sigma.square().reshape(-1, 1, 1, 1)
    var_y = args.noise_std**2

    def old_mmps(x_in):
        """The straightforward form: CG for v (maxiter VJPs), then one more VJP for J^T A^T v."""
        with torch.enable_grad():
            inp = x_in.detach().requires_grad_(True)
            x_hat = denoiser(inp, sigma)

            def vjp(v):
                return torch.autograd.grad(x_hat, inp, v, retain_graph=True)[0]

            v = conjugate_gradient(lambda p: var_y * p + s2 * A(vjp(A.T(p))), (y - A(x_hat)).detach(), maxiter=args.maxiter)
            return (x_hat + s2 * vjp(A.T(v))).detach()

    @torch.no_grad()
    def new_step():
        x_hat = posterior(x_t, sigma)
        return scheduler.step(x_hat, i, x_t, generator=step_gen).prev_sample

    @torch.no_grad()
    def old_step():
        x_hat = old_mmps(x_t)
        return scheduler.step(x_hat, i, x_t, generator=step_gen).prev_sample

    with torch.no_grad():
        difference = (posterior(x_t, sigma) - old_mmps(x_t)).abs().max().item()

    # The floor: the network work of the new form alone, one forward and maxiter VJPs.
    cotangents = [torch.randn(x.shape, generator=g).to(device) for _ in range(args.maxiter)]

    def forward_plus_vjps():
        with torch.enable_grad():
            inp = x_t.detach().requires_grad_(True)
            out = denoiser(inp, sigma)
            for v in cotangents:
                (grad,) = torch.autograd.grad(out, inp, v, retain_graph=True)
        return grad

    def timed(fn):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - start

    fns = {"new": new_step, "old": old_step, "floor": forward_plus_vjps}
    for _ in range(args.warmup):
        for fn in fns.values():
            timed(fn)
    times = {k: [] for k in fns}
    names = list(fns)
    for r in range(args.repeats):
        # Rotate the order so no measurement always follows the same one.
        for k in names[r % 3 :] + names[: r % 3]:
            times[k].append(timed(fns[k]))

    new_s, old_s, floor_s = (statistics.median(times[k]) for k in names)
    result = {
        "preset": args.preset,
        "params": params,
        "batch": B,
        "maxiter": args.maxiter,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "threads": threads,
        "new_step_s": round(new_s, 6),
        "old_step_s": round(old_s, 6),
        "forward_plus_vjps_s": round(floor_s, 6),
        "new_over_old": round(new_s / old_s, 4),
        "new_over_floor": round(new_s / floor_s, 4),
        "max_abs_difference": difference,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
