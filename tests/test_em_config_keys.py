"""Every config key reaches the code: changing it changes a run's behaviour or resolved objects.

Each key of the manifold smoke profile is set to another value and a probe that runs the
real phase consuming it (lap 0, E-step, M-step, evaluation, accelerator set-up, the
driver's lap loop) must give a different result. A key without a probe fails the
coverage test, so a key added later must come with the code that reads it.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from diffem.config import ConfigError, config_to_dict, load_config
from diffem.train import make_trainer
from diffem.em.estep import keep_samples, run_estep, screen_samples
from diffem.em.evaluation import evaluate_lap, is_scheduled
from diffem.em.lap0 import run_lap0
from diffem.em.mstep import mstep_steps, run_mstep
from diffem.em.trainer import accelerator_kwargs, make_accelerator
from diffem.tasks import get_task

BASE = ["data.points=64", "lap0.iterations=2", "lap0.observations=64", "estep.steps=4", "estep.batch_size=32",
        "estep.block=16", "mstep.steps=6", "mstep.batch_size=16", "mstep.log_every=2", "mstep.checkpoint_every=3",
        "eval.samples=32", "eval.batch_size=16", "eval.steps=4", "data.eval_points=32", "data.sinkhorn_maxiter=10",
        "network.hidden=[16]", "network.emb_features=8", "mstep.ema_decay=0.5", "estep.discard_outside=1.0"]

_tmp: dict = {}
_BASES: dict = {}  # (probe, common overrides) -> the unchanged run's result


def _config(*overrides: str):
    config = load_config("manifold", "smoke", overrides=BASE + list(overrides))
    config.output_dir = str(_tmp["dir"] / f"run-{abs(hash(tuple(overrides)))}")
    return config


@functools.lru_cache(maxsize=None)
def _accelerator():
    return make_accelerator(load_config("manifold", "smoke"))


def _obs(config):
    config.run_dir.mkdir(parents=True, exist_ok=True)
    return get_task(config).observations(config.run_dir)


def _lap0(config):
    prior, _ = run_lap0(_accelerator(), config, _obs(config))
    return prior


def probe_lap0(config):
    p = _lap0(config)
    return torch.cat([p.mean, p.covariance().flatten()])


class _Pipe:  # what run_estep loads: a pipeline whose `unet` is the prior
    def __init__(self, unet):
        self.unet = unet


def probe_estep(config):
    prior = _lap0(load_config("manifold", "smoke", overrides=BASE) if config.seed == 0 else config)
    folder = config.run_dir / "estep"
    x = run_estep(_accelerator(), config, 1, _obs(config)[:32], folder, lambda: _Pipe(prior))
    kept, discarded, _ = keep_samples(x, config.estep.discard_outside)
    return x, discarded, sorted(p.name for p in folder.iterdir())


def probe_estep_network(config):
    """Lap 2's E-step, under a (freshly initialised) network prior; lap 0's Gaussian is Sigma_x."""
    gauss = _lap0(load_config("manifold", "smoke", overrides=BASE))
    net = get_task(config).backbone(0)
    folder = config.run_dir / "estep2"
    return run_estep(_accelerator(), config, 2, _obs(config)[:16], folder, lambda: _Pipe(net),
                     load_lap0=lambda: _Pipe(gauss))


def probe_screen(config):
    """The samples the M-step would train on, from E-step samples with 2 of 64 far outside [-2, 2]."""
    x = torch.randn(64, 5, generator=torch.Generator().manual_seed(0))
    x[:2] *= 100
    try:
        kept, discarded, outliers = screen_samples(x, config, 2.0, lap=1)
    except RuntimeError as e:
        return ("stopped", str(e).split(";")[0])
    return kept, discarded, outliers


def probe_mstep(config):
    task = get_task(config)
    samples = torch.randn(48, 5, generator=torch.Generator().manual_seed(0))
    backbone = task.backbone(0)
    folder = config.run_dir / "mstep"
    model, stats = run_mstep(_accelerator(), config, task, 1, samples, backbone, folder, config.run_dir)
    checkpoints = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    return [p.detach().clone() for p in model.parameters()], stats, checkpoints, mstep_steps(config.mstep, len(samples))


def probe_eval(config):
    task = get_task(config)
    calls = []
    prior = _lap0(load_config("manifold", "smoke", overrides=BASE))
    original = type(prior).forward

    def counting(self, x, sigma):
        calls.append(x.shape[0])
        return original(self, x, sigma)

    type(prior).forward = counting
    try:
        out = evaluate_lap(_accelerator(), config, task, 0, prior, config.run_dir)
    finally:
        type(prior).forward = original
    assert out["eval_status"] == "ok", out
    schedule = [is_scheduled(config, k) for k in range(config.laps + 1)]
    return {k: v for k, v in out.items() if k not in ("eval_time_s", "eval_settings")}, calls, schedule


def probe_ambient_mstep(config):
    """The M-step of a cifar10 ambient run carrying this config's ``mstep.ambient_delta`` (the manifold
    has no mask operator)."""
    images = load_config("cifar10", "smoke", overrides=["train_on=ambient", "mstep.steps=2", "mstep.batch_size=4",
                                                         f"mstep.ambient_delta={config.mstep.ambient_delta}"])
    images.output_dir = config.output_dir
    task = get_task(images)
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(8, 1, 32, 32, generator=g) < 0.5).float().expand(8, 3, 32, 32)
    samples = torch.cat([torch.randn(8, 3, 32, 32, generator=g) * mask, mask], dim=1)
    backbone = task.ambient_backbone(0, 0.45)
    model, _ = run_mstep(_accelerator(), images, task, 1, samples, backbone, config.run_dir / "mstep", config.run_dir)
    return [p.detach().clone() for p in model.parameters()]


def probe_accelerator(config):
    kwargs = accelerator_kwargs(config)
    return kwargs["mixed_precision"], kwargs["kwargs_handlers"][0].timeout


def probe_task(config):
    task = get_task(config)
    return type(task).__name__, task.data, sum(p.numel() for p in task.backbone(0).parameters())


def probe_run_dir(config):
    config = dataclasses.replace(config, output_dir=config.output_dir)
    return str(config.run_dir)


def probe_laps(config, monkeypatch=None):
    ran = []
    trainer = make_trainer(config, _accelerator(), progress=False)
    trainer.lap0 = lambda obs: ran.append(0) or {}
    trainer.lap = lambda lap, obs: ran.append(lap) or {}
    trainer.run()
    return ran


# key -> (changed value, probe, overrides applied to both runs)
CHANGES = {
    "experiment": ("mnist", probe_task, ["data={}", "network={}"]),
    "profile": ("other", probe_run_dir, ["output_dir=''"]),
    "seed": (1, probe_estep, []),
    "precision": ("bf16", probe_accelerator, []),
    "timeout_minutes": (5.0, probe_accelerator, []),
    "output_dir": ("elsewhere", probe_run_dir, []),
    "laps": (1, probe_laps, []),
    "train_on": ("clean", probe_laps, []),  # a reference run has no lap 0 (tests/test_references.py runs them)
    "mstep.ambient_delta": (0.5, probe_ambient_mstep, []),
    "data": ({"points": 64, "features": 4}, probe_task, []),
    "network": ({"hidden": [8, 8]}, probe_task, []),
    "lap0.rank": (1, probe_lap0, []),
    "lap0.iterations": (1, probe_lap0, []),
    "lap0.observations": (16, probe_lap0, []),
    "lap0.estep": ("sample", probe_lap0, []),
    "lap0.steps": (3, probe_lap0, ["lap0.estep=mmps"]),
    "lap0.maxiter": (2, probe_lap0, ["lap0.estep=mmps"]),
    "lap0.tol": (0.9, probe_lap0, ["lap0.estep=mmps", "lap0.maxiter=3"]),
    "estep.method": ("ddim", probe_estep, []),
    "estep.steps": (3, probe_estep, []),
    "estep.corrections": (2, probe_estep, ["estep.method=pc"]),
    "estep.delta": (0.3, probe_estep, ["estep.method=pc"]),
    "estep.maxiter": (1, probe_estep, []),
    "estep.tol": (0.9, probe_estep, ["estep.maxiter=3"]),
    "estep.batch_size": (16, probe_estep, []),
    "estep.block": (8, probe_estep, []),
    "estep.discard_outside": (0.5, probe_estep, []),
    "estep.guidance": ("dps", probe_estep, []),
    "estep.covariance": ("sigma_x", probe_estep_network, []),  # lap 1 (the Gaussian) is exact whatever it says
    "estep.outlier_factor": (100.0, probe_screen, ["estep.discard_outside=null"]),
    "estep.max_outlier_fraction": (0.001, probe_screen, ["estep.discard_outside=null"]),
    "estep.dps_zeta": (0.5, probe_estep, ["estep.guidance=dps"]),
    "estep.solver": ("gmres", probe_estep, []),
    "estep.pigdm_weight": (0.5, probe_estep, ["estep.guidance=pigdm"]),
    "estep.diffpir_lambda": (3.0, probe_estep, ["estep.guidance=diffpir"]),
    "mstep.steps": (4, probe_mstep, []),
    "mstep.epochs": (1.0, probe_mstep, []),
    "mstep.batch_size": (8, probe_mstep, []),
    "mstep.lr": (1e-2, probe_mstep, []),
    "mstep.lr_end": (1e-4, probe_mstep, []),
    "mstep.weight_decay": (0.5, probe_mstep, []),
    "mstep.grad_clip": (1e-3, probe_mstep, []),
    "mstep.ema_decay": (0.1, probe_mstep, []),  # below the (1 + n) / (10 + n) warm-up of EMAModel
    "mstep.augment": (True, probe_task, []),  # the manifold has no augmentation: refused (cifar10 tests its own)
    "mstep.checkpoint_every": (2, probe_mstep, []),
    "mstep.log_every": (3, probe_mstep, []),
    "eval.samples": (16, probe_eval, []),
    "eval.method": ("ddpm", probe_eval, []),
    "eval.steps": (3, probe_eval, []),
    "eval.batch_size": (8, probe_eval, []),
    "eval.every": (2, probe_eval, ["laps=4"]),
    "eval.powers_of_two": (True, probe_eval, ["laps=8", "eval.every=1"]),
}
# Keys owned and tested elsewhere: the Hub section (tests/test_hub.py) and the kernel options, which by
# design leave the run unchanged up to round-off (tests/test_kernels.py checks that each reaches the code
# and computes the same network).
ELSEWHERE = ("hub.", "kernels.")


def _leaves(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        if isinstance(v, dict) and k not in ("data", "network"):
            out += _leaves(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}")
    return out


def _differs(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape != b.shape or not torch.equal(a, b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) != len(b) or any(_differs(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() != b.keys() or any(_differs(a[k], b[k]) for k in a)
    return a != b


def _run(probe, overrides):
    try:
        return probe(_config(*overrides))
    except ConfigError as e:  # refusing a value is a change of behaviour too
        return ("ConfigError", str(e))


def test_every_key_has_a_probe():
    keys = _leaves(config_to_dict(load_config("manifold", "smoke")))
    missing = [k for k in keys if k not in CHANGES and not k.startswith(ELSEWHERE)]
    assert not missing, f"config keys with no test that they reach the code: {missing}"


@pytest.mark.parametrize("key", sorted(CHANGES))
def test_changing_a_key_changes_the_run(key, tmp_path_factory):
    _tmp["dir"] = tmp_path_factory.mktemp("keys")
    value, probe, common = CHANGES[key]
    import yaml

    key_ = (probe.__name__, tuple(common))
    if key_ not in _BASES:  # one base run per (probe, overrides), shared by the keys that change it
        _BASES[key_] = _run(probe, common)
    base = _BASES[key_]
    changed = _run(probe, common + [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}"])
    assert not (isinstance(base, tuple) and base and base[0] == "ConfigError"), base
    assert _differs(base, changed), f"setting `{key}` to {value!r} changed nothing"
