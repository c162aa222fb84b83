r"""Tests of the baseline posterior methods (DPS, PiGDM, TMPD, DiffPIR) and of the common interface.

Exact cases (each method's assumption holds, closed-form Gaussian references):

- TMPD equals the exact :math:`\mathbb{E}[x \mid x_t, y]` when :math:`A J A^T` is diagonal: a
  pixel mask and a prior with diagonal covariance;
- DiffPIR's data step is the exact posterior mean for a prior :math:`\mathcal{N}(\mu, c I)` when
  :math:`\lambda = 1 + \sigma^2 / c`;
- PiGDM's guidance :math:`J^T A^T (\sigma_y^2 I + r_t^2 A A^T)^{-1} (y - A \hat{x})` is the exact
  :math:`\nabla_{x_t} \log p(y \mid x_t)` for a prior :math:`\mathcal{N}(\mu, I)`;
- DPS is never exact: only qualitative (posterior sampling beats the prior).
"""

import math

import pytest
import torch

from diffem.gaussian import GaussianPrior, operator_matrix
from diffem.operators import GaussianObservation, LinearOperator, Mask
from diffem.posterior import (
    GUIDANCES,
    DiffPIRDenoiser,
    DPSGuidance,
    PiGDMGuidance,
    TMPDDenoiser,
    make_posterior,
)
from diffem.sampling import sample_posterior

from posterior_cases import CASES, gen, low_rank_prior


def _gaussian(d, event, g, kind):
    if kind in ("identity", "dense"):  # N(mu, I), or N(mu, 0.3 I + U U^T) with U (d, 2)
        return low_rank_prior(d, event, g, identity=kind == "identity")
    mean = torch.randn(d, generator=g, dtype=torch.float64)
    if kind == "diagonal":  # D I + diag(s^2): diagonal, not isotropic
        s = torch.rand(d, generator=g, dtype=torch.float64) * 1.5 + 0.2
        return GaussianPrior.from_parameters(mean, torch.diag(s), 0.1, event_shape=event)
    if kind.startswith("isotropic"):
        c = float(kind.split(":")[1])
        return GaussianPrior.from_parameters(mean, torch.zeros(d, 0, dtype=torch.float64), c, event_shape=event)
    raise ValueError(f"unknown prior kind {kind!r}")


def _setup(case, kind, sigma, seed=0, noise_std=0.1, B=4):
    g = gen(seed)
    A, event = CASES[case](B, g)
    prior = _gaussian(math.prod(event), event, g, kind)
    x = prior.sample(B, generator=g)
    y = GaussianObservation(A, noise_std).sample(x, generator=g)
    s = torch.full((B,), float(sigma), dtype=torch.float64)
    x_t = x + s[0] * torch.randn(x.shape, generator=g, dtype=torch.float64)
    return prior, A, y, x_t, s


def exact_mean(prior, A, x_t, y, sigma, noise_std):
    """E[x | x_t, y], (B, d), by the precision form of the stacked observation [x_t; y]."""
    H = operator_matrix(A, prior.event_shape)
    Ci = torch.linalg.inv(prior.covariance())
    eye = torch.eye(prior.features, dtype=torch.float64)
    out = []
    for i in range(x_t.shape[0]):
        P = Ci + eye / sigma[i] ** 2 + H[i].mT @ H[i] / noise_std**2
        rhs = Ci @ prior.mean + x_t[i].reshape(-1) / sigma[i] ** 2 + H[i].mT @ y[i].reshape(-1) / noise_std**2
        out.append(torch.linalg.solve(P, rhs))
    return torch.stack(out)


def _close(out, ref, tol=1e-9):
    torch.testing.assert_close(out.flatten(1), ref, rtol=0, atol=tol * max(1.0, ref.abs().max().item()))


SIGMAS = [1e-3, 1e-1, 1.0, 10.0, 1e2]


# -- TMPD ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", SIGMAS)
def test_tmpd_is_exact_for_a_mask_and_a_diagonal_prior(sigma):
    prior, A, y, x_t, s = _setup("mask", "diagonal", sigma)
    _close(TMPDDenoiser(prior, y, A, 0.1)(x_t, s), exact_mean(prior, A, x_t, y, s, 0.1))


def test_tmpd_is_not_exact_when_A_J_At_is_not_diagonal():
    prior, A, y, x_t, s = _setup("projection", "dense", 1.0)
    out = TMPDDenoiser(prior, y, A, 0.1)(x_t, s)
    assert (out.flatten(1) - exact_mean(prior, A, x_t, y, s, 0.1)).abs().max() > 1e-3


# -- DiffPIR ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("sigma", SIGMAS)
def test_diffpir_is_exact_for_an_isotropic_prior_with_matched_lambda(case, sigma):
    c = 0.8
    prior, A, y, x_t, s = _setup(case, f"isotropic:{c}", sigma)
    d = prior.features
    out = DiffPIRDenoiser(prior, y, A, 0.1, lmbda=1 + sigma**2 / c, maxiter=d)(x_t, s)
    _close(out, exact_mean(prior, A, x_t, y, s, 0.1), tol=1e-8)
    default = DiffPIRDenoiser(prior, y, A, 0.1, maxiter=d)(x_t, s)  # lambda = 7: not matched
    if sigma >= 1.0:
        assert (default.flatten(1) - exact_mean(prior, A, x_t, y, s, 0.1)).abs().max() > 1e-3


