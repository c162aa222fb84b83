r"""Tests of MMPS's covariance heuristics (``covariance="tweedie" | "prior" | "sigma_t"``).

Each heuristic replaces :math:`V[x \mid x_t] = \sigma^2 J` in the system
:math:`(\Sigma_y + A V A^T) v = y - A \hat{x}` and keeps the output
:math:`\hat{x} + \sigma^2 J^T A^T v`. Each is exact when its assumption holds:

- ``"prior"`` with :math:`\Sigma_x` the covariance of a Gaussian prior: then
  :math:`(\Sigma_x^{-1} + \sigma^{-2} I)^{-1} = \sigma^2 J` exactly, at every sigma;
- ``"prior"`` with :math:`\Sigma_x = I` (the paper's :math:`(I + \Sigma_t^{-1})^{-1}`) for a prior
  :math:`\mathcal{N}(\mu, I)`;
- ``"sigma_t"`` as :math:`\sigma^2 / \lambda_{\min}(\Sigma_x) \to 0` (then :math:`J \to I`), with
  an error of order :math:`\sigma^2 / \lambda`.

The reference is the exact :math:`\mathbb{E}[x \mid x_t, y]` of the stacked observation
:math:`[x_t; y]` (precision form, independent of the code under test).
"""

import math

import pytest
import torch

from diffem.gaussian import operator_matrix
from diffem.operators import GaussianObservation
from diffem.posterior import MMPSDenoiser
from diffem.gaussian import GaussianPrior

from posterior_cases import CASES, gen, low_rank_prior


def exact_mean(prior, A, x_t, y, sigma, noise_std):
    """E[x | x_t, y] per sample, (B, d), by the precision form of the stacked observation."""
    H = operator_matrix(A, prior.event_shape)
    Ci = torch.linalg.inv(prior.covariance())
    d = prior.features
    out = []
    for i in range(x_t.shape[0]):
        P = Ci + torch.eye(d, dtype=torch.float64) / sigma[i] ** 2 + H[i].mT @ H[i] / noise_std**2
        rhs = Ci @ prior.mean + x_t[i].reshape(-1) / sigma[i] ** 2 + H[i].mT @ y[i].reshape(-1) / noise_std**2
        out.append(torch.linalg.solve(P, rhs))
    return torch.stack(out)


def _setup(case, sigma, seed=0, noise_std=0.1, **prior_kwargs):
    g = gen(seed)
    B = 4
    A, event = CASES[case](B, g)
    prior = low_rank_prior(math.prod(event), event, g, **prior_kwargs)
    x = prior.sample(B, generator=g)
    y = GaussianObservation(A, noise_std).sample(x, generator=g)
    sigma = torch.full((B,), float(sigma), dtype=torch.float64)
    x_t = x + sigma[0] * torch.randn(x.shape, generator=g, dtype=torch.float64)
    return prior, A, y, x_t, sigma, math.prod(A.out_shape)


SIGMAS = [1e-3, 1e-2, 1e-1, 1.0, 10.0, 1e2]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("sigma", SIGMAS)
def test_prior_heuristic_with_the_true_covariance_is_exact(case, sigma):
    prior, A, y, x_t, s, m = _setup(case, sigma)
    out = MMPSDenoiser(prior, y, A, 0.1, maxiter=m, covariance="prior", prior=prior)(x_t, s)
    ref = exact_mean(prior, A, x_t, y, s, 0.1)
    torch.testing.assert_close(out.flatten(1), ref, rtol=0, atol=1e-9 * max(1.0, ref.abs().max().item()))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("maxiter", [1, 2])
def test_prior_heuristic_with_the_true_covariance_equals_tweedie_at_any_cg(case, maxiter):
    """For a Gaussian prior sigma^2 J = (Sigma_x^-1 + sigma^-2 I)^-1: same system, same CG iterates."""
    prior, A, y, x_t, s, _ = _setup(case, 0.7, seed=1)
    a = MMPSDenoiser(prior, y, A, 0.1, maxiter=maxiter, covariance="prior", prior=prior)(x_t, s)
    b = MMPSDenoiser(prior, y, A, 0.1, maxiter=maxiter)(x_t, s)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("sigma", SIGMAS)
def test_identity_prior_heuristic_is_exact_for_a_unit_covariance_prior(case, sigma):
    prior, A, y, x_t, s, m = _setup(case, sigma, seed=2, identity=True)
    out = MMPSDenoiser(prior, y, A, 0.1, maxiter=m, covariance="prior")(x_t, s)
    ref = exact_mean(prior, A, x_t, y, s, 0.1)
    torch.testing.assert_close(out.flatten(1), ref, rtol=0, atol=1e-9 * max(1.0, ref.abs().max().item()))


@pytest.mark.parametrize("covariance", ["prior", "sigma_t"])
def test_heuristics_are_not_exact_when_their_assumption_fails(covariance):
    """A prior with covariance far from I: both heuristics miss the exact mean at sigma = 1 (the tests can fail)."""
    prior, A, y, x_t, s, m = _setup("projection", 1.0, seed=3, diag=0.05)
    out = MMPSDenoiser(prior, y, A, 0.1, maxiter=m, covariance=covariance)(x_t, s)
    ref = exact_mean(prior, A, x_t, y, s, 0.1)
    assert (out.flatten(1) - ref).abs().max() > 1e-2


