"""diffusers' EDM schedulers driving diffem denoisers (diffem.edm): exactness on Gaussian priors."""

import math

import pytest
import torch
from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler

from diffem.config import ConfigError, load_config
from diffem.edm import EDM_METHODS, SAMPLER_METHODS, edm_scheduler, make_scheduler, network_evaluations, sample_edm
from diffem.gaussian import GaussianPrior
from diffem.operators import Projection
from diffem.pipeline import DiffusionPriorPipeline
from diffem.random import randn
from diffem.sampling import sample, sample_posterior
from diffem.scheduler import VEScheduler

D = 4
N = 20000  # samples for the moment checks


def gaussian_prior(seed=0):
    g = torch.Generator().manual_seed(seed)
    factor = torch.randn(D, 2, generator=g, dtype=torch.float64)
    mean = torch.randn(D, generator=g, dtype=torch.float64)
    return GaussianPrior.from_parameters(mean, factor, torch.tensor(0.3, dtype=torch.float64))


def moment_errors(x, mean, cov):
    """Max |mean error| / its standard error, and the relative Frobenius covariance error."""
    x = x.double()
    se = (cov.diagonal() / x.shape[0]).sqrt()
    z_mean = ((x.mean(0) - mean).abs() / se).max().item()
    rel_cov = ((torch.cov(x.T) - cov).norm() / cov.norm()).item()
    return z_mean, rel_cov


def cov_noise(cov, n):
    """Expected relative Frobenius error of a sample covariance of n Gaussian draws."""
    var = (cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov.square()) / (n - 1)
    return (var.sum().sqrt() / cov.norm()).item()


def test_euler_step_is_ddim_on_the_karras_grid():
    """The Euler scheduler, fed diffem's x-hat, makes DDIM's update x_s = x_t - (1 - s/t)(x_t - x-hat)."""
    prior = gaussian_prior()
    scheduler = edm_scheduler("edm_euler")
    got = sample_edm(prior, (5, D), scheduler, 12, torch.Generator().manual_seed(3), dtype=torch.float64)
    sigmas = scheduler.sigmas.double()
    assert len(sigmas) == 13 and sigmas[-1] == 0
    assert sigmas[0].item() == pytest.approx(1e2, rel=1e-6) and sigmas[-2].item() == pytest.approx(1e-3, rel=1e-5)
    x = math.sqrt(1e4 + 1) * randn((5, D), torch.Generator().manual_seed(3), torch.float64)
    for i in range(12):
        x = x - (1 - sigmas[i + 1] / sigmas[i]) * (x - prior(x, sigmas[i].expand(5)))
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", EDM_METHODS)
def test_scheduler_sees_diffem_x_hat(method, monkeypatch):
    """The model output handed to the scheduler reproduces x-hat through its own precondition_outputs."""
    prior = gaussian_prior()
    scheduler = edm_scheduler(method)
    seen = []
    step = type(scheduler).step

    def spy(self, model_output, timestep, sample, *args, **kwargs):
        sigma = self.sigmas[self.step_index]
        seen.append((self.precondition_outputs(sample, model_output, sigma), prior(sample, sigma.double().expand(len(sample)))))
        return step(self, model_output, timestep, sample, *args, **kwargs)

    monkeypatch.setattr(type(scheduler), "step", spy)
    sample(prior, (3, D), scheduler, 6, torch.Generator().manual_seed(0))
    assert len(seen) == 6
    for fed, x_hat in seen:
        torch.testing.assert_close(fed.double(), x_hat.double(), rtol=1e-4, atol=1e-4)


def test_prior_samples_converge_to_the_gaussian_like_ddim():
    prior = gaussian_prior()
    cov = prior.covariance()
    floor = cov_noise(cov, N)
    errors = {}
    for method, steps in [("ddim", 16), ("ddim", 32), ("ddim", 256), ("edm_euler", 256), ("edm_dpmpp", 16), ("edm_dpmpp", 64),
                          ("edm_dpmpp_sde", 64)]:
        x = sample(prior, (N, D), make_scheduler(method), steps, torch.Generator().manual_seed(1))
        errors[method, steps] = moment_errors(x, prior.mean, cov)
    # converged samplers: the mean within 5 standard errors, the covariance within sampling noise
    for key in [("ddim", 256), ("edm_euler", 256), ("edm_dpmpp", 64), ("edm_dpmpp_sde", 64)]:
        z_mean, rel_cov = errors[key]
        assert z_mean < 5, (key, errors[key])
        assert rel_cov < 4 * floor + 0.02, (key, errors[key], floor)
    # DPM-Solver++(2M) at 16 evaluations is closer to exact than DDIM at 33 (2x the evaluations)
    assert errors["edm_dpmpp", 16][1] < errors["ddim", 32][1] < errors["ddim", 16][1]


def test_posterior_samples_converge_to_the_exact_posterior():
    prior = gaussian_prior(1)
    g = torch.Generator().manual_seed(2)
    matrix = torch.randn(2, D, generator=g, dtype=torch.float64)
    x_true = prior.sample(1, g)[0]
    noise_std = 0.1
    y = matrix @ x_true + noise_std * torch.randn(2, generator=g, dtype=torch.float64)
    mean, cov = prior.posterior(y, Projection(matrix), noise_std)
    n = 8000
    floor = cov_noise(cov, n)
    ys, A = y.float().expand(n, 2), Projection(matrix.float().expand(n, 2, D))
    for method, steps in [("ddim", 128), ("edm_euler", 128), ("edm_dpmpp", 32)]:
        x = sample_posterior(prior, ys, A, noise_std, (D,), steps=steps, maxiter=2, method=method,
                             generator=torch.Generator().manual_seed(3), batch_size=n)
        z_mean, rel_cov = moment_errors(x, mean, cov)
        assert z_mean < 5, (method, z_mean)
        assert rel_cov < 4 * floor + 0.03, (method, rel_cov, floor)


