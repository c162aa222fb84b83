r"""Tests of diffem.posterior (MMPS) against the exact Gaussian posterior.

For a Gaussian prior :math:`\mathcal{N}(\mu, C)`, :math:`x_t = x + \sigma z` and
:math:`y = A x + \sigma_y e`, the pair :math:`(x_t, y)` is one linear-Gaussian observation
of :math:`x` through the stacked operator :math:`H = [I; A]` with noise covariance
:math:`\mathrm{diag}(\sigma^2 I, \sigma_y^2 I)`. Hence, independently of MMPS,

.. math:: P = C^{-1} + I / \sigma^2 + A^T A / \sigma_y^2, \qquad
   \mathbb{E}[x \mid x_t, y] = P^{-1} (C^{-1} \mu + x_t / \sigma^2 + A^T y / \sigma_y^2).

MMPS is exact for a Gaussian prior (its Tweedie covariance is the true one), so with CG
run to convergence it must reproduce this mean to round-off.
"""

import math

import pytest
import torch

from diffem.gaussian import GaussianPrior, operator_matrix
from diffem.operators import GaussianObservation, Mask, Projection
from diffem.posterior import MMPSDenoiser
from diffem.sampling import sample_posterior

from posterior_cases import CASES, gen, low_rank_prior, projection_case


def stacked_posterior_mean(prior, A_dense, x_t, y, sigma, noise_std):
    """E[x | x_t, y] for one sample by the precision form of the stacked observation [x_t; y]."""
    d = prior.features
    Ci = torch.linalg.inv(prior.covariance())
    P = Ci + torch.eye(d, dtype=torch.float64) / sigma**2 + A_dense.mT @ A_dense / noise_std**2
    rhs = Ci @ prior.mean + x_t / sigma**2 + A_dense.mT @ y / noise_std**2
    return torch.linalg.solve(P, rhs)


def exact_posterior(prior, A_dense, y, noise_std):
    """Moments of q(x | y) by the precision form (independent of GaussianPrior.posterior)."""
    Ci = torch.linalg.inv(prior.covariance())
    P = Ci + A_dense.mT @ A_dense / noise_std**2
    S = torch.linalg.inv(P)
    return S @ (Ci @ prior.mean + A_dense.mT @ y / noise_std**2), (S + S.mT) / 2


# -- exactness with converged CG ------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("sigma", [1e-3, 1e-2, 1e-1, 1.0, 10.0, 1e2])
def test_mmps_is_exact_for_gaussian_prior(case, sigma):
    g = gen(0)
    B, noise_std = 4, 0.1
    A, event = CASES[case](B, g)
    d = math.prod(event)
    prior = low_rank_prior(d, event, g)
    x = prior.sample(B, generator=g)
    y = GaussianObservation(A, noise_std).sample(x, generator=g)
    x_t = x + sigma * torch.randn(x.shape, generator=g, dtype=torch.float64)
    m = math.prod(A.out_shape)  # CG is exact in (at most) the output dimension
    mmps = MMPSDenoiser(prior, y, A, noise_std, maxiter=m)
    out = mmps(x_t, torch.full((B,), sigma, dtype=torch.float64))
    assert out.shape == x_t.shape and out.dtype == torch.float64 and not out.requires_grad
    H = operator_matrix(A, event)
    for i in range(B):
        ref = stacked_posterior_mean(prior, H[i], x_t[i].reshape(-1), y[i].reshape(-1), sigma, noise_std)
        scale = ref.abs().max()
        torch.testing.assert_close(out[i].reshape(-1), ref, rtol=0, atol=1e-9 * max(1.0, scale.item()))