# -- PiGDM --------------------------------------------------------------------------------------------------


def exact_likelihood_score(prior, A, x_t, y, sigma, noise_std):
    r"""\nabla_{x_t} log p(y | x_t) for a Gaussian prior: J^T A^T (sigma_y^2 I + A V A^T)^{-1} (y - A E[x|x_t])."""
    H = operator_matrix(A, prior.event_shape)
    C = prior.covariance()
    eye = torch.eye(prior.features, dtype=torch.float64)
    out = []
    for i in range(x_t.shape[0]):
        K = C + sigma[i] ** 2 * eye
        J = eye - sigma[i] ** 2 * torch.linalg.inv(K)  # d E[x|x_t] / d x_t
        m = prior.mean + C @ torch.linalg.solve(K, x_t[i].reshape(-1) - prior.mean)
        V = C - C @ torch.linalg.solve(K, C)
        S = noise_std**2 * torch.eye(H.shape[1], dtype=torch.float64) + H[i] @ V @ H[i].mT
        out.append(J.mT @ H[i].mT @ torch.linalg.solve(S, y[i].reshape(-1) - H[i] @ m))
    return torch.stack(out)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("sigma", SIGMAS)
def test_pigdm_guidance_is_the_exact_likelihood_score_for_a_unit_prior(case, sigma):
    prior, A, y, x_t, s = _setup(case, "identity", sigma, noise_std=0.05)
    hook = PiGDMGuidance(prior, y, A, 0.05, maxiter=math.prod(A.out_shape), weight=1.0)
    x_hat = hook(x_t, s)
    torch.testing.assert_close(x_hat, prior(x_t, s))
    delta = hook.step_correction(s * 0.9)
    r2 = sigma**2 / (1 + sigma**2)
    ref = exact_likelihood_score(prior, A, x_t, y, s, 0.05)
    _close(delta.flatten(1) / r2, ref, tol=1e-8)


def test_pigdm_noiseless_form_is_the_noisy_form_as_sigma_y_vanishes():
    prior, A, y, x_t, s = _setup("projection", "dense", 0.5, noise_std=1e-7)
    noisy = PiGDMGuidance(prior, y, A, 1e-7, maxiter=2)
    noisy(x_t, s)
    noiseless = PiGDMGuidance(prior, y, A, 1e-7, form="noiseless")
    noiseless(x_t, s)
    a, b = noisy.step_correction(), noiseless.step_correction()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


class _NoPinv(LinearOperator):
    """A projection without a pseudo-inverse (what PiGDM's noiseless form must refuse)."""

    def __init__(self, matrix):
        self.matrix = matrix
        self.batch_shape, self.in_shape, self.out_shape = tuple(matrix.shape[:-2]), (matrix.shape[-1],), (matrix.shape[-2],)

    def parameters(self):
        return {"matrix": self.matrix}

    def _forward(self, x):
        return (self.matrix @ x[..., None])[..., 0]

    def _adjoint(self, y):
        return (self.matrix.mT @ y[..., None])[..., 0]


def test_pigdm_noiseless_needs_a_pseudo_inverse():
    prior, A, y, x_t, s = _setup("projection", "dense", 0.5)
    op = _NoPinv(A.matrix)
    with pytest.raises(TypeError, match="pseudo-inverse.*_NoPinv"):
        PiGDMGuidance(prior, y, op, 0.1, form="noiseless")
    PiGDMGuidance(prior, y, op, 0.1, form="noisy")  # the noisy form needs none


# -- DPS ----------------------------------------------------------------------------------------------------


def test_dps_uses_a_per_sample_residual_norm():
    """Sample i's correction does not depend on the other samples (no batch-global norm)."""
    prior, A, y, x_t, s = _setup("projection", "dense", 2.0)
    hook = DPSGuidance(prior, y, A, 0.1, zeta=0.5)
    hook(x_t, s)
    together = hook.step_correction(1.5)
    y2 = y.clone()
    y2[0] = y2[0] * 1e3  # a huge residual in sample 0
    hook2 = DPSGuidance(prior, y2, A, 0.1, zeta=0.5)
    hook2(x_t, s)
    other = hook2.step_correction(1.5)
    torch.testing.assert_close(other[1:], together[1:], rtol=1e-12, atol=1e-14)
    # The magnitude is zeta * sqrt((1 + s_t^2)(1 + s_s^2)) * ||J^T A^T r|| / ||r||, per sample.
    H = operator_matrix(A, prior.event_shape)
    K = prior.covariance() + 4.0 * torch.eye(5, dtype=torch.float64)
    J = torch.eye(5, dtype=torch.float64) - 4.0 * torch.linalg.inv(K)
    for i in range(4):
        r = y[i] - H[i] @ prior(x_t, s)[i]
        ref = 0.5 * math.sqrt(5.0 * 3.25) * (J.mT @ H[i].mT @ r) / r.norm()
        torch.testing.assert_close(together[i], ref, rtol=1e-10, atol=1e-12)


