"""`diffem train custom`: your own observation dataset (diffem.data.custom), checked before any work,
trained as the experiments are, evaluated without ground truth; the README's worked example."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import load_script, run_cli
from safetensors.torch import load_file

from diffem.config import ConfigError, config_to_dict, load_config
from diffem.data.custom import load_observation_dataset, save_observation_dataset, to_observation_set, validate
from diffem.operators import Mask
from diffem.runs import lap_dir

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "experiments" / "custom" / "make_example.py"


def _weights(run: Path, lap: int) -> dict:
    (path,) = (lap_dir(run, lap) / "unet").glob("*.safetensors")
    return load_file(path)


def test_custom_training_on_the_cifar10_observations_reproduces_the_built_in_experiment(tmp_path):
    """The same observations, seed and settings: the same lap-0 Gaussian and the same lap-1 network, bit for bit."""
    data = tmp_path / "data"
    assert load_script(EXAMPLE, "make_example").main([str(data), "--source", "cifar10", "--observations", "64"]) == 0
    fast = ["laps=1", "eval.samples=0", "data.posterior_observations=0", "mstep.steps=4"]
    built_in = load_config("cifar10", "smoke", overrides=[*fast, f"output_dir={tmp_path / 'built-in'}"])
    custom = config_to_dict(built_in)
    custom |= {"experiment": "custom", "output_dir": str(tmp_path / "custom"),
               "data": {"path": str(data), "holdout": 0.0}, "network": {"kind": "unet", "preset": "tiny"}}
    (tmp_path / "custom.yaml").write_text(yaml.safe_dump(custom))
    assert run_cli("train", "cifar10", "--profile", "smoke", "--no-progress", "--output-dir", tmp_path / "built-in",
                   "--set", *fast).returncode == 0
    result = run_cli("train", "--config", tmp_path / "custom.yaml", "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    for lap in (0, 1):
        a, b = _weights(tmp_path / "built-in", lap), _weights(tmp_path / "custom", lap)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), lap


def test_the_worked_example_trains_evaluates_and_reports_without_ground_truth(tmp_path):
    """The README's worked example, with one sigma_y per observation and a clean validation set: the
    ground-truth-free metrics, the validation scores, the report and the model card."""
    data, val, run = tmp_path / "mnist-masked", tmp_path / "mnist-val", tmp_path / "run"
    assert load_script(EXAMPLE, "make_example").main([str(data), "--observations", "64", "--noise-std-max", "0.2",
                                                      "--validation", str(val), "--validation-count", "8"]) == 0
    assert sorted(p.name for p in data.iterdir() if p.suffix != ".arrow") == ["dataset_info.json", "diffem.json",
                                                                                "state.json"]
    assert "x" not in __import__("datasets").load_from_disk(str(data)).column_names  # no clean image for training
    result = run_cli("train", "custom", "--data", data, "--validation", val, "--profile", "smoke", "--output-dir", run,
                     "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in records if r["eval_status"] == "ok"]
    assert [r["lap"] for r in evaluated] == [0, 2]
    for r in evaluated:
        # consistent with y at least as well as a blank image, and never below the noise
        assert r["noise_floor_train"] < r["data_consistency_train"] < 1.0
        assert r["data_consistency_heldout"] is not None and r["posterior_spread"] > 0
        # against the clean validation digits: the posterior mean beats the observation A^+ y
        assert r["validation_observations"] == 4 and r["psnr_posterior_mean"] > r["psnr_observation"]
    assert records[1]["observations"] == 48  # the last 25 % (16) held out
    report = load_script(ROOT / "experiments" / "custom" / "report.py", "custom_report")
    assert report.main([str(run)]) == 0
    text = (run / "report.md").read_text()
    assert "| 2 | diffusion |" in text and "Against the clean validation set" in text
    assert f"| 2 | {evaluated[-1]['psnr_posterior_mean']:.3g} |" in text
    assert (run / "report.png").stat().st_size > 0
    # the model card names the dataset, its operator, the per-observation noise and the validation scores
    from diffem.hub.publish import build_repo_folder

    card = (build_repo_folder(run, 2, tmp_path / "repo", "me/custom-prior") / "README.md").read_text()
    assert "dataset `mnist-masked-50` with a mask operator" in card and "one per observation" in card
    assert "operator: `diffem.Mask`" in card
    assert "clean validation set `mnist-val`" in card and f"value: {evaluated[-1]['psnr_posterior_mean']}" in card


def test_one_noise_level_per_observation_is_whitened_to_the_same_posterior():
    """w y = w A x + sigma_0 e with w = sigma_0 / sigma_i: the exact Gaussian posterior of every observation
    is unchanged, and so are each observation's data consistency and noise floor."""
    from diffem.gaussian import GaussianPrior
    from diffem.observations import whiten
    from diffem.operators import Projection

    g = torch.Generator().manual_seed(0)
    prior = GaussianPrior(event_shape=(7,), rank=3).double()
    with torch.no_grad():
        for p in prior.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    A = Projection(torch.randn(4, 3, 7, generator=g, dtype=torch.float64))
    sigma = torch.tensor([0.05, 0.1, 0.2, 0.4], dtype=torch.float64)
    x = torch.randn(4, 7, generator=g, dtype=torch.float64)
    y = A(x) + sigma[:, None] * torch.randn(4, 3, generator=g, dtype=torch.float64)
    y_w, A_w, sigma_0 = whiten(y, A, sigma)
    assert sigma_0 == pytest.approx(0.1)  # the lower middle value of an even count
    mean_w, cov_w = prior.posterior(y_w, A_w, sigma_0)
    for i in range(4):
        mean, cov = prior.posterior(y[i:i + 1], A[i:i + 1], float(sigma[i]))
        torch.testing.assert_close(mean_w[i:i + 1], mean, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(cov_w[i:i + 1], cov, rtol=1e-9, atol=1e-9)
    ratio = lambda r, v: r.norm(dim=1) / v.norm(dim=1)  # noqa: E731
    torch.testing.assert_close(ratio(A_w(x) - y_w, y_w), ratio(A(x) - y, y))
    torch.testing.assert_close(sigma_0 * 3 ** 0.5 / y_w.norm(dim=1), sigma * 3 ** 0.5 / y.norm(dim=1))
    with pytest.raises(ValueError, match="one per observation"):
        whiten(y, A, sigma[:3])


def test_a_per_row_noise_column_round_trips_and_is_whitened(tmp_path):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 1, 8, 8, generator=g)
    mask = torch.rand(6, 1, 8, 8, generator=g) > 0.5
    sigma = torch.tensor([0.01, 0.02, 0.04, 0.01, 0.02, 0.04], dtype=torch.float64)
    folder = save_observation_dataset(tmp_path / "disk", mask * x, mask, "mask", [1, 8, 8], [0, 1], sigma)
    data = load_observation_dataset(folder)
    assert torch.equal(data.noise_std, sigma) and "noise_std" not in json.loads((folder / "diffem.json").read_text())
    obs = to_observation_set(data)
    assert obs.noise_std == pytest.approx(4 * 0.02)  # the median, mapped to [-2, 2]
    w = (0.02 / sigma).float()
    torch.testing.assert_close(obs.y, w[:, None, None, None] * Mask(mask, channels=1)(4 * x - 2))
    torch.testing.assert_close(obs.operator.pinv(obs.y), Mask(mask, channels=1)(4 * x - 2))