@pytest.mark.parametrize("case", list(CASES))
def test_mmps_per_sample_sigma_and_operators(case):
    """Each sample has its own sigma and operator; the batch equals the samples run alone."""
    g = gen(1)
    B, noise_std = 4, 0.1
    A, event = CASES[case](B, g)
    d = math.prod(event)
    prior = low_rank_prior(d, event, g)
    x = prior.sample(B, generator=g)
    y = GaussianObservation(A, noise_std).sample(x, generator=g)
    sigma = torch.tensor([1e-2, 0.3, 3.0, 50.0], dtype=torch.float64)
    x_t = x + sigma.reshape(-1, *[1] * len(event)) * torch.randn(x.shape, generator=g, dtype=torch.float64)
    m = math.prod(A.out_shape)
    out = MMPSDenoiser(prior, y, A, noise_std, maxiter=m)(x_t, sigma)
    H = operator_matrix(A, event)
    for i in range(B):
        alone = MMPSDenoiser(prior, y[i : i + 1], A[i : i + 1], noise_std, maxiter=m)(x_t[i : i + 1], sigma[i : i + 1])
        torch.testing.assert_close(out[i : i + 1], alone, rtol=1e-10, atol=1e-10)
        ref = stacked_posterior_mean(prior, H[i], x_t[i].reshape(-1), y[i].reshape(-1), sigma[i], noise_std)
        torch.testing.assert_close(out[i].reshape(-1), ref, rtol=0, atol=1e-8)


def test_mmps_one_cg_iteration_moves_toward_the_observation():
    """maxiter = 1 is approximate, but reduces the data misfit ||y - A x_hat|| vs the prior denoiser."""
    g = gen(2)
    B, noise_std, sigma = 8, 0.05, 0.5
    A, event = projection_case(B, g)
    prior = low_rank_prior(5, event, g)
    x = prior.sample(B, generator=g)
    y = GaussianObservation(A, noise_std).sample(x, generator=g)
    x_t = x + sigma * torch.randn(x.shape, generator=g, dtype=torch.float64)
    before = (y - A(prior(x_t, sigma))).norm(dim=-1)
    after = (y - A(MMPSDenoiser(prior, y, A, noise_std, maxiter=1)(x_t, sigma))).norm(dim=-1)
    assert (after < before).all()


def test_mmps_validation():
    prior = GaussianPrior(event_shape=(5,), rank=1).double()
    A = Projection(torch.randn(2, 2, 5, dtype=torch.float64))
    y = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="`maxiter`"):
        MMPSDenoiser(prior, y, A, 0.1, maxiter=0)
    mmps = MMPSDenoiser(prior, y, A, 0.1)
    with pytest.raises(ValueError, match="`x_t`"):
        mmps(torch.zeros(3, 5, dtype=torch.float64), 1.0)
    with pytest.raises(ValueError, match="`sigma`"):
        mmps(torch.zeros(2, 5, dtype=torch.float64), 0.0)


# -- statistics of posterior samples -----------------------------------------------------------------------


def ddpm_variance_factor(variance, sigmas):
    r"""Var of the final DDPM sample / ``variance``, for a 1-D Gaussian N(0, v) with its exact denoiser.

    The chain is linear: :math:`x_s = a_t x_t + \sigma_s \sqrt{\tau} \epsilon` with
    :math:`\tau = 1 - \sigma_s^2/\sigma_t^2`, :math:`a_t = 1 - \tau + \tau v / (v + \sigma_t^2)`,
    then the final denoise multiplies by :math:`v / (v + \sigma_{\min}^2)`. DDPM with a
    known denoiser under-disperses by about :math:`\ln(\sigma_{\max}/\sigma_{\min}) / N`.
    """
    var = sigmas[0] ** 2
    for st, ss in zip(sigmas[:-1], sigmas[1:]):
        tau = 1 - (ss / st) ** 2
        a = 1 - tau + tau * variance / (variance + st**2)
        var = a**2 * var + ss**2 * tau
    return var * (variance / (variance + sigmas[-1] ** 2)) ** 2 / variance


def _small_mask_case(B, g):
    mask = torch.rand(B, 1, 2, 2, generator=g) < 0.5
    mask[:, 0, 0, 1] = True
    return Mask(mask, channels=2), (2, 2, 2)


STAT_CASES = {"mask": _small_mask_case, "projection": projection_case}


