r"""The E-step: one MMPS posterior sample per observation under the previous lap's prior.

Chunks of ``estep.batch_size`` observations are sharded over processes (chunk ``c`` on
process ``c % P``) and saved as they finish, so a resumed run reuses them. Each block
of ``estep.block`` observations draws its noise from its own generator, seeded with
``(seed, ESTEP, lap, block)``: the samples depend neither on the batch size nor on the
number of processes.

References:
    Rozet et al. 2024, arXiv:2405.13712, Algorithm 1 (E-step) and Section 4 (MMPS).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..config import EMConfig, EStepConfig
from ..pipeline import denoiser_of, estep_scheduler
from ..random import make_generators
from ..sampling import sample_posterior
from ..tasks import ObservationSet
from .checkpoint import atomic_torch_save, sampling_settings
from .seeds import ESTEP

__all__ = ["run_estep", "sample_chunk", "keep_samples", "scheduler_of"]


def scheduler_of(config: EMConfig):
    """The E-step's :class:`~diffem.scheduler.VEScheduler` (method, Langevin corrections and step size)."""
    return estep_scheduler(sampling_settings(config)["estep"])


def sample_chunk(denoiser, obs: ObservationSet, generators: list, padded: int, config: EMConfig, device) -> Tensor:
    """Posterior samples ``(len(obs), *event_shape)`` of one chunk.

    Arguments:
        denoiser: The prior's denoiser.
        obs: The chunk's observations (``m`` of them).
        generators: One generator per block of ``estep.block`` observations, covering
            ``padded >= m`` observations (a short last block is padded by repeating its last
            observation, so that it draws its full block of noise and is sliced back).
    """
    cfg: EStepConfig = config.estep
    m = len(obs)
    if padded != m:
        idx = torch.cat([torch.arange(m), torch.full((padded - m,), m - 1)])
        obs = obs[idx]
    x = sample_posterior(
        denoiser, obs.y.to(device), obs.operator.to(device), obs.noise_std, obs.event_shape,
        steps=cfg.steps, maxiter=cfg.maxiter, generator=generators, batch_size=padded, tol=cfg.tol,
        device=device, method=cfg.method, scheduler=scheduler_of(config), **cfg.guidance_kwargs(),
    )
    return x[:m]


def run_estep(accelerator, config: EMConfig, lap: int, obs: ObservationSet, folder: Path,
              load_prior: Callable[[], object], progress: bool = False) -> Tensor:
    """All posterior samples of lap ``lap``, ``(N, *event_shape)`` on the CPU (every process gets all).

    Arguments:
        accelerator: The run's ``Accelerator`` (sharding, barriers, device).
        config: The run's configuration (``estep``, ``seed``).
        lap: The lap (>= 1); the prior is lap ``lap - 1``'s.
        obs: All ``N`` observations.
        folder: Where chunks ``chunk_CCCCC.pt`` are saved (and found on resume).
        load_prior: Returns the lap ``lap - 1`` pipeline; called only if work remains.
    """
    acc, cfg = accelerator, config.estep
    folder = Path(folder)
    if acc.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    n = len(obs)
    chunks = list(range(math.ceil(n / cfg.batch_size)))
    mine = [c for c in chunks if c % acc.num_processes == acc.process_index]
    todo = [c for c in mine if not (folder / f"chunk_{c:05d}.pt").exists()]
    if todo:
        denoiser = denoiser_of(load_prior().unet)
        denoiser.eval()
        for c in tqdm(todo, desc=f"lap {lap} E-step", disable=not progress):
            i, j = c * cfg.batch_size, min((c + 1) * cfg.batch_size, n)
            first, last = i // cfg.block, math.ceil(j / cfg.block)
            gens = make_generators(config.seed, ESTEP, lap, indices=range(first, last))
            x = sample_chunk(denoiser, obs[i:j], gens, (last - first) * cfg.block, config, acc.device)
            atomic_torch_save(x.cpu(), folder / f"chunk_{c:05d}.pt")
    acc.wait_for_everyone()
    return torch.cat([torch.load(folder / f"chunk_{c:05d}.pt") for c in chunks])


def keep_samples(samples: Tensor, bound: float | None) -> tuple[Tensor, int]:
    """Drop non-finite samples and, with a ``bound``, samples with any ``|x_i| >= bound``
    (the authors' manifold protocol: 3); returns ``(kept, number discarded)``."""
    kept = torch.isfinite(samples).flatten(1).all(dim=1)
    if bound is not None:
        kept &= (samples.abs() < bound).flatten(1).all(dim=1)
    return samples[kept], int((~kept).sum())
