r"""diffusers' EDM schedulers driving diffem denoisers (priors and posteriors).

diffusers' ``EDMEulerScheduler`` and ``EDMDPMSolverMultistepScheduler`` integrate the
variance-exploding probability-flow ODE :math:`x_\sigma = x + \sigma z` from the
denoiser output :math:`\hat{x} = D(x_\sigma, \sigma)`, written as EDM's
preconditioning of a raw network output :math:`F`,

.. math:: \hat{x} = c_{\text{skip}}(\sigma) \, x_\sigma + c_{\text{out}}(\sigma) \, F,
   \qquad c_{\text{skip}} = \frac{\sigma_d^2}{\sigma^2 + \sigma_d^2}, \quad
   c_{\text{out}} = \frac{\sigma \sigma_d}{\sqrt{\sigma^2 + \sigma_d^2}}

(``scheduler.precondition_outputs``; ``-c_out`` for ``v_prediction``). For
:math:`\sigma_d = 1` these are exactly :class:`~diffem.denoiser.Denoiser`'s
:math:`c_{\text{skip}}, c_{\text{out}}`; the schedulers would only condition the
network on :math:`c_{\text{noise}} = \frac{1}{4}\ln\sigma` instead of diffem's
:math:`\ln\sigma`. So a diffem denoiser (a prior, or the MMPS posterior denoiser
whose :math:`\hat{x}` is :math:`\mathbb{E}[x \mid x_t, y]`) drives them directly:
:func:`sample_edm` evaluates :math:`\hat{x}` at the scheduler's :math:`\sigma` and
hands the scheduler the output :math:`F = (\hat{x} - c_{\text{skip}} x) / c_{\text{out}}`
that reproduces it, with :math:`c_{\text{skip}}, c_{\text{out}}` read from the
scheduler's own ``precondition_outputs`` (so any ``sigma_data`` or prediction type works).

Samplers (``method``):

- ``"edm_euler"``: ``EDMEulerScheduler`` (Euler on the ODE, Karras et al. 2022 Alg. 1
  without the Heun correction); an Euler step is diffem's DDIM update on another grid.
- ``"edm_dpmpp"``: ``EDMDPMSolverMultistepScheduler``, DPM-Solver++(2M) (midpoint),
  a second-order multistep method (Lu et al. 2022);
- ``"edm_dpmpp_sde"``: the same scheduler with ``algorithm_type="sde-dpmsolver++"``, its
  stochastic (SDE) form: fresh noise at every step, like diffem's DDPM update, which
  contracts the errors of an approximate posterior denoiser where an ODE sampler keeps them.

Both use the Karras grid :math:`\sigma_i = (\sigma_{\max}^{1/\rho} + \frac{i}{N-1}
(\sigma_{\min}^{1/\rho} - \sigma_{\max}^{1/\rho}))^\rho`, :math:`\rho = 7`, from
:math:`\sigma_{\max} = 10^2` to :math:`\sigma_{\min} = 10^{-3}` (diffem's range), and a
last step to :math:`\sigma = 0` that returns :math:`\hat{x}(\sigma_{\min})`. They
start from :math:`x_{\sigma_{\max}} = \sqrt{\sigma_{\max}^2 + \sigma_d^2}\, z` (the scheduler's
``init_noise_sigma``), and ``N`` steps cost exactly ``N`` denoiser evaluations (diffem's DDPM /
DDIM: ``N + 1``). The ODE samplers are deterministic after the initial noise; the SDE sampler
draws its step noise through diffusers (one generator, or one per sample).

References:
    Karras et al. 2022 (EDM), arXiv:2206.00364, eq. (5), (7), Table 1, Algorithm 1;
    Lu et al. 2022 (DPM-Solver++), arXiv:2211.01095.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .random import randn
from .scheduler import METHODS as VE_METHODS
from .scheduler import VEScheduler

__all__ = [
    "EDM_METHODS",
    "SAMPLER_METHODS",
    "edm_scheduler",
    "is_edm_scheduler",
    "make_scheduler",
    "network_evaluations",
    "sample_edm",
]

#: The diffusers EDM samplers, by diffem method name.
EDM_METHODS = ("edm_euler", "edm_dpmpp", "edm_dpmpp_sde")
#: Every sampler name accepted by :func:`make_scheduler` (and ``sample_posterior``, the E-step).
SAMPLER_METHODS = tuple(VE_METHODS) + EDM_METHODS


def edm_scheduler(method: str, sigma_min: float = 1e-3, sigma_max: float = 1e2, sigma_data: float = 1.0, **kwargs):
    """A diffusers EDM scheduler on diffem's noise range.

    Arguments:
        method: ``"edm_euler"`` (``EDMEulerScheduler``), ``"edm_dpmpp"``
            (``EDMDPMSolverMultistepScheduler``, DPM-Solver++(2M)) or ``"edm_dpmpp_sde"`` (its
            ``sde-dpmsolver++`` form).
        sigma_min, sigma_max: The noise range in data units (``0 < sigma_min < sigma_max``).
        sigma_data: EDM's data scale; 1 matches diffem's preconditioning (it only sets the
            initial noise level here, as the denoiser is given, not preconditioned).
        kwargs: Further scheduler config (e.g. ``rho``, ``solver_order``).

    Raises:
        ValueError: for an unknown ``method`` or a bad noise range.
    """
    from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler

    if method not in EDM_METHODS:
        raise ValueError(f"`method` must be one of {EDM_METHODS}, got {method!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < `sigma_min` < `sigma_max`, got {sigma_min}, {sigma_max}")
    if not sigma_data > 0:
        raise ValueError(f"`sigma_data` must be > 0, got {sigma_data}")
    common = dict(sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=sigma_data, prediction_type="epsilon")
    common.update(kwargs)
    if method == "edm_euler":
        return EDMEulerScheduler(**common)
    common.setdefault("algorithm_type", "sde-dpmsolver++" if method == "edm_dpmpp_sde" else "dpmsolver++")
    common.setdefault("solver_order", 2)
    return EDMDPMSolverMultistepScheduler(**common)


def is_edm_scheduler(scheduler) -> bool:
    """Whether ``scheduler`` is one of diffusers' EDM schedulers (driven by :func:`sample_edm`)."""
    from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler

    return isinstance(scheduler, (EDMEulerScheduler, EDMDPMSolverMultistepScheduler))


