r"""The E-step: one MMPS posterior sample per observation under the previous lap's prior.

The sampler is the run's :class:`~diffem.spec.SamplerSpec` (``SamplerSpec.from_estep``), the
one saved with every lap in ``sampling.json``. Under the lap-0 Gaussian (lap 1's E-step) the
Gaussian's exact covariance is used whatever ``estep.covariance`` says
(:func:`estep_covariance`); ``"sigma_x"`` uses the lap-0 Gaussian's covariance under every
network prior.

Chunks of ``estep.batch_size`` observations are sharded over processes (chunk ``c`` on
process ``c % P``) and saved as they finish, so a resumed run reuses them. Each block
of ``estep.block`` observations draws its noise from its own generator, seeded with
``(seed, ESTEP, lap, block)``: the samples depend neither on the batch size nor on the
number of processes.

References:
    Rozet et al. 2024, arXiv:2405.13712, Algorithm 1 (E-step) and Section 4 (MMPS).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..config import EMConfig
from ..gaussian import GaussianPrior
from ..kernels import compiled, prepare_network, set_matmul_precision
from ..observations import ObservationSet
from ..pipeline import denoiser_of
from ..random import make_generators
from ..spec import GAUSSIAN_EXACT, SamplerSpec
from .checkpoint import atomic_torch_save
from .seeds import ESTEP

__all__ = ["run_estep", "sample_chunk", "keep_samples", "screen_samples", "scheduler_of", "estep_covariance",
           "outlier_bound", "OutlierError"]

logger = logging.getLogger(__name__)


def scheduler_of(config: EMConfig):
    """The E-step's scheduler (method, Langevin corrections and step size) from its spec."""
    return SamplerSpec.from_estep(config.estep).scheduler()


def estep_covariance(config: EMConfig, lap: int) -> str:
    """The covariance lap ``lap``'s E-step really uses (what its record names).

    Lap 1 samples under the lap-0 Gaussian, whose exact covariance is used whatever
    ``estep.covariance`` says (:data:`~diffem.spec.GAUSSIAN_EXACT`); later laps use
    ``estep.covariance`` under the network prior (the authors' protocol: their lap ``k`` is
    diffem's lap ``k + 1``).
    """
    spec = SamplerSpec.from_estep(config.estep)
    if spec.guidance != "mmps":
        return "tweedie"
    return GAUSSIAN_EXACT if lap == 1 else spec.covariance


def sample_chunk(denoiser, obs: ObservationSet, generators: list, padded: int, config: EMConfig, device,
                 sigma_x=None) -> Tensor:
    """Posterior samples ``(len(obs), *event_shape)`` of one chunk.

    Arguments:
        denoiser: The prior's denoiser (a GaussianPrior's exact covariance wins over
            ``estep.covariance``, :meth:`~diffem.spec.SamplerSpec.effective_covariance`).
        obs: The chunk's observations (``m`` of them).
        generators: One generator per block of ``estep.block`` observations, covering
            ``padded >= m`` observations (a short last block is padded by repeating its last
            observation, so that it draws its full block of noise and is sliced back).
        sigma_x: For ``estep.covariance="sigma_x"``: the lap-0 GaussianPrior.
    """
    m = len(obs)
    if padded != m:
        idx = torch.cat([torch.arange(m), torch.full((padded - m,), m - 1)])
        obs = obs[idx]
    spec = SamplerSpec.from_estep(config.estep)
    x = spec.sample(denoiser, obs.y.to(device), obs.operator.to(device), obs.event_shape, generators,
                    noise_std=obs.noise_std, sigma_x=sigma_x, batch_size=padded, device=device)
    return x[:m]


