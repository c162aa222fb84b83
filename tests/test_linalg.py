"""Tests of diffem.linalg: batched conjugate gradient."""

import pytest
import torch

from diffem.linalg import conjugate_gradient, gmres, solve


def _spd(B, n, g, cond=50.0):
    """Random SPD matrices (B, n, n) with eigenvalues spread over [1, cond]."""
    q, _ = torch.linalg.qr(torch.randn(B, n, n, generator=g, dtype=torch.float64))
    lam = torch.exp(torch.rand(B, n, generator=g, dtype=torch.float64) * torch.log(torch.tensor(cond)))
    return q @ torch.diag_embed(lam) @ q.mT


def _matvec(M):
    return lambda v: (M @ v[..., None])[..., 0]


@pytest.mark.parametrize("B, n", [(1, 3), (4, 8), (7, 16)])
def test_cg_reaches_direct_solve_in_n_iterations(B, n):
    g = torch.Generator().manual_seed(B * 100 + n)
    M = _spd(B, n, g)
    b = torch.randn(B, n, generator=g, dtype=torch.float64)
    x = conjugate_gradient(_matvec(M), b, maxiter=n)
    # Exact in n iterations in exact arithmetic; float64 loses some orthogonality (cond 50).
    torch.testing.assert_close(x, torch.linalg.solve(M, b), rtol=1e-6, atol=1e-7)


def test_cg_event_shape_is_preserved():
    """b of shape (B, C, H, W): CG runs on the flattened events, per sample."""
    g = torch.Generator().manual_seed(0)
    B, shape = 3, (2, 2, 3)
    n = 12
    M = _spd(B, n, g)
    b = torch.randn(B, *shape, generator=g, dtype=torch.float64)

    def matvec(v):
        return (M @ v.reshape(B, n, 1)).reshape(B, *shape)

    x = conjugate_gradient(matvec, b, maxiter=n)
    assert x.shape == b.shape
    torch.testing.assert_close(x.reshape(B, n), torch.linalg.solve(M, b.reshape(B, n)), rtol=1e-8, atol=1e-8)


def test_cg_fewer_iterations_reduce_the_residual():
    """Each CG iteration minimises the M-norm of the error over a growing Krylov space."""
    g = torch.Generator().manual_seed(1)
    B, n = 5, 10
    M = _spd(B, n, g)
    b = torch.randn(B, n, generator=g, dtype=torch.float64)
    x_star = torch.linalg.solve(M, b)
    errors = []
    for k in range(1, n + 1):
        e = conjugate_gradient(_matvec(M), b, maxiter=k) - x_star
        errors.append(torch.einsum("bi,bij,bj->b", e, M, e))
    errors = torch.stack(errors)  # (n, B)
    assert (errors[1:] <= errors[:-1] * (1 + 1e-10) + 1e-20).all()


def test_cg_one_iteration_is_the_steepest_descent_step():
    g = torch.Generator().manual_seed(2)
    M = _spd(3, 6, g)
    b = torch.randn(3, 6, generator=g, dtype=torch.float64)
    alpha = (b * b).sum(-1) / torch.einsum("bi,bij,bj->b", b, M, b)
    torch.testing.assert_close(conjugate_gradient(_matvec(M), b, maxiter=1), alpha[:, None] * b)


def test_cg_samples_are_independent():
    """Sample i of the solution depends only on system i, whatever the other samples are."""
    g = torch.Generator().manual_seed(3)
    B, n = 4, 6
    M = _spd(B, n, g)
    b = torch.randn(B, n, generator=g, dtype=torch.float64)
    for maxiter in (1, 3, n):
        together = conjugate_gradient(_matvec(M), b, maxiter=maxiter)
        for i in range(B):
            alone = conjugate_gradient(_matvec(M[i : i + 1]), b[i : i + 1], maxiter=maxiter)
            torch.testing.assert_close(together[i : i + 1], alone, rtol=1e-12, atol=1e-14)
        # Changing sample 0 (even to a badly scaled system) leaves the others untouched.
        M2, b2 = M.clone(), b.clone()
        M2[0] *= 1e6
        b2[0] = torch.randn(n, generator=g, dtype=torch.float64) * 1e3
        other = conjugate_gradient(_matvec(M2), b2, maxiter=maxiter)
        torch.testing.assert_close(other[1:], together[1:], rtol=1e-12, atol=1e-14)


def test_cg_zero_right_hand_side_stays_zero():
    g = torch.Generator().manual_seed(4)
    B, n = 3, 5
    M = _spd(B, n, g)
    b = torch.randn(B, n, generator=g, dtype=torch.float64)
    b[1] = 0
    for tol in (0.0, 1e-6):
        x = conjugate_gradient(_matvec(M), b, maxiter=2 * n, tol=tol)
        assert torch.isfinite(x).all()
        assert (x[1] == 0).all()
        torch.testing.assert_close(x[[0, 2]], torch.linalg.solve(M[[0, 2]], b[[0, 2]]), rtol=1e-8, atol=1e-8)