def make_scheduler(method: str, corrections: int = 1, delta: float = 0.1, sigma_min: float = 1e-3, sigma_max: float = 1e2):
    """The scheduler of a sampler name: a :class:`VEScheduler` or a diffusers EDM scheduler.

    Arguments:
        method: One of :data:`SAMPLER_METHODS`: ``"ddpm"``, ``"ddim"``, ``"pc"`` (diffem's
            :class:`VEScheduler`) or ``"edm_euler"``, ``"edm_dpmpp"`` (:func:`edm_scheduler`).
        corrections, delta: Langevin settings of ``"pc"``.

    Raises:
        ValueError: naming the known methods, for an unknown ``method``.
    """
    if method in EDM_METHODS:
        return edm_scheduler(method, sigma_min=sigma_min, sigma_max=sigma_max)
    if method in VE_METHODS:
        return VEScheduler(sigma_min=sigma_min, sigma_max=sigma_max, method=method, corrections=corrections, delta=delta)
    raise ValueError(f"`method` must be one of {SAMPLER_METHODS}, got {method!r}")


def network_evaluations(method: str, steps: int, corrections: int = 1) -> int:
    """Denoiser evaluations of one sample with ``steps`` sampler steps (MMPS adds its VJPs to each).

    DDPM / DDIM: ``steps + 1`` (the last is the final denoise); PC: ``steps * (1 + corrections) + 1``;
    EDM samplers: ``steps``.
    """
    if method in EDM_METHODS:
        return steps
    if method == "pc":
        return steps * (1 + corrections) + 1
    if method in VE_METHODS:
        return steps + 1
    raise ValueError(f"`method` must be one of {SAMPLER_METHODS}, got {method!r}")


