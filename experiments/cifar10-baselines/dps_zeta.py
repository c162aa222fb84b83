"""Choose the DPS step size of the EM-DPS reference from the observations alone (no clean image).

    python experiments/cifar10-baselines/dps_zeta.py RUN_DIR [--observations 64] [--zetas 0.1 0.3 1 3 10 30]
        [--output experiments/cifar10-baselines/results/dps_zeta-cpu-p75.json]

RUN_DIR is a cifar10 run holding lap 0 (the Gaussian prior EM-DPS's first E-step samples
under). For each zeta, the run's own E-step sampler (``estep.*``: DDPM 16 steps on the `cpu`
profile) with ``guidance: dps`` draws one posterior sample of each of the first
``--observations`` observations (the E-step's own per-observation seeds), and the script
reports their data consistency ||A x - y|| / ||y|| (mean over the observations; the noise floor
is sigma_y sqrt(m) / ||y||) and max |x|. The chosen zeta is the one with the lowest data
consistency among those whose samples stay in the data range (max |x| <= 10 x 2, the E-step's
outlier bound). Nothing here reads a clean image: the choice is open to a user of EM-DPS.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from diffem.config import config_from_dict  # noqa: E402
from diffem.em.seeds import ESTEP  # noqa: E402
from diffem.pipeline import DiffusionPriorPipeline, denoiser_of  # noqa: E402
from diffem.random import make_generators  # noqa: E402
from diffem.runs import lap_dir, read_config  # noqa: E402
from diffem.spec import SamplerSpec  # noqa: E402
from diffem.tasks import get_task  # noqa: E402


def data_consistency(x: torch.Tensor, obs) -> torch.Tensor:
    """``||A x - y|| / ||y||`` per observation, ``(n,)``."""
    r = (obs.operator(x) - obs.y).flatten(1).norm(dim=1)
    return r / obs.y.flatten(1).norm(dim=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--observations", type=int, default=64)
    parser.add_argument("--zetas", type=float, nargs="+", default=[0.1, 0.3, 1.0, 3.0, 10.0, 30.0])
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)

    config = config_from_dict(read_config(args.run_dir)[0])
    task = get_task(config)
    obs = task.observations(args.run_dir)[: args.observations]
    prior = DiffusionPriorPipeline.from_pretrained(lap_dir(args.run_dir, 0))
    denoiser = denoiser_of(prior.unet)
    floor = float((obs.noise_std * obs.y[0].numel() ** 0.5 / obs.y.flatten(1).norm(dim=1)).mean())
    bound = (config.estep.outlier_factor or 10.0) * task.data_bound
    rows = []
    for zeta in args.zetas:
        estep = dataclasses.replace(config.estep, guidance="dps", dps_zeta=zeta)
        spec = SamplerSpec.from_estep(estep)
        # The E-step's own generators of lap 1 (one per observation with block 1).
        gens = make_generators(config.seed, ESTEP, 1, indices=range(len(obs)))  # block 1
        start = time.perf_counter()
        x = spec.sample(denoiser, obs.y, obs.operator, obs.event_shape, gens, noise_std=obs.noise_std,
                        batch_size=len(obs))
        dc = data_consistency(x, obs)
        rows.append({"zeta": zeta, "data_consistency": float(dc.mean()), "max_abs": float(x.abs().max()),
                     "finite": bool(torch.isfinite(x).all()), "time_s": time.perf_counter() - start})
        print(f"zeta {zeta:g}: ||Ax - y|| / ||y|| {rows[-1]['data_consistency']:.4f}  max|x| {rows[-1]['max_abs']:.2f}"
              f"  ({rows[-1]['time_s']:.1f} s)", flush=True)
    ok = [r for r in rows if r["finite"] and r["max_abs"] <= bound]
    chosen = min(ok, key=lambda r: r["data_consistency"])["zeta"] if ok else None
    print(f"noise floor {floor:.2e}; chosen zeta: {chosen}")
    out = {"run_dir": str(args.run_dir), "observations": len(obs), "prior": "lap 0 (the Gaussian)",
           "sampler": SamplerSpec.from_estep(config.estep).to_dict() | {"guidance": "dps"},
           "noise_floor": floor, "outlier_bound": bound, "rows": rows, "chosen_zeta": chosen}
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