def test_step_hook_without_a_call_raises():
    prior, A, y, x_t, s = _setup("projection", "dense", 1.0)
    for hook in (DPSGuidance(prior, y, A, 0.1), PiGDMGuidance(prior, y, A, 0.1)):
        with pytest.raises(RuntimeError, match="before `step_correction`"):
            hook.step_correction(0.5)


# -- every method through sample_posterior ------------------------------------------------------------------------


OPTIONS = {
    "mmps": dict(maxiter=4),
    "dps": dict(guidance_options={"zeta": 0.3}),
    "pigdm": dict(maxiter=4),
    "tmpd": {},
    "diffpir": dict(maxiter=8, guidance_options={"lmbda": 1.0}),
}


@pytest.mark.parametrize("guidance", GUIDANCES)
def test_every_method_samples_closer_to_the_posterior_than_the_prior(guidance):
    """2 observations x 300 samples, DDPM 64 steps: the sample mean is 4x nearer the exact posterior mean than
    the prior mean is (qualitative for DPS / PiGDM / DiffPIR; MMPS and TMPD are exact here)."""
    g = gen(7)
    K, R, noise_std = 2, 300, 0.1
    mask = torch.rand(K, 1, 2, 2, generator=g) < 0.5
    mask[:, 0, 0, 1] = True
    A, event = Mask(mask, channels=2), (2, 2, 2)
    prior = _gaussian(8, event, g, "diagonal").float()
    x = prior.mean.reshape(event) + 2.0  # observations far from the prior mean
    y = GaussianObservation(A, noise_std).sample(x.expand(K, *event), generator=g)
    idx = torch.arange(K).repeat_interleave(R)
    out = sample_posterior(prior, y[idx], A[idx], noise_std, event, steps=64, generator=gen(8),
                           batch_size=K * R, guidance=guidance, **OPTIONS[guidance])
    assert out.shape == (K * R, *event) and torch.isfinite(out).all()
    prior64 = prior.double()
    H = operator_matrix(A, event)
    for k in range(K):
        C = prior64.covariance()
        S = H[k] @ C @ H[k].mT + noise_std**2 * torch.eye(H.shape[1], dtype=torch.float64)
        post_mean = prior64.mean + C @ H[k].mT @ torch.linalg.solve(S, y[k].double().reshape(-1) - H[k] @ prior64.mean)
        emp = out[k * R : (k + 1) * R].double().reshape(R, -1).mean(0)
        assert (emp - post_mean).norm() < 0.25 * (prior64.mean - post_mean).norm(), guidance


# -- validation ---------------------------------------------------------------------------------------------------


def test_make_posterior_validation():
    prior, A, y, x_t, s = _setup("projection", "dense", 1.0)
    with pytest.raises(ValueError, match="`guidance` must be one of"):
        make_posterior("ddrm", prior, y, A, 0.1)
    with pytest.raises(ValueError, match="`zeta` is not an option of guidance 'mmps'"):
        make_posterior("mmps", prior, y, A, 0.1, zeta=1.0)
    with pytest.raises(ValueError, match="`covariance`"):
        make_posterior("mmps", prior, y, A, 0.1, covariance="full")
    with pytest.raises(ValueError, match="`zeta`"):
        make_posterior("dps", prior, y, A, 0.1, zeta=-0.1)
    with pytest.raises(ValueError, match="`lmbda`"):
        make_posterior("diffpir", prior, y, A, 0.1, lmbda=-1.0)
    with pytest.raises(ValueError, match="`lmbda`"):
        make_posterior("diffpir", prior, y, A, 0.1, lmbda=0.0)
    with pytest.raises(ValueError, match="`weight`"):
        make_posterior("pigdm", prior, y, A, 0.1, weight=-1.0)
    with pytest.raises(ValueError, match="`form`"):
        make_posterior("pigdm", prior, y, A, 0.1, form="exact")
    for guidance in GUIDANCES:
        module = make_posterior(guidance, prior, y, A, 0.1)
        with pytest.raises(ValueError, match="`sigma`"):
            module(x_t, 0.0)
        with pytest.raises(ValueError, match="`x_t`"):
            module(x_t[:2], s[:2])


def test_sample_posterior_validation():
    prior, A, y, _, _ = _setup("projection", "dense", 1.0)
    kwargs = dict(event_shape=(5,), steps=2, generator=gen(0))
    with pytest.raises(ValueError, match="`covariance` applies to guidance 'mmps' only"):
        sample_posterior(prior, y, A, 0.1, guidance="dps", covariance="prior", **kwargs)
    with pytest.raises(ValueError, match="`guidance` must be one of"):
        sample_posterior(prior, y, A, 0.1, guidance="unknown", **kwargs)
    with pytest.raises(ValueError, match="`covariance` must be one of"):
        sample_posterior(prior, y, A, 0.1, covariance="unknown", **kwargs)
