r"""One sampler / posterior specification: what draws posterior samples, from config to pipeline.

A :class:`SamplerSpec` names the sampler (``method``, ``steps``, Langevin ``corrections`` and
``delta``), the posterior method (``guidance`` with its ``guidance_options``), MMPS's
covariance and its linear solve (``maxiter``, ``tol``), and optionally the observation noise
``noise_std``. It is built from the E-step's configuration (:meth:`SamplerSpec.from_estep`),
saved with every lap as the ``"estep"`` entry of ``sampling.json`` (:meth:`to_dict`), read
back from it (:meth:`from_dict`), and consumed unchanged by the E-step, lap 0, the
evaluation, ``diffem reconstruct`` and :class:`~diffem.pipeline.DiffusionPriorPipeline`
through :meth:`SamplerSpec.sample`.

The names it accepts are the registries below: :data:`SAMPLER_METHODS` (diffem's VE samplers
and diffusers' EDM samplers), :data:`GUIDANCES` (the posterior methods) and
:data:`COVARIANCES` (MMPS's covariance of :math:`p(x \mid x_t)`); the config validates
against the same tuples.

Covariance under a Gaussian prior: when the prior is a :class:`~diffem.gaussian.GaussianPrior`
(lap 0's), :math:`\sigma^2 J` is its exact :math:`\mathbb{V}[x \mid x_t]`, so every covariance
heuristic resolves to ``"tweedie"`` there (:meth:`SamplerSpec.effective_covariance`), as in
the authors' code (``priors/common.py``, ``sample_any`` reads the Gaussian's own ``cov_x``).
A heuristic acts only under a network prior.

References:
    Rozet et al., "Learning Diffusion Priors from Observations by Expectation Maximization",
    arXiv:2405.13712, Section 4 (MMPS) and Section 5.2 (covariance heuristics).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

from torch import Tensor

from .edm import SAMPLER_METHODS, make_scheduler
from .gaussian import GaussianPrior
from .linalg import SOLVERS
from .posterior import GUIDANCE_OPTIONS, GUIDANCES
from .posterior.mmps import COVARIANCES
from .sampling import sample_posterior

__all__ = ["SamplerSpec", "SAMPLER_METHODS", "GUIDANCES", "COVARIANCES", "SOLVERS", "GAUSSIAN_EXACT"]

#: What a lap's record names as its E-step covariance when the prior was the lap-0 Gaussian.
GAUSSIAN_EXACT = "gaussian (exact)"


@dataclass(frozen=True)
class SamplerSpec:
    r"""How posterior samples :math:`x \sim q(x \mid y)` are drawn.

    Attributes:
        method: Sampler, one of :data:`SAMPLER_METHODS` (``"ddpm"``, ``"ddim"``, ``"pc"``,
            ``"edm_euler"``, ``"edm_dpmpp"``, ``"edm_dpmpp_sde"``).
        steps: Sampler steps, ``>= 1``.
        corrections: Langevin corrections per step (``"pc"``), ``>= 0``.
        delta: Langevin step size (``"pc"``), ``> 0``.
        guidance: Posterior method, one of :data:`GUIDANCES`.
        covariance: MMPS's :math:`\mathbb{V}[x \mid x_t]`, one of :data:`COVARIANCES`
            (``"tweedie"`` for every method but MMPS).
        solver: MMPS's linear solver, one of :data:`diffem.linalg.SOLVERS` (``"cg"``, ``"gmres"``;
            ``"cg"`` for every method but MMPS).
        maxiter: CG iterations (the cap when ``tol > 0``), ``>= 1``.
        tol: Relative CG tolerance :math:`\lVert r \rVert \le` ``tol`` :math:`\lVert b \rVert`
            (0: always ``maxiter``).
        guidance_options: The method's own options (DPS ``zeta``, PiGDM ``weight``, DiffPIR
            ``lmbda``), keys of :data:`diffem.posterior.GUIDANCE_OPTIONS`.
        noise_std: :math:`\sigma_y` in data units, or ``None`` (given at sampling time).

    Raises:
        ValueError: on construction, for an unknown name or an out-of-range value (the
            message names the field).
    """

    method: str = "ddpm"
    steps: int = 64
    corrections: int = 1
    delta: float = 0.1
    guidance: str = "mmps"
    covariance: str = "tweedie"
    solver: str = "cg"
    maxiter: int = 1
    tol: float = 0.0
    guidance_options: dict = field(default_factory=dict)
    noise_std: float | None = None

    def __post_init__(self):
        checks = [
            ("method", self.method in SAMPLER_METHODS, f"must be one of {SAMPLER_METHODS}"),
            ("steps", isinstance(self.steps, int) and self.steps >= 1, "must be an integer >= 1"),
            ("corrections", isinstance(self.corrections, int) and self.corrections >= 0, "must be an integer >= 0"),
            ("delta", self.delta > 0, "must be > 0"),
            ("guidance", self.guidance in GUIDANCES, f"must be one of {GUIDANCES}"),
            ("covariance", self.covariance in COVARIANCES, f"must be one of {COVARIANCES}"),
            ("covariance", self.covariance == "tweedie" or self.guidance == "mmps",
             "applies to guidance 'mmps' only (keep 'tweedie' for other methods)"),
            ("solver", self.solver in SOLVERS, f"must be one of {SOLVERS}"),
            ("solver", self.solver == "cg" or self.guidance == "mmps", "applies to guidance 'mmps' only (keep 'cg')"),
            ("maxiter", isinstance(self.maxiter, int) and self.maxiter >= 1, "must be an integer >= 1"),
            ("tol", self.tol >= 0 and math.isfinite(self.tol), "must be a finite number >= 0"),
            ("noise_std", self.noise_std is None or self.noise_std > 0, "must be > 0 (or None)"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"SamplerSpec `{name}` {why}, got {getattr(self, name)!r}")
        extra = sorted(set(self.guidance_options) - set(GUIDANCE_OPTIONS[self.guidance]) - {"maxiter", "tol", "covariance", "solver"})
        if extra:
            raise ValueError(f"SamplerSpec `guidance_options`: `{extra[0]}` is not an option of guidance {self.guidance!r}")

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_estep(cls, estep, noise_std: float | None = None) -> "SamplerSpec":
        """The spec of an :class:`~diffem.config.EStepConfig` (the E-step's sampler)."""
        options = {"dps": {"zeta": estep.dps_zeta}, "pigdm": {"weight": estep.pigdm_weight},
                   "diffpir": {"lmbda": estep.diffpir_lambda}}.get(estep.guidance, {})
        return cls(method=estep.method, steps=estep.steps, corrections=estep.corrections, delta=estep.delta,
                   guidance=estep.guidance, covariance=estep.covariance, solver=estep.solver, maxiter=estep.maxiter,
                   tol=estep.tol,
                   guidance_options=options, noise_std=noise_std)

    def to_dict(self) -> dict:
        """Plain data (the ``"estep"`` entry of ``sampling.json``); steps under the diffusers
        name ``num_inference_steps``."""
        out = dataclasses.asdict(self)
        out["num_inference_steps"] = out.pop("steps")
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "SamplerSpec":
        """The spec of :meth:`to_dict`'s mapping (also the entries of laps saved before the spec
        existed: missing keys take their defaults).

        Raises:
            ValueError: for an unknown key, or a value the spec refuses.
        """
        data = dict(data)
        if "num_inference_steps" in data:
            data["steps"] = data.pop("num_inference_steps")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown sampler setting `{unknown[0]}` (known: {', '.join(sorted(names))})")
        for key in ("steps", "corrections", "maxiter"):
            if key in data:
                data[key] = int(data[key])
        for key in ("delta", "tol"):
            if key in data:
                data[key] = float(data[key])
        data["guidance_options"] = dict(data.get("guidance_options") or {})
        return cls(**data)

    def replace(self, **changes) -> "SamplerSpec":
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    # -- use -------------------------------------------------------------------------------------
    def scheduler(self):
        """The sampler: a :class:`~diffem.scheduler.VEScheduler` or a diffusers EDM scheduler."""
        return make_scheduler(self.method, corrections=self.corrections, delta=self.delta)

    def effective_covariance(self, prior_is_gaussian: bool) -> str:
        """The covariance the sampler really uses: ``"tweedie"`` (exact) under a Gaussian prior,
        the spec's otherwise (module docstring)."""
        return "tweedie" if prior_is_gaussian and self.guidance == "mmps" else self.covariance

    def sample(
        self,
        denoiser: Callable[[Tensor, Tensor], Tensor],
        y: Tensor,
        operator,
        event_shape: Sequence[int],
        generator,
        noise_std: float | None = None,
        sigma_x=None,
        batch_size: int = 256,
        device=None,
        progress: bool = False,
    ) -> Tensor:
        r"""One posterior sample per observation, ``(N, *event_shape)`` (:func:`diffem.sampling.sample_posterior`).

        Arguments:
            denoiser: The prior denoiser (a :class:`~diffem.denoiser.Denoiser` or a
                :class:`~diffem.gaussian.GaussianPrior`, whose exact covariance then wins
                over the spec's heuristic).
            y: Observations ``(N, *out_shape)``; operator: batch shape ``(N,)``.
            event_shape: Shape of one ``x``.
            generator: A list of seeded generators, one per block of observations (or one).
            noise_std: :math:`\sigma_y`, when the spec holds none.
            sigma_x: For ``covariance="sigma_x"``: the :class:`~diffem.gaussian.GaussianPrior`
                whose covariance is :math:`\Sigma_x` (the lap-0 prior).

        Raises:
            ValueError: ``noise_std`` given neither here nor in the spec, or given in both with
                different values; ``covariance="sigma_x"`` without ``sigma_x`` under a network
                prior; and :func:`~diffem.sampling.sample_posterior`'s checks.
        """
        if noise_std is None:
            noise_std = self.noise_std
        elif self.noise_std is not None and float(noise_std) != float(self.noise_std):
            raise ValueError(f"`noise_std` {noise_std} differs from the spec's {self.noise_std}")
        if noise_std is None:
            raise ValueError("`noise_std` is required: give it here or in the SamplerSpec")
        covariance = self.effective_covariance(isinstance(denoiser, GaussianPrior))
        options = dict(self.guidance_options)
        if self.guidance == "mmps" and self.solver != "cg":
            options["solver"] = self.solver
        if covariance == "sigma_x":
            if sigma_x is None:
                raise ValueError("covariance 'sigma_x' needs `sigma_x`: the GaussianPrior whose covariance is Sigma_x")
            options["prior"] = sigma_x
        return sample_posterior(
            denoiser, y, operator, noise_std, event_shape, steps=self.steps, maxiter=self.maxiter, tol=self.tol,
            generator=generator, batch_size=batch_size, method=self.method, progress=progress, device=device,
            scheduler=self.scheduler(), guidance=self.guidance, covariance=covariance, guidance_options=options,
        )
