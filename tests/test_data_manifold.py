"""Tests for diffem.data.manifold: the random curve, projections, observations."""

from __future__ import annotations

import pytest
import torch

from diffem.data.manifold import ManifoldCurve, make_observations, manifold_points, random_projections


@pytest.fixture(scope="module")
def curve():
    return ManifoldCurve(seed=0)


def _nn_distance(x: torch.Tensor) -> torch.Tensor:
    d = torch.cdist(x.double(), x.double())
    d.fill_diagonal_(float("inf"))
    return d.min(dim=1).values


def test_points_in_range(curve):
    x = manifold_points(65536, seed=0, curve=curve)
    assert x.shape == (65536, 5) and x.dtype == torch.float32
    assert x.min() >= -2 and x.max() <= 2
    # the rescaling is tight: the extremes are (nearly) reached
    assert torch.allclose(x.min(dim=0).values, torch.full((5,), -2.0), atol=0.05)
    assert torch.allclose(x.max(dim=0).values, torch.full((5,), 2.0), atol=0.05)


def test_grid_extremes_exact(curve):
    t = torch.linspace(0, 1, 2**16 + 1, dtype=torch.float64)
    x = curve(t)
    assert (x.min(dim=0).values == -2).all() and (x.max(dim=0).values == 2).all()


@pytest.mark.parametrize("features", [2, 5, 7])
def test_features(features):
    c = ManifoldCurve(seed=1, features=features, grid=4097)
    assert c.sample(10, seed=0).shape == (10, features)
    assert c(torch.rand(3, 4, generator=torch.Generator().manual_seed(0))).shape == (3, 4, features)


def test_same_seed_same_curve(curve):
    other = ManifoldCurve(seed=0)
    t = torch.linspace(0, 1, 101)
    assert torch.equal(curve(t), other(t))
    assert torch.equal(manifold_points(100, 0, curve=curve), manifold_points(100, 0))
    different = ManifoldCurve(seed=1)
    assert (curve(t) - different(t)).abs().max() > 0.5


def test_train_and_eval_differ(curve):
    train = manifold_points(1000, 0, "train", curve=curve)
    evaluation = manifold_points(1000, 0, "eval", curve=curve)
    assert not torch.allclose(train, evaluation)
    # same distribution: per-feature means agree within sampling error
    assert torch.allclose(train.mean(0), evaluation.mean(0), atol=0.25)


def test_sample_generator_and_seed(curve):
    a = curve.sample(50, generator=torch.Generator().manual_seed(5))
    b = curve.sample(50, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert torch.equal(curve.sample(50, seed=7), curve.sample(50, seed=7))
    with pytest.raises(ValueError, match="seed"):
        curve.sample(5)
    with pytest.raises(ValueError, match="`n`"):
        curve.sample(0, seed=0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="seed"):
        ManifoldCurve(seed=-1)
    with pytest.raises(ValueError, match="features"):
        ManifoldCurve(features=0)
    with pytest.raises(ValueError, match="split"):
        manifold_points(10, split="test")
    with pytest.raises(ValueError, match="`t`"):
        ManifoldCurve(grid=17)(torch.tensor([1.5]))


def test_curve_is_one_dimensional(curve):
    # nearest-neighbour distances of n points on a 1-D curve shrink like 1 / n
    # (like n^{-1/5} in a 5-D volume)
    small = _nn_distance(curve.sample(500, seed=1)).median()
    large = _nn_distance(curve.sample(4000, seed=1)).median()
    assert 5.0 < (small / large).item() < 11.0


def test_curve_is_smooth(curve):
    t = torch.linspace(0, 1, 10001, dtype=torch.float64)
    x = curve(t).double()
    steps = (x[1:] - x[:-1]).norm(dim=-1)
    assert steps.max() < 0.05  # continuous: no jumps between neighbouring parameters


def test_projection_rows_unit_norm():
    A = random_projections(1000, seed=0)
    assert A.shape == (1000, 2, 5) and A.dtype == torch.float32
    assert torch.allclose(A.norm(dim=-1), torch.ones(1000, 2), atol=1e-6)
    assert torch.equal(A, random_projections(1000, seed=0))
    assert not torch.equal(A, random_projections(1000, seed=1))
    # isotropic directions: mean ~ 0, E[a_j^2] = 1/5
    assert A.mean().abs() < 0.02
    assert torch.allclose((A**2).mean(dim=(0, 1)), torch.full((5,), 0.2), atol=0.02)
    assert random_projections(3, 0, in_features=4, out_features=3).shape == (3, 3, 4)


def test_observation_noise_statistics(curve):
    x = manifold_points(65536, 0, curve=curve)
    A = random_projections(65536, seed=0)
    ds = make_observations(x, A, noise_std=1e-2, seed=0)
    assert len(ds) == 65536
    y, matrix = ds["y"][:], ds["matrix"][:]
    assert y.shape == (65536, 2) and matrix.shape == (65536, 2, 5)
    assert torch.equal(matrix, A)
    residual = (y.double() - torch.einsum("nij,nj->ni", A.double(), x.double())).flatten()
    n = residual.numel()
    # float32 storage of y adds < 1e-6 rounding noise
    assert abs(residual.std().item() / 1e-2 - 1) < 5 / (2 * n) ** 0.5 + 1e-3
    assert abs(residual.mean().item()) < 5 * 1e-2 / n**0.5


def test_observations_deterministic_and_no_ground_truth(curve):
    x = manifold_points(256, 0, curve=curve)
    A = random_projections(256, seed=0)
    a = make_observations(x, A, seed=3)
    b = make_observations(x, A, seed=3)
    c = make_observations(x, A, seed=4)
    assert a.column_names == ["y", "matrix"]
    assert torch.equal(a["y"][:], b["y"][:]) and not torch.equal(a["y"][:], c["y"][:])
    row = a[0]
    assert set(row) == {"y", "matrix"} and row["y"].shape == (2,)


def test_observation_bad_input():
    x = torch.zeros(4, 5)
    A = random_projections(4, 0)
    with pytest.raises(ValueError, match="noise_std"):
        make_observations(x, A, noise_std=0.0)
    with pytest.raises(ValueError, match="matrices"):
        make_observations(x, A[:3])
    with pytest.raises(ValueError, match="`x`"):
        make_observations(x.flatten(), A)
