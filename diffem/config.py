"""Run configuration: nested dataclasses loaded from YAML with command-line overrides.

A run is described by ``experiments/<experiment>/<profile>.yaml`` (or any YAML
file), whose keys mirror :class:`EMConfig`. Overrides use dotted keys,
``mstep.lr=1e-3``, parsed as YAML scalars. Unknown keys, wrong types and
out-of-range values fail *before any work starts*, with a message naming the key.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml

__all__ = [
    "EMConfig",
    "LapZeroConfig",
    "EStepConfig",
    "MStepConfig",
    "EvalConfig",
    "HubConfig",
    "KernelConfig",
    "ConfigError",
    "TRAIN_ON",
    "load_config",
    "experiments_dir",
    "config_to_dict",
    "config_from_dict",
]


class ConfigError(ValueError):
    """A configuration problem, raised before any work starts; the message names the key."""


@dataclass
class LapZeroConfig:
    """Lap 0: a Gaussian prior fitted to the observations by EM."""

    rank: int = 64  #: PPCA rank (``d`` for full rank)
    iterations: int = 16  #: EM iterations
    observations: int = 16384  #: how many observations the fit uses (the first ones)
    estep: str = "mmps"  #: "exact" (dense, small d), "sample" or "mmps"
    steps: int = 64  #: sampler steps of the "mmps" E-step
    maxiter: int = 1  #: CG iterations of the "mmps" E-step (the cap when ``tol > 0``)
    tol: float = 0.0  #: relative CG tolerance of the "mmps" E-step (0: always maxiter; the authors: 1e-3, to tolerance)


@dataclass
class EStepConfig:
    """E-step: one MMPS posterior sample per observation under the previous lap's prior."""

    method: str = "ddpm"  #: "ddpm", "ddim", "pc", or diffusers' EDM samplers "edm_euler", "edm_dpmpp", "edm_dpmpp_sde" (diffem.edm)
    steps: int = 256  #: sampler steps
    corrections: int = 1  #: Langevin corrections per step ("pc")
    delta: float = 0.1  #: Langevin step size ("pc")
    maxiter: int = 1  #: CG iterations (the cap when ``tol > 0``)
    tol: float = 0.0  #: relative CG tolerance (0: always maxiter; the authors' manifold: 1e-3, to tolerance)
    #: MMPS's linear solver: "cg" (the paper's) or "gmres" (for the non-symmetric system of a learned
    #: Jacobian; azula's default); same cost per iteration (diffem.linalg)
    solver: str = "cg"
    batch_size: int = 256  #: observations per sampler call and per saved chunk (a multiple of block)
    block: int = 1  #: observations sharing one generator; samples depend on this, not on batch size
    discard_outside: float | None = None  #: drop samples with any |x_i| >= this before the M-step (authors: 3, manifold)
    guidance: str = "mmps"  #: posterior method: "mmps", "dps", "pigdm", "tmpd" or "diffpir" (diffem.posterior)
    #: MMPS covariance under a network prior: "tweedie" (sigma^2 J), "prior" ((I + Sigma_t^-1)^-1),
    #: "sigma_t" or "sigma_x" (the lap-0 Gaussian's Sigma_x, fixed); under the lap-0 Gaussian (lap 1's
    #: E-step) the Gaussian's exact covariance is used whatever this says (diffem.spec)
    covariance: str = "tweedie"
    #: drop (with a warning, counted in the record) samples with any |x_i| > outlier_factor x the
    #: task's data bound (images: 2, data in [-2, 2]); None: keep them
    outlier_factor: float | None = 10.0
    #: stop the lap before its M-step when more than this fraction of the samples are outliers
    max_outlier_fraction: float = 0.01
    dps_zeta: float = 1.0  #: DPS step size zeta >= 0 ("dps")
    pigdm_weight: float = 1.0  #: PiGDM guidance weight > 0 ("pigdm")
    diffpir_lambda: float = 7.0  #: DiffPIR regularisation lambda > 0 ("diffpir")



