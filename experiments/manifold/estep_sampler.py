"""Does the E-step's sampler cap the manifold divergence? Posterior samples of one saved prior, three samplers.

    python experiments/manifold/estep_sampler.py RUN_DIR [--lap 32] [--observations 1024]

Draws one posterior sample for each of the first ``--observations`` observations of the run
under lap ``--lap``'s prior, with the run's MMPS covariance (``sigma_x``: the run's lap-0
Gaussian) and CG 2, by DDPM 64 (the `cpu` profile), DDPM 512 and PC 256 (1 correction), and
prints the paper's Sinkhorn divergence of each set (after the (-3, 3) filter) against the
held-out truth. A diagnostic for ``experiments/manifold/plateau.md``. Measured on the committed
`cpu` run's lap 32 (1 torch thread): 0.098 / 0.115 / 0.106, so more sampler steps do not lower it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffem.config import config_from_dict
from diffem.pipeline import DiffusionPriorPipeline, denoiser_of
from diffem.random import make_generators
from diffem.runs import read_config
from diffem.spec import SamplerSpec
from diffem.tasks import get_task


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--lap", type=int, default=32)
    parser.add_argument("--observations", type=int, default=1024)
    args = parser.parse_args(argv)
    config = config_from_dict(read_config(args.run_dir)[0])
    task = get_task(config)
    obs = task.observations(args.run_dir)[: args.observations]
    prior = denoiser_of(DiffusionPriorPipeline.from_pretrained(args.run_dir / f"lap_{args.lap:02d}").unet)
    gaussian = DiffusionPriorPipeline.from_pretrained(args.run_dir / "lap_00").unet
    for method, steps in (("ddpm", 64), ("ddpm", 512), ("pc", 256)):
        spec = SamplerSpec(method=method, steps=steps, maxiter=config.estep.maxiter, covariance=config.estep.covariance,
                           noise_std=obs.noise_std)
        x = spec.sample(prior, obs.y, obs.operator, obs.event_shape, make_generators(0, indices=range(len(obs))),
                        sigma_x=gaussian, batch_size=len(obs))
        value, dropped = task.divergence(x)
        print(f"{method.upper()} {steps}: posterior-sample Sinkhorn {value:.4f} (dropped {dropped})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
