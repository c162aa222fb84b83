"""The references at equal compute (issue 25): ``train_on`` clean / observed, and their report."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml

from diffem.cli import main as cli_main
from diffem.config import ConfigError, load_config
from diffem.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
FAST = ["laps=1", "mstep.steps=2", "eval.samples=0", "data.observations=16", "lap0.observations=16",
        "data.posterior_observations=0"]


def _config(tmp_path, *sets):
    cfg = load_config("cifar10", "smoke", overrides=[*FAST, *sets])
    cfg.output_dir = str(tmp_path)
    return cfg


@pytest.mark.parametrize("train_on", ["clean", "observed"])
def test_a_reference_run_trains_without_lap_0_or_an_e_step(tmp_path, train_on):
    assert cli_main(["train", "cifar10", "--profile", "smoke", "--output-dir", str(tmp_path), "--no-progress",
                     "--set", *FAST, f"train_on={train_on}"]) == 0
    assert not (tmp_path / "lap_00").exists()
    assert (tmp_path / "lap_01" / "model_index.json").exists()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["lap"] for r in records] == [1]
    assert records[0]["train_on"] == train_on and records[0]["estep_time_s"] == 0.0
    assert records[0]["mstep_steps"] == 2


def test_training_signals_are_the_clean_images_or_the_zero_filled_observations(tmp_path):
    clean_task = get_task(_config(tmp_path, "train_on=clean"))
    obs = clean_task.observations(tmp_path)
    clean = clean_task.training_signals(obs)
    assert torch.equal(clean, clean_task.clean_images("train")[:16])
    naive = get_task(_config(tmp_path, "train_on=observed")).training_signals(obs)
    mask = obs.operator.mask.expand_as(naive)
    assert bool((naive[~mask] == 0).all())  # deleted pixels are 0 (mid-grey in [-2, 2])
    # observed pixels are the clean ones plus the observation noise (sigma_y = 1e-3)
    assert float((naive[mask] - clean[mask]).abs().max()) < 0.01
    assert float((naive - clean).abs().max()) > 0.5  # and the deleted ones are not
    with pytest.raises(ConfigError, match="train_on"):
        get_task(_config(tmp_path)).training_signals(obs)  # EM has no fixed training signals


def test_train_on_is_validated():
    with pytest.raises(ConfigError, match="train_on"):
        load_config("cifar10", "smoke", overrides=["train_on=truth"])
    with pytest.raises(ConfigError, match="reference run has no lap 0"):
        load_config("cifar10", "smoke", overrides=["train_on=clean", "laps=0"])


def _fake_run(folder: Path, base: dict, fid: float, kid: float, **sets) -> Path:
    """A finished run folder holding the smoke profile's config (with ``sets``) and one scored lap."""
    config = json.loads(json.dumps(base))
    for key, value in sets.items():
        section, _, name = key.partition(".")
        if name:
            config[section][name] = value
        else:
            config[section] = value
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    record = {"lap": 2, "fid": fid, "kid": kid, "kid_std": 0.01, "mstep_steps": 16, "mstep_time_s": 60.0,
              "estep_time_s": 0.0, "eval_time_s": 30.0}
    (folder / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    return folder


def test_the_report_computes_the_gap_closed_from_the_records(tmp_path):
    spec = importlib.util.spec_from_file_location("baselines_report", ROOT / "experiments" / "cifar10-baselines" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    from diffem.config import config_to_dict

    base = config_to_dict(load_config("cifar10", "smoke", overrides=["data.drop_prob=0.75"]))
    runs = [
        _fake_run(tmp_path / "oracle", base, 100.0, 0.10, train_on="clean"),
        _fake_run(tmp_path / "naive", base, 300.0, 0.30, train_on="observed"),
        _fake_run(tmp_path / "em", base, 150.0, 0.25),  # 75 % of the FID gap, 25 % of the KID gap
        _fake_run(tmp_path / "dps", base, 350.0, 0.35, **{"estep.guidance": "dps"}),  # worse than naive
    ]
    table, figure = tmp_path / "t.md", tmp_path / "f.png"
    assert report.main([*map(str, runs), "--profile", "smoke", "--results-dir", str(tmp_path / "res"),
                        "--em-results", str(tmp_path / "em-res"), "--table", str(table), "--figure", str(figure)]) == 0
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.read_text().splitlines()
            if line.startswith("| ")}
    assert rows["EM, MMPS E-step (diffem)"][3:5] == ["75 %", "25 %"]
    assert rows["EM, DPS E-step"][3:5] == ["-25 %", "-25 %"]  # a method below naive is reported as such
    assert rows["Ambient Diffusion loss"][-1].strip(" |") == "not run"  # no run: said, never filled in
    assert figure.stat().st_size > 0
    assert not (tmp_path / "res").exists()  # smoke runs are not copied to the committed results


def test_ambient_loss_sees_only_the_further_corrupted_pixels_and_scores_all_observed_ones():
    from diffem.denoiser import AmbientLoss, Denoiser
    from diffem.networks import build_mask_conditioned_unet

    g = torch.Generator().manual_seed(0)
    net = build_mask_conditioned_unet({"preset": "tiny"}, 3, 16, seed=0, sampling_survival=0.5)
    loss_fn = AmbientLoss(Denoiser(net))
    mask = (torch.rand(2, 1, 16, 16, generator=g) < 0.6).float().expand(2, 3, 16, 16)
    further = mask * (torch.rand(2, 1, 16, 16, generator=g) < 0.8).float()
    y = torch.randn(2, 3, 16, 16, generator=g) * mask
    sigma = torch.tensor([0.5, 2.0])
    noise = torch.randn(2, 3, 16, 16, generator=g).requires_grad_(True)
    loss = loss_fn(y, mask, further, sigma, noise)
    (grad,) = torch.autograd.grad(loss, noise)
    assert float(grad[further == 0].abs().max()) == 0.0  # the network never sees a hidden pixel
    assert float(grad[further == 1].abs().max()) > 0.0
    # the loss is taken on every observed pixel, the hidden ones included, and on no deleted one
    d = Denoiser(net)(y + sigma[:, None, None, None] * noise.detach(), sigma, mask=further)
    expected = ((mask * (d - y)).square().flatten(1).sum(1) / mask.flatten(1).sum(1) * (1 / sigma**2 + 1)).mean()
    assert torch.allclose(loss, expected)
    with pytest.raises(ValueError, match="further"):
        loss_fn(y, mask, further[:, :1], sigma, noise)


def test_an_ambient_run_saves_a_mask_conditioned_prior_that_samples_through_the_pipeline(tmp_path):
    from diffem.networks import MaskConditionedUNet
    from diffem.pipeline import DiffusionPriorPipeline

    assert cli_main(["train", "cifar10", "--profile", "smoke", "--output-dir", str(tmp_path), "--no-progress",
                     "--set", *FAST, "train_on=ambient", "data.drop_prob=0.5"]) == 0
    pipe = DiffusionPriorPipeline.from_pretrained(tmp_path / "lap_01")
    assert isinstance(pipe.unet, MaskConditionedUNet) and pipe.event_shape == (3, 32, 32)
    obs = get_task(_config(tmp_path, "train_on=ambient", "data.drop_prob=0.5")).observations(tmp_path)
    observed = float(obs.operator.mask.float().mean())
    assert pipe.unet.config.sampling_survival == pytest.approx(observed * 0.9)
    kept = float(pipe.unet.sampling_mask.mean())
    assert abs(kept - observed * 0.9) < 0.05  # 1,024 pixels drawn with that probability
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    x = pipe(2, 3, gens, progress=False).samples
    assert x.shape == (2, 3, 32, 32) and bool(torch.isfinite(x).all())


def test_the_oracle_search_trains_times_and_projects_each_setting(tmp_path, monkeypatch):
    """``oracle_search.py run`` trains a setting's oracle and times its E-step; ``report`` projects an EM
    level phase by phase from the committed anchor run, scaled by each setting's cost over the profile's."""
    from conftest import load_script

    search = load_script(ROOT / "experiments" / "cifar10-baselines" / "oracle_search.py", "oracle_search")
    monkeypatch.setenv("RESULTS_DIR", str(tmp_path / "res"))
    assert search.main(["run", "--profile", "smoke", "--only", "s2", "--run-root", str(tmp_path / "runs"),
                        "--repeats", "1", "--no-progress"]) == 0
    res = tmp_path / "res" / "oracle-search-smoke"
    timing = json.loads((res / "s2" / search.TIMING_FILE).read_text())
    assert timing["batch"] == 32 and timing["new_step_s"] > 0  # the smoke E-step's batch
    # A second setting, prepared from the first: its MMPS step costs 2x, its M-step 3x the profile's.
    (res / "s4").mkdir()
    (res / "s4" / "config.yaml").write_text((res / "s2" / "config.yaml").read_text())
    records = [json.loads(line) for line in (res / "s2" / "metrics.jsonl").read_text().splitlines()]
    records = [r | {"mstep_time_s": 3 * r["mstep_time_s"], "fid": r["fid"] - 1.0} for r in records]
    (res / "s4" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (res / "s4" / search.TIMING_FILE).write_text(json.dumps(timing | {"new_step_s": 2 * timing["new_step_s"]}))
    table, figure = tmp_path / "search.md", tmp_path / "search.png"
    assert search.main(["report", "--profile", "smoke", "--table", str(table), "--figure", str(figure)]) == 0

    _, anchor = search.read_run(ROOT / "experiments" / "cifar10" / "results" / "cpu-p75")
    estep = sum(r["estep_time_s"] for r in anchor if r["lap"] > 0)
    mstep = sum(r["mstep_time_s"] for r in anchor)
    total = sum(r["estep_time_s"] + r["mstep_time_s"] + r.get("eval_time_s", 0.0) for r in anchor)
    cells = {line.split(" | ")[0].strip("| ").split("`")[1]: line.split(" | ") for line in table.read_text().splitlines()
             if line.startswith("| `")}
    assert float(cells["s2"][11]) == pytest.approx(total / 60, abs=0.05)  # the profile's own row is the anchor
    assert float(cells["s4"][11]) == pytest.approx((total + estep + 2 * mstep) / 60, abs=0.05)
    assert cells["s2"][12].strip(" |") == "yes" and cells["s4"][12].strip(" |") == "no"
    own = json.loads((tmp_path / "runs" / "oracle-search-smoke-s2" / "metrics.jsonl").read_text().splitlines()[-1])
    assert cells["s2"][5] == f"{own['fid']:.1f}"
    assert "`s2`, is the best feasible one; the profile stays" in table.read_text()  # s4 is better but does not fit
    assert figure.stat().st_size > 0