@dataclass
class MStepConfig:
    """M-step: denoising score matching on the posterior samples."""

    steps: int = 1000  #: optimizer steps per lap (``epochs`` overrides it when > 0)
    epochs: float = 0.0  #: passes over the samples per lap (0: use ``steps``)
    batch_size: int = 256  #: global batch size (split over processes)
    lr: float = 2e-4
    lr_end: float | None = None  #: linear decay to this value over the lap (None: constant)
    weight_decay: float = 0.0
    grad_clip: float = 1.0  #: max gradient norm (0: off)
    ema_decay: float = 0.9999  #: EMA decay (diffusers EMAModel, with its (1+n)/(10+n) warm-up)
    augment: bool = False  #: the experiment's data augmentation (CIFAR-10: flips and 1-px shifts)
    #: ``train_on: ambient``: the further-corruption fraction delta of the observed pixels hidden from
    #: the network's input at every step (Daras et al. 2023: 0.1 for CIFAR-10)
    ambient_delta: float = 0.1
    checkpoint_every: int = 500  #: steps between resumable checkpoints
    log_every: int = 50


@dataclass
class EvalConfig:
    """Per-lap evaluation of the prior (the experiment's metric)."""

    samples: int = 1024  #: prior samples drawn for the metric
    method: str = "ddim"
    steps: int = 64
    batch_size: int = 256
    every: int = 1  #: evaluate every ``every`` laps (lap 0 and the last lap always)
    powers_of_two: bool = False  #: evaluate laps 1, 2, 4, 8, ... instead of every ``every``


@dataclass
class HubConfig:
    """Push each finished lap to the Hugging Face Hub while training (:func:`diffem.hub.push_after_lap`).

    Lap ``k`` goes to the branch ``lap-KK`` of ``repo_id``, ``main`` follows the newest lap. The
    token comes from ``$HF_TOKEN`` or ``hf auth login``, never from the config.
    """

    repo_id: str = ""  #: ``namespace/name``; empty: no pushing
    private: bool = False  #: create the repo private
    license: str = "mit"  #: the model card's license


#: The values of ``train_on`` (:class:`EMConfig`): EM, then the references without an E-step.
TRAIN_ON = ("posterior", "clean", "observed", "ambient")


@dataclass
class KernelConfig:
    """Speed options of the network's kernels (:mod:`diffem.kernels`); the defaults are the plain fp32 path.

    Each changes how the same maths runs, not what it computes, up to float round-off (TF32 and
    ``compile`` up to their own precision): the ``paper`` profiles state which they use and why.
    """

    tf32: bool = False  #: TF32 for CUDA matmuls and convolutions (no effect on the CPU)
    channels_last: bool = False  #: the network's 4-D weights in channels_last memory format (images)
    compile: str = ""  #: a ``torch.compile`` backend for the denoiser in the M-step and the E-step ("" off)
    fused_adam: bool = False  #: ``torch.optim.Adam(fused=True)``: one kernel for every parameter
    foreach_ema: bool = False  #: diffusers ``EMAModel(foreach=True)``: multi-tensor EMA updates
    #: read the M-step's finiteness check (loss and gradient norm, one host-device sync) every ``k`` steps,
    #: and always before a checkpoint and at the end: nothing non-finite is ever saved
    check_every: int = 1


