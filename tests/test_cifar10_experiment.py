"""The CIFAR-10 experiment: the smoke profile end to end, M-step augmentation, config errors, report."""

import json
import os
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F
from conftest import load_script

from diffem.config import ConfigError, load_config
from diffem.data.cifar10 import DEFAULT_CIFAR10_ARCHIVE
from diffem.train import make_trainer
from diffem.observations import ObservationSet
from diffem.runs import lap_dir
from diffem.tasks import get_task
from diffem.tasks.cifar10 import Cifar10Task, random_flip_shift

ROOT = Path(__file__).resolve().parents[1]
needs_data = pytest.mark.skipif(
    not DEFAULT_CIFAR10_ARCHIVE.is_file() and not os.environ.get("DIFFEM_CIFAR10"),
    reason=f"offline CIFAR-10 archive not found: {DEFAULT_CIFAR10_ARCHIVE}",
)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cifar10-smoke")
    config = load_config("cifar10", "smoke", overrides=[f"output_dir={out}"])
    records = make_trainer(config, progress=False).run()
    return out, config, records


# -- end to end ----------------------------------------------------------------------------------
@needs_data
def test_smoke_profile_end_to_end(smoke_run):
    out, config, records = smoke_run
    assert [r["lap"] for r in records] == [0, 1, 2]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["lap"] for line in lines] == [0, 1, 2]
    for k in range(3):
        assert (lap_dir(out, k) / "model_index.json").exists()
    unet = json.loads((lap_dir(out, 2) / "unet" / "config.json").read_text())
    assert unet["_class_name"] == "UNet2DModel" and list(unet["block_out_channels"]) == [16, 32]
    # Laps 0 and 2 (the last) are evaluated: FID against the JPEG reference set, no IS, PSNR.
    evaluated = [r for r in records if "fid" in r]
    assert [r["lap"] for r in evaluated] == [0, 2]
    for r in evaluated:
        assert r["isc"] is None
        assert r["fid_reference_set"] == "cifar10-train-jpeg"
        assert (r["fid_samples"], r["fid_reference"]) == (16, 32)
        # KID (unbiased, subsets of all 16 samples) and the real-images row: 16 held-out test
        # images against the same reference, computed once (lap 0) and read back at lap 2.
        assert (r["kid_subset_size"], r["kid_subsets"]) == (16, 100) and r["kid_std"] >= 0
        assert r["real_images"] == 16 and r["real_images_set"] == "cifar10-test-jpeg"
        assert r["real_kid_subset_size"] == 16 and 0 < r["real_fid"] < r["fid"] and r["real_kid"] < r["kid"]
        art = torch.load(out / "eval" / f"lap_{r['lap']:02d}.pt")
        assert art["prior"].shape == (16, 3, 32, 32) and art["posterior"].shape == (4, 3, 32, 32)
    # The metrics can fail: FID of real images is below FID of noise images; lap 0's posterior mean
    # (the Gaussian's, close to exact) is nearer the clean images than the zero-filled observations.
    task = get_task(config)
    noise = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 4 - 2
    assert evaluated[0]["real_fid"] < task.image_set_metrics(noise, "cpu")["fid"]
    assert evaluated[0]["psnr_posterior_mean"] > evaluated[0]["psnr_observation"]
    real = json.loads((out / "eval" / "real_images.json").read_text())
    assert real["metrics"]["real_fid"] == evaluated[0]["real_fid"] == evaluated[1]["real_fid"]
    assert real["key"]["reference"] == "cifar10-train-jpeg-32"
    assert records[2]["mstep_steps"] == 8 and records[2]["discarded_samples"] == 0
    assert not (out / "work" / "lap_02").exists()
    assert make_trainer(config, progress=False).run() == []  # a finished run does nothing


