"""Build the worked example of `diffem train custom`: an observation dataset from offline MNIST or CIFAR-10.

    python experiments/custom/make_example.py OUT_DIR [--source mnist | cifar10] [--observations 1024]
        [--drop-prob 0.5] [--noise-std 0.1] [--seed 0]

MNIST: the first digits of the offline test split (diffem.data.mnist), each observed as
y = m * (x + sigma_y e) with a random pixel mask m deleting each pixel with probability
--drop-prob, pixel values in [0, 1] (data_range [0, 1]; diffem maps them to [-2, 2]). CIFAR-10:
exactly the built-in experiment's observations (diffem.data.cifar10.make_observations, the same
shuffled order and seeds, data in [-2, 2]), so that `diffem train custom` on them reproduces
`diffem train cifar10` (tests/test_custom.py). The folder holds no clean image: only y, the masks and
the metadata (diffem.data.custom's schema).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from diffem.data.custom import save_observation_dataset


def mnist_observations(n: int, drop_prob: float, noise_std: float, seed: int):
    from diffem.data.mnist import images_to_tensor, load_mnist

    x = (images_to_tensor(load_mnist("test").select(range(n))) + 2) / 4  # [0, 1]
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, 1, *x.shape[-2:], generator=g) >= drop_prob
    y = mask * (x + noise_std * torch.randn(x.shape, generator=g))
    return y, mask, list(x.shape[1:]), [0.0, 1.0]


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
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    noise = args.noise_std if args.noise_std is not None else (0.05 if args.source == "mnist" else 1e-3)
    build = mnist_observations if args.source == "mnist" else cifar10_observations
    y, mask, event, data_range = build(args.observations, args.drop_prob, noise, args.seed)
    save_observation_dataset(args.out_dir, y, mask, "mask", event, data_range, noise,
                             name=f"{args.source}-masked-{round(100 * args.drop_prob)}")
    print(f"wrote {args.out_dir}: {len(y)} observations y of shape {tuple(y.shape[1:])}, operator mask, "
          f"noise_std {noise:g}, data_range {data_range}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
