r"""Samplers as small functions of (denoiser, shape, scheduler, generator).

:func:`sample` draws :math:`x \sim q(x)` by running a :class:`~diffem.scheduler.VEScheduler`
from :math:`x_1 = \sigma_{\max} z` down to :math:`\sigma_{\min}` and denoising once more.
:func:`sample_posterior` does the same with the MMPS posterior denoiser
(:class:`~diffem.posterior.MMPSDenoiser`) for a batch of observations: this is the
E-step of Rozet et al. (2024), arXiv:2405.13712, Algorithm 1.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .operators import LinearOperator, check_batch
from .edm import is_edm_scheduler, make_scheduler, sample_edm
from .posterior import GUIDANCE_OPTIONS, make_posterior
from .random import randn
from .scheduler import VEScheduler

__all__ = ["sample", "sample_posterior"]


@torch.no_grad()
def sample(
    denoiser: Callable[[Tensor, Tensor], Tensor],
    shape: Sequence[int],
    scheduler: VEScheduler,
    num_inference_steps: int,
    generator,
    progress: bool = False,
    device=None,
) -> Tensor:
    r"""Draw samples ``(B, *event_shape)`` by the reverse process of ``scheduler``.

    Arguments:
        denoiser: ``(x_t, sigma) -> E[x | x_t]`` with ``sigma`` of shape ``(B,)``.
        shape: ``(B, *event_shape)``.
        scheduler: A :class:`VEScheduler` (its ``method`` picks DDPM, DDIM or PC).
        num_inference_steps: Number of steps (>= 1).
        generator: A ``torch.Generator`` or a list of them (one per block of samples).
        progress: Show a progress bar.

    A posterior step hook (:class:`~diffem.posterior.DPSGuidance`,
    :class:`~diffem.posterior.PiGDMGuidance`) is recognised by its ``step_correction``
    method: its correction for the step from ``sigmas[i]`` is added to the new sample.
    """
    if is_edm_scheduler(scheduler):  # diffusers' EDM samplers (diffem.edm)
        return sample_edm(denoiser, shape, scheduler, num_inference_steps, generator, progress=progress, device=device)
    shape = tuple(shape)
    scheduler.set_timesteps(num_inference_steps, device=device)
    sigmas = scheduler.sigmas
    x = sigmas[0] * randn(shape, generator, torch.float32, device)
    b = shape[0]
    for i in tqdm(range(num_inference_steps), desc="sampling", disable=not progress, leave=False):
        x_hat = denoiser(x, sigmas[i].expand(b))
        # A step hook's correction is taken before the step (a corrector may call the denoiser again).
        correction = denoiser.step_correction(sigmas[i + 1]) if hasattr(denoiser, "step_correction") else None
        x = scheduler.step(x_hat, i, x, generator=generator, denoiser=denoiser).prev_sample
        if correction is not None:
            x = x + correction
    return denoiser(x, sigmas[-1].expand(b))


def _split_generators(generator, n: int):
    """Return (block size, list of generators or a single generator)."""
    if isinstance(generator, torch.Generator):
        return None, generator
    generators = list(generator)
    if not generators or n % len(generators):
        raise ValueError(f"`generator` is a list of {len(generators)} generators, which must divide the {n} observations")
    return n // len(generators), generators


def sample_posterior(
    denoiser: Callable[[Tensor, Tensor], Tensor],
    y: Tensor,
    operator: LinearOperator,
    noise_std: float,
    event_shape: Sequence[int],
    steps: int = 64,
    maxiter: int = 1,
    generator=None,
    batch_size: int = 256,
    method: str = "ddpm",
    tol: float = 0.0,
    progress: bool = False,
    device=None,
    scheduler: VEScheduler | None = None,
    guidance: str = "mmps",
    covariance: str = "tweedie",
    guidance_options: dict | None = None,
) -> Tensor:
    r"""One posterior sample :math:`x_i \sim q(x \mid y_i)` per observation, by MMPS (or a baseline).

    Arguments:
        denoiser: The prior denoiser.
        y: Observations ``(N, *out_shape)``.
        operator: Operator with batch shape ``(N,)`` (one per observation).
        noise_std: :math:`\sigma_y > 0`.
        event_shape: Shape of one signal ``x``.
        steps: Sampler steps; ``method``: ``"ddpm"``, ``"ddim"``, ``"pc"`` or diffusers' EDM
            samplers ``"edm_euler"``, ``"edm_dpmpp"`` (:mod:`diffem.edm`, ``steps`` network
            evaluations instead of ``steps + 1``).
        maxiter, tol: Conjugate gradient iterations and relative tolerance.
        generator: A ``torch.Generator`` (the result then depends on ``batch_size``) or a
            list of ``G`` generators, one per block of ``N / G`` consecutive observations
            (the result then does not depend on ``batch_size``, which must be a multiple
            of the block size).
        batch_size: Observations per sampler call.
        scheduler: A :class:`VEScheduler` to use instead of ``VEScheduler(method=method)``
            (e.g. with the E-step's Langevin ``corrections`` and ``delta``); its method wins.
        guidance: The posterior method, one of :data:`diffem.posterior.GUIDANCES`
            (``"mmps"``, ``"dps"``, ``"pigdm"``, ``"tmpd"``, ``"diffpir"``); ``maxiter`` and
            ``tol`` go to the methods that take them (all but DPS and TMPD).
        covariance: MMPS's covariance, ``"tweedie"``, ``"prior"`` (:math:`\Sigma_x = I`
            unless ``guidance_options["prior"]`` gives a GaussianPrior) or ``"sigma_t"``.
        guidance_options: Further options of the method (e.g. ``{"zeta": 0.5}`` for DPS,
            ``{"lmbda": 7.0}`` for DiffPIR), see :data:`diffem.posterior.GUIDANCE_OPTIONS`.

    Raises:
        ValueError: an unknown ``guidance`` or option, ``covariance`` other than
            ``"tweedie"`` with a method other than MMPS, a bad option value.

    Returns:
        ``(N, *event_shape)`` samples on ``device`` (default: the device of ``y``).
    """
    n = y.shape[0]
    check_batch(operator, n)
    options = dict(guidance_options or {})
    accepted = GUIDANCE_OPTIONS.get(guidance, ())
    if guidance == "mmps":
        options["covariance"] = covariance
    elif covariance != "tweedie":
        raise ValueError(f"`covariance` applies to guidance 'mmps' only, got covariance={covariance!r} with {guidance!r}")
    for key, value in (("maxiter", maxiter), ("tol", tol)):
        if key in accepted:
            options.setdefault(key, value)
    make_posterior(guidance, denoiser, y[:1], operator[:1], noise_std, **options)  # fail before any work
    block, gens = _split_generators(generator, n) if generator is not None else (None, None)
    if gens is None:
        raise ValueError("`generator` is required: pass a seeded torch.Generator or a list of them")
    if block is not None:
        batch_size = max(block, batch_size // block * block)
    device = y.device if device is None else device
    scheduler = make_scheduler(method) if scheduler is None else scheduler
    out = []
    for i in tqdm(range(0, n, batch_size), desc="posterior sampling", disable=not progress):
        j = min(i + batch_size, n)
        g = gens if block is None else gens[i // block : j // block]
        yb = y[i:j].to(device)
        posterior = make_posterior(guidance, denoiser, yb, operator[i:j].to(device), noise_std, **options)
        out.append(sample(posterior, (j - i, *event_shape), scheduler, steps, g, device=device))
    return torch.cat(out)
