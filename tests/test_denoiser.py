"""Tests of diffem.denoiser: EDM preconditioning, noise embedding, training loss, t ~ Beta(3, 3)."""

import math

import pytest
import torch
from torch import nn

from diffem.denoiser import SIGMA_MAX, SIGMA_MIN, Denoiser, sample_beta33, sigma_of_t
from diffem.networks import MLP, build_unet


def _gen(seed):
    return torch.Generator().manual_seed(seed)


class Zero(nn.Module):
    def forward(self, x, c_noise):
        return torch.zeros_like(x)


class Echo(nn.Module):
    """Returns its input and records c_noise."""

    def forward(self, x, c_noise):
        self.c_noise = c_noise
        return x


EVENTS = [(5,), (3, 4, 4)]


def _sigmas(B, dtype=torch.float64):
    return torch.exp(torch.linspace(math.log(1e-3), math.log(1e2), B, dtype=dtype))


@pytest.mark.parametrize("event", EVENTS)
@pytest.mark.parametrize("B", [1, 4])
def test_zero_backbone_gives_skip_connection(event, B):
    x_t = torch.randn(B, *event, generator=_gen(0), dtype=torch.float64)
    sigma = _sigmas(B)
    out = Denoiser(Zero())(x_t, sigma)
    expected = x_t / (sigma**2 + 1).reshape(-1, *[1] * len(event))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("event", EVENTS)
def test_preconditioning_coefficients(event):
    r"""F(u) = u: d = c_skip x + c_out c_in x = x (1 + sigma) / (sigma^2 + 1); c_noise = log sigma."""
    B = 4
    x_t = torch.randn(B, *event, generator=_gen(1), dtype=torch.float64)
    sigma = _sigmas(B)
    echo = Echo()
    out = Denoiser(echo)(x_t, sigma)
    expected = x_t * ((1 + sigma) / (sigma**2 + 1)).reshape(-1, *[1] * len(event))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=0)
    assert echo.c_noise.shape == (B,) and echo.c_noise.is_floating_point()
    torch.testing.assert_close(echo.c_noise, sigma.log(), rtol=0, atol=1e-14)
    # A scalar sigma is broadcast to (B,).
    Denoiser(echo)(x_t, 0.5)
    torch.testing.assert_close(echo.c_noise, torch.full((B,), math.log(0.5), dtype=torch.float64))


def test_unet_receives_float_c_noise_equal_to_log_sigma():
    unet = build_unet("tiny", sample_size=8)
    seen = {}

    def pre_hook(module, args, kwargs):
        seen["timestep"] = args[1] if len(args) > 1 else kwargs["timestep"]

    def proj_hook(module, args):
        seen["projected"] = args[0]

    unet.register_forward_pre_hook(pre_hook, with_kwargs=True)
    unet.time_proj.register_forward_pre_hook(proj_hook)
    den = Denoiser(unet)
    B = 3
    x_t = torch.randn(B, 3, 8, 8, generator=_gen(2))
    sigma = torch.tensor([0.013, 0.5, 37.0])
    with torch.no_grad():
        out = den(x_t, sigma)
    assert out.shape == x_t.shape
    for key in ("timestep", "projected"):
        c = seen[key]
        assert torch.is_tensor(c) and c.is_floating_point() and c.shape == (B,), key
        torch.testing.assert_close(c, sigma.log(), rtol=0, atol=1e-6)
    # Not truncated: sigmas whose logs share their integer part give different outputs.
    with torch.no_grad():
        a = den(x_t, torch.full((B,), 1.2))  # log = 0.18
        b = den(x_t, torch.full((B,), 1.9))  # log = 0.64
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("sigma", [0.0, -1.0])
def test_nonpositive_sigma_raises(sigma):
    den = Denoiser(Zero())
    with pytest.raises(ValueError, match="`sigma`"):
        den(torch.zeros(2, 3), sigma)
    with pytest.raises(ValueError, match="`sigma`"):
        den(torch.zeros(2, 3), torch.tensor([1.0, sigma]))


def test_sigma_of_wrong_shape_raises():
    with pytest.raises(ValueError, match="`sigma`"):
        Denoiser(Zero())(torch.zeros(2, 3), torch.ones(3))


def test_sigma_schedule_endpoints_and_monotone():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    s = sigma_of_t(t)
    torch.testing.assert_close(s[0], torch.tensor(SIGMA_MIN, dtype=torch.float64))
    torch.testing.assert_close(s[-1], torch.tensor(SIGMA_MAX, dtype=torch.float64))
    assert (s[1:] > s[:-1]).all()
    # Log-linear: constant ratio between consecutive levels.
    r = s[1:] / s[:-1]
    torch.testing.assert_close(r, r[0].expand_as(r))


