"""Tests of diffem.gaussian: exact denoiser, PPCA fits, exact posterior and evidence, lap-0 EM."""

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from diffem.em.lap0 import fit_gaussian_em
from diffem.gaussian import GaussianPrior, operator_matrix
from diffem.operators import GaussianObservation, Mask, Projection


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def random_prior(d, rank, g, diag=0.3, event_shape=None):
    mean = torch.randn(d, generator=g, dtype=torch.float64)
    factor = torch.randn(d, rank, generator=g, dtype=torch.float64)
    return GaussianPrior.from_parameters(mean, factor, diag, event_shape=event_shape)


# -- exact denoiser ------------------------------------------------------------------------------------


@pytest.mark.parametrize("d, rank", [(6, 2), (6, 0), (6, 6), (1, 1)])
@pytest.mark.parametrize("batch", [1, 5])
def test_denoiser_equals_dense_formula(d, rank, batch):
    g = _gen(d * 10 + rank)
    prior = random_prior(d, rank, g)
    C = prior.covariance()
    x_t = torch.randn(batch, d, generator=g, dtype=torch.float64) * 3
    sigma = torch.exp(torch.linspace(math.log(1e-3), math.log(1e2), batch, dtype=torch.float64))
    out = prior(x_t, sigma)
    eye = torch.eye(d, dtype=torch.float64)
    for i in range(batch):
        s2 = sigma[i] ** 2
        ref = x_t[i] - s2 * torch.linalg.solve(C + s2 * eye, x_t[i] - prior.mean)
        torch.testing.assert_close(out[i], ref, rtol=1e-9, atol=1e-9)
    # A scalar sigma is broadcast over the batch.
    torch.testing.assert_close(prior(x_t, sigma[0]), prior(x_t, sigma[0].expand(batch)), rtol=0, atol=0)


def test_denoiser_zero_diag_full_rank():
    """D = 0 with r = d: the covariance is U U^T, still invertible."""
    g = _gen(7)
    prior = random_prior(4, 4, g, diag=0.0)
    C = prior.covariance()
    x_t = torch.randn(3, 4, generator=g, dtype=torch.float64)
    s2 = 0.5**2
    ref = x_t - s2 * torch.linalg.solve(C + s2 * torch.eye(4, dtype=torch.float64), (x_t - prior.mean).mT).mT
    torch.testing.assert_close(prior(x_t, 0.5), ref, rtol=1e-9, atol=1e-9)


