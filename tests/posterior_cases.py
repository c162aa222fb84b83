"""Shared set-ups of the posterior tests (``tests/test_posterior*.py``): seeded generators,
small observation cases and low-rank Gaussian priors in float64.

Imported by the test modules as ``from posterior_cases import ...`` (pytest puts ``tests/`` on
``sys.path``, as for ``conftest``).
"""

import torch

from diffem.gaussian import GaussianPrior
from diffem.operators import Mask, Projection, SenseFourier


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


def sense_case(B: int, g: torch.Generator):
    """3 coils of smooth random complex sensitivities on ``(1, 4, 4)`` images, a random 2-D k-space mask (DC
    always sampled), batch ``(B,)``."""
    h = w = 4
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h, dtype=torch.float64), torch.linspace(-1, 1, w, dtype=torch.float64),
                            indexing="ij")
    coef = torch.randn(B, 3, 3, 2, generator=g, dtype=torch.float64)
    basis = torch.stack([torch.ones_like(xx), xx, yy])  # (3, H, W): a low-order field per coil
    maps = torch.complex(torch.einsum("bcki,khw->bchw", coef[..., :1].expand(B, 3, 3, 1), basis),
                         torch.einsum("bcki,khw->bchw", coef[..., 1:], basis)) + 1.0
    mask = torch.rand(B, h, w, generator=g) < 0.5
    mask[:, h // 2, w // 2] = True
    return SenseFourier(mask, maps), (1, h, w)


def complex_sense_case(B: int, g: torch.Generator):
    """:func:`sense_case` on complex images ``(2, 4, 4)`` (real and imaginary channels)."""
    A, (_, h, w) = sense_case(B, g)
    return SenseFourier(A.mask, A.maps, complex_images=True), (2, h, w)


#: The observation cases by name: ``case(B, g) -> (operator, event_shape)``.
CASES = {"mask": mask_case, "projection": projection_case, "sense": sense_case, "sense-complex": complex_sense_case}


def low_rank_prior(d, event, g, rank=2, diag=0.3, identity=False) -> GaussianPrior:
    r"""A :math:`\mathcal{N}(\mu, D I + U U^T)` prior on ``event`` (``d`` features), random ``\mu`` and ``U`` (d, rank).

    With ``identity``: :math:`\mathcal{N}(\mu, I)` (only ``\mu`` is drawn).
    """
    mean = torch.randn(d, generator=g, dtype=torch.float64)
    if identity:
        return GaussianPrior.from_parameters(mean, torch.zeros(d, 0, dtype=torch.float64), 1.0, event_shape=event)
    factor = torch.randn(d, rank, generator=g, dtype=torch.float64)
    return GaussianPrior.from_parameters(mean, factor, diag, event_shape=event)