def test_cg_tolerance_freezes_converged_samples():
    """A sample that meets the tolerance stops updating (no NaN from 0/0 afterwards)."""
    g = torch.Generator().manual_seed(5)
    B, n = 3, 8
    M = _spd(B, n, g)
    M[0] = 2.0 * torch.eye(n, dtype=torch.float64)  # converges in one iteration
    b = torch.randn(B, n, generator=g, dtype=torch.float64)
    calls = []

    def matvec(v):
        calls.append(v[0].clone())
        return _matvec(M)(v)

    x = conjugate_gradient(matvec, b, maxiter=3 * n, tol=1e-10)
    assert torch.isfinite(x).all()
    torch.testing.assert_close(x[0], b[0] / 2, rtol=0, atol=1e-15)
    # After sample 0 converged, its search direction is frozen (never updated again).
    assert all(torch.equal(c, calls[1]) for c in calls[1:])
    torch.testing.assert_close(x, torch.linalg.solve(M, b), rtol=1e-8, atol=1e-8)
    r = b - _matvec(M)(x)
    assert (r.norm(dim=-1) <= 1e-8 * b.norm(dim=-1)).all()


def test_cg_with_initial_guess():
    g = torch.Generator().manual_seed(6)
    B, n = 2, 5
    M = _spd(B, n, g)
    b = torch.randn(B, n, generator=g, dtype=torch.float64)
    x_star = torch.linalg.solve(M, b)
    # Starting at the solution: stays there.
    torch.testing.assert_close(conjugate_gradient(_matvec(M), b, x0=x_star, maxiter=3), x_star, rtol=1e-10, atol=1e-12)
    x0 = torch.randn(B, n, generator=g, dtype=torch.float64)
    torch.testing.assert_close(conjugate_gradient(_matvec(M), b, x0=x0, maxiter=n), x_star, rtol=1e-8, atol=1e-8)
    with pytest.raises(ValueError, match="`x0`"):
        conjugate_gradient(_matvec(M), b, x0=x0[:1], maxiter=1)


@pytest.mark.parametrize("maxiter", [0, -1, 1.5])
def test_cg_bad_maxiter_raises(maxiter):
    b = torch.ones(2, 3)
    with pytest.raises(ValueError, match="`maxiter`"):
        conjugate_gradient(lambda v: v, b, maxiter=maxiter)


def test_cg_bad_tol_and_shape_raise():
    with pytest.raises(ValueError, match="`tol`"):
        conjugate_gradient(lambda v: v, torch.ones(2, 3), tol=-1.0)
    with pytest.raises(ValueError, match="`b`"):
        conjugate_gradient(lambda v: v, torch.ones(3))


# -- companion output ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("maxiter", [1, 3, 8])
@pytest.mark.parametrize("tol", [0.0, 1e-3])
def test_cg_companion_equals_the_map_of_the_solution(maxiter, tol):
    """With ``companion``, W v is accumulated inside CG: equal to applying W to the returned v."""
    g = torch.Generator().manual_seed(7)
    B, n, m = 4, 8, 5
    M = _spd(B, n, g)
    M[0] = 3.0 * torch.eye(n, dtype=torch.float64)  # converges at once: frozen by `tol` afterwards
    W = torch.randn(B, m, n, generator=g, dtype=torch.float64)
    b = torch.randn(B, n, generator=g, dtype=torch.float64)

    def matvec(p):
        return _matvec(M)(p), _matvec(W)(p)

    v, wv = conjugate_gradient(matvec, b, maxiter=maxiter, tol=tol, companion=True)
    assert wv.shape == (B, m)
    torch.testing.assert_close(v, conjugate_gradient(_matvec(M), b, maxiter=maxiter, tol=tol), rtol=0, atol=0)
    torch.testing.assert_close(wv, _matvec(W)(v), rtol=1e-12, atol=1e-12)


def test_cg_companion_under_the_curvature_guard():
    """An indefinite M stops a sample at its first non-positive curvature; W v stays consistent."""
    g = torch.Generator().manual_seed(8)
    B, n = 3, 6
    q, _ = torch.linalg.qr(torch.randn(B, n, n, generator=g, dtype=torch.float64))
    lam = torch.linspace(-1.0, 2.0, n, dtype=torch.float64).expand(B, n)
    M = q @ torch.diag_embed(lam) @ q.mT  # indefinite
    W = torch.randn(B, n, n, generator=g, dtype=torch.float64)
    b = torch.randn(B, n, generator=g, dtype=torch.float64)
    curvatures = []

    def matvec(p):
        Mp = _matvec(M)(p)
        curvatures.append((p * Mp).sum(-1))
        return Mp, _matvec(W)(p)

    v, wv = conjugate_gradient(matvec, b, maxiter=n, companion=True)
    assert (torch.stack(curvatures) <= 0).any()  # the guard was met
    assert torch.isfinite(v).all()
    torch.testing.assert_close(wv, _matvec(W)(v), rtol=1e-12, atol=1e-12)