@pytest.mark.parametrize("case", list(STAT_CASES))
def test_sample_posterior_matches_exact_posterior(case):
    """2 distinct observations x 5,000 posterior samples each (one operator per sample), DDPM + MMPS.

    Tolerances (N = 5,000 per observation): the sample mean lies within 4.5 standard errors
    of the exact posterior mean in every coordinate; the relative Frobenius error of the
    sample covariance is below 0.1 against the exact posterior covariance (DDPM with 256
    steps under-disperses by ~4.5 %, the sampling standard deviation is ~0.03), and below
    0.08 against the covariance that DDPM with an exact denoiser provably produces
    (same eigenvectors, eigenvalues scaled by :func:`ddpm_variance_factor`).
    """
    g = gen(3)
    K, R, noise_std, steps = 2, 5000, 0.1, 256
    A, event = STAT_CASES[case](K, g)
    d = math.prod(event)
    prior = low_rank_prior(d, event, g, rank=2, diag=0.2)
    x = prior.sample(K, generator=g)
    y = GaussianObservation(A, noise_std).sample(x, generator=g)
    # Repeat each observation (and its operator) R times: a (K * R,) batched operator.
    idx = torch.arange(K).repeat_interleave(R)
    m = math.prod(A.out_shape)
    samples = sample_posterior(
        prior, y[idx].float(), A[idx], noise_std, event_shape=event, steps=steps, maxiter=m,
        generator=gen(4), batch_size=K * R,
    )
    assert samples.shape == (K * R, *event) and torch.isfinite(samples).all()
    samples = samples.double().reshape(K, R, d)
    H = operator_matrix(A, event)
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    sigmas = torch.exp(math.log(1e-3) + (math.log(1e2) - math.log(1e-3)) * t)
    for k in range(K):
        mean, cov = exact_posterior(prior, H[k], y[k].reshape(-1), noise_std)
        emp_mean = samples[k].mean(0)
        emp_cov = torch.cov(samples[k].mT)
        se = (torch.diagonal(cov) / R).sqrt()
        z = ((emp_mean - mean) / se).abs()
        assert z.max() < 4.5, (z, emp_mean, mean)
        rel = (emp_cov - cov).norm() / cov.norm()
        assert rel < 0.1, rel
        lam, V = torch.linalg.eigh(cov)
        factors = torch.stack([ddpm_variance_factor(v, sigmas) for v in lam])
        cov_ddpm = V @ torch.diag(lam * factors) @ V.mT
        rel_ddpm = (emp_cov - cov_ddpm).norm() / cov_ddpm.norm()
        assert rel_ddpm < 0.08, rel_ddpm


# -- the one-forward + maxiter-VJP form equals the straightforward form ----------------------------------------


def reference_mmps(denoiser, y, A, noise_std, x_t, sigma, maxiter, tol=0.0):
    r"""The straightforward MMPS (one forward, maxiter + 1 VJPs): solve for v, then one more VJP for J^T A^T v."""
    from diffem.linalg import conjugate_gradient

    with torch.enable_grad():
        x_t = x_t.detach().requires_grad_(True)
        x_hat = denoiser(x_t, sigma)
        s2 = sigma.square().reshape(-1, *[1] * (x_t.dim() - 1))

        def vjp(v):
            return torch.autograd.grad(x_hat, x_t, v, retain_graph=True)[0]

        def matvec(v):
            return noise_std**2 * v + s2.reshape(-1, *[1] * (y.dim() - 1)) * A(vjp(A.T(v)))

        v = conjugate_gradient(matvec, (y - A(x_hat)).detach(), maxiter=maxiter, tol=tol)
        return (x_hat + s2 * vjp(A.T(v))).detach(), x_hat.detach()


class TinyDenoiser(torch.nn.Module):
    """A nonlinear float64 denoiser (EDM preconditioning, tanh layer): J is neither symmetric nor constant."""

    def __init__(self, d, g, hidden=16, matrix=None):
        super().__init__()
        self.w1 = torch.randn(d, hidden, generator=g, dtype=torch.float64) / d**0.5
        self.w2 = torch.randn(hidden, d, generator=g, dtype=torch.float64) / hidden**0.5
        self.matrix = matrix

    def forward(self, x_t, sigma):
        shape, flat = x_t.shape, x_t.flatten(1)
        if self.matrix is not None:  # a linear "denoiser" with an indefinite Jacobian
            return (flat @ self.matrix.mT).reshape(shape)
        s = sigma[:, None]
        h = torch.tanh(flat / (s**2 + 1).sqrt() @ self.w1 + sigma.log()[:, None])
        return (flat / (s**2 + 1) + s / (s**2 + 1).sqrt() * (h @ self.w2)).reshape(shape)


