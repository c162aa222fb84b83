"""The manifold prior's ceiling at a given M-step budget: the MLP trained on clean points, no E-step.

    python experiments/manifold/oracle.py --steps 4000 [--lr-end 1e-5] [--points 4096]

Trains the `cpu` profile's MLP with the M-step's own code (``diffem.em.mstep.run_mstep``: same
loss, batch, Adam and linear learning-rate schedule) on ``--points`` ground-truth training points,
then prints the paper's Sinkhorn divergence of 1,024 prior samples (the profile's evaluation) and
the median distance of the samples to the curve. This is a diagnostic for
``experiments/manifold/plateau.md``, not part of ``reproduce.sh``: the clean points never reach EM.
Measured on a shared 2-core host (1 torch thread), 4,096 points: 500 steps 0.154, 1,000 steps with
lr_end 1e-6 0.057, 1,500 steps 0.042, 4,000 steps 0.024.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from diffem.config import load_config
from diffem.data import manifold
from diffem.em.mstep import run_mstep
from diffem.em.trainer import make_accelerator
from diffem.pipeline import DiffusionPriorPipeline
from diffem.scheduler import VEScheduler
from diffem.tasks import draw_prior_samples
from diffem.tasks.manifold import ManifoldTask


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--lr-end", type=float, default=1e-5)
    parser.add_argument("--points", type=int, default=4096)
    args = parser.parse_args(argv)
    config = load_config("manifold", "cpu", overrides=[f"mstep.steps={args.steps}", f"mstep.lr_end={args.lr_end}",
                                                        "mstep.checkpoint_every=1000000"])
    task = ManifoldTask(config)
    x = manifold.manifold_points(args.points, task.data["curve_seed"], "train", features=task.data["features"])
    with tempfile.TemporaryDirectory() as tmp:
        model, stats = run_mstep(make_accelerator(config), config, task, 1, x.float(), task.backbone(0),
                                 Path(tmp) / "mstep", Path(tmp))
    pipe = DiffusionPriorPipeline(model, VEScheduler(method=config.eval.method))
    pipe.set_progress_bar_config(disable=True)
    samples = draw_prior_samples(pipe, config.eval.samples, config.eval, 7, False)
    value, dropped = task.divergence(samples)
    curve = task.ground_truth(65536, "train").double()
    dist = torch.cdist(samples.double(), curve).min(1).values
    print(f"oracle: {args.points} clean points, {args.steps} steps, lr_end {args.lr_end:g}: Sinkhorn {value:.4f} "
          f"(dropped {dropped}), median distance to the curve {dist.median():.3f}, final loss {stats['train_loss']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
