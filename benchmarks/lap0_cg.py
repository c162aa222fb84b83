"""What CG to a tolerance costs in the lap-0 Gaussian EM of the CIFAR-10 `cpu` profile (issue 24).

    python benchmarks/lap0_cg.py [--observations 256] [--iterations 2] [--level 0.75] [--threads 1]

Times ``fit_gaussian_em`` (MMPS E-step, DDPM with the profile's lap-0 steps) at the profile's CG 1
and at the authors' "to a tolerance" (relative 1e-3, capped at 65 iterations: the Gaussian's
system is identity + rank 64) on the same observations and seed, and prints both times and their
ratio as JSON. The observations are built in a temporary folder from the offline CIFAR-10 copy.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from diffem.config import load_config
from diffem.em.lap0 import fit_gaussian_em
from diffem.spec import SamplerSpec
from diffem.tasks import get_task


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--observations", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--level", type=float, default=0.75)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = load_config("cifar10", "cpu", overrides=[f"data.drop_prob={args.level}"])
    with tempfile.TemporaryDirectory() as tmp:
        obs = get_task(config).observations(Path(tmp))[: args.observations]
    out = {"observations": args.observations, "iterations": args.iterations, "threads": args.threads}
    for name, maxiter, tol in (("cg1", config.lap0.maxiter, 0.0), ("tolerance", 65, 1e-3)):
        spec = SamplerSpec(method="ddpm", steps=config.lap0.steps, maxiter=maxiter, tol=tol)
        start = time.perf_counter()
        fit_gaussian_em(obs.y, obs.operator, obs.noise_std, config.lap0.rank, args.iterations, obs.event_shape,
                        estep="mmps", generator=torch.Generator().manual_seed(0), batch_size=args.observations,
                        progress=False, sampler=spec)
        out[f"{name}_s"] = time.perf_counter() - start
    out["ratio"] = out["tolerance_s"] / out["cg1_s"]
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
