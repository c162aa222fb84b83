r"""The diffusion prior as a diffusers pipeline: unconditional and posterior sampling.

``DiffusionPriorPipeline(unet, scheduler)`` holds a backbone (a diffusers
``UNet2DModel``, a :class:`~diffem.networks.MLP`, or a :class:`~diffem.gaussian.GaussianPrior`
for lap 0) and a :class:`~diffem.scheduler.VEScheduler`. Called without an
observation it samples the prior :math:`q_\theta(x)`; with an observation ``y``,
an operator ``A`` and a noise level :math:`\sigma_y`, it samples the posterior
:math:`q_\theta(x \mid y)` with MMPS (Rozet et al. 2024, arXiv:2405.13712, Section 4).
Each EM lap is saved as one such pipeline folder (``save_pretrained``). Its scheduler is
the evaluation's (unconditional samples); ``sampling.json`` beside it holds the E-step's
sampler settings, so that posterior sampling can repeat the E-step exactly::

    pipe = DiffusionPriorPipeline.from_pretrained("runs/manifold-cpu/lap_08")
    settings = load_sampling_settings("runs/manifold-cpu/lap_08")["estep"]
    pipe.scheduler = estep_scheduler(settings)
    pipe(observation=y, operator=A, noise_std=0.01, generator=gens,
         num_inference_steps=settings["num_inference_steps"], maxiter=settings["maxiter"])

Loading: :meth:`DiffusionPriorPipeline.from_pretrained` loads a lap folder, and a folder or Hub
repo written by ``diffem publish`` (:func:`load_prior`: diffem's own classes, safetensors
weights only, none of the repository's code executed; see :mod:`diffem.hub` for the published
layout). The run folder's names (``sampling.json``, ``lap_KK``) come from :mod:`diffem.runs`.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from torch import Tensor

from .denoiser import Denoiser
from .gaussian import GaussianPrior
from .operators import LinearOperator, check_batch
from .posterior import MMPSDenoiser
from .runs import SAMPLING_FILE, load_sampling_settings
from .sampling import sample
from .scheduler import VEScheduler
from .spec import SamplerSpec

__all__ = [
    "DiffusionPriorPipeline",
    "DiffusionPriorPipelineOutput",
    "event_shape_of",
    "denoiser_of",
    "SAMPLING_FILE",
    "load_sampling_settings",
    "estep_scheduler",
    "load_estep_spec",
    "PIPELINE_MODULE",
    "load_prior",
    "load_published",
    "published_index",
]

#: The root re-export file of the pipeline class in a published folder (``_class_name`` of its
#: ``model_index.json`` is ``[PIPELINE_MODULE, "DiffusionPriorPipeline"]``; see :mod:`diffem.hub`).
PIPELINE_MODULE = "diffem_pipeline"


def estep_scheduler(settings: dict) -> VEScheduler:
    """The scheduler of a settings mapping (``load_sampling_settings(folder)["estep"]``, or a part of
    one): :meth:`SamplerSpec.from_dict(settings).scheduler() <diffem.spec.SamplerSpec.scheduler>`."""
    return SamplerSpec.from_dict(settings).scheduler()


@dataclass
class DiffusionPriorPipelineOutput(BaseOutput):
    """``samples``: ``(B, *event_shape)`` float tensor in data units (images in about [-2, 2])."""

    samples: Tensor


def event_shape_of(backbone) -> tuple:
    """The shape of one sample of a backbone: ``(C, H, W)`` for a U-Net, ``(d,)`` for an MLP."""
    if isinstance(backbone, GaussianPrior):
        return tuple(backbone.event_shape)
    config = backbone.config
    if "features" in config:
        return (config.features,)
    if "sample_size" in config and "in_channels" in config:
        size = config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (config.in_channels, h, w)
    raise ValueError(f"cannot infer the event shape of backbone {type(backbone).__name__}")


def denoiser_of(backbone):
    """The denoiser of a backbone: a :class:`GaussianPrior` is its own exact denoiser."""
    return backbone if isinstance(backbone, GaussianPrior) else Denoiser(backbone)


class DiffusionPriorPipeline(DiffusionPipeline):
    r"""Sample a diffusion prior, or its posterior given linear-Gaussian observations.

    Arguments:
        unet: The backbone (``UNet2DModel``, :class:`~diffem.networks.MLP`) or a
            :class:`~diffem.gaussian.GaussianPrior`.
        scheduler: A :class:`~diffem.scheduler.VEScheduler`.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet, scheduler: VEScheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load a saved lap folder, or a folder / Hub repo written by ``diffem publish``.

        A published prior (its ``model_index.json`` names diffem's re-export files) loads with
        diffem's own classes, without ``trust_remote_code`` and without executing any file of
        the repository (:func:`load_published`, safetensors weights only), e.g.
        ``DiffusionPriorPipeline.from_pretrained("someone/diffem-cifar10", revision="lap-03")``.
        Anything else goes to diffusers' ``DiffusionPipeline.from_pretrained``.
        """
        pipe = load_published(pretrained_model_name_or_path, **kwargs)
        return pipe if pipe is not None else super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @property
    def event_shape(self) -> tuple:
        return event_shape_of(self.unet)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 64,
        generator: torch.Generator | list[torch.Generator] | None = None,
        observation: Tensor | None = None,
        operator: LinearOperator | None = None,
        noise_std: float | None = None,
        maxiter: int = 1,
        return_dict: bool = True,
        progress: bool = True,
        spec: SamplerSpec | None = None,
        sigma_x=None,
    ):
        r"""Draw samples.

        Arguments:
            batch_size: Number of samples (ignored, and must match, when ``observation`` is given).
            num_inference_steps: Sampler steps (the scheduler's ``method``: DDPM, DDIM or PC).
            generator: A seeded ``torch.Generator`` or a list of ``batch_size`` of them (one per
                sample: the samples then do not depend on the batch size). Required.
            observation: ``y``, ``(B, *out_shape)``, for posterior sampling.
            operator: ``A``, batch shape ``(B,)``; required with ``observation``.
            noise_std: :math:`\sigma_y > 0`; required with ``observation``.
            maxiter: CG iterations of MMPS (without ``spec``).
            spec: A :class:`~diffem.spec.SamplerSpec` (with ``observation``): sample the posterior
                exactly as it says, e.g. a lap's E-step (:func:`load_estep_spec`); it then
                replaces ``num_inference_steps``, ``maxiter`` and the pipeline's scheduler.
                Without it: MMPS (Tweedie, ``maxiter`` CG iterations) under the scheduler.
            sigma_x: For a spec with ``covariance="sigma_x"``: the GaussianPrior of
                :math:`\Sigma_x` (the run's lap-0 prior, ``from_pretrained(run/lap_00).unet``).

        Returns:
            :class:`DiffusionPriorPipelineOutput` with ``samples`` ``(B, *event_shape)``, or a tuple.

        Raises:
            ValueError: on a missing generator, a missing operator / noise level, or shapes
                that do not match.
        """
        if generator is None:
            raise ValueError("`generator` is required: pass a seeded torch.Generator or a list of them")
        denoiser = denoiser_of(self.unet)
        if spec is not None:
            if observation is None or operator is None:
                raise ValueError("`spec` samples a posterior: give `observation` and `operator` too")
            if isinstance(generator, list) and len(generator) != observation.shape[0]:
                raise ValueError(f"`generator` is a list of {len(generator)}, expected one per sample ({observation.shape[0]})")
            x = spec.sample(denoiser, observation.to(self.device), operator.to(self.device), self.event_shape,
                            generator if isinstance(generator, list) else [generator], noise_std=noise_std,
                            sigma_x=sigma_x, batch_size=observation.shape[0], device=self.device, progress=progress)
            return DiffusionPriorPipelineOutput(samples=x) if return_dict else (x,)
        if observation is not None:
            if operator is None or noise_std is None:
                raise ValueError("`operator` and `noise_std` are required with `observation`")
            batch_size = observation.shape[0]
            check_batch(operator, batch_size)
            denoiser = MMPSDenoiser(denoiser, observation.to(self.device), operator.to(self.device), noise_std, maxiter)
        elif operator is not None or noise_std is not None:
            raise ValueError("`operator` and `noise_std` are only meaningful with `observation`")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"`generator` is a list of {len(generator)}, expected one per sample ({batch_size})")
        x = sample(
            denoiser,
            (batch_size, *self.event_shape),
            self.scheduler,
            num_inference_steps,
            generator,
            progress=progress,
            device=self.device,
        )
        if not return_dict:
            return (x,)
        return DiffusionPriorPipelineOutput(samples=x)


def load_estep_spec(folder) -> SamplerSpec:
    """The :class:`~diffem.spec.SamplerSpec` of the E-step a saved lap was trained with
    (``sampling.json``'s ``"estep"``), for ``pipe(..., spec=load_estep_spec(folder))``.

    Raises:
        FileNotFoundError: for a folder saved without ``sampling.json``.
    """
    return SamplerSpec.from_dict(load_sampling_settings(folder)["estep"])


# -- loading a published prior ---------------------------------------------------------------------
_COMPONENT_BASES = ("ModelMixin", "SchedulerMixin")


def _component_class(module: str, cls: str):
    """A component class named in a published ``model_index.json``, from diffusers or diffem only."""
    import diffusers

    if module == "diffusers":
        obj = getattr(diffusers, cls, None)
    elif module == "diffem" or module.startswith(("diffem.", "diffem_")):
        dotted = module if not module.startswith("diffem_") else "diffem." + module[len("diffem_"):]
        try:
            obj = getattr(importlib.import_module(dotted), cls, None)
        except ImportError:
            obj = None
    else:
        obj = None
    if obj is None or not isinstance(obj, type) or not issubclass(obj, (diffusers.ModelMixin, diffusers.SchedulerMixin)):
        raise ValueError(f"component [{module!r}, {cls!r}] of model_index.json is neither a diffusers nor a diffem "
                         "model or scheduler class")
    return obj


def load_prior(path_or_repo_id, revision: str | None = None, token: str | None = None, cache_dir=None,
               local_files_only: bool | None = None, device=None):
    """Load a published prior (a local repo folder or a Hub repo id) without running the repo's code.

    The repo's re-export files are not executed: each component named in ``model_index.json``
    is mapped to its diffusers or diffem class (``diffem_networks`` -> ``diffem.networks``) and
    loaded with that class's ``from_pretrained`` (weights from safetensors only, never unpickled).
    Also loads plain lap folders (``run_dir/lap_KK``).

    Arguments:
        path_or_repo_id: A folder with ``model_index.json``, or ``namespace/name`` on the Hub.
        revision: The Hub revision, e.g. ``"lap-03"`` (default ``main``).
        token, cache_dir, local_files_only: Passed to ``huggingface_hub.snapshot_download``.
        device: Optional device to move the pipeline to.

    Returns:
        A :class:`~diffem.pipeline.DiffusionPriorPipeline`.

    Raises:
        ValueError: for a component class outside diffusers and diffem.
    """
    from diffusers import ModelMixin

    folder = Path(path_or_repo_id)
    if not (folder / "model_index.json").is_file():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(
            str(path_or_repo_id), revision=revision, token=token, cache_dir=cache_dir,
            local_files_only=bool(local_files_only), ignore_patterns=["*.py", "*.bin", "*.pt", "*.pkl"],
        ))
    index = json.loads((folder / "model_index.json").read_text())
    components = {}
    for name in ("unet", "scheduler"):
        module, cls = index[name]
        klass = _component_class(module, cls)
        safe = {"use_safetensors": True} if issubclass(klass, ModelMixin) else {}  # never unpickle weights
        components[name] = klass.from_pretrained(folder, subfolder=name, **safe)
    pipe = DiffusionPriorPipeline(**components)
    return pipe.to(device) if device is not None else pipe


_LOAD_KWARGS = ("revision", "token", "cache_dir", "local_files_only")


def published_index(path_or_repo_id, revision: str | None = None, token: str | None = None, cache_dir=None,
                    local_files_only: bool = False) -> dict | None:
    """The ``model_index.json`` of a folder or Hub repo written by ``diffem publish``, else ``None``.

    Published: ``_class_name`` is ``["diffem_pipeline", ...]`` (see :func:`diffem.hub.build_repo_folder`). A
    Hub repo id costs one ``model_index.json`` download (or a cache hit).
    """
    folder = Path(path_or_repo_id)
    if folder.is_dir():
        if not (folder / "model_index.json").is_file():
            return None
        index = json.loads((folder / "model_index.json").read_text())
    else:
        # hub.names is a leaf; imported here, not at the top, since the package diffem.hub re-exports this module
        from .hub.names import PublishError, check_repo_id

        try:
            check_repo_id(str(path_or_repo_id))
        except PublishError:
            return None
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(str(path_or_repo_id), "model_index.json", revision=revision, token=token,
                               cache_dir=cache_dir, local_files_only=local_files_only)
        index = json.loads(Path(path).read_text())
    name = index.get("_class_name")
    return index if isinstance(name, list) and name[:1] == [PIPELINE_MODULE] else None


def load_published(path_or_repo_id, **kwargs):
    """:func:`load_prior` for a folder or repo written by ``diffem publish``; ``None`` for anything else.

    ``DiffusionPriorPipeline.from_pretrained`` calls it first, so that diffem's own class loads a
    published prior without ``trust_remote_code`` (diffusers' loader must run the re-export files).

    Arguments:
        kwargs: ``revision``, ``token``, ``cache_dir``, ``local_files_only`` and
            ``trust_remote_code`` (ignored: nothing is executed). Any other keyword returns ``None``
            (diffusers' own loader handles it).
    """
    kwargs = {k: v for k, v in kwargs.items() if k != "trust_remote_code"}
    if set(kwargs) - set(_LOAD_KWARGS):
        return None
    if published_index(path_or_repo_id, **kwargs) is None:
        return None
    return load_prior(path_or_repo_id, **kwargs)