@needs_data
def test_observation_set_holds_only_y_and_mask(smoke_run):
    out, config, _ = smoke_run
    ds = datasets.load_from_disk(str(out / "observations"))
    assert sorted(ds.column_names) == ["mask", "y"]
    obs = get_task(config).observations(out)
    assert isinstance(obs, ObservationSet)
    assert set(vars(obs)) == {"y", "operator", "noise_std", "event_shape"}
    assert obs.y.shape == (64, 3, 32, 32) and obs.noise_std == 1e-3
    mask = obs.operator.mask
    assert mask.dtype == torch.bool and mask.shape == (64, 1, 32, 32)
    assert abs(mask.float().mean().item() - 0.5) < 0.02  # drop_prob 0.5 over 65,536 pixels
    assert (obs.y * ~mask).abs().max() == 0  # deleted pixels carry nothing


@needs_data
def test_observed_images_span_the_classes(smoke_run):
    # The offline split is sorted by class: the task observes a fixed shuffle of it.
    _, config, _ = smoke_run
    task = get_task(config)
    labels = task._train_split().select(task._order[:64].tolist())["label"]
    assert len(set(labels)) >= 8


@needs_data
def test_report_on_the_smoke_run(smoke_run, tmp_path):
    out = smoke_run[0]
    table, post, samples, results = (tmp_path / n for n in ("t.md", "post.png", "samples.png", "results"))
    report = load_script(ROOT / "experiments" / "cifar10" / "report.py", "cifar10_report")
    assert report.main([str(out), str(tmp_path / "missing-run"), "--table", str(table), "--posterior-figure", str(post),
                        "--samples-figure", str(samples), "--results-dir", str(results)]) == 0
    text = table.read_text()
    assert "| 50 % | done |" in text
    assert "| 25 % | not run |" in text and "| 75 % | not run |" in text
    assert "unavailable" in text and "cifar10-train-jpeg" in text and "JPEG" in text
    assert "6.76" in text and "13.18" in text  # the paper's numbers beside ours
    assert "| 50 % | done | this run (" in text and "real images: 16 test images (`cifar10-test-jpeg`) vs 32" in text
    assert "KID: unbiased" in text and "100 subsets of 16" in text
    assert post.stat().st_size > 0 and samples.stat().st_size > 0
    assert not results.exists()  # smoke runs are not copied to the results folder


# -- augmentation ----------------------------------------------------------------------------------
def _naive(image, flip: bool, dy: int, dx: int):
    image = image.flip(-1) if flip else image
    padded = F.pad(image[None], (1, 1, 1, 1), mode="reflect")[0]
    h, w = image.shape[-2:]
    return padded[:, 1 + dy: 1 + dy + h, 1 + dx: 1 + dx + w]