def _fast_case(case, B, g, denoiser_kind="tiny"):
    A, event = CASES[case](B, g)
    d = math.prod(event)
    if denoiser_kind == "indefinite":
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        lam = torch.linspace(-3.0, 1.0, d, dtype=torch.float64)
        denoiser = TinyDenoiser(d, g, matrix=q @ torch.diag(lam) @ q.mT)
    else:
        denoiser = TinyDenoiser(d, g)
    x = torch.randn(B, *event, generator=g, dtype=torch.float64)
    y = GaussianObservation(A, 0.05).sample(x, generator=g)
    sigma = torch.exp(torch.linspace(-3, 2, B, dtype=torch.float64))
    x_t = x + sigma.reshape(-1, *[1] * len(event)) * torch.randn(x.shape, generator=g, dtype=torch.float64)
    return denoiser, A, y, x_t, sigma


def _relative_to_correction(out, ref, x_hat):
    correction = (ref - x_hat).flatten(1).norm(dim=1).clamp_min(torch.finfo(ref.dtype).tiny)
    return ((out - ref).flatten(1).norm(dim=1) / correction).max().item()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("maxiter", [1, 3, 8])
@pytest.mark.parametrize("tol", [0.0, 0.3])
def test_fast_mmps_equals_the_straightforward_form(case, maxiter, tol):
    """<= 1e-10 relative to the size of the correction sigma^2 J^T A^T v, float64."""
    g = gen(10 + maxiter)
    denoiser, A, y, x_t, sigma = _fast_case(case, 6, g)
    out = MMPSDenoiser(denoiser, y, A, 0.05, maxiter=maxiter, tol=tol)(x_t, sigma)
    ref, x_hat = reference_mmps(denoiser, y, A, 0.05, x_t, sigma, maxiter, tol)
    assert _relative_to_correction(out, ref, x_hat) <= 1e-10
    if tol > 0 and maxiter > 1 and case != "sense":  # early stopping did act (the sense case's CG never meets 0.3 early)
        full, _ = reference_mmps(denoiser, y, A, 0.05, x_t, sigma, maxiter, 0.0)
        assert (ref - full).abs().max() > 1e-8


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("maxiter", [1, 3, 8])
def test_fast_mmps_equals_the_straightforward_form_under_the_curvature_guard(case, maxiter):
    """An indefinite Jacobian: some CG directions have p^T M p <= 0 and freeze their sample."""
    g = gen(20 + maxiter)
    denoiser, A, y, x_t, sigma = _fast_case(case, 6, g, denoiser_kind="indefinite")
    sigma = torch.full_like(sigma, 2.0)
    curv = []
    from diffem import linalg

    original = linalg._dot

    def spy(a, b):
        out = original(a, b)
        curv.append(out)
        return out

    linalg._dot = spy
    try:
        out = MMPSDenoiser(denoiser, y, A, 0.05, maxiter=maxiter)(x_t, sigma)
    finally:
        linalg._dot = original
    assert (torch.stack(curv) <= 0).any()  # the guard was met (p^T M p <= 0 for some sample)
    ref, x_hat = reference_mmps(denoiser, y, A, 0.05, x_t, sigma, maxiter)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