def run_estep(accelerator, config: EMConfig, lap: int, obs: ObservationSet, folder: Path,
              load_prior: Callable[[], object], progress: bool = False,
              load_lap0: Callable[[], object] | None = None) -> Tensor:
    r"""All posterior samples of lap ``lap``, ``(N, *event_shape)`` on the CPU (every process gets all).

    Arguments:
        accelerator: The run's ``Accelerator`` (sharding, barriers, device).
        config: The run's configuration (``estep``, ``seed``).
        lap: The lap (>= 1); the prior is lap ``lap - 1``'s.
        obs: All ``N`` observations.
        folder: Where chunks ``chunk_CCCCC.pt`` are saved (and found on resume).
        load_prior: Returns the lap ``lap - 1`` pipeline; called only if work remains.
        load_lap0: Returns the lap-0 pipeline (its GaussianPrior is :math:`\Sigma_x` of
            ``estep.covariance="sigma_x"``); needed for that covariance only.
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
        backbone = load_prior().unet
        if not isinstance(backbone, GaussianPrior):  # the kernel options act on networks only
            set_matmul_precision(config.kernels)
            backbone = compiled(prepare_network(backbone, config.kernels), config.kernels)
        denoiser = denoiser_of(backbone)
        denoiser.eval()
        sigma_x = None
        if estep_covariance(config, lap) == "sigma_x":
            if load_lap0 is None:
                raise ValueError("estep.covariance='sigma_x' needs the lap-0 Gaussian: pass `load_lap0`")
            sigma_x = load_lap0().unet
        for c in tqdm(todo, desc=f"lap {lap} E-step", disable=not progress):
            i, j = c * cfg.batch_size, min((c + 1) * cfg.batch_size, n)
            first, last = i // cfg.block, math.ceil(j / cfg.block)
            gens = make_generators(config.seed, ESTEP, lap, indices=range(first, last))
            x = sample_chunk(denoiser, obs[i:j], gens, (last - first) * cfg.block, config, acc.device, sigma_x)
            atomic_torch_save(x.cpu(), folder / f"chunk_{c:05d}.pt")
    acc.wait_for_everyone()
    return torch.cat([torch.load(folder / f"chunk_{c:05d}.pt") for c in chunks])


def outlier_bound(config: EMConfig, data_bound: float) -> float | None:
    """The magnitude above which a finite E-step sample is an outlier: ``estep.outlier_factor``
    times the task's ``data_bound`` (None: no bound)."""
    factor = config.estep.outlier_factor
    return None if factor is None else float(factor) * float(data_bound)


def keep_samples(samples: Tensor, bound: float | None, outlier: float | None = None) -> tuple[Tensor, int, int]:
    """Drop non-finite samples, samples with any ``|x_i| >= bound`` (the authors' manifold
    protocol: 3) and outliers, samples with any ``|x_i| > outlier``.

    Returns:
        ``(kept, discarded, outliers)``: the kept samples, how many were discarded by the
        finiteness check and ``bound``, and how many of the remaining finite ones were outliers
        (dropped as well).
    """
    finite = torch.isfinite(samples).flatten(1).all(dim=1)
    kept = finite.clone()
    if bound is not None:
        kept &= (samples.abs() < bound).flatten(1).all(dim=1)
    outliers = torch.zeros_like(kept)
    if outlier is not None:
        outliers = kept & (samples.abs() > outlier).flatten(1).any(dim=1)
        kept &= ~outliers
    return samples[kept], int((~kept).sum() - outliers.sum()), int(outliers.sum())


class OutlierError(RuntimeError):
    """Too many of a lap's E-step samples lie far outside the data's range; the lap stops before its M-step.

    Nothing saved is lost: the previous laps stay, and the E-step's chunks stay in the run's
    ``work/`` folder. Attributes: ``lap``, ``outliers``, ``total``.
    """

    def __init__(self, lap: int, outliers: int, total: int, bound: float, max_fraction: float, previous):
        self.lap, self.outliers, self.total = lap, outliers, total
        super().__init__(
            f"lap {lap}: {outliers} of {total} E-step samples ({outliers / total:.1%}) have a coordinate beyond "
            f"+-{bound:g}, more than estep.max_outlier_fraction = {max_fraction:g}; the lap is stopped before its "
            f"M-step (the prior of lap {lap - 1}, {previous}, is kept). The posterior sampler diverged: continue from "
            f"lap {lap - 1} with other estep.* keys (another covariance, more CG iterations or sampler steps) through "
            f"`diffem fork RUN --lap {lap - 1} --output-dir NEW --set estep.KEY=VALUE`"
        )


def screen_samples(samples: Tensor, config: EMConfig, data_bound: float, lap: int, previous=None) -> tuple[Tensor, int, int]:
    """The samples the M-step trains on: :func:`keep_samples` with ``estep.discard_outside`` and
    the outlier bound (:func:`outlier_bound`); a warning names the lap and the outlier count.

    Returns:
        ``(kept, discarded, outliers)`` as :func:`keep_samples`.

    Raises:
        OutlierError: when more than ``estep.max_outlier_fraction`` of the samples are outliers.
    """
    cfg = config.estep
    bound = outlier_bound(config, data_bound)
    kept, discarded, outliers = keep_samples(samples, cfg.discard_outside, bound)
    if outliers:
        logger.warning(f"lap {lap}: dropped {outliers} of {len(samples)} E-step samples with a coordinate beyond "
                       f"+-{bound:g} (estep.outlier_factor {cfg.outlier_factor:g} x the data bound {data_bound:g})")
        if outliers / len(samples) > cfg.max_outlier_fraction:
            raise OutlierError(lap, outliers, len(samples), bound, cfg.max_outlier_fraction, previous)
    return kept, discarded, outliers