def test_denoiser_image_event_shape_and_gradient():
    """Events of shape (C, H, W); the denoiser is linear with Jacobian I - s^2 (C + s^2 I)^{-1}."""
    g = _gen(8)
    prior = random_prior(12, 3, g, event_shape=(3, 2, 2))
    C = prior.covariance()
    x_t = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    out = prior(x_t, 0.7)
    assert out.shape == x_t.shape
    v = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64)
    (vjp,) = torch.autograd.grad(out, x_t, v)
    J = torch.eye(12, dtype=torch.float64) - 0.49 * torch.linalg.inv(C + 0.49 * torch.eye(12, dtype=torch.float64))
    torch.testing.assert_close(vjp.reshape(2, 12), v.reshape(2, 12) @ J, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sigma", [0.0, -1.0])
def test_denoiser_rejects_bad_sigma(sigma):
    prior = GaussianPrior(event_shape=(3,), rank=1)
    with pytest.raises(ValueError, match="`sigma`"):
        prior(torch.zeros(2, 3), sigma)
    with pytest.raises(ValueError, match="`sigma`"):
        prior(torch.zeros(2, 3), torch.ones(3))
    with pytest.raises(ValueError, match="`x_t`"):
        prior(torch.zeros(2, 4), 1.0)


# -- PPCA fits ---------------------------------------------------------------------------------------


def test_from_moments_full_rank_reproduces_covariance():
    g = _gen(9)
    d = 6
    L = torch.randn(d, d, generator=g, dtype=torch.float64)
    S = L @ L.mT + 0.1 * torch.eye(d, dtype=torch.float64)
    mean = torch.randn(d, generator=g, dtype=torch.float64)
    prior = GaussianPrior.from_moments(mean, S, rank=d)
    torch.testing.assert_close(prior.covariance(), S, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(prior.mean, mean, rtol=0, atol=0)
    assert prior.diag == 0


def test_from_moments_low_rank_is_ppca_solution():
    """Rank r: D is the mean of the d - r smallest eigenvalues; the top-r eigenvalues are kept."""
    g = _gen(10)
    d, r = 6, 2
    L = torch.randn(d, d, generator=g, dtype=torch.float64)
    S = L @ L.mT
    lam, V = torch.linalg.eigh(S)
    prior = GaussianPrior.from_moments(torch.zeros(d, dtype=torch.float64), S, rank=r)
    C = prior.covariance()
    torch.testing.assert_close(prior.diag, lam[: d - r].mean(), rtol=1e-10, atol=1e-12)
    # C shares the eigenvectors of S: top-r eigenvalues equal, the rest equal to D.
    lam_C = torch.linalg.eigvalsh(C)
    torch.testing.assert_close(lam_C[d - r :], lam[d - r :], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(lam_C[: d - r], lam[: d - r].mean().expand(d - r), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(C @ V[:, -1], lam[-1] * V[:, -1], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("rank", [2, 6])
def test_fit_recovers_mean_and_covariance(rank):
    g = _gen(11)
    d = 6
    truth = random_prior(d, rank, g, diag=0.2 if rank < d else 0.0)
    x = truth.sample(20000, generator=g)
    fit = GaussianPrior.fit(x, rank)
    C = truth.covariance()
    se = (torch.diagonal(C) / x.shape[0]).sqrt()
    assert ((fit.mean - truth.mean).abs() < 5 * se).all()
    rel = (fit.covariance() - C).norm() / C.norm()
    assert rel < 0.05


def test_fit_rejects_bad_input():
    with pytest.raises(ValueError, match="`x`"):
        GaussianPrior.fit(torch.zeros(1, 3), 1)
    with pytest.raises(ValueError, match="`x`"):
        GaussianPrior.fit(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), 1)
    with pytest.raises(ValueError, match="`rank`"):
        GaussianPrior(event_shape=(3,), rank=4)


def test_sample_statistics_and_generator():
    g = _gen(12)
    prior = random_prior(4, 2, g, event_shape=(1, 2, 2))
    x = prior.sample(20000, generator=g)
    assert x.shape == (20000, 1, 2, 2)
    C = prior.covariance()
    emp = torch.cov(x.reshape(-1, 4).mT)
    assert (emp - C).norm() / C.norm() < 0.05
    with pytest.raises(ValueError, match="`generator`"):
        prior.sample(3, generator=None)


# -- exact posterior and evidence --------------------------------------------------------------------


def dense_posterior(mu, C, A, y, noise_std):
    """Posterior by precision matrices: P = C^-1 + A^T A / s^2, m = P^-1 (C^-1 mu + A^T y / s^2)."""
    Ci = torch.linalg.inv(C)
    P = Ci + A.mT @ A / noise_std**2
    S = torch.linalg.inv(P)
    m = S @ (Ci @ mu + A.mT @ y / noise_std**2)
    return m, S


def _mask_case(B, g):
    mask = torch.rand(B, 1, 3, 3, generator=g) < 0.5
    mask[:, 0, 0, 0] = True
    return Mask(mask, channels=2), (2, 3, 3)


def _projection_case(B, g):
    return Projection(torch.randn(B, 3, 7, generator=g, dtype=torch.float64)), (7,)


CASES = {"mask": _mask_case, "projection": _projection_case}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("noise_std", [1e-2, 0.5])
def test_posterior_equals_dense_bayes(case, noise_std):
    g = _gen(13)
    B = 4
    A, event = CASES[case](B, g)
    d = math.prod(event)
    prior = random_prior(d, 3, g, diag=0.4, event_shape=event)
    x = prior.sample(B, generator=g)
    y = GaussianObservation(A, noise_std).sample(x, generator=g)
    mean, cov = prior.posterior(y, A, noise_std)
    assert mean.shape == (B, d) and cov.shape == (B, d, d)
    M = operator_matrix(A, event)
    for i in range(B):
        m_ref, S_ref = dense_posterior(prior.mean, prior.covariance(), M[i], y[i].reshape(-1), noise_std)
        torch.testing.assert_close(mean[i], m_ref, rtol=1e-7, atol=1e-8)
        torch.testing.assert_close(cov[i], S_ref, rtol=1e-7, atol=1e-9)
    # An unbatched operator returns unbatched moments.
    m0, S0 = prior.posterior(y[0], A[0], noise_std)
    torch.testing.assert_close(m0, mean[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S0, cov[0], rtol=1e-12, atol=1e-12)


def test_operator_matrix_matches_operator():
    g = _gen(14)
    A, event = _mask_case(3, g)
    M = operator_matrix(A, event)
    x = torch.randn(3, *event, generator=g, dtype=torch.float64)
    torch.testing.assert_close((M @ x.reshape(3, -1, 1))[..., 0], A(x).reshape(3, -1), rtol=0, atol=1e-14)


@pytest.mark.parametrize("case", list(CASES))
def test_log_evidence_equals_multivariate_normal(case):
    g = _gen(15)
    B, noise_std = 5, 0.3
    A, event = CASES[case](B, g)
    d = math.prod(event)
    prior = random_prior(d, 2, g, diag=0.5, event_shape=event)
    x = prior.sample(B, generator=g)
    y = GaussianObservation(A, noise_std).sample(x, generator=g)
    out = prior.log_evidence(y, A, noise_std)
    assert out.shape == (B,)
    M = operator_matrix(A, event)
    C = prior.covariance()
    for i in range(B):
        K = M[i] @ C @ M[i].mT + noise_std**2 * torch.eye(M.shape[1], dtype=torch.float64)
        ref = MultivariateNormal(M[i] @ prior.mean, covariance_matrix=K).log_prob(y[i].reshape(-1))
        torch.testing.assert_close(out[i], ref, rtol=1e-10, atol=1e-10)


def test_posterior_rejects_mismatched_y():
    g = _gen(16)
    A, event = _projection_case(3, g)
    prior = random_prior(7, 1, g)
    with pytest.raises(ValueError, match="`y`"):
        prior.posterior(torch.zeros(3, 4, dtype=torch.float64), A, 0.1)
    with pytest.raises(ValueError, match="`y`"):
        prior.log_evidence(torch.zeros(2, 3, dtype=torch.float64), A, 0.1)
    with pytest.raises(ValueError, match="`noise_std`"):
        prior.posterior(torch.zeros(3, 3, dtype=torch.float64), A, 0.0)


# -- lap 0: EM from observations only --------------------------------------------------------------------


def _em_problem(kind, n, g, noise_std):
    """A rank-2 + diagonal Gaussian in d = 6 observed through random masks or projections."""
    d = 6
    mean = torch.randn(d, generator=g, dtype=torch.float64)
    factor = torch.randn(d, 2, generator=g, dtype=torch.float64)
    truth = GaussianPrior.from_parameters(mean, factor, 0.1)
    if kind == "mask":
        # Each observation sees a random ~2/3 of the 6 pixels of a (1, 2, 3) image.
        mask = torch.rand(n, 1, 2, 3, generator=g) < 2 / 3
        mask[:, 0, 0, 0] |= ~mask.flatten(1).any(1)
        A = Mask(mask, channels=1)
        event = (1, 2, 3)
    else:
        M = torch.randn(n, 3, d, generator=g, dtype=torch.float64)
        A = Projection(M / M.norm(dim=-1, keepdim=True))
        event = (d,)
    truth = GaussianPrior.from_parameters(mean, factor, 0.1, event_shape=event)
    x = truth.sample(n, generator=g)
    y = GaussianObservation(A, noise_std).sample(x, generator=g)
    return truth, y, A, event


@pytest.mark.parametrize("kind", ["mask", "projection"])
def test_em_exact_recovers_truth_and_evidence_is_monotone(kind):
    g = _gen(17)
    n, noise_std = 4096, 0.05
    truth, y, A, event = _em_problem(kind, n, g, noise_std)
    evidence = []

    def callback(it, prior):
        evidence.append(prior.log_evidence(y, A, noise_std).sum().item())

    start = GaussianPrior(event_shape=event, rank=2).double().log_evidence(y, A, noise_std).sum().item()
    prior = fit_gaussian_em(
        y, A, noise_std, rank=2, iterations=40, event_shape=event, estep="exact",
        batch_size=4096, progress=False, callback=callback,
    )
    assert len(evidence) == 40
    ev = torch.tensor([start] + evidence, dtype=torch.float64)
    # EM never decreases the evidence (up to round-off).
    assert (ev[1:] >= ev[:-1] - 1e-8 * ev[:-1].abs()).all(), ev
    # ... and ends above the evidence of the truth minus a sampling-level margin.
    ev_truth = truth.log_evidence(y, A, noise_std).sum().item()
    assert ev[-1] > ev_truth - 5.0
    # Recovers the truth (the finite-sample MLE is within sampling error of it).
    C = truth.covariance()
    se = (torch.diagonal(C) / n).sqrt()
    assert ((prior.mean - truth.mean).abs() < 6 * se).all(), (prior.mean, truth.mean)
    rel = (prior.covariance() - C).norm() / C.norm()
    assert rel < 0.08, rel


def test_em_mmps_moves_toward_truth_on_images():
    """estep="mmps": a tiny image case (1, 3, 3), evidence improves over N(0, I)."""
    g = _gen(18)
    n, noise_std, event = 512, 0.05, (1, 3, 3)
    d = 9
    truth = GaussianPrior.from_parameters(
        torch.full((d,), 1.0, dtype=torch.float64) + 0.5 * torch.randn(d, generator=g, dtype=torch.float64),
        0.8 * torch.randn(d, 2, generator=g, dtype=torch.float64),
        0.05,
        event_shape=event,
    )
    mask = torch.rand(n, 1, 3, 3, generator=g) < 0.6
    mask[:, 0, 1, 1] = True
    A = Mask(mask, channels=1)
    x = truth.sample(n, generator=g)
    y = GaussianObservation(A, noise_std).sample(x, generator=g).float()
    prior = fit_gaussian_em(
        y, A, noise_std, rank=2, iterations=4, event_shape=event, estep="mmps",
        generator=_gen(19), sampler_steps=16, maxiter=3, batch_size=512, progress=False,
    )
    assert prior.mean.dtype == torch.float32
    start = GaussianPrior(event_shape=event, rank=2).double()
    y64 = y.double()
    ev0 = start.log_evidence(y64, A, noise_std).sum()
    ev = prior.double().log_evidence(y64, A, noise_std).sum()
    assert ev > ev0 + 0.5 * abs(ev0.item())
    # The fitted mean moved toward the truth.
    assert (prior.mean - truth.mean).norm() < 0.5 * truth.mean.norm()


def test_em_argument_validation():
    g = _gen(20)
    A, _ = _projection_case(4, g)
    y = torch.zeros(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="`estep`"):
        fit_gaussian_em(y, A, 0.1, 1, 1, (7,), estep="bogus", progress=False)
    with pytest.raises(ValueError, match="`generator`"):
        fit_gaussian_em(y, A, 0.1, 1, 1, (7,), estep="sample", progress=False)
    with pytest.raises(ValueError, match="`operator`"):
        fit_gaussian_em(y, A[:2], 0.1, 1, 1, (7,), progress=False)


def test_exact_posterior_with_one_operator_shared_by_a_batch():
    """A () operator applied to a batch of y equals the same operator repeated per observation."""
    from diffem.operators import Projection

    g = torch.Generator().manual_seed(3)
    prior = GaussianPrior.from_moments(torch.randn(4, generator=g, dtype=torch.float64),
                                       torch.eye(4, dtype=torch.float64) * 2, rank=4)
    matrix = torch.randn(2, 4, generator=g, dtype=torch.float64)
    y = torch.randn(3, 2, generator=g, dtype=torch.float64)
    shared = prior.posterior(y, Projection(matrix), 0.1)
    repeated = prior.posterior(y, Projection(matrix.expand(3, 2, 4).clone()), 0.1)
    assert shared[0].shape == (3, 4)
    torch.testing.assert_close(shared[0], repeated[0])
    torch.testing.assert_close(shared[1], repeated[1])
    torch.testing.assert_close(prior.log_evidence(y, Projection(matrix), 0.1),
                               prior.log_evidence(y, Projection(matrix.expand(3, 2, 4).clone()), 0.1))
    single_mean, single_cov = prior.posterior(y[0], Projection(matrix), 0.1)
    torch.testing.assert_close(single_mean, shared[0][0])
