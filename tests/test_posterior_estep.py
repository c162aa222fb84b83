"""The E-step's posterior method comes from the config: ``estep.guidance``, ``estep.covariance`` and
the methods' hyperparameters reach :func:`diffem.sampling.sample_posterior` and change its samples.

The prior is a network-like denoiser (a shrunk Gaussian one that is no ``GaussianPrior``): under a
``GaussianPrior`` the E-step uses its exact covariance whatever ``estep.covariance`` says
(``tests/test_spec.py``)."""

import pytest
import torch

from diffem.config import ConfigError, load_config
from diffem.em.estep import sample_chunk
from diffem.gaussian import GaussianPrior
from diffem.observations import ObservationSet
from diffem.operators import GaussianObservation, Projection
from diffem.random import make_generators


def _chunk(overrides, device="cpu"):
    config = load_config("manifold", "smoke", overrides=["estep.steps=8", "estep.method=ddpm", "estep.maxiter=2",
                                                         "estep.block=1"] + overrides)
    g = torch.Generator().manual_seed(0)
    n = 16
    prior = GaussianPrior.from_parameters(torch.randn(5, generator=g), torch.randn(5, 2, generator=g), 0.3)
    M = torch.randn(n, 2, 5, generator=g)
    A = Projection(M / M.norm(dim=-1, keepdim=True))
    y = GaussianObservation(A, 0.05).sample(prior.sample(n, generator=g), generator=g)
    obs = ObservationSet(y, A, 0.05, (5,))
    gens = make_generators(0, 1, indices=range(n))
    return sample_chunk(_NetworkLike(prior).to(device), obs, gens, n, config, device)


class _NetworkLike(torch.nn.Module):
    """A denoiser that is not a GaussianPrior (so the covariance heuristics act), differentiable in x_t."""

    def __init__(self, prior):
        super().__init__()
        self.prior = prior

    def forward(self, x_t, sigma):
        return 0.9 * self.prior(x_t, sigma) + 0.1 * torch.tanh(x_t)


def test_estep_guidance_and_covariance_change_the_samples():
    base = _chunk([])
    assert torch.equal(base, _chunk(["estep.guidance=mmps", "estep.covariance=tweedie"]))  # the defaults
    variants = {
        "prior": _chunk(["estep.covariance=prior"]),
        "sigma_t": _chunk(["estep.covariance=sigma_t"]),
        "dps": _chunk(["estep.guidance=dps", "estep.dps_zeta=0.2"]),
        "dps_other_zeta": _chunk(["estep.guidance=dps", "estep.dps_zeta=0.4"]),
        "pigdm": _chunk(["estep.guidance=pigdm"]),
        "tmpd": _chunk(["estep.guidance=tmpd"]),
        "diffpir": _chunk(["estep.guidance=diffpir"]),
        "diffpir_other_lambda": _chunk(["estep.guidance=diffpir", "estep.diffpir_lambda=2.0"]),
    }
    for name, x in variants.items():
        assert x.shape == base.shape and torch.isfinite(x).all(), name
        assert (x - base).abs().max() > 1e-4, name
    assert (variants["dps"] - variants["dps_other_zeta"]).abs().max() > 1e-4
    assert (variants["diffpir"] - variants["diffpir_other_lambda"]).abs().max() > 1e-4


@pytest.mark.parametrize("override, key", [
    (["estep.guidance=ddrm"], "estep.guidance"),
    (["estep.covariance=full"], "estep.covariance"),
    (["estep.guidance=dps", "estep.covariance=prior"], "estep.covariance"),
    (["estep.dps_zeta=-1"], "estep.dps_zeta"),
    (["estep.diffpir_lambda=0"], "estep.diffpir_lambda"),
    (["estep.pigdm_weight=-2"], "estep.pigdm_weight"),
])
def test_estep_guidance_keys_are_validated(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("manifold", "smoke", overrides=override)
