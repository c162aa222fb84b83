"""Two processes through the real CLI, launched as the README says:

    accelerate launch --multi_gpu --num_processes 2 -m diffem.cli train manifold --profile smoke ...

On a CPU-only machine this is torchrun with the gloo backend. Each process must see
``num_processes == 2``; the E-step samples, the evaluation metrics and the learning-rate
sequence, the M-step's trained weights must equal a 1-process run's (the 1-process run is
in-process), and only the main process builds the observations. One two-process launch
trains (E-step, M-step and the sharded evaluation of lap 0), another one fails an evaluation
on one process.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffem.runs import lap_dir

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ["laps=1", "lap0.iterations=4", "data.points=256", "estep.batch_size=64", "estep.block=32", "estep.steps=8",
            "mstep.steps=20", "mstep.checkpoint_every=10", "mstep.batch_size=64", "mstep.log_every=5",
            "eval.samples=96", "eval.batch_size=32", "eval.steps=8", "data.eval_points=64", "data.sinkhorn_maxiter=30"]


def _launch() -> list[str]:
    with socket.socket() as sock:  # a free rendezvous port (the default 29500 may be taken)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # `accelerate launch` as a module of the same interpreter; the last four options only
    # silence accelerate's warnings about defaults and pick a free port.
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]


def _weights(run: Path, lap: int) -> dict:
    (path,) = (lap_dir(run, lap) / "unet").glob("*.safetensors")
    return load_file(path)


def _records(run: Path) -> dict:
    return {json.loads(l)["lap"]: json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()}


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo")
def test_two_processes_through_the_cli_match_one(tmp_path, cli):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    train = ["train", "manifold", "--profile", "smoke", "--no-progress", "--set", *SETTINGS]
    one, two = tmp_path / "one", tmp_path / "two"
    single = cli(*train, "--output-dir", one)  # the 1-process run, in this process (1 torch thread)
    assert single.returncode == 0, single.stderr[-3000:]
    assert "process 0 of num_processes 1" in single.stderr
    double = subprocess.run(_launch() + ["-m", "diffem.cli", *train, "--output-dir", str(two)], env=env, cwd=ROOT,
                            capture_output=True, text=True)
    assert double.returncode == 0, double.stderr[-3000:]
    for rank in (0, 1):  # two real processes, each in a group of two (not two lone "main" processes)
        assert f"process {rank} of num_processes 2 (MULTI_CPU" in double.stderr
    a, b = _records(one), _records(two)
    assert sorted(a) == sorted(b) == [0, 1]
    assert [r["processes"] for r in b.values()] == [2, 2] and "2 process(es)" in b[1]["hardware"]
    # E-step: the same samples (per-block generators), compared through their moments.
    assert b[1]["estep_sample_moments"] == pytest.approx(a[1]["estep_sample_moments"], rel=1e-5, abs=1e-6)
    assert b[1]["discarded_samples"] == a[1]["discarded_samples"]
    # One optimizer step is one learning-rate step on any number of processes.
    assert b[1]["lr_log"] == a[1]["lr_log"] and len(a[1]["lr_log"]) == 4
    # M-step: one global batch per step, sliced over the processes (the MLP has no dropout):
    # the same loss and the same trained weights, up to float32 round-off.
    assert b[1]["train_loss"] == pytest.approx(a[1]["train_loss"], rel=1e-5)
    wa, wb = _weights(one, 1), _weights(two, 1)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)
    # Evaluation of the same prior (lap 0): samples sharded over the processes and gathered.
    assert a[0]["eval_status"] == b[0]["eval_status"] == "ok"
    assert b[0]["sinkhorn"] == pytest.approx(a[0]["sinkhorn"], rel=1e-4)
    assert b[0]["eval_samples"] == a[0]["eval_samples"] == 96



@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo")
def test_evaluation_failing_on_one_process_fails_everywhere_without_waiting(tmp_path):
    # One process's evaluation raises, between two gathers or before the first: every process
    # records the failure and the run goes on with its collectives still paired (a final gather
    # succeeds), instead of one process waiting in a gather until the group's timeout.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    script = str(ROOT / "tests" / "scripts" / "eval_failure.py")
    result = subprocess.run(_launch() + [script, str(tmp_path)], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    for r, o in enumerate(out):
        assert o["final"] == [1.0, 2.0]
        first, second, third = o["results"]
        assert first["eval_status"] == second["eval_status"] == "failed"
        assert third["eval_status"] == "ok" and third["total"] == 6.0  # 3 x 2 zeros and 3 x 2 ones
    # The failing process records its own error; the other one says where the failure was.
    assert "injected failure on process 1" in out[1]["results"][0]["eval_error"]
    assert out[0]["results"][0]["eval_error"] == "evaluation failed on another process"
    assert "injected failure on process 0" in out[0]["results"][1]["eval_error"]
    assert out[1]["results"][1]["eval_error"] == "evaluation failed on another process"