# -- GMRES: the solve of a learned (non-symmetric) Jacobian ----------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_mmps_with_gmres_is_exact_for_a_gaussian_prior(case):
    g = gen(30)
    B, noise_std, sigma = 3, 0.1, 0.5
    A, event = CASES[case](B, g)
    prior = low_rank_prior(math.prod(event), event, g)
    x = prior.sample(B, generator=g)
    y = GaussianObservation(A, noise_std).sample(x, generator=g)
    x_t = x + sigma * torch.randn(x.shape, generator=g, dtype=torch.float64)
    m = math.prod(A.out_shape)
    out = MMPSDenoiser(prior, y, A, noise_std, maxiter=m, solver="gmres")(x_t, torch.full((B,), sigma, dtype=torch.float64))
    H = operator_matrix(A, event)
    for i in range(B):
        ref = stacked_posterior_mean(prior, H[i], x_t[i].reshape(-1), y[i].reshape(-1), sigma, noise_std)
        torch.testing.assert_close(out[i].reshape(-1), ref, rtol=0, atol=1e-9 * max(1.0, ref.abs().max().item()))


def test_mmps_with_gmres_solves_the_non_symmetric_system_of_a_learned_jacobian():
    """x_hat + sigma^2 J^T A^T (Sigma_y + sigma^2 A J^T A^T)^-1 (y - A x_hat), J of a nonlinear denoiser: GMRES
    at maxiter = dim y reaches the dense solve; CG, which assumes symmetry, does not."""
    g = gen(31)
    denoiser, A, y, x_t, sigma = _fast_case("projection", 3, g)
    m = math.prod(A.out_shape)
    gm = MMPSDenoiser(denoiser, y, A, 0.05, maxiter=m, solver="gmres")(x_t, sigma)
    cg = MMPSDenoiser(denoiser, y, A, 0.05, maxiter=m)(x_t, sigma)
    H = operator_matrix(A, x_t.shape[1:])
    for i in range(len(y)):
        xi, si = x_t[i : i + 1], sigma[i : i + 1]
        J = torch.autograd.functional.jacobian(lambda u: denoiser(u.reshape(xi.shape), si).reshape(-1), xi.reshape(-1))
        x_hat = denoiser(xi, si).reshape(-1)
        M = 0.05**2 * torch.eye(m, dtype=torch.float64) + si**2 * H[i] @ J.mT @ H[i].mT
        v = torch.linalg.solve(M, y[i].reshape(-1) - H[i] @ x_hat)
        ref = x_hat + si**2 * J.mT @ H[i].mT @ v
        scale = (ref - x_hat).norm()
        assert float((gm[i].reshape(-1) - ref).norm() / scale) < 1e-8
        assert float((cg[i].reshape(-1) - ref).norm() / scale) > 1e-6
    with pytest.raises(ValueError, match="solver"):
        MMPSDenoiser(denoiser, y, A, 0.05, solver="lu")


def test_the_data_consistency_step_is_gaussian_conditioning():
    """x_dc = x_hat + tau^2 A^T (sigma^2 I + tau^2 A A^T)^-1 (y - A x_hat): the posterior mean under N(x_hat, tau^2 I),
    against the dense formula; tau -> infinity on a mask is the hard projection onto the observed pixels."""
    from diffem.operators import Mask, Projection
    from diffem.posterior import data_consistency_step

    g = gen(5)
    M = torch.randn(3, 2, 5, generator=g, dtype=torch.float64)
    A = Projection(M)
    x_hat = torch.randn(3, 5, generator=g, dtype=torch.float64)
    y = torch.randn(3, 2, generator=g, dtype=torch.float64)
    tau, sigma = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64), 0.1
    out = data_consistency_step(x_hat, y, A, sigma, tau, maxiter=2)
    for i in range(3):
        K = sigma**2 * torch.eye(2, dtype=torch.float64) + tau[i] ** 2 * M[i] @ M[i].T
        ref = x_hat[i] + tau[i] ** 2 * M[i].T @ torch.linalg.solve(K, y[i] - M[i] @ x_hat[i])
        torch.testing.assert_close(out[i], ref, rtol=1e-9, atol=1e-9)
    mask = torch.rand(2, 1, 4, 4, generator=g) < 0.5
    B = Mask(mask, channels=1)
    x_hat = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64) * mask
    hard = data_consistency_step(x_hat, y, B, 1e-6, 1e3, maxiter=1)
    torch.testing.assert_close(hard, torch.where(mask, y, x_hat), rtol=1e-8, atol=1e-8)
    with pytest.raises(ValueError, match="tau"):
        data_consistency_step(x_hat, y, B, 0.1, 0.0)
