"""The covariance ablation's report (``bash reproduce.sh cifar10-ablation``), with ``REPORT_ONLY=1`` on
prepared run folders: which covariance each E-step used, which rows this run produced, which are
not run, the paper's FIDs beside them, and a diverged heuristic said as such. The training side
(fork after lap 1, the heuristic from lap 2 on) is tested in tests/test_fork.py and by the
records' ``estep_covariance`` (tests/test_cifar10_experiment.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from diffem.config import config_to_dict, load_config

ROOT = Path(__file__).resolve().parents[1]


def _run_folder(folder: Path, covariance: str, fids: list[float], max_abs: float = 3.0, source: Path | None = None):
    config = config_to_dict(load_config("cifar10", "smoke", overrides=[
        "data.drop_prob=0.75", f"estep.covariance={covariance}", "laps=2", f"output_dir={folder}"]))
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    used = [None, "gaussian (exact)", covariance]
    lines = []
    for lap, fid in enumerate(fids):
        record = {"lap": lap, "fid": fid, "kid": fid / 1000, "kid_std": 0.01, "kid_subset_size": 16, "kid_subsets": 100,
                  "fid_samples": 16, "fid_reference": 32, "eval_status": "ok", "estep_time_s": 1.0,
                  "mstep_time_s": 2.0 * (lap > 0), "eval_time_s": 3.0, "hardware": "test machine"}
        if lap:
            top = max_abs if lap == 2 else 3.0
            record |= {"estep_covariance": used[lap], "estep_sample_moments": [0.0, 1.0, -top, top]}
        if source is not None and lap <= 1:
            record["copied_from"] = str(source)
        lines.append(json.dumps(record))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_the_ablation_report_on_prepared_runs(tmp_path):
    runs = tmp_path / "runs"
    source = runs / "cifar10-smoke-p75"  # the Tweedie run (all laps of the smoke profile: 2)
    _run_folder(source, "tweedie", [480.0, 470.0, 460.0])
    (source / "lap_02").mkdir()
    (source / "lap_02" / "model_index.json").write_text("{}")  # the driver's test that the run holds every lap
    _run_folder(runs / "cifar10-ablation-smoke-sigma_t", "sigma_t", [480.0, 470.0, 450.0], source=source)
    _run_folder(runs / "cifar10-ablation-smoke-prior", "prior", [480.0, 470.0, 500.0], max_abs=1e7, source=source)
    env = os.environ | {
        "REPORT_ONLY": "1", "RUN_ROOT": str(runs), "TABLES_DIR": str(tmp_path / "tables"),
        "RESULTS_DIR": str(tmp_path / "results"), "FIGURES_DIR": str(tmp_path / "figures"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    proc = subprocess.run(["bash", "reproduce.sh", "cifar10-ablation", "--profile", "smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert (tmp_path / "figures" / "cifar10_ablation_smoke.png").stat().st_size > 0
    table = (tmp_path / "tables" / "cifar10_ablation_smoke.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert "this report's run" in rows["Sigma_t = sigma_t^2 I"] and "done" in rows["Sigma_t = sigma_t^2 I"]
    assert "| 450 (lap 2) |" in rows["Sigma_t = sigma_t^2 I"] and "| 460 (lap 2) |" in rows["Tweedie sigma_t^2 J (MMPS)"]
    assert "diverged at lap 2" in rows["(I + Sigma_t^-1)^-1"]  # E-step samples at 1e7: said, not hidden
    for paper in ("| 13.18 |", "| 39.94 |", "| 118.69 |"):
        assert paper in table
    assert "gaussian (exact)" in table and "sigma_t" in table
    assert not (tmp_path / "results").exists()  # smoke runs are never copied to the results


def test_ablation_rejects_an_unknown_profile(tmp_path):
    proc = subprocess.run(["bash", "experiments/cifar10-ablation/run.sh", "nope"], cwd=ROOT,
                          capture_output=True, text=True, env=os.environ | {"RUN_ROOT": str(tmp_path)})
    assert proc.returncode == 2 and "no profile 'nope'" in proc.stderr
