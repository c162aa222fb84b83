"""Tests of diffem.pipeline: save / load round trips, per-sample seeds, posterior sampling, schedulers."""

import math

import pytest
import torch

from diffem.gaussian import GaussianPrior
from diffem.networks import MLP, build_unet
from diffem.operators import GaussianObservation, Mask, Projection
from diffem.pipeline import DiffusionPriorPipeline, DiffusionPriorPipelineOutput
from diffem.random import make_generators
from diffem.scheduler import VEScheduler


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _gaussian(event=(4,), rank=2, seed=0, dtype=torch.float32):
    g = _gen(seed)
    d = math.prod(event)
    mean = torch.randn(d, generator=g, dtype=torch.float64)
    factor = torch.randn(d, rank, generator=g, dtype=torch.float64)
    return GaussianPrior.from_parameters(mean, factor, 0.2, event_shape=event).to(dtype)


def _mlp():
    torch.manual_seed(0)
    return MLP(features=3, hidden_features=(16, 16), emb_features=8)


BACKBONES = {
    "unet": lambda: build_unet("tiny", sample_size=8),
    "mlp": _mlp,
    "gaussian": _gaussian,
}


def _pipe(kind, method="ddpm"):
    return DiffusionPriorPipeline(BACKBONES[kind](), VEScheduler(method=method))


def _run(pipe, batch_size, generator, steps=4, **kwargs):
    return pipe(batch_size=batch_size, num_inference_steps=steps, generator=generator, progress=False, **kwargs).samples


@pytest.mark.parametrize("kind", list(BACKBONES))
def test_save_load_round_trip_is_bit_exact(kind, tmp_path):
    pipe = _pipe(kind)
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPriorPipeline.from_pretrained(tmp_path)
    assert type(loaded.unet) is type(pipe.unet)
    assert isinstance(loaded.scheduler, VEScheduler) and loaded.scheduler.config.method == "ddpm"
    assert loaded.event_shape == pipe.event_shape
    a = _run(pipe, 3, _gen(0))
    b = _run(loaded, 3, _gen(0))
    assert a.shape == (3, *pipe.event_shape)
    assert torch.equal(a, b)
    assert not torch.equal(a, _run(pipe, 3, _gen(1)))


def test_gaussian_float64_round_trip(tmp_path):
    """A float64 lap-0 prior reloads bit for bit when loaded with ``dtype=torch.float64``."""
    pipe = DiffusionPriorPipeline(_gaussian(dtype=torch.float64), VEScheduler())
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPriorPipeline.from_pretrained(tmp_path, dtype=torch.float64)
    for name in ("mean", "factor", "diag"):
        assert torch.equal(getattr(loaded.unet, name), getattr(pipe.unet, name)), name
    assert torch.equal(_run(pipe, 2, _gen(0)), _run(loaded, 2, _gen(0)))


def test_scheduler_config_round_trip(tmp_path):
    pipe = DiffusionPriorPipeline(_mlp(), VEScheduler(method="pc", corrections=2, delta=0.05, sigma_min=2e-3))
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPriorPipeline.from_pretrained(tmp_path)
    for key in ("method", "corrections", "delta", "sigma_min", "sigma_max"):
        assert loaded.scheduler.config[key] == pipe.scheduler.config[key], key


@pytest.mark.parametrize("kind", ["unet", "mlp", "gaussian"])
def test_per_sample_generators_make_samples_batch_independent(kind):
    pipe = _pipe(kind)
    batch = _run(pipe, 4, make_generators(7, indices=range(4)))
    alone = _run(pipe, 1, make_generators(7, indices=[3]))
    torch.testing.assert_close(alone[0], batch[3], rtol=1e-5, atol=1e-5)
    pair = _run(pipe, 2, make_generators(7, indices=[1, 2]))
    torch.testing.assert_close(pair, batch[1:3], rtol=1e-5, atol=1e-5)
    # Distinct seeds give distinct samples.
    assert not torch.allclose(batch[0], batch[1])


def test_generator_list_of_wrong_length_raises():
    with pytest.raises(ValueError, match="`generator`"):
        _run(_pipe("mlp"), 3, make_generators(0, indices=range(2)))


@pytest.mark.parametrize("method", ["ddpm", "ddim", "pc"])
@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_all_scheduler_methods_run(method, kind):
    pipe = _pipe(kind, method=method)
    x = _run(pipe, 2, _gen(0), steps=3)
    assert x.shape == (2, *pipe.event_shape) and torch.isfinite(x).all()
    # Replayable; DDIM is deterministic given the initial noise, DDPM / PC are not.
    assert torch.equal(x, _run(pipe, 2, _gen(0), steps=3))
    out = pipe(batch_size=2, num_inference_steps=3, generator=_gen(0), progress=False, return_dict=False)
    assert isinstance(out, tuple) and torch.equal(out[0], x)


def test_return_type():
    out = _pipe("mlp")(batch_size=2, num_inference_steps=2, generator=_gen(0), progress=False)
    assert isinstance(out, DiffusionPriorPipelineOutput)


def test_ddim_gaussian_prior_covariance():
    """DDIM (probability-flow) with the exact Gaussian denoiser samples the prior.

    256 steps under-disperse by ~2.2 % (a known O(1/N) discretisation error); 4,000
    samples in d = 4 give a sampling relative Frobenius error of ~0.03.
    """
    prior = _gaussian(event=(4,), rank=2, seed=3, dtype=torch.float64)
    pipe = DiffusionPriorPipeline(prior, VEScheduler(method="ddim"))
    n = 4000
    x = _run(pipe, n, _gen(1), steps=256).double()
    C = prior.covariance()
    se = (torch.diagonal(C) / n).sqrt()
    assert ((x.mean(0) - prior.mean).abs() < 4.5 * se).all()
    rel = (torch.cov(x.mT) - C).norm() / C.norm()
    assert rel < 0.1, rel


