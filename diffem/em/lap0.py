r"""Lap 0 of EM: a Gaussian prior fitted to the observations alone, by EM.

:func:`fit_gaussian_em` is the algorithm (exact, sampling or MMPS E-steps; PPCA M-step);
:func:`run_lap0` is the EM trainer's phase around it (the first ``lap0.observations``
observations, seeded generator, float32 result).

References:
    Dempster, Laird & Rubin 1977; Tipping & Bishop 1999 (PPCA); Rozet et al. 2024,
    arXiv:2405.13712, Section 4 (lap 0).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..config import EMConfig
from ..gaussian import GaussianPrior
from ..observations import ObservationSet
from ..operators import LinearOperator, check_batch
from ..random import derive_seed
from ..spec import SamplerSpec
from .seeds import LAP0

__all__ = ["fit_gaussian_em", "run_lap0"]


def fit_gaussian_em(
    y: Tensor,
    operator: LinearOperator,
    noise_std: float,
    rank: int,
    iterations: int,
    event_shape: Sequence[int],
    estep: str = "exact",
    generator: torch.Generator | None = None,
    sampler_steps: int = 64,
    maxiter: int = 1,
    batch_size: int = 1024,
    sampler: SamplerSpec | None = None,
    prior: GaussianPrior | None = None,
    progress: bool = True,
    callback=None,
) -> GaussianPrior:
    r"""Fit a Gaussian prior to observations only, by expectation-maximization (lap 0).

    Starts from :math:`\mathcal{N}(0, I)` (or ``prior``). Each iteration:

    - ``estep="exact"``: the exact posteriors :math:`\mathcal{N}(m_i, S_i)` (dense; small
      ``d``); the M-step is PPCA of the expected scatter
      :math:`\frac{1}{N}\sum_i S_i + (m_i - \mu)(m_i - \mu)^T`. This is exact EM: the
      log-evidence never decreases.
    - ``estep="sample"``: one exact posterior sample per observation (dense; small ``d``),
      then PPCA of the samples (stochastic EM).
    - ``estep="mmps"``: one posterior sample per observation by MMPS with the prior's exact
      denoiser and the sampler ``sampler`` (default: DDPM of ``sampler_steps`` steps and
      ``maxiter`` CG iterations; any ``d``: images), then PPCA of the samples. The
      authors' ``fit_moments`` runs CG to a tolerance (``SamplerSpec(tol=1e-3)``, ``maxiter`` a cap).

    Arguments:
        y: Observations ``(N, *out_shape)``.
        operator: Operator with batch shape ``(N,)``.
        noise_std: :math:`\sigma_y > 0`.
        rank: PPCA rank ``r``.
        iterations: Number of EM iterations (>= 0).
        event_shape: Shape of one signal ``x``.
        generator: Required for the sampling E-steps.
        sampler: The :class:`~diffem.spec.SamplerSpec` of the ``"mmps"`` E-step (its MMPS
            covariance is the prior's exact one whatever it says).
        callback: Called as ``callback(iteration, prior)`` after each iteration.

    Returns:
        The fitted :class:`GaussianPrior`.

    References:
        Dempster, Laird & Rubin 1977; Rozet et al. 2024, Section 4 (lap 0).
    """
    if estep not in ("exact", "sample", "mmps"):
        raise ValueError(f"`estep` must be 'exact', 'sample' or 'mmps', got {estep!r}")
    if iterations < 0:
        raise ValueError(f"`iterations` must be >= 0, got {iterations}")
    check_batch(operator, y.shape[0])
    if estep != "exact" and generator is None:
        raise ValueError("`generator` is required for a sampling E-step")
    event_shape = tuple(event_shape)
    d = math.prod(event_shape)
    dtype = torch.float64 if estep != "mmps" else torch.float32
    if prior is None:
        prior = GaussianPrior(event_shape=event_shape, rank=min(rank, d))
        prior = GaussianPrior.from_parameters(prior.mean.to(dtype), prior.factor.to(dtype), prior.diag.to(dtype), event_shape)
    prior = prior.to(y.device)
    n = y.shape[0]
    if sampler is None:
        sampler = SamplerSpec(method="ddpm", steps=sampler_steps, maxiter=maxiter)

    for it in tqdm(range(iterations), desc="lap 0 (Gaussian EM)", disable=not progress):
        if estep == "exact":
            means, covs = [], []
            for i in range(0, n, batch_size):
                m, S = prior.posterior(y[i : i + batch_size], operator[i : i + batch_size], noise_std)
                means.append(m)
                covs.append(S.sum(0))
            m = torch.cat(means)
            mu = m.mean(0)
            centred = m - mu
            scatter = (sum(covs) + centred.mT @ centred) / n
            prior = GaussianPrior.from_moments(mu, scatter, rank, event_shape)
        elif estep == "sample":
            samples = []
            for i in range(0, n, batch_size):
                m, S = prior.posterior(y[i : i + batch_size], operator[i : i + batch_size], noise_std)
                L = torch.linalg.cholesky(S + 1e-10 * torch.eye(d, dtype=dtype, device=S.device))
                z = torch.randn(m.shape, generator=generator, dtype=dtype, device=generator.device).to(m.device)
                samples.append(m + (L @ z[..., None])[..., 0])
            prior = GaussianPrior.fit(torch.cat(samples).reshape(n, *event_shape), rank)
        else:
            x = sampler.sample(prior, y, operator, event_shape, generator, noise_std=noise_std, batch_size=batch_size)
            prior = GaussianPrior.fit(x.to(dtype), rank)
        if callback is not None:
            callback(it, prior)
    return prior


def run_lap0(accelerator, config: EMConfig, obs: ObservationSet, progress: bool = False) -> tuple[GaussianPrior, dict]:
    """Fit the lap-0 Gaussian prior to the first ``lap0.observations`` observations.

    Runs on every process (it is cheap next to a lap and deterministic: its generator is
    seeded with ``(seed, LAP0)``), in float64 for the exact E-steps, always outside autocast.

    Returns:
        ``(prior, stats)``: the prior in float32 on the accelerator's device, and
        ``{"observations": n}``.
    """
    cfg = config.lap0
    n = min(cfg.observations, len(obs))
    sub = obs[:n]
    rank = min(cfg.rank, math.prod(obs.event_shape))
    generator = torch.Generator().manual_seed(derive_seed(config.seed, LAP0))
    device = accelerator.device
    with torch.autocast(device.type, enabled=False):
        prior = fit_gaussian_em(
            sub.y.to(device), sub.operator.to(device), obs.noise_std, rank, cfg.iterations, obs.event_shape,
            estep=cfg.estep, generator=generator, batch_size=config.estep.batch_size, progress=progress,
            sampler=SamplerSpec(method="ddpm", steps=cfg.steps, maxiter=cfg.maxiter, tol=cfg.tol),
        )
    prior = GaussianPrior.from_parameters(prior.mean.float(), prior.factor.float(), prior.diag.float(), prior.event_shape)
    return prior, {"observations": n}