def test_pipeline_with_an_edm_scheduler(tmp_path):
    prior = gaussian_prior()
    pipe = DiffusionPriorPipeline(prior, edm_scheduler("edm_dpmpp"))
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    x = pipe(batch_size=4, num_inference_steps=8, generator=gens, progress=False).samples
    again = sample_edm(prior, (4, D), edm_scheduler("edm_dpmpp"), 8, [torch.Generator().manual_seed(i) for i in range(4)])
    torch.testing.assert_close(x, again)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = DiffusionPriorPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(loaded.scheduler, EDMDPMSolverMultistepScheduler)
    assert loaded.scheduler.config.sigma_min == pytest.approx(1e-3) and loaded.scheduler.config.sigma_max == pytest.approx(1e2)
    y = torch.zeros(4, 2)
    A = Projection(torch.eye(2, D).expand(4, 2, D).contiguous())
    post = loaded(observation=y, operator=A, noise_std=0.01, num_inference_steps=8,
                  generator=[torch.Generator().manual_seed(i) for i in range(4)], maxiter=2, progress=False).samples
    assert post.shape == (4, D) and post[:, :2].abs().max() < 0.1


def test_names_configs_and_errors():
    assert set(EDM_METHODS) <= set(SAMPLER_METHODS) and {"ddpm", "ddim", "pc"} <= set(SAMPLER_METHODS)
    assert isinstance(make_scheduler("edm_euler"), EDMEulerScheduler)
    assert isinstance(make_scheduler("ddim"), VEScheduler)
    assert network_evaluations("edm_dpmpp", 32) == 32 and network_evaluations("ddpm", 32) == 33
    assert network_evaluations("pc", 10, corrections=2) == 31
    with pytest.raises(ValueError, match="method"):
        make_scheduler("heun")
    with pytest.raises(ValueError, match="method"):
        edm_scheduler("ddim")
    with pytest.raises(ValueError, match="sigma_min"):
        edm_scheduler("edm_euler", sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="scheduler"):
        sample_edm(gaussian_prior(), (2, D), VEScheduler(), 4, torch.Generator())
    with pytest.raises(ValueError, match="generators"):
        sample_edm(gaussian_prior(), (4, D), edm_scheduler("edm_dpmpp_sde"), 4, [torch.Generator(), torch.Generator()])
    with pytest.raises(ValueError, match="num_inference_steps"):
        sample_edm(gaussian_prior(), (2, D), edm_scheduler("edm_euler"), 0, torch.Generator())
    with pytest.raises(ValueError, match="method"):
        sample_posterior(gaussian_prior(), torch.zeros(2, 2), Projection(torch.ones(2, 2, D)), 0.1, (D,), method="heun",
                         generator=torch.Generator())
    cfg = load_config("manifold", overrides=["estep.method=edm_dpmpp"])
    assert cfg.estep.method == "edm_dpmpp"
    # the E-step builds its scheduler from the config through the pipeline's settings
    from diffem.em.estep import scheduler_of
    from diffem.pipeline import estep_scheduler

    assert isinstance(scheduler_of(cfg), EDMDPMSolverMultistepScheduler)
    assert isinstance(estep_scheduler({"method": "edm_euler"}), EDMEulerScheduler)
    assert isinstance(estep_scheduler({"method": "pc", "corrections": 2}), VEScheduler)
    with pytest.raises(ConfigError, match="estep.method"):
        load_config("manifold", overrides=["estep.method=heun"])


def test_step_hooks_are_applied_after_each_edm_step():
    """A posterior step hook (DPS, PiGDM) gets step_correction(sigma_next) after every step, as in sample()."""
    prior = gaussian_prior()

    class Hook(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.sigmas_next = []

        def forward(self, x_t, sigma):
            return prior(x_t, sigma)

        def step_correction(self, sigma_next):
            self.sigmas_next.append(float(sigma_next))
            return torch.full((3, D), 0.5)

    for method in EDM_METHODS:
        hook, scheduler = Hook(), edm_scheduler(method)
        x = sample_edm(hook, (3, D), scheduler, 5, torch.Generator().manual_seed(0))
        plain = sample_edm(prior, (3, D), edm_scheduler(method), 5, torch.Generator().manual_seed(0))
        assert hook.sigmas_next == pytest.approx(scheduler.sigmas[1:].tolist())
        # the last step lands on x-hat(sigma_min) + the last correction
        assert not torch.allclose(x, plain)
        assert torch.allclose(x - 0.5, prior(x - 0.5, 1e-3), atol=1e-2)


def test_sde_sampler_is_stochastic_and_batch_independent():
    """edm_dpmpp_sde draws step noise per sample from its generators: results do not depend on batching."""
    prior = gaussian_prior()
    gens = lambda idx: [torch.Generator().manual_seed(i) for i in idx]  # noqa: E731
    whole = sample_edm(prior, (4, D), edm_scheduler("edm_dpmpp_sde"), 8, gens(range(4)))
    parts = torch.cat([sample_edm(prior, (2, D), edm_scheduler("edm_dpmpp_sde"), 8, gens(r)) for r in ([0, 1], [2, 3])])
    torch.testing.assert_close(whole, parts)
    ode = sample_edm(prior, (4, D), edm_scheduler("edm_dpmpp"), 8, gens(range(4)))
    assert not torch.allclose(whole, ode)  # the step noise changes the samples (same initial noise)
    assert edm_scheduler("edm_dpmpp_sde").config.algorithm_type == "sde-dpmsolver++"