def test_augmentation_is_deterministic_and_matches_its_definition():
    x = torch.randn(256, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    a = random_flip_shift(x, torch.Generator().manual_seed(1))
    b = random_flip_shift(x, torch.Generator().manual_seed(1))
    c = random_flip_shift(x, torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    g = torch.Generator().manual_seed(1)  # the documented draws: B uniforms, then 2B integers
    flips = torch.rand(256, generator=g) < 0.5
    offsets = torch.randint(-1, 2, (256, 2), generator=g)
    for i in range(256):
        torch.testing.assert_close(a[i], _naive(x[i], bool(flips[i]), *offsets[i].tolist()), rtol=0, atol=0)
    assert len({tuple(o) for o in offsets.tolist()}) == 9  # every shift occurs


def test_augmentation_keeps_pixel_values_up_to_the_border():
    x = torch.randn(64, 3, 12, 12, generator=torch.Generator().manual_seed(0))  # distinct values
    out = random_flip_shift(x, torch.Generator().manual_seed(3))
    assert out.shape == x.shape
    for i in range(64):
        assert torch.isin(out[i], x[i]).all()  # nothing new enters (reflect padding)
        assert torch.isin(x[i, :, 1:-1, 1:-1], out[i]).all()  # only the 1-px border may leave


def test_augmentation_flips_about_half_the_batch():
    x = torch.randn(2000, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    out = random_flip_shift(x, torch.Generator().manual_seed(4), shift=0)
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert (flipped ^ kept).all()
    assert 0.45 < flipped.float().mean().item() < 0.55


def test_augmentation_only_when_configured(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    off = Cifar10Task(load_config("cifar10", "smoke", overrides=[f"output_dir={tmp_path}", "mstep.augment=false"]))
    assert off.augment(x, g) is x
    on = Cifar10Task(load_config("cifar10", "smoke", overrides=[f"output_dir={tmp_path}"]))
    assert not torch.equal(on.augment(x, g), x)


# -- configuration ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, key",
    [
        ("data.drop_prob=0", "data.drop_prob"),
        ("data.drop_prob=1", "data.drop_prob"),
        ("data.drop_prob=1.5", "data.drop_prob"),
        ("data.drop_prob=-0.25", "data.drop_prob"),
        ("data.drop_prob=half", "data.drop_prob"),
        ("data.source=/no/such/cifar10-jpg.tar.gz", "data.source"),
        ("data.noise_std=0", "data.noise_std"),
        ("data.bogus=1", "data.bogus"),
        ("network.bogus=1", "network.bogus"),
        ("network.preset=huge", "network.preset"),
        ("mstep.bogus=1", "mstep.bogus"),
    ],
)
def test_bad_config_fails_before_work(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        get_task(load_config("cifar10", "smoke", overrides=[f"output_dir={tmp_path}", override]))
    assert not any(tmp_path.iterdir())


def test_cli_rejects_a_bad_level_before_work(tmp_path, cli):
    out = tmp_path / "run"
    proc = cli("train", "cifar10", "--profile", "smoke", "--output-dir", out, "--set", "data.drop_prob=1.5")
    assert proc.returncode == 2 and "data.drop_prob" in proc.stderr
    assert not out.exists()


def test_profiles_resolve():
    paper = load_config("cifar10", "paper")
    assert (paper.laps, paper.mstep.epochs, paper.mstep.batch_size, paper.mstep.lr) == (32, 256, 256, 2e-4)
    assert (paper.mstep.grad_clip, paper.mstep.ema_decay, paper.mstep.augment) == (1.0, 0.9999, True)
    assert (paper.estep.method, paper.estep.steps, paper.estep.maxiter) == ("ddpm", 256, 1)
    assert (paper.eval.method, paper.eval.steps, paper.eval.samples) == ("ddim", 256, 50000)
    assert (paper.lap0.rank, paper.lap0.iterations, paper.lap0.observations, paper.lap0.estep) == (64, 16, 16384, "mmps")
    assert paper.network["preset"] == "paper" and paper.data["observations"] == 50000
    for profile in ("cpu", "paper", "smoke"):
        for p in (0.25, 0.5, 0.75):
            task = get_task(load_config("cifar10", profile, overrides=[f"data.drop_prob={p}"]))
            assert task.data["drop_prob"] == p and task.data["noise_std"] == 1e-3


@needs_data
def test_paper_profile_runs_one_step(tmp_path, poison_eval_keys):
    """The `paper` profile's own network, optimizer and samplers, shrunk to one M-step step."""
    overrides = [
        f"output_dir={tmp_path}", "laps=1",
        "data.observations=8", "data.fid_reference=16", "data.posterior_observations=0", "data.posterior_samples=1",
        "lap0.observations=8", "lap0.iterations=1", "lap0.steps=2", "lap0.rank=4",
        "estep.steps=2", "estep.batch_size=8",
        "mstep.epochs=0", "mstep.steps=1", "mstep.batch_size=4", "mstep.checkpoint_every=1",
        "eval.samples=0", "eval.steps=2", "eval.batch_size=16",
    ]
    config = load_config("cifar10", "paper", overrides=overrides)
    assert (config.lap0.maxiter, config.lap0.tol) == (65, 1e-3)  # lap 0's CG runs to the authors' tolerance
    records = poison_eval_keys(make_trainer(config, progress=False)).run()  # training never reads eval keys
    assert [r["lap"] for r in records] == [0, 1]
    assert records[1]["mstep_steps"] == 1
    unet = json.loads((lap_dir(tmp_path, 1) / "unet" / "config.json").read_text())
    assert list(unet["block_out_channels"]) == [128, 256, 384] and unet["layers_per_block"] == 5
    assert records[1]["estep_covariance"] == "gaussian (exact)"
