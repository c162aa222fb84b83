"""The MNIST experiment: one lap of a tiny transformer prior end to end, and config errors."""

import json
from pathlib import Path

import pytest
from conftest import load_script

from diffem.config import ConfigError, load_config
from diffem.train import make_trainer
from diffem.networks import DiT
from diffem.runs import lap_dir
from diffem.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "mnist"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="offline MNIST not found")


def test_one_lap_tiny_transformer_end_to_end(tmp_path):
    config = load_config("mnist", "smoke", overrides=[f"output_dir={tmp_path}"])
    records = make_trainer(config, progress=False).run()
    assert [r["lap"] for r in records] == [0, 1]
    # the mean of the posterior samples is nearer the clean digits than one sample (the MSE is convex)
    for r in records:
        assert r["psnr_posterior_mean"] > r["psnr_posterior_sample"], r
    assert (lap_dir(tmp_path, 1) / "model_index.json").exists()
    assert json.loads((lap_dir(tmp_path, 1) / "unet" / "config.json").read_text())["_class_name"] == "DiT"
    assert isinstance(get_task(config).backbone(0), DiT)
    # The report script builds the table and the figure from this run.
    table, figure = tmp_path / "t.md", tmp_path / "f.png"
    report = load_script(ROOT / "experiments" / "mnist" / "report.py", "mnist_report")
    assert report.main([str(tmp_path), "--table", str(table), "--figure", str(figure)]) == 0
    assert "| 1 | diffusion |" in table.read_text() and figure.stat().st_size > 0


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.source=/no/such/folder", "data.source"),
        ("data.noise_std=0", "data.noise_std"),
        ("data.noise_std=-1", "data.noise_std"),
        ("data.mask_prob=1.5", "data.mask_prob"),
        ("network.kind=mlp", "network.kind"),
    ],
)
def test_bad_config_fails_before_work(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        get_task(load_config("mnist", "smoke", overrides=[f"output_dir={tmp_path}", override]))
    assert not any(tmp_path.iterdir())
