"""A suite-style session for tests/test_cache_isolation.py, run by pytest in a subprocess.

It does what the suite's tests do with caches, each through its *default* cache folder:
converts the Inception weights, computes FID statistics under a cache key, builds a
CIFAR-10 dataset from a (tiny) folder source, loads a ``datasets`` dataset, writes a
matplotlib figure and asks torch hub for its folder. It prints the folders used, one per
line as ``CACHE <name> <path>``, for the calling test to check.
"""

import io

import torch
from PIL import Image


def _jpeg(seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8).numpy()
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG")
    return out.getvalue()


def test_touch_every_default_cache(tmp_path):
    import datasets
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffem.data.cifar10 import load_cifar10
    from diffem.metrics import default_cache_dir, fid, setup_inception

    weights = setup_inception()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 32, 32), generator=g, dtype=torch.uint8)
    fid(images, images, cache_key="probe", batch_size=3)
    root = tmp_path / "cifar"
    for cls in ("cat", "airplane"):
        (root / "train" / cls).mkdir(parents=True)
        for i in range(2):
            (root / "train" / cls / f"{i:04d}.jpg").write_bytes(_jpeg(i))
    assert len(load_cifar10("train", source=root)) == 4
    datasets.Dataset.from_dict({"a": [1, 2]}).map(lambda row: {"b": row["a"] + 1})
    fig = plt.figure()
    plt.plot([0, 1])
    fig.savefig(tmp_path / "figure.png")
    plt.close(fig)
    for name, path in (
        ("diffem", default_cache_dir()),
        ("inception", weights),
        ("fid_stats", default_cache_dir() / "fid_stats" / "probe.npz"),
        ("torch_hub", torch.hub.get_dir()),
        ("hf_datasets", datasets.config.HF_DATASETS_CACHE),
        ("matplotlib", matplotlib.get_cachedir()),
    ):
        print(f"CACHE {name} {path}")