@dataclass
class EMConfig:
    """A whole EM run.

    ``data`` and ``network`` are experiment-specific mappings, validated by the
    experiment (:mod:`diffem.tasks`).
    """

    experiment: str = "manifold"
    profile: str = "cpu"
    seed: int = 0
    precision: str = "fp32"  #: "fp32" or "bf16": the M-step's mixed precision (accelerate); fp16 is refused
    timeout_minutes: float = 60.0  #: process-group timeout (accelerate InitProcessGroupKwargs)
    output_dir: str = ""  #: default: runs/<experiment>-<profile>
    laps: int = 8
    #: what the M-step trains on: "posterior" (EM: E-step posterior samples, the method), or a
    #: reference without an E-step and without lap 0: "clean" (the oracle: the clean signals
    #: behind the observations, ground truth a real user does not have) or "observed" (naive:
    #: A^T y, the observations as if they were clean; a mask's deleted pixels are 0, mid-grey
    #: in [-2, 2] units) or "ambient" (Ambient Diffusion's objective on the masked observations,
    #: with ``mstep.ambient_delta``; mask operators only)
    train_on: str = "posterior"
    data: dict = field(default_factory=dict)
    network: dict = field(default_factory=dict)
    lap0: LapZeroConfig = field(default_factory=LapZeroConfig)
    estep: EStepConfig = field(default_factory=EStepConfig)
    mstep: MStepConfig = field(default_factory=MStepConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)

    def validate(self) -> "EMConfig":
        """Check ranges; raise :class:`ConfigError` naming the key."""
        from .spec import COVARIANCES, GUIDANCES, SAMPLER_METHODS, SOLVERS

        checks = [
            ("laps", self.laps >= 0, "must be >= 0"),
            ("train_on", self.train_on in TRAIN_ON, f"must be one of {', '.join(TRAIN_ON)}, got {self.train_on!r}"),
            ("mstep.ambient_delta", 0 <= self.mstep.ambient_delta < 1, "must be in [0, 1)"),
            ("laps", self.train_on == "posterior" or self.laps >= 1,
             f"must be >= 1 with train_on={self.train_on!r} (a reference run has no lap 0)"),
            ("seed", self.seed >= 0, "must be >= 0"),
            ("precision", self.precision in ("fp32", "bf16"),
             f"must be fp32 or bf16, got {self.precision!r} (fp16 is refused: the denoising loss weights "
             "1 / sigma^2 + 1 reach 1e6 at sigma_min = 1e-3, beyond float16's range of 6.5e4; use bf16)"),
            ("timeout_minutes", self.timeout_minutes > 0, "must be > 0"),
            ("lap0.rank", self.lap0.rank >= 0, "must be >= 0"),
            ("lap0.iterations", self.lap0.iterations >= 0, "must be >= 0"),
            ("lap0.observations", self.lap0.observations >= 2, "must be >= 2"),
            ("lap0.estep", self.lap0.estep in ("exact", "sample", "mmps"), "must be exact, sample or mmps"),
            ("estep.method", self.estep.method in SAMPLER_METHODS, f"must be one of {', '.join(SAMPLER_METHODS)}"),
            ("estep.steps", self.estep.steps >= 1, "must be >= 1"),
            ("estep.maxiter", self.estep.maxiter >= 1, "must be >= 1"),
            ("estep.guidance", self.estep.guidance in GUIDANCES, f"must be one of {', '.join(GUIDANCES)}"),
            ("estep.covariance", self.estep.covariance in COVARIANCES, f"must be one of {', '.join(COVARIANCES)}"),
            ("estep.tol", self.estep.tol >= 0, "must be >= 0"),
            ("estep.solver", self.estep.solver in SOLVERS, f"must be one of {', '.join(SOLVERS)}"),
            ("estep.solver", self.estep.solver == "cg" or self.estep.guidance == "mmps",
             "applies to estep.guidance mmps only (keep cg)"),
            ("lap0.tol", self.lap0.tol >= 0, "must be >= 0"),
            ("estep.outlier_factor", self.estep.outlier_factor is None or self.estep.outlier_factor > 0,
             "must be > 0 (or null: keep every finite sample)"),
            ("estep.max_outlier_fraction", 0 <= self.estep.max_outlier_fraction <= 1, "must be in [0, 1]"),
            ("estep.covariance", self.estep.covariance == "tweedie" or self.estep.guidance == "mmps",
             "applies to estep.guidance=mmps only (keep tweedie for other methods)"),
            ("estep.dps_zeta", self.estep.dps_zeta >= 0, "must be >= 0"),
            ("estep.pigdm_weight", self.estep.pigdm_weight > 0, "must be > 0"),
            ("estep.diffpir_lambda", self.estep.diffpir_lambda > 0, "must be > 0"),
            ("estep.block", self.estep.block >= 1, "must be >= 1"),
            ("estep.batch_size", self.estep.batch_size >= 1 and self.estep.batch_size % self.estep.block == 0,
             "must be a positive multiple of estep.block"),
            ("mstep.steps", self.mstep.steps >= 0, "must be >= 0"),
            ("mstep.epochs", self.mstep.epochs >= 0, "must be >= 0"),
            ("mstep.batch_size", self.mstep.batch_size >= 1, "must be >= 1"),
            ("mstep.lr", self.mstep.lr > 0, "must be > 0"),
            ("mstep.ema_decay", 0 <= self.mstep.ema_decay < 1, "must be in [0, 1)"),
            ("mstep.checkpoint_every", self.mstep.checkpoint_every >= 1, "must be >= 1"),
            ("eval.samples", self.eval.samples >= 0, "must be >= 0"),
            ("eval.method", self.eval.method in ("ddpm", "ddim", "pc"), "must be ddpm, ddim or pc"),
            ("eval.every", self.eval.every >= 1, "must be >= 1"),
            ("kernels.check_every", self.kernels.check_every >= 1, "must be >= 1"),
            ("kernels.compile", self.kernels.compile in ("",) + COMPILE_BACKENDS,
             f"must be '' (off) or a torch.compile backend: {', '.join(COMPILE_BACKENDS)}"),
        ]
        for key, ok, why in checks:  # the names come from one registry, diffem.spec
            if not ok:
                raise ConfigError(f"config key `{key}` {why}")
        if self.hub.repo_id:
            from .hub.names import PublishError, check_repo_id  # a leaf: config sits below the Hub

            try:
                check_repo_id(self.hub.repo_id)
            except PublishError as e:
                raise ConfigError(f"config key `hub.repo_id`: {e}") from None
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or f"runs/{self.experiment}-{self.profile}")