def _preconditioning(scheduler, sigma: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """``(c_skip, c_out)`` of the scheduler at ``sigma``, read from its ``precondition_outputs`` (it is affine)."""
    one = torch.ones((), dtype=torch.float64)
    zero = torch.zeros((), dtype=torch.float64)
    s = sigma.to(torch.float64)
    c_skip = scheduler.precondition_outputs(one, zero, s)
    c_out = scheduler.precondition_outputs(zero, one, s)
    return c_skip.to(like.dtype), c_out.to(like.dtype)


@torch.no_grad()
def sample_edm(
    denoiser: Callable[[Tensor, Tensor], Tensor],
    shape: Sequence[int],
    scheduler,
    num_inference_steps: int,
    generator,
    progress: bool = False,
    device=None,
    dtype=torch.float32,
) -> Tensor:
    r"""Draw samples ``(B, *event_shape)`` with a diffusers EDM scheduler driven by a diffem denoiser.

    Arguments:
        denoiser: ``(x_t, sigma) -> E[x | x_t]`` with ``x_t`` ``(B, *event_shape)`` and ``sigma``
            ``(B,)`` in data units (a :class:`~diffem.denoiser.Denoiser`, a
            :class:`~diffem.gaussian.GaussianPrior`, an :class:`~diffem.posterior.MMPSDenoiser`, ...).
        shape: ``(B, *event_shape)``.
        scheduler: An ``EDMEulerScheduler`` or ``EDMDPMSolverMultistepScheduler`` (see
            :func:`edm_scheduler`), deterministic configuration.
        num_inference_steps: ``N >= 1``: ``N`` denoiser evaluations.
        generator: A ``torch.Generator`` or a list of them (one per block of samples, see
            :func:`diffem.random.randn`) for the initial noise. The SDE sampler
            (``sde-dpmsolver++``) also draws its step noise from it through diffusers, which
            takes one generator or one per sample: a list must then have length 1 or ``B``.

    A posterior step hook (DPS, ΠGDM: a denoiser with a ``step_correction(sigma_next)``
    method) adds its correction to the sample after each step, as in
    :func:`diffem.sampling.sample`.

    Raises:
        ValueError: for a scheduler that is not an EDM scheduler, a bad step count, a missing
            generator, or (SDE sampler) a list of generators whose length is neither 1 nor ``B``.
    """
    if not is_edm_scheduler(scheduler):
        raise ValueError(f"`scheduler` must be a diffusers EDM scheduler, got {type(scheduler).__name__}")
    stochastic = scheduler.config.get("algorithm_type", "dpmsolver++") == "sde-dpmsolver++"
    if stochastic and not isinstance(generator, torch.Generator):
        n_gen = len(list(generator)) if generator is not None else 0
        if n_gen not in (1, shape[0]):
            raise ValueError(
                f"the SDE sampler draws its step noise through diffusers, which takes one generator or one per "
                f"sample: got a list of {n_gen} generators for {shape[0]} samples"
            )
    if int(num_inference_steps) != num_inference_steps or num_inference_steps < 1:
        raise ValueError(f"`num_inference_steps` must be an integer >= 1, got {num_inference_steps!r}")
    shape = tuple(shape)
    b = shape[0]
    scheduler.set_timesteps(int(num_inference_steps), device=device)
    sigmas = scheduler.sigmas
    x = float(scheduler.init_noise_sigma) * randn(shape, generator, dtype, device)
    for i, t in enumerate(tqdm(scheduler.timesteps, desc="sampling", disable=not progress, leave=False)):
        sigma = sigmas[i]
        scheduler.scale_model_input(x, t)  # sets the step index (its output is not used: diffem preconditions)
        x_hat = denoiser(x, sigma.to(device=x.device, dtype=x.dtype).expand(b))
        # a posterior step hook (DPS, PiGDM) corrects the new sample, as in diffem.sampling.sample
        correction = denoiser.step_correction(sigmas[i + 1].to(device=x.device, dtype=x.dtype)) if hasattr(denoiser, "step_correction") else None
        c_skip, c_out = _preconditioning(scheduler, sigma, x)
        model_output = (x_hat - c_skip.to(x.device) * x) / c_out.to(x.device)
        step_kwargs = {"generator": list(generator) if not isinstance(generator, torch.Generator) else generator} if stochastic else {}
        x = scheduler.step(model_output, t, x, return_dict=False, **step_kwargs)[0].to(dtype)
        if correction is not None:
            x = x + correction.to(dtype)
    return x