def test_a_bad_validation_set_is_refused_before_any_work(tmp_path):
    data, val = tmp_path / "data", tmp_path / "val"
    assert load_script(EXAMPLE, "make_example").main([str(data), "--observations", "8", "--validation", str(val),
                                                      "--validation-count", "4"]) == 0
    out = tmp_path / "run"
    no_x = run_cli("train", "custom", "--data", data, "--validation", data, "--profile", "smoke", "--output-dir", out)
    assert no_x.returncode == 2 and "column `x` is missing" in no_x.stderr and not out.exists()
    meta = json.loads((val / "diffem.json").read_text())
    (val / "diffem.json").write_text(json.dumps(meta | {"data_range": [0, 255]}))
    other = run_cli("train", "custom", "--data", data, "--validation", val, "--profile", "smoke", "--output-dir", out)
    assert other.returncode == 2 and "`data.validation`: its metadata `data_range`" in other.stderr and not out.exists()


def test_npz_parquet_and_save_to_disk_give_the_same_observations(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 8, 8, generator=g)
    mask = torch.rand(6, 1, 8, 8, generator=g) > 0.5
    y = mask * x
    folder = save_observation_dataset(tmp_path / "disk", y, mask, "mask", [1, 8, 8], [0, 1], 0.01)
    meta = json.loads((folder / "diffem.json").read_text())
    np.savez(tmp_path / "obs.npz", y=y.numpy(), mask=mask.numpy(), metadata=json.dumps(meta))
    import datasets

    datasets.load_from_disk(str(folder)).to_parquet(str(tmp_path / "pq" / "obs.parquet"))
    (tmp_path / "pq" / "diffem.json").write_text(json.dumps(meta))
    sets = [to_observation_set(load_observation_dataset(p)) for p in (folder, tmp_path / "obs.npz", tmp_path / "pq")]
    for other in sets[1:]:
        assert torch.equal(other.y, sets[0].y) and torch.equal(other.operator.mask, sets[0].operator.mask)
    # the data range [0, 1] is mapped to [-2, 2]: y' = A x' with x' = 4 x - 2, sigma_y scaled by 4
    A = Mask(mask, channels=1)
    torch.testing.assert_close(sets[0].y, A(4 * x - 2))
    assert sets[0].noise_std == pytest.approx(0.04)


def _columns(n=4):
    return {"y": np.zeros((n, 1, 8, 8), np.float32), "mask": np.ones((n, 1, 8, 8), bool)}


