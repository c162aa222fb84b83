"""Shared set-ups of the posterior tests (``tests/test_posterior*.py``): seeded generators,
small observation cases and low-rank Gaussian priors in float64.

Imported by the test modules as ``from posterior_cases import ...`` (pytest puts ``tests/`` on
``sys.path``, as for ``conftest``).
"""

import torch

from diffem.gaussian import GaussianPrior
from diffem.operators import Mask, Projection


def gen(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def mask_case(B: int, g: torch.Generator):
    """A random pixel mask over ``(2, 3, 3)`` images (centre pixel always observed), batch ``(B,)``."""
    mask = torch.rand(B, 1, 3, 3, generator=g) < 0.5
    mask[:, 0, 1, 1] = True
    return Mask(mask, channels=2), (2, 3, 3)


def projection_case(B: int, g: torch.Generator):
    """A random ``2 x 5`` projection with unit-norm rows, batch ``(B,)``, on vectors ``(5,)``."""
    M = torch.randn(B, 2, 5, generator=g, dtype=torch.float64)
    return Projection(M / M.norm(dim=-1, keepdim=True)), (5,)


#: The observation cases by name: ``case(B, g) -> (operator, event_shape)``.
CASES = {"mask": mask_case, "projection": projection_case}


def low_rank_prior(d, event, g, rank=2, diag=0.3, identity=False) -> GaussianPrior:
    r"""A :math:`\mathcal{N}(\mu, D I + U U^T)` prior on ``event`` (``d`` features), random ``\mu`` and ``U`` (d, rank).

    With ``identity``: :math:`\mathcal{N}(\mu, I)` (only ``\mu`` is drawn).
    """
    mean = torch.randn(d, generator=g, dtype=torch.float64)
    if identity:
        return GaussianPrior.from_parameters(mean, torch.zeros(d, 0, dtype=torch.float64), 1.0, event_shape=event)
    factor = torch.randn(d, rank, generator=g, dtype=torch.float64)
    return GaussianPrior.from_parameters(mean, factor, diag, event_shape=event)
