"""The covariance ablation's wiring (``bash reproduce.sh cifar10-ablation``), on a tiny real run.

One heuristic (``COVARIANCES=sigma_t``) of the ``smoke`` overlay, shortened to two laps, on the
authors' protocol: the cifar10 run at 75 % trains laps 0-1 (shared by every row), the heuristic
forks it and trains lap 2 with ``estep.covariance=sigma_t``; the records say which covariance
each E-step used, and the report says which rows it produced, which are not run, and puts the
paper's FIDs beside them. Everything is written inside tmp_path.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
FAST = ["laps=2", "lap0.iterations=1", "mstep.steps=2", "mstep.checkpoint_every=2", "eval.samples=0",
        "data.posterior_observations=0", "estep.steps=2"]


def test_ablation_runs_one_heuristic_and_reports(tmp_path):
    env = os.environ | {
        "OMP_NUM_THREADS": "1", "COVARIANCES": "sigma_t", "RUN_ROOT": str(tmp_path / "runs"),
        "TABLES_DIR": str(tmp_path / "tables"), "RESULTS_DIR": str(tmp_path / "results"),
        "FIGURES_DIR": str(tmp_path / "figures"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    proc = subprocess.run(["bash", "reproduce.sh", "cifar10-ablation", "--profile", "smoke", "--set", *FAST],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    run = tmp_path / "runs" / "cifar10-ablation-smoke-sigma_t"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["estep"]["covariance"] == "sigma_t" and config["data"]["drop_prob"] == 0.75
    assert config["laps"] == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    source = tmp_path / "runs" / "cifar10-smoke-p75"
    assert [r["lap"] for r in records] == [0, 1, 2]
    assert [r.get("copied_from") for r in records] == [str(source), str(source), None]
    assert [r.get("estep_covariance") for r in records[1:]] == ["gaussian (exact)", "sigma_t"]
    shared = [json.loads(line) for line in (source / "metrics.jsonl").read_text().splitlines()]
    assert [r["lap"] for r in shared] == [0, 1]  # the shared laps are trained once, in the cifar10 run
    assert (tmp_path / "figures" / "cifar10_ablation_smoke.png").exists()
    table = (tmp_path / "tables" / "cifar10_ablation_smoke.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert "this report's run" in rows["Sigma_t = sigma_t^2 I"] and "done" in rows["Sigma_t = sigma_t^2 I"]
    assert "not run" in rows["Tweedie sigma_t^2 J (MMPS)"] and "not run" in rows["(I + Sigma_t^-1)^-1"]
    for paper in ("| 13.18 |", "| 39.94 |", "| 118.69 |"):
        assert paper in table
    assert not (tmp_path / "results").exists()  # smoke runs are never copied to the results


def test_ablation_rejects_an_unknown_profile(tmp_path):
    proc = subprocess.run(["bash", "experiments/cifar10-ablation/run.sh", "nope"], cwd=ROOT,
                          capture_output=True, text=True, env=os.environ | {"RUN_ROOT": str(tmp_path)})
    assert proc.returncode == 2 and "no profile 'nope'" in proc.stderr
