"""The CIFAR-10 report on a partial rerun (issue 12 item 12), through reproduce.sh, without training.

``LEVELS=0.75 bash reproduce.sh cifar10`` must rebuild the table and both figures with the
levels it did not rerun taken from the committed result files, and say which rows it produced.
Everything here lives in tmp_path: fake run and result folders (no training), and the outputs.
"""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import torch
import yaml

from diffem.data.cifar10 import to_uint8

ROOT = Path(__file__).resolve().parents[1]
COMMITTED_CONFIG = ROOT / "experiments" / "cifar10" / "results" / "cpu-p75" / "config.yaml"


def _config(p: float, output_dir: str) -> dict:
    config = yaml.safe_load(COMMITTED_CONFIG.read_text())
    config["data"]["drop_prob"] = p
    config["output_dir"] = output_dir
    config["laps"] = 1
    return config


def _write_folder(folder: Path, config: dict, records: list[dict]) -> None:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _record(lap: int, fid: float, **extra) -> dict:
    return {"lap": lap, "fid": fid, "isc": None, "fid_samples": 384, "fid_reference": 2000,
            "fid_reference_set": "cifar10-train-jpeg", "psnr_posterior_mean": 20.0 + lap, "psnr_observation": 14.0,
            "psnr_posterior_sample": 19.0 + lap, "estep_time_s": 60.0, "mstep_time_s": 120.0 * (lap > 0),
            "eval_time_s": 30.0, "hardware": "a fake machine"} | extra


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 4 - 2


def _colourful_columns(png: Path) -> torch.Tensor:
    """Per third of the image (one per level): the fraction of strongly coloured pixels."""
    from PIL import Image

    rgb = torch.from_numpy(np.array(Image.open(png).convert("RGB"))).float()
    saturation = rgb.max(-1).values - rgb.min(-1).values
    thirds = saturation.chunk(3, dim=1)
    return torch.tensor([(t > 60).float().mean().item() for t in thirds])


def test_partial_rerun_keeps_the_committed_levels(tmp_path):
    results, runs = tmp_path / "results", tmp_path / "runs"
    # Committed results: 25 % with figure images, 50 % without (as written before they existed).
    _write_folder(results / "cpu-p25", _config(0.25, "runs/cifar10-cpu-p25"),
                  [_record(0, 350.5), _record(1, 211.25)])
    committed_images = {"posterior_laps": [0, 1], "posterior": to_uint8(_images(8, 1)).reshape(2, 4, 3, 32, 32),
                        "clean": to_uint8(_images(4, 2)), "observed": to_uint8(_images(4, 3)),
                        "prior_lap": 1, "prior": to_uint8(_images(32, 4))}
    torch.save(committed_images, results / "cpu-p25" / "figure_images.pt")
    _write_folder(results / "cpu-p50", _config(0.5, "runs/cifar10-cpu-p50"), [_record(0, 345.5), _record(1, 252.75)])
    before = {p: p.read_bytes() for p in results.rglob("*") if p.is_file()}
    # This run: 75 %, with KID and the real-images row, and per-lap evaluation artifacts.
    run = runs / "cifar10-cpu-p75"
    real = {"real_fid": 124.5, "real_kid": 0.0012, "real_kid_std": 0.0003, "real_kid_subset_size": 384,
            "real_images": 384, "real_images_set": "cifar10-test-jpeg"}
    kid = {"kid_std": 0.001, "kid_subset_size": 384, "kid_subsets": 100}
    _write_folder(run, _config(0.75, str(run)), [_record(0, 318.125, kid=0.31, **kid, **real),
                                                  _record(1, 301.875, kid=0.27, **kid, **real)])
    (run / "eval").mkdir()
    for lap in (0, 1):
        torch.save({"prior": _images(32, 10 + lap), "posterior": _images(16, 20 + lap),
                    "observed": _images(16, 30), "clean": _images(16, 31)}, run / "eval" / f"lap_{lap:02d}.pt")

    env = os.environ | {"LEVELS": "0.75", "REPORT_ONLY": "1", "RUN_ROOT": str(runs), "RESULTS_DIR": str(results),
                        "TABLES_DIR": str(tmp_path / "tables"), "FIGURES_DIR": str(tmp_path / "figures"),
                        "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "reproduce.sh", "cifar10", "--profile", "cpu"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

    table = (tmp_path / "tables" / "cifar10.md").read_text()
    assert "rows produced by this report's run: 75 %; taken from committed result files (see the source column): " \
           "25 %, 50 %" in table
    lines = {line.split(" |")[0]: line for line in table.splitlines() if line.startswith("| ")}
    assert lines["| 25 %"].startswith("| 25 % | done | committed results (") and "| 211 (lap 1) | not measured |" \
        in lines["| 25 %"]
    assert lines["| 50 %"].startswith("| 50 % | done | committed results (") and "253 (lap 1)" in lines["| 50 %"]
    assert lines["| 75 %"].startswith("| 75 % | done | this run (") and "| 302 (lap 1) | 0.2700 ± 0.0010 |" \
        in lines["| 75 %"]
    real_row = next(line for line in table.splitlines() if line.startswith("| real images"))
    assert "384 test images (`cifar10-test-jpeg`) vs 2000 reference" in real_row and "| 124 |" in real_row
    assert "0.0012 ± 0.0003" in real_row and "runs of 75 %" in real_row
    assert "KID: unbiased" in table and "100 subsets of 384" in table
    assert "not run" not in table

    # The committed result files are untouched; this run's level joins them, with its figure images.
    assert {p: p.read_bytes() for p in before} == before
    saved = results / "cpu-p75"
    assert (saved / "metrics.jsonl").read_text() == (run / "metrics.jsonl").read_text()
    images = torch.load(saved / "figure_images.pt")
    assert images["posterior_laps"] == [0, 1] and images["posterior"].shape == (2, 4, 3, 32, 32)
    assert torch.equal(images["prior"], to_uint8(_images(32, 11)))  # the last lap's prior samples
    assert torch.equal(images["clean"], to_uint8(_images(4, 31)))

    # Both figures show the committed 25 % images and this run's 75 % images; 50 % has none to show.
    for name in ("cifar10_samples.png", "cifar10_posterior_laps.png"):
        assert (tmp_path / "figures" / name).stat().st_size > 0
    colour = _colourful_columns(tmp_path / "figures" / "cifar10_samples.png")
    assert colour[0] > 0.2 and colour[2] > 0.2 and colour[1] < 0.01
