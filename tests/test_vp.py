"""Tests of the diffusers VP checkpoint adapter (diffem.vp), offline on tiny random UNets."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

from diffem.operators import Mask
from diffem.posterior import MMPSDenoiser
from diffem.sampling import sample_posterior
from diffem.vp import VPDenoiser


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).eval()


def saved_checkpoint(tmp_path, prediction_type, scheduler_cls=DDPMScheduler, layout="pipeline"):
    unet = tiny_unet()
    scheduler = scheduler_cls(num_train_timesteps=100, prediction_type=prediction_type, clip_sample=False)
    folder = tmp_path / f"{prediction_type}-{layout}"
    if layout == "pipeline":
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    else:  # google/ddpm-cifar10-32 style: UNet and scheduler config in the root folder
        unet.save_pretrained(folder)
        scheduler.save_pretrained(folder)
    return unet, scheduler, folder


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("data_scale", [1.0, 2.0])
def test_matches_scheduler_x0_at_training_timesteps(tmp_path, prediction_type, data_scale):
    unet, scheduler, folder = saved_checkpoint(tmp_path, prediction_type)
    vp = VPDenoiser.from_pretrained(folder, data_scale=data_scale)
    assert vp.prediction_type == prediction_type
    g = torch.Generator().manual_seed(1)
    for t in [0, 1, 17, 50, 99]:
        x_vp = torch.randn(2, 3, 8, 8, generator=g)
        with torch.no_grad():
            out = unet(x_vp, torch.full((2,), t)).sample
            expected = scheduler.step(out, t, x_vp, generator=g).pred_original_sample
            alpha_bar = scheduler.alphas_cumprod[t].double()
            sigma = data_scale * math.sqrt((1 - alpha_bar) / alpha_bar)
            x_ve = data_scale * x_vp / alpha_bar.sqrt().float()
            assert torch.allclose(vp.timestep(torch.tensor([sigma], dtype=torch.float64)), torch.tensor([float(t)], dtype=torch.float64), atol=1e-6)
            got = vp(x_ve, torch.full((2,), sigma))
        torch.testing.assert_close(got, data_scale * expected, rtol=1e-4, atol=1e-4)


def test_ddim_scheduler_and_root_layout(tmp_path):
    unet, scheduler, folder = saved_checkpoint(tmp_path, "epsilon", DDIMScheduler, layout="root")
    vp = VPDenoiser.from_pretrained(folder)
    torch.testing.assert_close(vp.alphas_cumprod.float(), scheduler.alphas_cumprod)
    scheduler.set_timesteps(10)
    t = int(scheduler.timesteps[3])
    x_vp = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = scheduler.step(unet(x_vp, t).sample, t, x_vp).pred_original_sample
        ab = scheduler.alphas_cumprod[t]
        got = vp(2 * x_vp / ab.sqrt(), 2 * ((1 - ab) / ab).sqrt())
    torch.testing.assert_close(got, 2 * expected, rtol=1e-4, atol=1e-4)


def test_timestep_interpolates_in_log_sigma_and_clamps():
    ab = DDPMScheduler(num_train_timesteps=50).alphas_cumprod
    vp = VPDenoiser(tiny_unet(), ab, "epsilon", data_scale=1.0)
    log_s = vp.log_sigmas
    mid = ((log_s[10] + log_s[11]) / 2).exp()
    quarter = (0.75 * log_s[30] + 0.25 * log_s[31]).exp()
    t = vp.timestep(torch.stack([mid, quarter, log_s[0].exp() / 10, log_s[-1].exp() * 10]))
    torch.testing.assert_close(t, torch.tensor([10.5, 30.25, 0.0, 49.0], dtype=torch.float64))
    lo, hi = vp.sigma_range
    assert lo == pytest.approx(log_s[0].exp().item()) and hi == pytest.approx(log_s[-1].exp().item())


def test_data_scale_is_a_change_of_units():
    ab = DDPMScheduler(num_train_timesteps=100).alphas_cumprod
    unet = tiny_unet()
    v1, v2 = VPDenoiser(unet, ab, "epsilon", 1.0), VPDenoiser(unet, ab, "epsilon", 2.0)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.05, 0.7, 9.0])
    with torch.no_grad():
        torch.testing.assert_close(v2(2 * x, 2 * sigma), 2 * v1(x, sigma), rtol=1e-5, atol=1e-5)


def test_differentiable_in_x_t():
    ab = DDPMScheduler(num_train_timesteps=100).alphas_cumprod
    vp = VPDenoiser(tiny_unet().double(), ab, "v_prediction").double()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    sigma = torch.tensor([0.3], dtype=torch.float64)
    # a directional derivative: the VJP against a central finite difference
    u = torch.randn_like(x)
    w = torch.randn_like(x)
    vjp = torch.autograd.grad(vp(x, sigma), x, w)[0]
    eps = 1e-6
    with torch.no_grad():
        fd = (vp(x + eps * u, sigma) - vp(x - eps * u, sigma)) / (2 * eps)
    assert (vjp * u).sum().item() == pytest.approx((w * fd).sum().item(), rel=1e-5)


def test_unsupported_prediction_type_and_bad_input(tmp_path):
    ab = DDPMScheduler(num_train_timesteps=10).alphas_cumprod
    with pytest.raises(ValueError, match="prediction_type"):
        VPDenoiser(tiny_unet(), ab, "flow")
    with pytest.raises(ValueError, match="prediction_type"):
        VPDenoiser.from_scheduler(tiny_unet(), DDPMScheduler(num_train_timesteps=10, prediction_type="flow"))
    unet = tiny_unet()
    folder = tmp_path / "bad"
    unet.save_pretrained(folder)
    DDPMScheduler(num_train_timesteps=10, prediction_type="flow").save_pretrained(folder)
    with pytest.raises(ValueError, match="prediction_type"):
        VPDenoiser.from_pretrained(folder)
    with pytest.raises(ValueError, match="alphas_cumprod"):
        VPDenoiser(tiny_unet(), ab.flip(0), "epsilon")
    with pytest.raises(ValueError, match="data_scale"):
        VPDenoiser(tiny_unet(), ab, "epsilon", data_scale=0)
    vp = VPDenoiser(tiny_unet(), ab, "epsilon")
    with pytest.raises(ValueError, match="sigma"):
        vp(torch.zeros(2, 3, 8, 8), torch.tensor([1.0, -1.0]))
    with pytest.raises(OSError):
        VPDenoiser.from_pretrained(tmp_path / "missing")


def test_mmps_runs_on_the_adapter(tmp_path):
    _, _, folder = saved_checkpoint(tmp_path, "epsilon")
    vp = VPDenoiser.from_pretrained(folder)
    g = torch.Generator().manual_seed(4)
    mask = torch.rand(2, 1, 8, 8, generator=g) > 0.5
    A = Mask(mask, channels=3)
    x = torch.rand(2, 3, 8, 8, generator=g) * 4 - 2
    y = A(x)
    # at a small noise level J ~ I, so one MMPS call moves x-hat onto the observed pixels
    x_t = x + 0.01 * torch.randn(2, 3, 8, 8, generator=g)
    posterior = MMPSDenoiser(vp, y, A, noise_std=1e-3, maxiter=1)
    with torch.no_grad():
        prior_hat = vp(x_t, 0.01)
    post_hat = posterior(x_t, 0.01)
    assert (y - A(post_hat)).norm() < 0.1 * (y - A(prior_hat)).norm()
    samples = sample_posterior(vp, y, A, 1e-3, (3, 8, 8), steps=4, generator=torch.Generator().manual_seed(5))
    assert samples.shape == (2, 3, 8, 8) and torch.isfinite(samples).all()
