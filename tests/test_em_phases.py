"""The EM trainer's phases: save before evaluate, failing evaluations, `diffem evaluate`,
resume rules, the non-finite loss guard, the saved sampler settings and the LR schedule."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from diffem.cli import main
from diffem.config import ConfigError, load_config
from diffem.denoiser import DenoisingLoss
from diffem.em import NonFiniteLossError, lap_dir
from diffem.train import make_trainer
from diffem.em.estep import scheduler_of
from diffem.em.mstep import learning_rate
from diffem.pipeline import DiffusionPriorPipeline, estep_scheduler, load_sampling_settings
from diffem.spec import SamplerSpec
from diffem.tasks.manifold import ManifoldTask

ROOT = Path(__file__).resolve().parents[1]
FAST = ["lap0.iterations=4", "data.points=256", "estep.batch_size=128", "estep.steps=8", "mstep.steps=40",
        "mstep.checkpoint_every=10", "mstep.batch_size=64", "eval.samples=64", "eval.steps=4",
        "data.eval_points=64", "data.sinkhorn_maxiter=20"]


def _config(out, *extra):
    return load_config("manifold", "smoke", overrides=[f"output_dir={out}", *FAST, *extra])


def _records(run: Path) -> dict:
    return {json.loads(l)["lap"]: json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()}


def test_failing_evaluation_keeps_the_lap_and_is_filled_in_later(tmp_path, monkeypatch):
    original = ManifoldTask.evaluate

    def broken(self, pipeline, lap, seed, progress=True):
        if lap == 1:
            raise OSError("disk full (injected)")
        return original(self, pipeline, lap, seed, progress)

    monkeypatch.setattr(ManifoldTask, "evaluate", broken)
    records = make_trainer(_config(tmp_path), progress=False).run()
    assert [r["lap"] for r in records] == [0, 1, 2]  # the run went on past the failure
    saved = _records(tmp_path)
    assert saved[1]["eval_status"] == "failed" and "disk full (injected)" in saved[1]["eval_error"]
    assert "sinkhorn" not in saved[1] and saved[1]["mstep_steps"] == 40
    assert saved[0]["eval_status"] == saved[2]["eval_status"] == "ok"
    assert (lap_dir(tmp_path, 1) / "model_index.json").exists()  # the lap was saved before its evaluation
    monkeypatch.setattr(ManifoldTask, "evaluate", original)

    # `diffem evaluate RUN --missing` fills in lap 1 only, with a changed eval key, updating its record.
    out = run_cli("evaluate", tmp_path, "--missing", "--no-progress", "--set", "eval.samples=32")
    assert out.returncode == 0, out.stderr[-2000:]
    assert [json.loads(l)["lap"] for l in out.stdout.splitlines()] == [1]
    after = _records(tmp_path)
    assert after[1]["eval_status"] == "ok" and after[1]["eval_samples"] == 32
    assert after[1]["sinkhorn"] != after[0]["sinkhorn"]  # lap 1's own prior, not lap 0's record
    assert "eval_error" not in after[1] and after[1]["mstep_steps"] == 40  # training fields kept
    assert after[2] == saved[2]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3  # one record per lap, updated in place


def test_resume_may_change_eval_keys_only(tmp_path, monkeypatch, capsys):
    def broken(self, pipeline, lap, seed, progress=True):
        raise RuntimeError("no Inception weights (injected)")

    monkeypatch.setattr(ManifoldTask, "evaluate", broken)
    make_trainer(_config(tmp_path, "laps=1"), progress=False).run()
    assert {k: r["eval_status"] for k, r in _records(tmp_path).items()} == {0: "failed", 1: "failed"}
    monkeypatch.undo()
    with pytest.raises(ConfigError, match=r"mstep\.lr"):
        make_trainer(_config(tmp_path, "laps=1", "mstep.lr=0.5"), progress=False).run()
    # A resume with changed eval keys re-runs the missing evaluations, then extends the run.
    records = make_trainer(_config(tmp_path, "laps=2", "eval.samples=48"), progress=False).run()
    assert [r["lap"] for r in records] == [0, 1, 2]
    after = _records(tmp_path)
    assert all(r["eval_status"] == "ok" and r["eval_samples"] == 48 for r in after.values())
    assert all(r["eval_settings"]["samples"] == 48 for r in after.values())
    # The task's evaluation-only data keys may change too (resume and `diffem evaluate`),
    # the data that defines the observations may not.
    make_trainer(_config(tmp_path, "laps=2", "eval.samples=48", "data.eval_points=32"), progress=False).run()
    with pytest.raises(ConfigError, match=r"data\.curve_seed"):
        make_trainer(_config(tmp_path, "laps=2", "eval.samples=48", "data.curve_seed=5"), progress=False).run()
    assert main(["evaluate", str(tmp_path), "--lap", "1", "--set", "data.eval_points=40", "--no-progress"]) == 0
    assert _records(tmp_path)[1]["eval_points"] == 40
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path), "--lap", "1", "--set", "data.points=40"]) != 0
    assert "data.points=40" in capsys.readouterr().err  # the error names the key and what may be set


def test_non_finite_loss_stops_the_lap_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    original, calls = DenoisingLoss.forward, {"n": 0}

    def poisoned(self, x, generator=None, **noise):
        calls["n"] += 1
        loss = original(self, x, generator, **noise)
        return loss * float("nan") if calls["n"] == 40 + 25 else loss  # lap 2, step 25

    monkeypatch.setattr(DenoisingLoss, "forward", poisoned)
    config = _config(tmp_path, "eval.samples=0")
    with pytest.raises(NonFiniteLossError) as info:
        make_trainer(config, progress=False).run()
    checkpoint = tmp_path / "work" / "lap_02" / "mstep" / "checkpoint-00000020"
    message = str(info.value)
    assert "step 25 of lap 2" in message and str(checkpoint) in message
    assert info.value.lap == 2 and info.value.step == 25 and info.value.checkpoint == checkpoint
    assert checkpoint.is_dir() and not (lap_dir(tmp_path, 2) / "model_index.json").exists()
    assert (lap_dir(tmp_path, 1) / "model_index.json").exists()
    monkeypatch.undo()
    records = make_trainer(config, progress=False).run()  # resumes from the kept checkpoint
    assert [r["lap"] for r in records] == [2]
    weights = DiffusionPriorPipeline.from_pretrained(lap_dir(tmp_path, 2)).unet.state_dict()
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_saved_lap_carries_the_estep_sampler(tmp_path):
    config = _config(tmp_path, "laps=1", "eval.samples=0", "estep.method=pc", "estep.corrections=2",
                     "estep.delta=0.05", "estep.steps=6", "estep.maxiter=3")
    make_trainer(config, progress=False).run()
    settings = load_sampling_settings(lap_dir(tmp_path, 1))
    assert SamplerSpec.from_dict(settings["estep"]) == SamplerSpec(method="pc", steps=6, corrections=2, delta=0.05,
                                                                   maxiter=3)
    assert settings["eval"] == {"method": "ddim", "num_inference_steps": 4}
    scheduler = estep_scheduler(settings["estep"])
    assert dict(scheduler.config) == dict(scheduler_of(config).config)
    assert (scheduler.config.method, scheduler.config.corrections, scheduler.config.delta) == ("pc", 2, 0.05)


def test_learning_rate_is_linear_in_optimizer_steps(tmp_path, poison_eval_keys):
    cfg = _config(tmp_path).mstep
    total = 40
    lrs = [learning_rate(cfg, s, total) for s in range(total)]
    assert lrs[0] == cfg.lr and all(a > b for a, b in zip(lrs, lrs[1:]))
    assert learning_rate(cfg, total, total) == pytest.approx(cfg.lr_end)
    # training alone, and it never reads an evaluation-only key
    records = poison_eval_keys(make_trainer(_config(tmp_path, "laps=1", "eval.samples=0"), progress=False)).run()
    logged = records[1]["lr_log"]  # [step, lr used by that step] every log_every steps
    assert [s for s, _ in logged] == [10, 20, 30, 40]
    assert [lr for _, lr in logged] == pytest.approx([learning_rate(cfg, s - 1, total) for s, _ in logged])


def test_bf16_on_cpu_through_the_cli_and_fp16_refused(tmp_path):
    from safetensors.torch import load_file

    settings = ["laps=1", "eval.samples=0", *FAST]
    runs = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        args = ["train", "manifold", "--profile", "smoke", "--output-dir", str(out), "--no-progress", "--set", *settings,
                f"precision={precision}"]
        if precision == "fp32":  # in this process; bf16 in its own (accelerate's state fixes one precision a process)
            result = run_cli(*args)
        else:
            result = subprocess.run([sys.executable, "-m", "diffem.cli", *args], capture_output=True, text=True, cwd=ROOT,
                                    env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"precision {precision}" in result.stderr
        assert f"precision: {precision}" in (out / "config.yaml").read_text()
        assert {r["precision"] for r in _records(out).values()} == {precision}
        (path,) = (lap_dir(out, 1) / "unet").glob("*.safetensors")
        runs[precision] = load_file(path)
    for k, w in runs["bf16"].items():
        assert w.dtype == torch.float32 and torch.isfinite(w).all()  # weights stay float32
    # The M-step ran under bf16 autocast: the same seeds give other weights.
    assert any(not torch.equal(runs["fp32"][k], runs["bf16"][k]) for k in runs["fp32"])
    with pytest.raises(ConfigError, match=r"`precision`.*fp16 is refused.*use bf16"):
        load_config("manifold", "smoke", overrides=["precision=fp16"])


def test_mstep_draws_nothing_from_the_global_rng(tmp_path):
    """Batches, noise and dropout come from seeded streams (diffem.em.seeds): the caller's global
    RNG neither changes the result nor is advanced."""
    from accelerate import Accelerator

    from diffem.em.mstep import run_mstep
    from diffem.tasks import get_task

    config = _config(tmp_path, "mstep.steps=5", "network.hidden=[16]")
    task = get_task(config)
    samples = torch.randn(64, 5, generator=torch.Generator().manual_seed(0))
    out = []
    for k, global_seed in enumerate((1, 2)):
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        model, _ = run_mstep(Accelerator(cpu=True), config, task, 1, samples, task.backbone(0), tmp_path / f"m{k}", tmp_path)
        assert torch.equal(torch.get_rng_state(), state)  # the global RNG was not advanced
        out.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*out))


def test_every_eval_data_key_is_a_data_option():
    """That training never reads them is tested by poisoning them (fixture ``poison_eval_keys``) in
    training runs of the manifold, cifar10 and MRI tasks."""
    from diffem.tasks import TASKS, task_class

    for name in TASKS:
        cls = task_class(name)
        assert cls.eval_data_keys and set(cls.eval_data_keys) <= set(cls.data_defaults), name


def test_batch_size_not_splitting_over_the_processes_fails_before_any_work(tmp_path):
    # On 3 processes a batch of 64 has no equal slices: the run must refuse at its start, not
    # after lap 0 and a whole E-step. A stand-in accelerator reports 3 processes.
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    fake = SimpleNamespace(num_processes=3, process_index=0, is_main_process=True, device=torch.device("cpu"),
                           distributed_type=DistributedType.MULTI_GPU)
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=r"`mstep\.batch_size` \(64\) must be a multiple of the number of processes \(3\)"):
        make_trainer(_config(run), accelerator=fake, progress=False).run()
    assert not run.exists()  # nothing built, nothing trained


def test_too_many_outlier_samples_stop_the_lap_before_its_mstep(tmp_path):
    """E-step samples far outside the data's range are never trained on silently: past
    estep.max_outlier_fraction the lap stops, naming the lap and the count; lap 0 and the E-step's
    chunks are kept."""
    from diffem.em.estep import OutlierError

    config = _config(tmp_path, "laps=1", "eval.samples=0", "estep.outlier_factor=0.05", "estep.discard_outside=null")
    with pytest.raises(OutlierError, match=r"lap 1: \d+ of 256 E-step samples") as err:
        make_trainer(config, progress=False).run()
    assert err.value.lap == 1 and err.value.outliers > 0.01 * 256
    assert (lap_dir(tmp_path, 0) / "model_index.json").exists() and not lap_dir(tmp_path, 1).exists()
    assert sorted(p.name for p in (tmp_path / "work" / "lap_01" / "estep").iterdir())  # the chunks stay
    assert "diffem fork" in str(err.value)


def test_a_failing_estep_metric_is_recorded_and_the_lap_goes_on(tmp_path, monkeypatch):
    from diffem.tasks.manifold import ManifoldTask

    def broken(self, samples, lap):
        raise RuntimeError("no memory for the cost matrix")

    monkeypatch.setattr(ManifoldTask, "estep_metrics", broken)
    make_trainer(_config(tmp_path, "laps=1"), progress=False).run()
    record = _records(tmp_path)[1]
    assert "no memory for the cost matrix" in record["estep_metrics_error"] and "sinkhorn_posterior" not in record
    assert (lap_dir(tmp_path, 1) / "model_index.json").exists()


def test_a_lap_saved_without_its_record_gets_it_back_on_resume(tmp_path):
    """A kill between saving lap_KK/ and writing metrics.jsonl: the record saved inside the lap folder
    comes back (E-step and M-step statistics kept), and the lap's due evaluation runs."""
    config = _config(tmp_path, "laps=1", "eval.samples=32", "data.eval_points=32")
    first = {r["lap"]: r for r in make_trainer(config, progress=False).run()}
    saved = json.loads((lap_dir(tmp_path, 1) / "lap_record.json").read_text())
    assert saved["mstep_steps"] == first[1]["mstep_steps"] and saved["estep_sample_moments"] == first[1]["estep_sample_moments"]
    # as if killed right after the save: lap 1's record never reached metrics.jsonl
    lines = [l for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if json.loads(l)["lap"] != 1]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    again = make_trainer(config, progress=False).run()
    assert [r["lap"] for r in again] == [1]  # evaluated, not retrained
    record = _records(tmp_path)[1]
    assert record["restored"] is True and record["eval_status"] == "ok"
    assert record["train_loss"] == first[1]["train_loss"] and record["sinkhorn"] == pytest.approx(first[1]["sinkhorn"])
