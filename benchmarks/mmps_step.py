r"""Seconds per MMPS sampling step against its floor: one forward plus (1 + maxiter) VJPs.

One MMPS sampling step is one call of :class:`diffem.posterior.MMPSDenoiser` (one forward
of the denoiser, ``maxiter`` conjugate-gradient iterations each costing one vector-Jacobian
product, and one final VJP) followed by one :class:`diffem.scheduler.VEScheduler` DDPM
update. Its unavoidable cost is the network work alone, measured here by hand with
``torch.autograd.grad``: one forward and ``1 + maxiter`` VJPs through the same graph.
``ratio = mmps_step_s / forward_plus_vjps_s`` is the overhead of our own code (operator
applications, CG bookkeeping, the scheduler); it should stay close to 1.

The two measurements are interleaved within each repeat (so that a change of machine load
hits both) and the medians over ``--repeats`` are reported, after ``--warmup`` calls of each.

Usage::

    python benchmarks/mmps_step.py --preset cpu --batch 64 --maxiter 1 --size 32 --repeats 10

Prints one JSON object: preset, params, batch, maxiter, device, threads, mmps_step_s,
forward_plus_vjps_s, ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from diffem.denoiser import Denoiser
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

    unet = build_unet(args.preset, sample_size=args.size, channels=args.channels, seed=args.seed).to(device).eval()
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

    @torch.no_grad()
    def mmps_step():
        x_hat = posterior(x_t, sigma)
        return scheduler.step(x_hat, i, x_t, generator=step_gen).prev_sample

    # The floor: the network work alone, one forward and (1 + maxiter) VJPs.
    cotangents = [torch.randn(x.shape, generator=g).to(device) for _ in range(1 + args.maxiter)]

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

    for _ in range(args.warmup):
        timed(mmps_step)
        timed(forward_plus_vjps)
    t_mmps, t_floor = [], []
    for r in range(args.repeats):
        # Alternate the order so neither measurement always follows the other.
        if r % 2:
            t_floor.append(timed(forward_plus_vjps))
            t_mmps.append(timed(mmps_step))
        else:
            t_mmps.append(timed(mmps_step))
            t_floor.append(timed(forward_plus_vjps))

    mmps_s, floor_s = statistics.median(t_mmps), statistics.median(t_floor)
    result = {
        "preset": args.preset,
        "params": params,
        "batch": B,
        "maxiter": args.maxiter,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "threads": threads,
        "mmps_step_s": round(mmps_s, 6),
        "forward_plus_vjps_s": round(floor_s, 6),
        "ratio": round(mmps_s / floor_s, 4),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