META = {"operator": "mask", "event_shape": [1, 8, 8], "data_range": [0, 1], "noise_std": 0.1}


@pytest.mark.parametrize("change, message", [
    (lambda c, m: c.pop("y"), "column `y` is missing"),
    (lambda c, m: c.pop("mask"), "operator 'mask' needs a column `mask`"),
    (lambda c, m: m.update(operator="blur"), "metadata `operator`: 'blur' is unknown"),
    (lambda c, m: m.update(operator="projection"), "operator 'projection' needs a column `matrix`"),
    (lambda c, m: c.update(y=np.zeros((4, 1, 8, 9), np.float32)), "column `y`: rows of shape"),
    (lambda c, m: c.update(mask=np.ones((4, 1, 7, 8), bool)), "column `mask`: rows of shape"),
    (lambda c, m: c["y"].__setitem__((2, 0, 0, 0), np.nan), "column `y` has non-finite values in 1 row"),
    (lambda c, m: m.pop("data_range"), "metadata `data_range` is missing"),
    (lambda c, m: m.update(data_range=[1, 0]), "metadata `data_range` must be \\[low, high\\]"),
    (lambda c, m: m.pop("noise_std"), "no noise level"),
    (lambda c, m: c.update(noise_std=np.array([0.1, 0.1, 0.2, 0.1])), "metadata `noise_std` .* gives one value"),
    (lambda c, m: c.update(noise_std=np.array([0.1, 0.1, -0.2, 0.1])), "column `noise_std` must be finite and > 0"),
    (lambda c, m: c.update(noise_std=np.array([0.1, 0.2])), "column `noise_std` has 2 rows"),
    (lambda c, m: c.update(x=np.zeros((4, 1, 8, 8))), "column `x` is not part of the schema"),
    (lambda c, m: c.update(mask=np.zeros((4, 1, 8, 8), bool)), "some rows observe no pixel"),
])
def test_bad_input_is_refused_naming_the_column(change, message):
    columns, meta = _columns(), dict(META)
    change(columns, meta)
    with pytest.raises(ConfigError, match=message):
        validate(columns, meta)


def test_bad_input_fails_before_any_work(tmp_path):
    np.savez(tmp_path / "bad.npz", y=np.zeros((4, 1, 8, 8), np.float32), mask=np.ones((4, 1, 8, 8), bool),
             metadata=json.dumps(META | {"data_range": [0, 0]}))
    out = tmp_path / "run"
    result = run_cli("train", "custom", "--data", tmp_path / "bad.npz", "--profile", "smoke", "--output-dir", out)
    assert result.returncode == 2 and "data_range" in result.stderr and not out.exists()
    missing = run_cli("train", "custom", "--profile", "smoke", "--output-dir", out)
    assert missing.returncode == 2 and "--data" in missing.stderr


def test_vectors_through_a_projection_get_the_mlp(tmp_path):
    from diffem.data import manifold
    from diffem.networks import MLP
    from diffem.pipeline import DiffusionPriorPipeline

    x = manifold.manifold_points(96, 0, "train", features=5)
    A = manifold.random_projections(96, 0)  # (96, 2, 5) unit rows
    y = torch.einsum("nij,nj->ni", A, x) + 0.01 * torch.randn(96, 2, generator=torch.Generator().manual_seed(0))
    data = save_observation_dataset(tmp_path / "vectors", y, A, "projection", [5], [-2, 2], 0.01)
    result = run_cli("train", "custom", "--data", data, "--profile", "smoke", "--output-dir", tmp_path / "run",
                     "--no-progress", "--set", "lap0.rank=5", "lap0.estep=exact")
    assert result.returncode == 0, result.stderr[-3000:]
    assert isinstance(DiffusionPriorPipeline.from_pretrained(lap_dir(tmp_path / "run", 2)).unet, MLP)
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["noise_floor_train"] < last["data_consistency_train"] < 1.0
    # a clean validation set of vectors: the Sinkhorn divergence of the prior samples against its x
    xv = manifold.manifold_points(32, 0, "eval", features=5)
    Av = manifold.random_projections(32, 1)
    yv = torch.einsum("nij,nj->ni", Av, xv)
    val = save_observation_dataset(tmp_path / "val", yv, Av, "projection", [5], [-2, 2], 0.01, x=xv)
    run = tmp_path / "run-val"
    result = run_cli("train", "custom", "--data", data, "--validation", val, "--profile", "smoke", "--output-dir", run,
                     "--no-progress", "--set", "lap0.rank=5", "lap0.estep=exact", "laps=0")
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    from diffem.ot import manifold_divergence

    prior = torch.load(run / "eval" / "lap_00.pt")["prior"]
    assert len(prior) == 16 and record["sinkhorn_validation"] == pytest.approx(
        manifold_divergence(prior, xv[:16], xv[16:]), rel=1e-6)
