"""The core properties on the device of ``pytest --device`` (default ``cpu``, as azula's ``tests/conftest.py``):
operator adjoints and pseudo-inverses, MMPS exactness on a Gaussian prior, CG and GMRES against the
direct solve, one E-step chunk and one M-step. On a GPU, run ``pytest tests/test_device.py --device cuda``;
CI runs them on the CPU. Each compares the device's result with the closed form or with the CPU's."""

from __future__ import annotations

import math

import pytest
import torch
from posterior_cases import CASES, gen, low_rank_prior
from test_operators import KINDS, make_operator

from diffem.linalg import conjugate_gradient, gmres
from diffem.operators import GaussianObservation
from diffem.posterior import MMPSDenoiser


@pytest.mark.parametrize("kind", KINDS)
def test_operator_adjoint_and_pinv_on_the_device(kind, device):
    g = gen(0)
    A, in_shape, out_shape = make_operator(kind, (3,), g)
    A = A.to(device)
    x = torch.randn(3, *in_shape, generator=g, dtype=torch.float64).to(device)
    y = torch.randn(3, *out_shape, generator=g, dtype=torch.float64).to(device)
    lhs = (A(x) * y).flatten(1).sum(1)
    rhs = (x * A.T(y)).flatten(1).sum(1)
    torch.testing.assert_close(lhs, rhs, rtol=1e-9, atol=1e-9)
    if A.has_pinv:
        torch.testing.assert_close(A(A.pinv(A(x))), A(x), rtol=1e-6, atol=1e-6)  # A A^+ A = A


@pytest.mark.parametrize("case", list(CASES))
def test_mmps_is_exact_for_a_gaussian_prior_on_the_device(case, device):
    """Converged CG under a Gaussian prior: the device's MMPS denoiser equals the CPU's, which
    tests/test_posterior.py checks against the closed form."""
    g = gen(1)
    B, noise_std, sigma = 4, 0.1, 0.5
    A, event = CASES[case](B, g)
    prior = low_rank_prior(math.prod(event), event, g)
    x = prior.sample(B, generator=g)
    y = GaussianObservation(A, noise_std).sample(x, generator=g)
    x_t = x + sigma * torch.randn(x.shape, generator=g, dtype=torch.float64)
    sigmas = torch.full((B,), sigma, dtype=torch.float64)
    m = math.prod(A.out_shape)
    on_cpu = MMPSDenoiser(prior, y, A, noise_std, maxiter=m)(x_t, sigmas)
    there = MMPSDenoiser(prior.to(device), y.to(device), A.to(device), noise_std, maxiter=m)(x_t.to(device), sigmas.to(device))
    assert there.device.type == device.type
    torch.testing.assert_close(there.cpu(), on_cpu, rtol=1e-8, atol=1e-8)


def test_cg_and_gmres_reach_the_direct_solve_on_the_device(device):
    g = gen(2)
    n = 12
    Q = torch.randn(3, n, n, generator=g, dtype=torch.float64)
    spd = (Q @ Q.mT + n * torch.eye(n, dtype=torch.float64)).to(device)
    general = (torch.randn(3, n, n, generator=g, dtype=torch.float64) + n * torch.eye(n, dtype=torch.float64)).to(device)
    b = torch.randn(3, n, generator=g, dtype=torch.float64).to(device)

    def matvec(M):
        return lambda v: (M @ v[..., None])[..., 0]

    torch.testing.assert_close(conjugate_gradient(matvec(spd), b, maxiter=n), torch.linalg.solve(spd, b),
                               rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gmres(matvec(general), b, maxiter=n), torch.linalg.solve(general, b),
                               rtol=1e-6, atol=1e-7)


def test_an_estep_chunk_on_the_device_matches_the_cpu(device):
    """One E-step chunk (diffem.em.estep.sample_chunk): the same seeded samples on the device as on the CPU."""
    from test_posterior_estep import _chunk

    cpu, there = _chunk([]), _chunk([], device)
    assert there.device.type == device.type and there.shape == cpu.shape
    torch.testing.assert_close(there.cpu(), cpu, rtol=1e-4, atol=1e-4)


def test_one_mstep_on_the_device(tmp_path, device):
    """A few M-step steps on the device: the loss is finite and the weights move; on the CPU, exactly as CI runs it."""
    from accelerate import Accelerator

    from diffem.config import load_config
    from diffem.em.mstep import run_mstep
    from diffem.tasks import get_task

    config = load_config("manifold", "smoke", overrides=["mstep.steps=4", f"output_dir={tmp_path}"])
    task = get_task(config)
    samples = torch.randn(48, 5, generator=gen(3))
    backbone = task.backbone(0)
    before = [p.detach().clone() for p in backbone.parameters()]
    accelerator = Accelerator(cpu=device.type == "cpu")
    model, stats = run_mstep(accelerator, config, task, 1, samples, backbone, tmp_path / "mstep", tmp_path)
    assert math.isfinite(stats["train_loss"]) and stats["mstep_steps"] == 4
    assert next(model.parameters()).device.type == device.type
    assert any(not torch.equal(a, b.detach().cpu()) for a, b in zip(before, model.parameters()))