@pytest.mark.parametrize("case", list(CASES))
def test_sigma_t_heuristic_becomes_exact_as_sigma_vanishes(case):
    r"""The error of the correction, relative to the exact correction, falls like sigma^2 / lambda."""
    noise_std = 1e-3
    rel = {}
    for sigma in (1e-1, 1e-2, 10.0):
        prior, A, y, x_t, s, m = _setup(case, sigma, seed=4, noise_std=noise_std, diag=0.5)
        out = MMPSDenoiser(prior, y, A, noise_std, maxiter=m, covariance="sigma_t")(x_t, s).flatten(1)
        ref = exact_mean(prior, A, x_t, y, s, noise_std)
        x_hat = prior(x_t, s).flatten(1)
        rel[sigma] = ((out - ref).norm(dim=1) / (ref - x_hat).norm(dim=1)).max().item()
    assert rel[1e-2] < 1e-3
    assert rel[1e-2] < rel[1e-1] / 30  # ~ 100x for 10x smaller sigma
    assert rel[10.0] > 0.1  # far from exact when sigma^2 >> the prior's variances


def test_prior_covariance_woodbury_matches_dense():
    g = gen(5)
    d, B = 7, 3
    prior = low_rank_prior(d, (d,), g, rank=3, diag=0.2)
    u = torch.randn(B, d, generator=g, dtype=torch.float64)
    s2 = torch.tensor([1e-4, 0.5, 1e3], dtype=torch.float64)
    out = prior.conditional_covariance(u, s2.sqrt())
    C = prior.covariance()
    for i in range(B):
        V = torch.linalg.inv(torch.linalg.inv(C) + torch.eye(d, dtype=torch.float64) / s2[i])
        torch.testing.assert_close(out[i], V @ u[i], rtol=1e-9, atol=1e-12)
    standard = GaussianPrior((d,), rank=0).double()  # N(0, I): (I + Sigma_t^-1)^-1
    torch.testing.assert_close(standard.conditional_covariance(u, s2.sqrt()), u * (s2 / (1 + s2))[:, None])


def test_sigma_x_is_prior_with_a_gaussian_and_needs_one():
    prior, A, y, x_t, s, m = _setup("projection", 1.0, seed=7)
    sigma_x = MMPSDenoiser(prior, y, A, 0.1, maxiter=m, covariance="sigma_x", prior=prior)(x_t, s)
    given = MMPSDenoiser(prior, y, A, 0.1, maxiter=m, covariance="prior", prior=prior)(x_t, s)
    identity = MMPSDenoiser(prior, y, A, 0.1, maxiter=m, covariance="prior")(x_t, s)
    torch.testing.assert_close(sigma_x, given, rtol=0, atol=0)
    assert (sigma_x - identity).abs().max() > 1e-3  # Sigma_x = I is another system
    with pytest.raises(ValueError, match="needs `prior`"):
        MMPSDenoiser(prior, y, A, 0.1, covariance="sigma_x")


def test_covariance_validation():
    g = gen(6)
    prior, A, y, _, _, _ = _setup("projection", 1.0, seed=6)
    with pytest.raises(ValueError, match="`covariance`"):
        MMPSDenoiser(prior, y, A, 0.1, covariance="diagonal")
    with pytest.raises(ValueError, match="`prior`"):
        MMPSDenoiser(prior, y, A, 0.1, covariance="tweedie", prior=prior)
    with pytest.raises(TypeError, match="`prior`"):
        MMPSDenoiser(prior, y, A, 0.1, covariance="prior", prior=torch.eye(5))
    other = low_rank_prior(6, (6,), g)
    with pytest.raises(ValueError, match="`prior` has 6 features"):
        MMPSDenoiser(prior, y, A, 0.1, covariance="prior", prior=other)


def test_identity_heuristic_diverges_under_a_gaussian_with_a_large_leading_variance():
    r"""The mechanism behind the ablation's diverged lap (issue 24): under an exact Gaussian
    denoiser whose leading variance is 784 (as CIFAR-10's lap-0 Gaussian), :math:`(I + \Sigma_t^{-1})^{-1}`
    under-estimates :math:`\mathbb{V}[x \mid x_t]` along that direction by up to 784x for
    sigma ~ 10-90, the MMPS correction overshoots and DDPM amplifies it step after step; Tweedie
    (exact here) stays in the data's range. A per-call test cannot see this: it is the trajectory."""
    from diffem.operators import Mask
    from diffem.sampling import sample_posterior

    g = gen(0)
    shape, d, B = (3, 8, 8), 192, 8
    u = torch.randn(d, 1, generator=g)
    prior = GaussianPrior.from_parameters(torch.zeros(d), u / u.norm() * math.sqrt(784 - 0.04), 0.04, event_shape=shape)
    x = prior.sample(B, generator=g)
    A = Mask(torch.rand(B, 1, 8, 8, generator=g) > 0.75, channels=3)  # 75 % deleted
    y = GaussianObservation(A, 1e-3).sample(x, generator=g)
    top = {}
    for cov in ("tweedie", "prior"):
        s = sample_posterior(prior, y, A, 1e-3, shape, steps=16, maxiter=1, method="ddpm", covariance=cov,
                             generator=[gen(i) for i in range(B)])
        top[cov] = s.abs().max().item()
    data = x.abs().max().item()
    assert top["tweedie"] < 2 * data
    assert top["prior"] > 1e4 * data