# -- posterior sampling -----------------------------------------------------------------------------


def _mask_problem(B=4, noise_std=0.05, seed=0):
    event = (3, 4, 4)
    prior = _gaussian(event=event, rank=4, seed=seed, dtype=torch.float64)
    g = _gen(seed + 1)
    mask = torch.rand(B, 1, 4, 4, generator=g) < 0.5
    mask[:, 0, 0, 0] = True
    A = Mask(mask, channels=3)
    x = prior.sample(B, generator=g)
    y = GaussianObservation(A, noise_std).sample(x, generator=g).float()
    return prior, A, y, mask.expand(B, 3, 4, 4)


def test_posterior_sampling_respects_the_observation():
    noise_std = 0.05
    prior, A, y, observed = _mask_problem(noise_std=noise_std)
    pipe = DiffusionPriorPipeline(prior, VEScheduler())
    x = _run(pipe, None, _gen(2), steps=32, observation=y, operator=A, noise_std=noise_std, maxiter=3)
    assert x.shape == y.shape and torch.isfinite(x).all()
    err = (x - y)[observed].abs()
    # Posterior residual on an observed pixel has std below sqrt(2) * noise_std.
    assert err.mean() < 2 * noise_std and err.max() < 6 * noise_std, (err.mean(), err.max())
    # Prior samples do not match y: the observation is what pins the observed pixels.
    free = _run(pipe, 4, _gen(2), steps=32)
    assert (free - y)[observed].abs().mean() > 5 * noise_std


def test_posterior_sampling_with_projection_and_mlp_shapes():
    torch.manual_seed(0)
    pipe = DiffusionPriorPipeline(MLP(features=5, hidden_features=(16,), emb_features=8), VEScheduler())
    A = Projection(torch.randn(3, 2, 5))
    y = torch.randn(3, 2)
    x = _run(pipe, 3, make_generators(0, indices=range(3)), steps=3, observation=y, operator=A, noise_std=0.1)
    assert x.shape == (3, 5) and torch.isfinite(x).all()


def test_posterior_sampling_per_sample_seeds_are_batch_independent():
    noise_std = 0.05
    prior, A, y, _ = _mask_problem(noise_std=noise_std)
    pipe = DiffusionPriorPipeline(prior.float(), VEScheduler())
    kw = dict(steps=8, noise_std=noise_std, maxiter=2)
    batch = _run(pipe, 4, make_generators(5, indices=range(4)), observation=y, operator=A, **kw)
    alone = _run(pipe, 1, make_generators(5, indices=[3]), observation=y[3:], operator=A[3:], **kw)
    torch.testing.assert_close(alone[0], batch[3], rtol=1e-5, atol=1e-5)


def test_missing_arguments_raise():
    prior, A, y, _ = _mask_problem()
    pipe = DiffusionPriorPipeline(prior, VEScheduler())
    with pytest.raises(ValueError, match="`generator`"):
        pipe(batch_size=2, num_inference_steps=2, generator=None, progress=False)
    with pytest.raises(ValueError, match="`operator`"):
        _run(pipe, 4, _gen(0), observation=y, noise_std=0.1)
    with pytest.raises(ValueError, match="`noise_std`"):
        _run(pipe, 4, _gen(0), observation=y, operator=A)
    with pytest.raises(ValueError, match="`operator`"):
        _run(pipe, 4, _gen(0), operator=A, noise_std=0.1)  # an operator without an observation
    with pytest.raises(ValueError, match="`operator`"):
        _run(pipe, 4, _gen(0), observation=y, operator=A[:2], noise_std=0.1)  # wrong batch


def test_a_pipeline_loaded_from_a_saved_lap_replays_its_estep_exactly(tmp_path):
    """The spec saved with a lap (sampling.json) is the E-step's: the pipeline, given it, draws the
    E-step's very samples (here under a network prior with the lap-0 Gaussian's Sigma_x, PC steps)."""
    from diffem.config import load_config
    from diffem.em import lap_dir
    from diffem.train import make_trainer
    from diffem.em.estep import run_estep
    from diffem.em.seeds import ESTEP
    from diffem.pipeline import load_estep_spec
    from diffem.random import make_generators

    config = load_config("manifold", "smoke", overrides=[
        f"output_dir={tmp_path}", "laps=1", "eval.samples=0", "data.points=64", "lap0.observations=64",
        "mstep.steps=10", "estep.block=1", "estep.batch_size=32", "estep.method=pc", "estep.steps=4",
        "estep.covariance=sigma_x"])
    trainer = make_trainer(config, progress=False)
    trainer.run()
    obs = trainer.observations()[:8]
    expected = run_estep(trainer.accelerator, config, 2, obs, tmp_path / "replay", lambda: trainer.load_lap(1),
                         load_lap0=lambda: trainer.load_lap(0))
    pipe = DiffusionPriorPipeline.from_pretrained(lap_dir(tmp_path, 1))
    spec = load_estep_spec(lap_dir(tmp_path, 1))
    assert (spec.method, spec.steps, spec.covariance) == ("pc", 4, "sigma_x")
    out = pipe(observation=obs.y, operator=obs.operator, noise_std=obs.noise_std, spec=spec,
               sigma_x=DiffusionPriorPipeline.from_pretrained(lap_dir(tmp_path, 0)).unet,
               generator=make_generators(config.seed, ESTEP, 2, indices=range(8)), progress=False).samples
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="sigma_x"):
        pipe(observation=obs.y, operator=obs.operator, noise_std=obs.noise_std, spec=spec,
             generator=make_generators(0, indices=range(8)), progress=False)
