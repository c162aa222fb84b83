"""Build the worked example of `diffem train custom`: an observation dataset from offline MNIST or CIFAR-10.

    python experiments/custom/make_example.py OUT_DIR [--source mnist | cifar10] [--observations 1024]
        [--drop-prob 0.5] [--noise-std 0.05] [--noise-std-max S] [--validation VAL_DIR [--validation-count 64]]
        [--seed 0]

MNIST: the first digits of the offline test split (diffem.data.mnist), each observed as
y = m * (x + sigma_y e) with a random pixel mask m deleting each pixel with probability
--drop-prob, pixel values in [0, 1] (data_range [0, 1]; diffem maps them to [-2, 2]). CIFAR-10:
exactly the built-in experiment's observations (diffem.data.cifar10.make_observations, the same
shuffled order and seeds, data in [-2, 2]), so that `diffem train custom` on them reproduces
`diffem train cifar10` (tests/test_custom.py). The folder holds no clean image: only y, the masks and
the metadata (diffem.data.custom's schema).

--noise-std-max gives each observation its own sigma_y, uniform in [--noise-std, --noise-std-max]
(the column `noise_std`; MNIST only). --validation writes a clean validation dataset beside it:
the next --validation-count digits after the training ones, observed the same way, with their
clean images as the column `x` (`diffem train custom --validation VAL_DIR` scores posteriors on it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from diffem.data.custom import save_observation_dataset


def mnist_observations(n: int, drop_prob: float, noise_std, seed: int, start: int = 0, clean: bool = False):
    """Digits ``start`` to ``start + n`` of the test split, masked and noisy; ``noise_std`` a float or ``(n,)``."""
    from diffem.data.mnist import images_to_tensor, load_mnist

    x = (images_to_tensor(load_mnist("test").select(range(start, start + n))) + 2) / 4  # [0, 1]
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, 1, *x.shape[-2:], generator=g) >= drop_prob
    sigma = torch.as_tensor(noise_std, dtype=torch.float32).reshape(-1, *([1] * (x.dim() - 1)))
    y = mask * (x + sigma * torch.randn(x.shape, generator=g))
    return (y, mask, list(x.shape[1:]), [0.0, 1.0]) + ((x,) if clean else ())


def cifar10_observations(n: int, drop_prob: float, noise_std: float, seed: int):
    from diffem.config import load_config
    from diffem.tasks import get_task

    task = get_task(load_config("cifar10", "smoke", overrides=[f"data.observations={n}", f"data.drop_prob={drop_prob}",
                                                               f"data.noise_std={noise_std}", f"data.seed={seed}"]))
    ds = task.observe(task.clean_images("train")[:n]).with_format("torch")
    return ds["y"][:], ds["mask"][:].bool(), [3, 32, 32], [-2.0, 2.0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--source", choices=("mnist", "cifar10"), default="mnist")
    parser.add_argument("--observations", type=int, default=1024)
    parser.add_argument("--drop-prob", type=float, default=0.5)
    parser.add_argument("--noise-std", type=float, default=None, help="default: 0.05 (MNIST, [0, 1]) / 1e-3 (CIFAR-10)")
    parser.add_argument("--noise-std-max", type=float, default=None,
                        help="one sigma_y per observation, uniform in [--noise-std, this] (MNIST)")
    parser.add_argument("--validation", type=Path, default=None, help="also write a clean validation dataset here (MNIST)")
    parser.add_argument("--validation-count", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    noise = args.noise_std if args.noise_std is not None else (0.05 if args.source == "mnist" else 1e-3)
    if args.source != "mnist" and (args.noise_std_max is not None or args.validation is not None):
        parser.error("--noise-std-max and --validation build MNIST examples only")
    name = f"{args.source}-masked-{round(100 * args.drop_prob)}"

    def noise_levels(n: int, seed: int):
        if args.noise_std_max is None:
            return noise
        if not args.noise_std_max > noise:
            parser.error(f"--noise-std-max must exceed --noise-std ({noise:g})")
        g = torch.Generator().manual_seed(seed)
        return noise + (args.noise_std_max - noise) * torch.rand(n, generator=g, dtype=torch.float64)

    build = mnist_observations if args.source == "mnist" else cifar10_observations
    sigma = noise_levels(args.observations, args.seed + 1000)
    y, mask, event, data_range = build(args.observations, args.drop_prob, sigma, args.seed)
    save_observation_dataset(args.out_dir, y, mask, "mask", event, data_range, sigma, name=name)
    said = f"{noise:g}" if args.noise_std_max is None else f"{noise:g} to {args.noise_std_max:g}, one per observation"
    print(f"wrote {args.out_dir}: {len(y)} observations y of shape {tuple(y.shape[1:])}, operator mask, "
          f"noise_std {said}, data_range {data_range}")
    if args.validation is not None:
        n = args.validation_count
        sigma = noise_levels(n, args.seed + 1001)
        y, mask, event, data_range, x = mnist_observations(n, args.drop_prob, sigma, args.seed + 1, start=args.observations,
                                                           clean=True)
        save_observation_dataset(args.validation, y, mask, "mask", event, data_range, sigma, name=f"{name}-validation", x=x)
        print(f"wrote {args.validation}: {n} validation observations with their clean digits `x` "
              f"(test digits {args.observations} to {args.observations + n - 1})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
