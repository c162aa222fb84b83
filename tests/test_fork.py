"""Forking a run (``diffem fork``): laps 0..K copied, later laps trained with changed E-step keys.

The covariance ablation relies on it: lap 1's E-step samples under the lap-0 Gaussian, whose
exact covariance is used whatever ``estep.covariance`` says, so a fork of a Tweedie run at lap 1
must end where a fresh run with the heuristic ends.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from diffem.cli import main
from diffem.em import lap_dir

FAST = ["eval.samples=0", "lap0.iterations=4", "data.points=256", "estep.batch_size=128", "estep.steps=8",
        "mstep.steps=30", "mstep.checkpoint_every=10", "mstep.batch_size=64"]


def _train(out, *sets):
    assert main(["train", "manifold", "--profile", "smoke", "--output-dir", str(out), "--no-progress",
                 "--set", *FAST, *sets]) == 0


def _weights(run, lap):
    (path,) = (lap_dir(run, lap) / "unet").glob("*.safetensors")
    return load_file(path)


def test_a_fork_at_lap_one_ends_where_a_fresh_run_ends(tmp_path, capsys):
    source, fresh, fork = tmp_path / "tweedie", tmp_path / "fresh", tmp_path / "fork"
    _train(source, "laps=1")
    assert main(["fork", str(source), "--lap", "1", "--output-dir", str(fork), "--set", "estep.covariance=sigma_x"]) == 0
    _train(fork, "laps=2", "estep.covariance=sigma_x")
    _train(fresh, "laps=2", "estep.covariance=sigma_x")
    for k in (1, 2):
        a, b = _weights(fork, k), _weights(fresh, k)
        assert all(torch.equal(a[n], b[n]) for n in a), f"lap {k} differs"
    records = [json.loads(line) for line in (fork / "metrics.jsonl").read_text().splitlines()]
    assert [r["lap"] for r in records] == [0, 1, 2]
    assert records[1]["copied_from"] == str(source) and "copied_from" not in records[2]
    assert [r.get("estep_covariance") for r in records[1:]] == ["gaussian (exact)", "sigma_x"]
    assert json.loads((fork / "fork.json").read_text())["changed"] == {"estep.covariance": "sigma_x"}
    # Calling it again (a driver resuming) leaves the fork alone; another fork into it is refused.
    assert main(["fork", str(source), "--lap", "1", "--output-dir", str(fork), "--set", "estep.covariance=sigma_x"]) == 0
    assert main(["fork", str(source), "--lap", "1", "--output-dir", str(fork), "--set", "estep.covariance=prior"]) == 2
    assert "is not this fork" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [("data.points=128", "not data.points"),
                                               ("seed=3", "not seed"), ("lap0.rank=2", "not lap0.rank")])
def test_a_fork_refuses_keys_the_copied_laps_depend_on(tmp_path, capsys, override, message):
    source = tmp_path / "src"
    _train(source, "laps=0")
    assert main(["fork", str(source), "--lap", "0", "--output-dir", str(tmp_path / "f"), "--set", override]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "f").exists()
    assert main(["fork", str(source), "--lap", "1", "--output-dir", str(tmp_path / "g")]) == 2  # lap 1 not saved

