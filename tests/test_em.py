"""The EM trainer: end to end, multi-process E-step, kill and resume, config errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffem.cli import main as cli_main
from diffem.config import ConfigError, load_config
from diffem.train import make_trainer
from diffem.observations import ObservationSet
from diffem.runs import lap_dir
from diffem.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
FAST = ["eval.samples=0", "lap0.iterations=4", "data.points=256", "estep.batch_size=128", "estep.steps=8",
        "mstep.steps=40", "mstep.checkpoint_every=10", "mstep.batch_size=64"]


def _cli(out: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "diffem.cli", "train", "manifold", "--profile", "smoke", "--output-dir", str(out),
            "--no-progress", "--set", *overrides]


def _weights(run: Path, lap: int) -> dict:
    (path,) = (lap_dir(run, lap) / "unet").glob("*.safetensors")
    return load_file(path)


def test_two_laps_end_to_end(tmp_path):
    config = load_config("manifold", "smoke", overrides=[f"output_dir={tmp_path}"])
    records = make_trainer(config, progress=False).run()
    assert [r["lap"] for r in records] == [0, 1, 2]
    # The metric can tell the truth from the lap-0 Gaussian: held-out truth scores below it.
    task = get_task(config)
    truth, _ = task.divergence(task.ground_truth(config.eval.samples, "train"))
    assert truth < records[0]["sinkhorn"]
    for r in records:
        # Wall times are only meaningful with the machine they were measured on: its cores and threads.
        assert r["hardware"].startswith("1 process(es) on CPU only: ")
        assert f"{os.cpu_count()} cores" in r["hardware"] and f"{torch.get_num_threads()} torch threads" in r["hardware"]
    assert (tmp_path / "config.yaml").exists()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["lap"] for l in lines] == [0, 1, 2]
    for k in range(3):
        assert (lap_dir(tmp_path, k) / "model_index.json").exists()
    assert not (tmp_path / "work" / "lap_01").exists()  # scratch removed once a lap is saved
    # Rerunning a finished run does nothing and loses nothing.
    assert make_trainer(config, progress=False).run() == []
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3


def test_ground_truth_never_reaches_the_trainer(tmp_path):
    config = load_config("manifold", "smoke", overrides=[f"output_dir={tmp_path}"] + FAST)
    obs = get_task(config).observations(tmp_path)
    assert isinstance(obs, ObservationSet)
    assert set(vars(obs)) == {"y", "operator", "noise_std", "event_shape"}
    import datasets

    assert sorted(datasets.load_from_disk(str(tmp_path / "observations")).column_names) == ["matrix", "y"]
    assert obs.y.shape == (256, 2)


def test_estep_does_not_depend_on_batch_size(tmp_path):
    base = load_config("manifold", "smoke", overrides=[f"output_dir={tmp_path}"] + FAST)
    trainer = make_trainer(base, progress=False)
    trainer._prepare_run_dir()
    obs = trainer.observations()
    trainer.lap0(obs)
    a = trainer.estep(1, obs)
    other = load_config("manifold", "smoke", overrides=[f"output_dir={tmp_path / 'b'}"] + FAST + ["estep.batch_size=64"])
    t2 = make_trainer(other, progress=False)
    t2.run_dir, t2.work_dir = tmp_path, tmp_path / "work-b"
    b = t2.estep(1, obs)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(sys.platform != "linux", reason="uses SIGKILL")
def test_kill_and_resume_gives_the_same_prior(tmp_path, cli):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert cli(*_cli(full, *FAST)[3:]).returncode == 0  # in this process (1 torch thread, as the killed one)

    # Kill in the lap-2 M-step, after its first checkpoint, then resume.
    proc = subprocess.Popen(_cli(killed, *FAST), env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = killed / "work" / "lap_02" / "mstep" / "state.json"
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (lap_dir(killed, 2) / "model_index.json").exists()
    assert cli(*_cli(killed, *FAST)[3:]).returncode == 0  # the resume, in this process

    laps = [json.loads(l)["lap"] for l in (killed / "metrics.jsonl").read_text().splitlines()]
    assert laps == [0, 1, 2]  # nothing finished was recomputed
    a, b = _weights(full, 2), _weights(killed, 2)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)



@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(overrides=["mstep.lrr=1"]), "mstep.lrr"),
        (dict(overrides=["laps=-1"]), "laps"),
        (dict(overrides=["estep.batch_size=100", "estep.block=64"]), "estep.batch_size"),
        (dict(overrides=["data.pointz=3"]), "data.pointz"),
        (dict(profile="nope"), "nope"),
    ],
)
def test_bad_configs_fail_before_work(tmp_path, kwargs, key):
    profile = kwargs.pop("profile", "smoke")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config = load_config("manifold", profile, **kwargs)
        get_task(config)
    assert not any(tmp_path.iterdir())


def test_cli_dry_run_and_errors(tmp_path, cli):
    ok = cli("train", "manifold", "--profile", "smoke", "--dry-run", "--set", "mstep.lr=3e-4")
    assert ok.returncode == 0 and "lr: 0.0003" in ok.stdout
    bad = cli("train", "manifold", "--profile", "smoke", "--set", "laps=-2", f"output_dir={tmp_path / 'x'}")
    assert bad.returncode == 2 and "`laps`" in bad.stderr
    assert not (tmp_path / "x").exists()
    missing = cli("evaluate", tmp_path)
    assert missing.returncode == 2 and "not a run folder" in missing.stderr


def test_train_says_which_profile_it_chose_and_why(capsys):
    assert cli_main(["train", "manifold", "--dry-run"]) == 0
    err = capsys.readouterr().err
    expected = "profile paper (CUDA found" if torch.cuda.is_available() else "profile cpu (no CUDA"
    assert expected in err
    assert cli_main(["train", "manifold", "--profile", "smoke", "--dry-run"]) == 0
    assert "profile" not in capsys.readouterr().err  # chosen by the user: nothing to explain