# -- t ~ Beta(3, 3) ---------------------------------------------------------------------------------------


def test_sample_beta33_moments_and_support():
    n = 200_000
    t = sample_beta33(n, _gen(3), dtype=torch.float64)
    assert t.shape == (n,) and ((t > 0) & (t < 1)).all()
    var = 1 / 28  # Beta(3, 3): a b / ((a + b)^2 (a + b + 1)) = 9 / (36 * 7)
    assert abs(t.mean().item() - 0.5) < 5 * math.sqrt(var / n)
    # Var of the sample variance ~ (mu4 - var^2) / n; Beta(3, 3) has mu4 = 1/336.
    assert abs(t.var().item() - var) < 5 * math.sqrt((1 / 336 - var**2) / n)
    # Reproducible from the seed.
    assert torch.equal(sample_beta33(10, _gen(4)), sample_beta33(10, _gen(4)))


# -- loss ------------------------------------------------------------------------------------------------


def test_zero_backbone_loss_is_one_in_expectation():
    r"""With F = 0 and x ~ N(0, I) the weighted error is (1/s^2 + 1) s^2 / (s^2 + 1) = 1 for every s."""
    den = Denoiser(Zero())
    g = _gen(5)
    x = torch.randn(100_000, 2, generator=g, dtype=torch.float64)
    loss = den.loss(x, generator=g)
    # Per-sample loss = mean over 2 dims of (s z - s^2 x)^2 / (s^2 (s^2 + 1)) ~ chi2_2 / 2: std 1.
    assert abs(loss.item() - 1) < 5 / math.sqrt(100_000)


def _tiny_mlp(seed=0):
    torch.manual_seed(seed)
    return MLP(features=2, hidden_features=(32, 32), emb_features=16)


def _data(n, g):
    L = torch.tensor([[1.0, 0.0], [0.8, 0.3]])
    return torch.randn(n, 2, generator=g) @ L.mT + torch.tensor([0.5, -0.5])


def test_loss_finite_and_deterministic():
    den = Denoiser(_tiny_mlp())
    x = _data(64, _gen(6))
    l1 = den.loss(x, generator=_gen(7))
    l2 = den.loss(x, generator=_gen(7))
    l3 = den.loss(x, generator=_gen(8))
    assert l1.dim() == 0 and torch.isfinite(l1)
    assert torch.equal(l1, l2) and not torch.equal(l1, l3)
    l1.backward()
    assert all(torch.isfinite(p.grad).all() for p in den.parameters())
    with pytest.raises(ValueError, match="`generator`"):
        den.loss(x, generator=None)


def test_loss_with_given_noise_splits_into_slices():
    # The M-step draws a global batch's noise once and gives each process a slice: the mean
    # of equal slices' losses is the global batch's loss.
    den = Denoiser(_tiny_mlp())
    x = _data(64, _gen(6))
    sigma, z = den.draw_noise(x, _gen(7))
    assert sigma.shape == (64,) and z.shape == x.shape and (sigma > 0).all()
    whole = den.loss(x, generator=_gen(7))
    torch.testing.assert_close(den.loss(x, sigma=sigma, noise=z), whole)
    halves = [den.loss(x[s], sigma=sigma[s], noise=z[s]) for s in (slice(0, 32), slice(32, 64))]
    torch.testing.assert_close((halves[0] + halves[1]) / 2, whole)
    with pytest.raises(ValueError, match="`sigma` and `noise`"):
        den.loss(x, sigma=sigma)
    with pytest.raises(ValueError, match="`noise` must have the shape"):
        den.loss(x, sigma=sigma, noise=z[:3])
    with pytest.raises(ValueError, match="`sigma`"):
        den.loss(x, sigma=sigma[:3], noise=z)


def test_loss_decreases_with_adam():
    den = Denoiser(_tiny_mlp())
    g = _gen(9)
    x_eval = _data(4096, _gen(10))

    def eval_loss():
        with torch.no_grad():
            return den.loss(x_eval, generator=_gen(11)).item()  # same noise every time

    before = eval_loss()
    opt = torch.optim.Adam(den.parameters(), lr=3e-3)
    for _ in range(50):
        loss = den.loss(_data(256, g), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert math.isfinite(after) and after < 0.9 * before, (before, after)