#: The ``torch.compile`` backends ``kernels.compile`` accepts.
COMPILE_BACKENDS = ("inductor", "cudagraphs", "aot_eager", "eager")


def experiments_dir() -> Path:
    """The folder of experiment configs: ``$DIFFEM_EXPERIMENTS`` or the repository's ``experiments/``."""
    env = os.environ.get("DIFFEM_EXPERIMENTS")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "experiments"


def _coerce(key: str, value: Any, hint: Any, default: Any):
    if value is None:
        return None
    origin = str(hint)
    if isinstance(value, str) and (hint in (int, float) or "float" in origin):
        try:  # YAML reads 1e-3 as a string
            value = float(value) if "float" in origin or hint is float else int(value)
        except ValueError:
            pass
    if hint is bool or origin == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"config key `{key}` must be true or false, got {value!r}")
        return value
    if hint is int or origin == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"config key `{key}` must be an integer, got {value!r}")
        return value
    if hint is float or "float" in origin:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key `{key}` must be a number, got {value!r}")
        return float(value)
    if hint is str or origin == "str":
        if not isinstance(value, str):
            raise ConfigError(f"config key `{key}` must be a string, got {value!r}")
        return value
    if hint is dict or origin.startswith("dict"):
        if not isinstance(value, dict):
            raise ConfigError(f"config key `{key}` must be a mapping, got {value!r}")
        return dict(value)
    return value


def _from_dict(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"config key `{prefix.rstrip('.') or '<root>'}` must be a mapping, got {data!r}")
    hints = get_type_hints(cls)
    names = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown config key `{prefix}{unknown[0]}` (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _from_dict(hint, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(f"{prefix}{name}", value, hint, None)
    return cls(**kwargs)


def config_from_dict(data: dict) -> EMConfig:
    """A validated :class:`EMConfig` from plain data (a run's ``config.yaml``, :func:`config_to_dict`'s output).

    Raises:
        ConfigError: for an unknown key, a bad type or value (the message names the key).
    """
    return _from_dict(EMConfig, data).validate()


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key `{key}`: `{p}` is not a mapping")
    node[parts[-1]] = value


def config_to_dict(config: EMConfig) -> dict:
    """The resolved configuration as plain data (what is saved beside a run)."""
    return dataclasses.asdict(config)


def load_config(
    experiment: str | None = None,
    profile: str = "cpu",
    path: str | os.PathLike | None = None,
    overrides: list[str] | dict | None = None,
) -> EMConfig:
    """Load and validate a configuration.

    Arguments:
        experiment: The experiment name; its config is ``experiments/<experiment>/<profile>.yaml``.
        profile: The profile name.
        path: An explicit YAML file (instead of experiment + profile).
        overrides: ``["key.sub=value", ...]`` or a ``{"key.sub": value}`` mapping.

    Raises:
        ConfigError: for a profile or file that does not exist, an unknown key, a bad type or
            value; always before any work starts.
    """
    if path is None:
        if experiment is None:
            raise ConfigError("give an experiment name or a config `path`")
        folder = experiments_dir() / experiment
        if not folder.is_dir():
            known = sorted(p.name for p in experiments_dir().iterdir() if (p / "cpu.yaml").exists()) if experiments_dir().is_dir() else []
            raise ConfigError(f"unknown experiment `{experiment}` (known: {', '.join(known)})")
        path = folder / f"{profile}.yaml"
        if not path.exists():
            known = sorted(p.stem for p in folder.glob("*.yaml"))
            raise ConfigError(f"profile `{profile}` does not exist for `{experiment}` (known: {', '.join(known)})")
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file `{path}` does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file `{path}` must hold a mapping")
    if experiment is not None:
        data.setdefault("experiment", experiment)
    data.setdefault("profile", profile if path.stem == profile else path.stem)
    if isinstance(overrides, dict):
        overrides = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}" for k, v in overrides.items()]
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override `{item}` must look like key=value")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), yaml.safe_load(raw))
    return _from_dict(EMConfig, data).validate()