def test_cg_companion_rejects_an_initial_guess():
    with pytest.raises(ValueError, match="`companion`"):
        conjugate_gradient(lambda v: (v, v), torch.ones(2, 3), x0=torch.zeros(2, 3), companion=True)


# -- GMRES -----------------------------------------------------------------------------------------
def _nonsymmetric(B: int, n: int, seed: int = 0) -> torch.Tensor:
    """I + a skew-heavy random part: nonsingular, far from symmetric (as Sigma_y + A J A^T of a learned J)."""
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(B, n, n, generator=g, dtype=torch.float64)
    return torch.eye(n, dtype=torch.float64) + 0.3 * (S @ S.transpose(1, 2)) / n + 2.0 * (S - S.transpose(1, 2)) / n**0.5


def test_gmres_solves_a_nonsymmetric_system_where_cg_does_not():
    B, n = 3, 8
    M = _nonsymmetric(B, n)
    b = torch.randn(B, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    matvec = lambda p: torch.einsum("bij,bj->bi", M, p)  # noqa: E731
    exact = torch.linalg.solve(M, b)
    torch.testing.assert_close(gmres(matvec, b, maxiter=n), exact, rtol=1e-9, atol=1e-10)
    cg = conjugate_gradient(matvec, b, maxiter=n)
    assert float((cg - exact).norm(dim=1).max()) > 1e-3  # CG's symmetric assumption fails here


def test_gmres_residual_never_grows_with_the_krylov_dimension_and_matches_cg_on_spd():
    B, n = 2, 7
    M = _nonsymmetric(B, n, seed=2)
    b = torch.randn(B, n, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    matvec = lambda p: torch.einsum("bij,bj->bi", M, p)  # noqa: E731
    residuals = [(matvec(gmres(matvec, b, maxiter=k)) - b).norm(dim=1) for k in range(1, n + 1)]
    for a, c in zip(residuals, residuals[1:]):
        assert bool((c <= a + 1e-12).all())  # minimal residual over nested Krylov spaces
    # one iteration: the minimal-residual step along b, c = <Mb, b> / <Mb, Mb>
    Mb = matvec(b)
    one = ((Mb * b).sum(1) / (Mb * Mb).sum(1))[:, None] * b
    torch.testing.assert_close(gmres(matvec, b, maxiter=1), one)
    spd = M @ M.transpose(1, 2)
    mv = lambda p: torch.einsum("bij,bj->bi", spd, p)  # noqa: E731
    torch.testing.assert_close(gmres(mv, b, maxiter=n), conjugate_gradient(mv, b, maxiter=n), rtol=1e-7, atol=1e-8)


def test_gmres_tolerance_breakdown_zero_rhs_and_companion():
    B, n = 4, 6
    M = _nonsymmetric(B, n, seed=4)
    b = torch.randn(B, n, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    b[1] = 0.0  # a zero right-hand side stays zero
    matvec = lambda p: torch.einsum("bij,bj->bi", M, p)  # noqa: E731
    v = gmres(matvec, b, maxiter=n, tol=0.3)
    rel = (matvec(v) - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-300)
    assert bool((rel[[0, 2, 3]] <= 0.3 + 1e-12).all()) and float(v[1].abs().max()) == 0.0
    # M = 2 I: exact after one matvec (the Krylov space is exhausted), later iterations add nothing
    torch.testing.assert_close(gmres(lambda p: 2 * p, b, maxiter=4), b / 2)
    W = torch.randn(B, 3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    pair = lambda p: (matvec(p), torch.einsum("bij,bj->bi", W, p))  # noqa: E731
    v, wv = gmres(pair, b, maxiter=3, companion=True)
    torch.testing.assert_close(wv, torch.einsum("bij,bj->bi", W, v))
    # float32 vectors, float64 inner products: the dtype of b is kept
    v32 = gmres(lambda p: matvec(p.double()).float(), b.float(), maxiter=n)
    assert v32.dtype == torch.float32 and float((matvec(v32.double()) - b).norm(dim=1).max()) < 1e-4
    with pytest.raises(ValueError, match="solver"):
        solve("minres", matvec, b)
    with pytest.raises(ValueError, match="maxiter"):
        gmres(matvec, b, maxiter=0)
