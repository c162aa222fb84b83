"""The one sampler specification (:mod:`diffem.spec`): round trips, validation, and the rule that
under a Gaussian prior every covariance heuristic is the Gaussian's exact covariance."""

from __future__ import annotations

import json

import pytest
import torch

from diffem.config import load_config
from diffem.em.checkpoint import sampling_settings
from diffem.em.estep import estep_covariance, run_estep
from diffem.em.lap0 import run_lap0
from diffem.em.trainer import make_accelerator
from diffem.gaussian import GaussianPrior
from diffem.operators import GaussianObservation, Projection
from diffem.spec import COVARIANCES, GAUSSIAN_EXACT, SamplerSpec
from diffem.tasks import get_task


def test_round_trip_through_sampling_json():
    spec = SamplerSpec(method="pc", steps=7, corrections=2, delta=0.3, covariance="sigma_x", solver="gmres", maxiter=9,
                       tol=1e-3, noise_std=0.01)
    assert SamplerSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    config = load_config("manifold", "smoke", overrides=["estep.guidance=dps", "estep.dps_zeta=0.25"])
    saved = sampling_settings(config)["estep"]
    assert SamplerSpec.from_dict(saved) == SamplerSpec.from_estep(config.estep)
    assert saved["guidance_options"] == {"zeta": 0.25}


def test_a_lap_saved_before_the_spec_still_loads():
    old = {"method": "ddpm", "num_inference_steps": 16, "corrections": 1, "delta": 0.1, "maxiter": 1, "tol": 0.0,
           "guidance": "mmps", "covariance": "tweedie", "guidance_options": {}}
    spec = SamplerSpec.from_dict(old)
    assert (spec.steps, spec.noise_std, spec.solver) == (16, None, "cg")


@pytest.mark.parametrize("field, value", [("method", "euler"), ("steps", 0), ("covariance", "diag"), ("tol", -1.0),
                                          ("maxiter", 0), ("noise_std", 0.0), ("solver", "lu")])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        SamplerSpec(**{field: value})
    with pytest.raises(ValueError, match="guidance 'mmps' only"):
        SamplerSpec(guidance="dps", covariance="sigma_t")
    with pytest.raises(ValueError, match="`solver` applies to guidance 'mmps' only"):
        SamplerSpec(guidance="dps", solver="gmres")
    with pytest.raises(ValueError, match="unknown sampler setting `stepz`"):
        SamplerSpec.from_dict({"stepz": 3})


def _gaussian_case():
    g = torch.Generator().manual_seed(0)
    d, n = 5, 12
    factor = torch.randn(d, 2, generator=g)
    prior = GaussianPrior.from_parameters(torch.randn(d, generator=g), factor * 3, 0.2)
    M = torch.randn(n, 2, d, generator=g)
    A = Projection(M / M.norm(dim=-1, keepdim=True))
    y = GaussianObservation(A, 0.05).sample(prior.sample(n, generator=g), generator=g)
    return prior, A, y


def test_every_covariance_is_the_exact_one_under_a_gaussian_prior():
    prior, A, y = _gaussian_case()
    out = {}
    for cov in COVARIANCES:
        spec = SamplerSpec(steps=8, maxiter=2, covariance=cov, noise_std=0.05)
        out[cov] = spec.sample(prior, y, A, (5,), [torch.Generator().manual_seed(i) for i in range(len(y))],
                               sigma_x=prior)
    for cov in COVARIANCES:
        torch.testing.assert_close(out[cov], out["tweedie"], rtol=0, atol=0)
    # ... and a heuristic does change the system under a network-like (non-Gaussian) denoiser
    net = lambda x, sigma: prior(x, sigma) * 0.9  # noqa: E731
    a, b = (SamplerSpec(steps=8, maxiter=2, covariance=c, noise_std=0.05).sample(
        net, y, A, (5,), [torch.Generator().manual_seed(i) for i in range(len(y))]) for c in ("tweedie", "sigma_t"))
    assert (a - b).abs().max() > 1e-3


def test_lap_one_estep_is_identical_for_every_covariance(tmp_path):
    """Lap 1 samples under the lap-0 Gaussian: the E-step and its record ignore estep.covariance there."""
    base = ["data.points=48", "lap0.iterations=2", "lap0.observations=48", "estep.steps=4", "estep.batch_size=16",
            "estep.block=16"]
    acc = make_accelerator(load_config("manifold", "smoke"))
    out = {}
    for cov in COVARIANCES:
        config = load_config("manifold", "smoke", overrides=base + [f"estep.covariance={cov}",
                                                                     f"output_dir={tmp_path / cov}"])
        config.run_dir.mkdir(parents=True)
        obs = get_task(config).observations(config.run_dir)
        prior, _ = run_lap0(acc, config, obs)

        class Pipe:
            unet = prior

        out[cov] = run_estep(acc, config, 1, obs, config.run_dir / "estep", lambda: Pipe, load_lap0=lambda: Pipe)
        assert estep_covariance(config, 1) == GAUSSIAN_EXACT
        assert estep_covariance(config, 2) == cov
    for cov in COVARIANCES:
        torch.testing.assert_close(out[cov], out["tweedie"], rtol=0, atol=0)
