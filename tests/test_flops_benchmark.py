"""benchmarks/flops.py: the FLOP counts behind the paper-scale cost table are right on a small network."""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from diffem.denoiser import Denoiser
from diffem.operators import Mask
from diffem.posterior import MMPSDenoiser

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def flops():
    spec = importlib.util.spec_from_file_location("flops_benchmark", ROOT / "benchmarks" / "flops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Linear(nn.Module):
    """A linear backbone (x, c_noise) -> W x: its FLOPs are 2 d^2 per sample and pass."""

    def __init__(self, d: int):
        super().__init__()
        self.d = d
        self.weight = nn.Parameter(torch.randn(d, d) / d**0.5)

    def forward(self, x, c_noise):
        return (x.flatten(1) @ self.weight.T).reshape(x.shape)


@pytest.mark.parametrize("maxiter", [1, 3])
def test_mmps_costs_one_forward_and_maxiter_vjps(flops, maxiter):
    d, b = 48, 4  # images (3, 4, 4)
    denoiser = Denoiser(_Linear(d))
    g = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(b, 3, 4, 4, generator=g), torch.ones(b)
    forward = flops.count_flops(lambda: denoiser(x, sigma))
    assert forward == 2 * b * d * d
    operator = Mask(torch.rand(b, 1, 4, 4, generator=g) < 0.5, channels=3)
    posterior = MMPSDenoiser(denoiser, torch.randn(b, 3, 4, 4, generator=g), operator, 0.1, maxiter=maxiter)
    assert flops.count_flops(lambda: posterior(x, sigma)) == (1 + maxiter) * forward
    # M-step: forward, and the backward's weight gradient (the input x needs none; deeper
    # layers also need their input gradient, hence ~3 forwards for a real network).
    assert flops.count_flops(lambda: denoiser.loss(x, g).backward()) == 2 * forward


def test_projection_arithmetic(flops):
    counts = {"mmps_flops_per_sample": 2e9, "mstep_flops_per_sample": 3e9, "forward_flops_per_sample": 1e9}
    work = {"observations": 1000, "estep_steps": 10, "estep_calls_per_step": 2, "mstep_steps": 50, "mstep_batch": 100,
            "eval_samples": 10, "eval_steps": 5, "eval_calls_per_step": 1, "laps": 4, "evaluations_after_lap_0": 2}
    out = flops.project(counts, work, utilisation=0.5)
    assert out["estep_flops_per_lap"] == 1000 * 10 * 2 * 2e9 and out["mstep_flops_per_lap"] == 50 * 100 * 3e9
    assert out["run_flops"] == 4 * (4e13 + 1.5e13) + 2 * 10 * 5 * 1e9
    h100 = out["gpu_hours"]["4xH100"]
    assert h100["lap_h"] == pytest.approx(5.5e13 / (0.5 * 989e12 * 4) / 3600)
