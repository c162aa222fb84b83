"""The manifold metric: entropic OT through POT and the authors' divergence."""

import pytest
import torch

from diffem.data.manifold import manifold_points
from diffem.ot import entropic_ot, manifold_divergence


def test_divergence_orders_distributions():
    truth = manifold_points(1024, 0, "eval")
    a, b = truth[:512], truth[512:]
    good = manifold_points(512, 0, "train")
    g = torch.Generator().manual_seed(0)
    noisy = good + 0.3 * torch.randn(good.shape, generator=g)
    gaussian = torch.randn(good.shape, generator=g)
    options = dict(reg=1e-2, maxiter=200)
    d_good, d_noisy, d_gauss = (manifold_divergence(x, a, b, **options) for x in (good, noisy, gaussian))
    assert d_good < d_noisy < d_gauss
    assert d_good < 0.1 * d_gauss


def test_floor_outliers_and_baseline():
    truth = manifold_points(256, 0, "eval")
    a, b = truth[:128], truth[128:]
    assert manifold_divergence(a, a, b, reg=1e-2, maxiter=100) == 1e-6  # W(a, a) < W(a, b): floored
    polluted = torch.cat([b, torch.full((4, 5), 50.0)])
    base = entropic_ot(a, b, reg=1e-2, maxiter=100)
    assert manifold_divergence(polluted, a, b, reg=1e-2, maxiter=100, baseline=base) == pytest.approx(
        manifold_divergence(b, a, b, reg=1e-2, maxiter=100), abs=1e-9
    )


def test_bad_input():
    x = torch.zeros(4, 5)
    with pytest.raises(ValueError, match="`u`"):
        entropic_ot(torch.zeros(4), x)
    with pytest.raises(ValueError, match="dimension"):
        entropic_ot(x, torch.zeros(4, 3))
    with pytest.raises(ValueError, match="`samples`"):
        manifold_divergence(torch.full((4, 5), 10.0), x, x)
