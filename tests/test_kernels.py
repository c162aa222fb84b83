"""``kernels.*`` (diffem.kernels): each option runs the same maths as the plain fp32 path, to round-off, in
the M-step and the E-step; a delayed finiteness check still names the first bad step and saves nothing."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from diffem.config import ConfigError, load_config
from diffem.em.estep import run_estep
from diffem.em.mstep import NonFiniteLossError, run_mstep
from diffem.kernels import set_matmul_precision
from diffem.observations import ObservationSet
from diffem.operators import GaussianObservation, Mask
from diffem.pipeline import DiffusionPriorPipeline
from diffem.scheduler import VEScheduler
from diffem.tasks import get_task

FAST = ["mstep.steps=6", "mstep.batch_size=8", "mstep.checkpoint_every=2", "mstep.log_every=2"]


def _mstep(tmp_path, name, *sets, samples=None):
    config = load_config("cifar10", "smoke", overrides=[*FAST, *sets, f"output_dir={tmp_path / name}"])
    task = get_task(config)
    if samples is None:
        samples = torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 4 - 2
    model, stats = run_mstep(Accelerator(cpu=True), config, task, 1, samples, task.backbone(0), tmp_path / name / "m",
                             tmp_path / name)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, stats


@pytest.mark.parametrize("sets, tol", [
    (["kernels.check_every=4"], 0.0),  # only when the check is read: bit for bit
    (["kernels.fused_adam=true"], 1e-5),
    (["kernels.foreach_ema=true"], 1e-5),
    (["kernels.channels_last=true"], 1e-4),
    (["kernels.compile=eager"], 1e-5),
    (["kernels.tf32=true"], 0.0),  # CUDA only: no effect on the CPU
])
def test_each_kernel_option_reaches_the_mstep_and_trains_the_same_network(tmp_path, monkeypatch, sets, tol):
    import diffem.em.mstep as mstep

    base, base_stats = _mstep(tmp_path, "base")
    seen = {}

    class Adam(torch.optim.Adam):
        def __init__(self, *args, **kwargs):
            seen["fused"] = kwargs.get("fused", False)
            super().__init__(*args, **kwargs)

    class EMAModel(mstep.EMAModel):
        def __init__(self, *args, **kwargs):
            seen["foreach"] = kwargs.get("foreach", False)
            super().__init__(*args, **kwargs)

    real_compile = torch.compile

    def compile_(*args, **kwargs):
        seen["compile"] = kwargs["backend"]
        return real_compile(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", Adam)
    monkeypatch.setattr(mstep, "EMAModel", EMAModel)
    monkeypatch.setattr(torch, "compile", compile_)
    try:
        other, stats = _mstep(tmp_path, "other", *sets)
        reached = {
            "kernels.fused_adam=true": seen["fused"] is True,
            "kernels.foreach_ema=true": seen["foreach"] is True,
            "kernels.compile=eager": seen.get("compile") == "eager",
            "kernels.tf32=true": torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32,
            "kernels.channels_last=true": True,
            "kernels.check_every=4": True,  # its reach: test_a_delayed_check_names_the_first_non_finite_step...
        }
        assert reached[sets[0]], sets
    finally:
        set_matmul_precision(load_config("cifar10", "smoke").kernels)  # leave the global flags as the tests found them
    assert stats["mstep_steps"] == base_stats["mstep_steps"] == 6
    if sets == ["kernels.channels_last=true"]:
        assert other["conv_in.weight"].is_contiguous(memory_format=torch.channels_last)
    for key, value in base.items():
        if tol == 0.0:
            assert torch.equal(other[key], value), key
        else:
            torch.testing.assert_close(other[key].contiguous(), value, rtol=tol, atol=tol, msg=key)


def test_a_delayed_check_names_the_first_non_finite_step_and_saves_nothing(tmp_path):
    bad = torch.full((32, 3, 32, 32), float("nan"))
    with pytest.raises(NonFiniteLossError, match="step 1"):
        _mstep(tmp_path, "nan", "kernels.check_every=5", samples=bad)  # read at step 2, before the first checkpoint
    folder = tmp_path / "nan" / "m"
    assert not folder.exists() or not any(folder.iterdir())  # no checkpoint: the check ran before the first save


def test_the_estep_under_kernel_options_draws_the_same_samples(tmp_path):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    g = torch.Generator().manual_seed(1)
    A = Mask(torch.rand(6, 1, 8, 8, generator=g) < 0.5, channels=3)
    y = GaussianObservation(A, 1e-2).sample(torch.rand(6, 3, 8, 8, generator=g) * 4 - 2, generator=g)
    obs = ObservationSet(y, A, 1e-2, (3, 8, 8))

    def estep(name, *sets):
        config = load_config("cifar10", "smoke", overrides=["estep.steps=3", *sets])
        pipe = DiffusionPriorPipeline(unet, VEScheduler())
        return run_estep(Accelerator(cpu=True), config, 1, obs, tmp_path / name, lambda: pipe)

    base = estep("base")
    torch.testing.assert_close(estep("kernels", "kernels.channels_last=true", "kernels.compile=eager"), base,
                               rtol=1e-4, atol=1e-4)


def test_kernel_options_are_validated():
    with pytest.raises(ConfigError, match="kernels.compile"):
        load_config("cifar10", "smoke", overrides=["kernels.compile=fast"])
    with pytest.raises(ConfigError, match="kernels.check_every"):
        load_config("cifar10", "smoke", overrides=["kernels.check_every=0"])
