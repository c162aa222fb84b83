r"""Publishing EM priors to the Hugging Face Hub: one repo folder per lap, one revision per lap.

Between a finished lap of a run (``run_dir/lap_KK``, a :class:`~diffem.pipeline.DiffusionPriorPipeline`
folder, its line of ``metrics.jsonl`` and the run's ``config.yaml``, see :mod:`diffem.em`) and
``huggingface_hub``. The API client is an argument, so that uploads can be tested offline.

The repo folder of lap ``k`` (:func:`build_repo_folder`)::

    model_index.json        the pipeline index; diffem's classes are named through the re-export files
    diffem_pipeline.py      ``from diffem.pipeline import DiffusionPriorPipeline`` (trust_remote_code route)
    unet/                   the backbone (``save_pretrained``); ``diffem_<module>.py`` re-export if not diffusers'
    scheduler/              the :class:`~diffem.scheduler.VEScheduler` config and its re-export file
    ...                     any other file of the lap folder (e.g. the E-step sampler settings)
    config.yaml             the run's resolved configuration
    metrics.json            the lap's record of ``metrics.jsonl``
    README.md               the model card (``huggingface_hub.ModelCard``); every number from the files above

Why re-export files: diffusers 0.42 records diffem's classes by module path (``["diffem.networks",
"MLP"]``), which only loads from a local folder with diffem's own pipeline class; loading by Hub repo
id refuses components outside diffusers unless ``<component>/<module>.py`` exists in the repo. With
the re-export files, ``diffusers.DiffusionPipeline.from_pretrained(repo_id, trust_remote_code=True)``
works (diffem installed); :func:`load_prior` loads the same folder or repo **without** executing any
of the repo's code, by mapping the re-export names back to diffem's classes. A ``UNet2DModel``
backbone stays ``["diffusers", "UNet2DModel"]``: ``UNet2DModel.from_pretrained(repo_id,
subfolder="unet")`` loads the network alone.

Revisions: lap ``k`` goes to the branch ``lap-KK``; ``main`` holds the newest lap published. A
ledger in the run folder (``hub_uploads.json``) records, per repo id and revision, a fingerprint of
what was uploaded (the lap folder's bytes, its metrics record and ``config.yaml``); a rerun skips
revisions whose fingerprint is unchanged, so an interrupted ``--all-laps`` resumes where it stopped.

Secrets: the token is given to the API client only; every message that could quote it passes
through :func:`redact`, and a folder that contains it is refused before upload.

References:
    Rozet et al., "Learning Diffusion Priors from Observations by Expectation Maximization",
    NeurIPS 2024, arXiv:2405.13712.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import yaml

__all__ = [
    "PublishError",
    "METRICS",
    "LEDGER_NAME",
    "revision_name",
    "check_repo_id",
    "resolve_token",
    "redact",
    "finished_laps",
    "check_lap_folder",
    "read_run",
    "build_model_card",
    "build_repo_folder",
    "check_repo_folder",
    "load_prior",
    "load_published",
    "published_index",
    "publish",
    "push_after_lap",
]

logger = logging.getLogger(__name__)

#: The ledger of uploads, in the run folder.
LEDGER_NAME = "hub_uploads.json"
#: Files every published folder holds besides the pipeline's.
RUN_FILES = ("config.yaml", "metrics.json", "README.md")
#: The root re-export file of the pipeline class (``_class_name`` of ``model_index.json``).
PIPELINE_MODULE = "diffem_pipeline"
#: Metrics of ``metrics.jsonl`` reported in the card's ``model-index``: key -> (metric type, metric name).
METRICS: dict[str, tuple[str, str]] = {
    "fid": ("fid", "FID"),
    "kid": ("kid", "KID"),
    "isc": ("inception_score", "Inception score"),
    "psnr_posterior_mean": ("psnr", "PSNR of the posterior mean (dB)"),
    "psnr_posterior_sample": ("psnr", "PSNR of one posterior sample (dB)"),
    "ssim_posterior_mean": ("ssim", "SSIM of the posterior mean"),
    "psnr_zero_filled": ("psnr", "PSNR of the zero-filled image (dB)"),
    "ssim_zero_filled": ("ssim", "SSIM of the zero-filled image"),
    "sinkhorn": ("sinkhorn_divergence", "Sinkhorn divergence"),
}
_REPO_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_CARD_KEYS = ("library_name", "pipeline_tag", "tags", "license", "datasets", "model-index")


class PublishError(ValueError):
    """A problem found before anything is uploaded; the message names what to fix (never the token)."""


# -- names, tokens, secrets ---------------------------------------------------------------------------
def revision_name(lap: int) -> str:
    """The branch of lap ``lap``: ``lap-KK`` (``lap-03``)."""
    if isinstance(lap, bool) or not isinstance(lap, int) or lap < 0:
        raise ValueError(f"`lap` must be a non-negative integer, got {lap!r}")
    return f"lap-{lap:02d}"


def check_repo_id(repo_id) -> str:
    """``repo_id`` if it has the form ``namespace/name`` that the Hub accepts.

    Raises:
        PublishError: for anything else (no namespace, empty parts, characters other than
            letters, digits, ``-``, ``_``, ``.``, ``--`` or ``..`` inside, a trailing ``.git``).
    """
    parts = repo_id.split("/") if isinstance(repo_id, str) else []
    ok = (
        len(parts) == 2
        and all(_REPO_NAME.match(p) for p in parts)
        and "--" not in repo_id
        and ".." not in repo_id
        and not repo_id.endswith((".", "-", ".git"))
    )
    if not ok:
        raise PublishError(
            f"repo id {repo_id!r} has a bad format: expected `namespace/name` (your user or organisation, "
            "a slash, the model name; letters, digits, '-', '_' and '.' only), e.g. `someone/diffem-manifold`"
        )
    return repo_id


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set to a true value, now or at import."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return env.strip().upper() in ("1", "ON", "YES", "TRUE") or bool(constants.HF_HUB_OFFLINE)


def resolve_token(token: str | None = None) -> str | None:
    """The token to upload with: ``token``, else ``$HF_TOKEN``, else huggingface_hub's login (``hf auth login``)."""
    if token:
        return token
    from huggingface_hub import get_token

    return get_token()


def redact(text: str, token: str | None) -> str:
    """``text`` with every occurrence of ``token`` replaced by ``***``."""
    text = str(text)
    if token:
        text = text.replace(token, "***")
    return text


# -- the run ------------------------------------------------------------------------------------------
def _lap_dir(run_dir: Path, lap: int) -> Path:
    return Path(run_dir) / f"lap_{lap:02d}"


def finished_laps(run_dir) -> list[int]:
    """Laps of ``run_dir`` with a saved pipeline (``lap_KK/model_index.json``), ascending."""
    laps = []
    for p in Path(run_dir).glob("lap_*"):
        m = re.fullmatch(r"lap_(\d+)", p.name)
        if m and p.is_dir() and (p / "model_index.json").is_file():
            laps.append(int(m.group(1)))
    return sorted(laps)


def check_lap_folder(folder) -> dict:
    """Check that a lap folder is a complete pipeline; returns its ``model_index.json``.

    Complete: ``model_index.json`` names a ``unet`` and a ``scheduler``; ``scheduler/`` holds
    ``scheduler_config.json``; every model component holds ``config.json`` and a weights file
    (``*.safetensors`` or ``*.bin``).

    Raises:
        PublishError: naming the missing or unreadable files.
    """
    folder = Path(folder)
    index_file = folder / "model_index.json"
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError) as e:
        raise PublishError(f"lap folder `{folder}` is incomplete: cannot read model_index.json ({e})") from None
    missing = []
    for name in ("unet", "scheduler"):
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0]):
            missing.append(f"a `{name}` entry in model_index.json")
            continue
        sub = folder / name
        if name == "scheduler":
            if not (sub / "scheduler_config.json").is_file():
                missing.append(f"{name}/scheduler_config.json")
        else:
            if not (sub / "config.json").is_file():
                missing.append(f"{name}/config.json")
            weights = [p for p in sub.glob("*") if p.suffix in (".safetensors", ".bin") and p.stat().st_size > 0]
            if not weights:
                missing.append(f"{name}/diffusion_pytorch_model.safetensors (the weights)")
    if missing:
        raise PublishError(f"lap folder `{folder}` is incomplete: missing {', '.join(missing)}")
    return index


@dataclass
class Run:
    """What a run folder says: its config (plain data), one metrics record per lap, finished laps."""

    run_dir: Path
    config: dict
    config_text: str
    records: dict[int, dict]
    laps: list[int] = field(default_factory=list)


def read_run(run_dir) -> Run:
    """Read ``config.yaml``, ``metrics.jsonl`` and the finished laps of a run folder.

    Raises:
        PublishError: when ``run_dir`` is not a run folder or its files do not parse.
    """
    run_dir = Path(run_dir)
    config_file, metrics_file = run_dir / "config.yaml", run_dir / "metrics.jsonl"
    if not config_file.is_file():
        raise PublishError(f"`{run_dir}` is not a run folder: no config.yaml (run `diffem train` first)")
    text = config_file.read_text()
    try:
        config = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise PublishError(f"`{config_file}` is not valid YAML: {e}") from None
    if not isinstance(config, dict):
        raise PublishError(f"`{config_file}` must hold a mapping")
    records: dict[int, dict] = {}
    if metrics_file.is_file():
        for i, line in enumerate(metrics_file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise PublishError(f"`{metrics_file}` line {i} is not JSON") from None
            if isinstance(record, dict) and isinstance(record.get("lap"), int):
                records[record["lap"]] = record  # a resumed lap's newer line wins
    return Run(run_dir, config, text, records, finished_laps(run_dir))


# -- the model card ---------------------------------------------------------------------------------
def _fmt(x, digits: int = 4) -> str:
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _data_options(config: dict) -> dict:
    """``config["data"]`` over the experiment's defaults (what the run used; config.yaml holds only given keys)."""
    defaults = {}
    try:
        from .tasks import TASKS

        module, name = TASKS[config.get("experiment")].split(":")
        defaults = dict(getattr(importlib.import_module(module), name).data_defaults)
    except (KeyError, ImportError, AttributeError, ValueError):
        pass
    return defaults | dict(config.get("data") or {})


def _experiment_facts(config: dict, record: dict) -> dict:
    """Dataset ids, pipeline tag, data description and the posterior-sampling snippet of an experiment."""
    exp = config.get("experiment", "unknown")
    data = _data_options(config)
    n = record.get("observations", data.get("observations", data.get("points")))
    sigma = data.get("noise_std")
    if exp == "cifar10":
        p = data.get("drop_prob")
        return dict(
            datasets=["uoft-cs/cifar10"], pipeline_tag="unconditional-image-generation",
            task_type="unconditional-image-generation", dataset_type="uoft-cs/cifar10",
            dataset_name="CIFAR-10", dataset_split="train", kind="image", event="(3, 32, 32) images in [-2, 2]",
            corruption=(f"{n} CIFAR-10 train images, each observed as y = m * (x + sigma_y e) with a random pixel "
                        f"mask m deleting each pixel (all three channels) with probability {_fmt(p)}, and noise "
                        f"std sigma_y = {_fmt(sigma)} (data in [-2, 2])"),
            operator="`diffem.Mask` (per-image pixel mask, shared over RGB)",
            posterior=("from diffem import Mask\n"
                       "g = torch.Generator().manual_seed(0)\n"
                       f"mask = torch.rand(4, 1, 32, 32, generator=g) > {_fmt(p)}  # True = observed pixel\n"
                       "A = Mask(mask, channels=3)\n"
                       f"y = A(x[:4] + {_fmt(sigma)} * torch.randn(4, 3, 32, 32, generator=g))  # stand-ins for real y"),
            sigma=sigma,
        )
    if exp == "mnist":
        mp = data.get("mask_prob")
        masked = "" if mp is None else f", a random pixel mask deleting each pixel with probability {_fmt(mp)},"
        return dict(
            datasets=["ylecun/mnist"], pipeline_tag="unconditional-image-generation",
            task_type="unconditional-image-generation", dataset_type="ylecun/mnist", dataset_name="MNIST",
            dataset_split=str(data.get("split", "test")), kind="image", event="(1, 28, 28) images in [-2, 2]",
            corruption=(f"{n} MNIST digits of the `{data.get('split', 'test')}` split, each observed as "
                        f"y = x + sigma_y e{masked} with noise std sigma_y = {_fmt(sigma)} (data in [-2, 2])"),
            operator="`diffem.Identity`" + ("" if mp is None else " / `diffem.Mask`"),
            posterior=("from diffem import Identity\n"
                       "g = torch.Generator().manual_seed(0)\n"
                       "A = Identity()\n"
                       f"y = A(x[:4] + {_fmt(sigma)} * torch.randn(4, 1, 28, 28, generator=g))  # stand-ins for real y"),
            sigma=sigma,
        )
    if exp == "manifold":
        d = data.get("features", 5)
        return dict(
            datasets=[], pipeline_tag="other", task_type="unconditional-generation",
            dataset_type="synthetic-manifold",
            dataset_name=f"Random smooth 1-D manifold in R^{d} (diffem, curve seed {data.get('curve_seed', 0)})",
            dataset_split="eval", kind="vector", event=f"({d},) vectors in about [-2, 2]",
            corruption=(f"{n} points of a random smooth 1-D manifold in R^{d}, each observed through its own "
                        f"random 2x{d} projection matrix A_i (unit-norm rows) as y_i = A_i x_i + sigma_y e_i, "
                        f"noise std sigma_y = {_fmt(sigma)}"),
            operator="`diffem.Projection` (one 2x5 matrix per observation)",
            posterior=("from diffem import Projection\n"
                       "g = torch.Generator().manual_seed(0)\n"
                       f"matrix = torch.randn(4, 2, {d}, generator=g)\n"
                       "A = Projection(matrix / matrix.norm(dim=-1, keepdim=True))  # one 2x5 matrix per observation\n"
                       f"y = A(x[:4]) + {_fmt(sigma)} * torch.randn(4, 2, generator=g)  # stand-ins for real y"),
            sigma=sigma,
        )
    if exp == "mri":
        size, R = data.get("size"), data.get("acceleration")
        source = ("the offline brain volumes" if data.get("kind") == "brain"
                  else "fastMRI single-coil knee `reconstruction_rss` slices")
        return dict(
            datasets=[], pipeline_tag="unconditional-image-generation", task_type="unconditional-image-generation",
            dataset_type="fastmri" if data.get("kind") == "fastmri" else "mri-brain-volumes",
            dataset_name=f"MRI slices ({data.get('kind')}, {size}x{size})", dataset_split="eval", kind="image",
            event=f"(1, {size}, {size}) magnitude images in [-2, 2]",
            corruption=(f"{n} MRI slices of {source}, {size}x{size} pixels, each observed as "
                        f"y = M (FFT2c(x) + sigma_y e): a random column mask M of acceleration R = {_fmt(R)} "
                        f"over the centred 2-D FFT, noise std sigma_y = {_fmt(sigma)}"
                        + (f", every observation repeated {data.get('duplicate')} times"
                           if (data.get("duplicate") or 1) > 1 else "")),
            operator="`diffem.SubsampledFourier` (real and imaginary parts as two channels)",
            posterior=("from diffem import SubsampledFourier\n"
                       "from diffem.operators import column_mask\n"
                       f"mask = ...  # (4, {size}) bool: the observed k-space columns, e.g. from column_mask\n"
                       "A = SubsampledFourier(mask)\n"
                       "y = ...  # (4, 2, H, W): real and imaginary k-space, zero on unobserved columns"),
            sigma=sigma,
        )
    return dict(
        datasets=[], pipeline_tag="other", task_type="unconditional-generation", dataset_type=str(exp),
        dataset_name=str(exp), dataset_split=None, kind="other", event="see config.yaml",
        corruption=f"{n} observations of the `{exp}` experiment (operator and noise: see config.yaml)",
        operator="see config.yaml", posterior="A, y = ...  # the experiment's operator and observations",
        sigma=sigma,
    )


def _metric_config(key: str, config: dict, record: dict) -> str | None:
    ev = config.get("eval") or {}
    est = config.get("estep") or {}
    data = _data_options(config)
    sampler = f"{str(ev.get('method', '')).upper()} {ev.get('steps', '?')} steps"
    if key == "kid":
        return (f"{record.get('fid_samples', ev.get('samples'))} prior samples ({sampler}) vs "
                f"{record.get('fid_reference', data.get('fid_reference'))} clean reference images, "
                f"{record.get('kid_subsets')} subsets of {record.get('kid_subset_size')}, std {_fmt(record.get('kid_std'))}")
    if key in ("fid", "isc"):
        ref = record.get("fid_reference_set")
        return (f"{record.get('fid_samples', ev.get('samples'))} prior samples ({sampler}) vs "
                f"{record.get('fid_reference', data.get('fid_reference'))} clean reference images"
                + (f" ({ref})" if ref else ""))
    if config.get("experiment") == "mri" and key.startswith(("psnr", "ssim")):
        what = ("the zero-filled image A^+ y" if key.endswith("zero_filled") else
                f"{record.get('posterior_samples')} MMPS posterior samples ({data.get('posterior_method')} "
                f"{data.get('posterior_steps')} steps, CG {data.get('posterior_maxiter')})")
        return (f"{record.get('eval_slices')} held-out slices at acceleration R = {_fmt(data.get('acceleration'))}, "
                f"{what}; magnitude images, data range 1")
    if key.startswith(("psnr", "ssim")):
        return (f"{record.get('posterior_observations')} observations x {record.get('posterior_samples')} MMPS "
                f"posterior samples ({str(est.get('method', '')).upper()} {est.get('steps')} steps, "
                f"CG {est.get('maxiter')}), data range 4")
    if key == "sinkhorn":
        return (f"{record.get('eval_samples')} prior samples ({sampler}) vs {record.get('eval_points')} "
                f"held-out ground-truth points, entropic OT with lambda = {_fmt(data.get('sinkhorn_reg'))}, "
                "minus the same between two ground-truth sets")
    return None


def _eval_results(config: dict, record: dict, facts: dict):
    from huggingface_hub import EvalResult

    results = []
    for key, (mtype, mname) in METRICS.items():
        value = record.get(key)
        if not _number(value):
            continue
        results.append(EvalResult(
            task_type=facts["task_type"], dataset_type=facts["dataset_type"], dataset_name=facts["dataset_name"],
            dataset_split=facts["dataset_split"], metric_type=mtype, metric_name=mname, metric_value=value,
            metric_config=_metric_config(key, config, record),
        ))
    return results


def _wall_time_s(records: dict[int, dict], lap: int) -> tuple[float, list[int]]:
    """Sum of E-step, M-step and evaluation times of laps 0..lap, and the laps with no record."""
    total, missing = 0.0, []
    for k in range(lap + 1):
        r = records.get(k)
        if r is None:
            missing.append(k)
            continue
        total += sum(float(r.get(f, 0.0) or 0.0) for f in ("estep_time_s", "mstep_time_s", "eval_time_s"))
    return total, missing


def _network_text(config: dict, index: dict | None) -> str:
    net = config.get("network") or {}
    cls = (index or {}).get("unet", [None, None])[1]
    if config.get("experiment") == "manifold":
        return f"MLP, hidden widths {net.get('hidden')}, noise embedding {net.get('emb_features')} (`diffem.MLP`)"
    kind = net.get("kind", "unet")
    if kind == "unet":
        return f"diffusers `UNet2DModel`, diffem preset `{net.get('preset', 'cpu')}`"
    if kind == "dit":
        opts = {k: v for k, v in net.items() if k not in ("kind", "preset") and v is not None}
        return f"DiT (`diffem.DiT`, a diffusers `DiTTransformer2DModel`), {opts}"
    return f"{cls or kind}"


def build_model_card(repo_id: str, lap: int, run: Run, index: dict | None = None, files: Iterable[str] = ()):
    """The model card of lap ``lap`` of a run, as a ``huggingface_hub.ModelCard``.

    Metadata: ``library_name: diffusers``, ``pipeline_tag``, ``tags`` (diffem, diffusion,
    expectation-maximization, inverse-problems, the experiment), ``license`` (``hub.license``
    of the config, default ``mit``), ``datasets`` and ``model-index`` (one ``EvalResult`` per
    metric of :data:`METRICS` present in the lap's record, value as written in ``metrics.jsonl``).
    Text: the corruption, the lap and the number of laps, profile, hardware, wall time, how to
    load and sample, limitations and the citation. Every number is read from ``run``.

    Raises:
        PublishError: when the run has no metrics record for ``lap``.
    """
    from huggingface_hub import ModelCard, ModelCardData

    config, records = run.config, run.records
    if lap not in records:
        raise PublishError(
            f"metrics.jsonl of `{run.run_dir}` has no record for lap {lap}: the lap did not finish "
            "(its record is written after the lap is saved); rerun `diffem train` to finish it"
        )
    record = records[lap]
    exp = str(config.get("experiment", "unknown"))
    profile = str(config.get("profile", "unknown"))
    laps = config.get("laps")
    hub = config.get("hub") or {}
    facts = _experiment_facts(config, record)
    revision = revision_name(lap)
    data = ModelCardData(
        library_name="diffusers",
        pipeline_tag=facts["pipeline_tag"],
        tags=["diffem", "diffusion", "expectation-maximization", "inverse-problems", exp],
        license=str(hub.get("license") or "mit"),
        datasets=facts["datasets"],
        model_name=f"diffem-{exp}-{profile}-{revision}",
        eval_results=_eval_results(config, record, facts) or None,
    )
    lap0, est, mst, ev = (config.get(k) or {} for k in ("lap0", "estep", "mstep", "eval"))
    wall, missing = _wall_time_s(records, lap)
    hardware = record.get("hardware") or "not recorded in this lap's metrics record"
    gaussian = lap == 0

    metric_rows = []
    for key, value in record.items():
        if key in ("lap", "hardware"):
            continue
        if _number(value) or value is None:
            metric_rows.append(f"| `{key}` | {_fmt(value) if value is not None else 'null'} |")
        elif isinstance(value, str):  # one table cell: no pipes, no line breaks, bounded length
            cell = " ".join(value.replace("|", "/").split())
            metric_rows.append(f"| `{key}` | {cell[:200] + ('...' if len(cell) > 200 else '')} |")

    what = (
        f"the lap-0 prior of the run: a Gaussian N(mu, D I + U U^T) of rank {lap0.get('rank')} fitted by "
        f"{lap0.get('iterations')} EM iterations to {lap0.get('observations')} observations"
        if gaussian else
        f"a diffusion prior after EM lap {lap} of {laps}: a denoiser network ({_network_text(config, index)}) "
        "trained by denoising score matching on posterior samples of the observations"
    )
    sigma = facts["sigma"]
    diffusers_version = (index or {}).get("_diffusers_version", "")
    epochs = f" ({_fmt(mst['epochs'])} epochs)" if mst.get("epochs") else ""
    wall_text = f"{wall:.0f} s" if wall < 120 else f"{_fmt(wall / 60, 3)} min"
    extra = sorted(set(files or ()) - {"model_index.json", "README.md", "config.yaml", "metrics.json"})
    files_text = "".join(f"\n- `{f}`" for f in extra)
    load_net = (
        "\nThe network alone (a diffusers `UNet2DModel`):\n\n```python\nfrom diffusers import UNet2DModel\n\n"
        f'unet = UNet2DModel.from_pretrained("{repo_id}", subfolder="unet", revision="{revision}")\n```\n'
        if (index or {}).get("unet", [None])[0] == "diffusers" and (index or {}).get("unet", [None, None])[1] == "UNet2DModel"
        else ""
    )
    limitations = [
        "The prior was learned from corrupted observations only; it is as good as the EM laps of this run "
        "made it, and EM converges to a local optimum of the evidence.",
    ]
    if profile != "paper":
        limitations.append(
            f"Profile `{profile}`: sizes are reduced from the paper's (fewer observations, laps, sampler "
            "steps and training steps; a smaller network), so its metrics are not comparable with the paper's. "
            "FID and KID from a few hundred samples are biased upwards: compare laps of the same run, not "
            "numbers from other papers.")
    if profile == "smoke":
        limitations.append("Profile `smoke` is a seconds-long test run: this prior is not meant to be used.")
    if str(record.get("fid_reference_set", "")).endswith("jpeg"):
        limitations.append(f"The FID reference set `{record['fid_reference_set']}` is a JPEG re-encoding of the "
                           "CIFAR-10 train set: FIDs against it are self-consistent only.")
    if gaussian:
        limitations.append("Lap 0 is the Gaussian initial prior of EM, not a trained network.")
    if missing:
        limitations.append(f"metrics.jsonl has no record for lap(s) {missing}: the wall time leaves them out.")

    text = f"""---
{data.to_yaml()}
---

# diffem prior: `{exp}`, lap {lap} of {laps} (`{profile}` profile)

This is {what}. It was learned **only from corrupted observations** y = A x + e by expectation-maximization
(Rozet et al. 2024, "Learning Diffusion Priors from Observations by Expectation Maximization"): the clean data
x were never seen by training. Samples are {facts['event']}.

## The observations

- {facts['corruption']};
- operator: {facts['operator']};
- observations used by EM: {record.get('observations', 'see config.yaml')}.

## Training

- lap {lap} of {laps} laps configured; laps of this run with a saved prior: {run.laps};
- lap 0: Gaussian prior of rank {lap0.get('rank')}, {lap0.get('iterations')} EM iterations on {lap0.get('observations')} observations ({lap0.get('estep')} E-step);
- each lap: E-step = one MMPS posterior sample per observation ({str(est.get('method', '')).upper()} {est.get('steps')} steps, CG {est.get('maxiter')} iterations); M-step = {mst.get('steps')} steps of batch {mst.get('batch_size')}{epochs}, Adam {_fmt(mst.get('lr'))} -> {_fmt(mst.get('lr_end') if mst.get('lr_end') is not None else mst.get('lr'))}, EMA {mst.get('ema_decay')}, fine-tuned from the previous lap;
- network: {_network_text(config, index)};
- profile `{profile}`, seed {config.get('seed')}; hardware: {hardware};
- wall time of laps 0 to {lap} (E-step + M-step + evaluation, from metrics.jsonl): {wall_text}.

Files: `config.yaml` (the run's resolved configuration), `metrics.json` (this lap's record of the run's
`metrics.jsonl`), `model_index.json` and the pipeline's components:{files_text}

## Results (lap {lap}, from metrics.jsonl)

| key | value |
|---|---|
{chr(10).join(metric_rows)}

Evaluation: {_fmt(ev.get('samples'))} prior samples ({str(ev.get('method', '')).upper()} {ev.get('steps')} steps) on the laps the run evaluates; `eval_status` says whether this lap was evaluated.

## How to use

Install diffem, the package that trained this prior (its `requirements.txt` pins diffusers {diffusers_version}). Every lap of the run is a revision `lap-KK` of this repository; `main` holds the newest lap published.

With diffem, without executing any code from this repository:

```python
import torch
from diffem import DiffusionPriorPipeline

pipe = DiffusionPriorPipeline.from_pretrained("{repo_id}", revision="{revision}")  # or diffem.hub.load_prior
```

With diffusers' own loader: the repository holds small files that re-export diffem's classes
(`{PIPELINE_MODULE}.py`, `unet/diffem_*.py`, `scheduler/diffem_scheduler.py`), named in `model_index.json`:

```python
from diffusers import DiffusionPipeline
from diffem import DiffusionPriorPipeline

pipe = DiffusionPipeline.from_pretrained("{repo_id}", revision="{revision}", trust_remote_code=True)
```
{load_net}
Unconditional samples (one seeded generator per sample: samples do not depend on the batch size):

```python
generators = [torch.Generator().manual_seed(i) for i in range(16)]
x = pipe(batch_size=16, num_inference_steps=64, generator=generators).samples
```

Posterior samples given observations y = A x + e, e ~ N(0, sigma_y^2 I) (MMPS, {est.get('maxiter')} CG iterations;
here four prior samples observed through the run's kind of operator stand in for real data):

```python
{facts['posterior']}
generators = [torch.Generator().manual_seed(i) for i in range(4)]
x_post = pipe(observation=y, operator=A, noise_std={_fmt(sigma)}, maxiter={est.get('maxiter')},
              num_inference_steps=64, generator=generators).samples
```

## Limitations

{chr(10).join('- ' + line for line in limitations)}

## Citation

```bibtex
@inproceedings{{rozet2024learning,
  title     = {{Learning Diffusion Priors from Observations by Expectation Maximization}},
  author    = {{Rozet, Fran{{\\c{{c}}}}ois and Andry, G{{\\'e}}r{{\\^o}}me and Lanusse, Fran{{\\c{{c}}}}ois and Louppe, Gilles}},
  booktitle = {{Advances in Neural Information Processing Systems}},
  year      = {{2024}},
  eprint    = {{2405.13712}},
  archivePrefix = {{arXiv}}
}}
```
"""
    return ModelCard(text)


# -- the repo folder ---------------------------------------------------------------------------------
def _reexport(module: str) -> str:
    """The re-export module name of a diffem module: ``diffem.networks`` -> ``diffem_networks``."""
    return module.replace(".", "_")


def _strip_local_paths(folder: Path) -> None:
    """Drop ``_name_or_path`` (a local path of the machine that trained) from every JSON config."""
    for path in folder.rglob("*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "_name_or_path" in data:
            data.pop("_name_or_path")
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_reexports(folder: Path) -> dict:
    """Name diffem's classes in ``model_index.json`` through re-export files (see the module docstring)."""
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())
    name = index["_class_name"]
    name = name[1] if isinstance(name, list) else name
    header = ('"""Re-export of diffem\'s class for diffusers\' `trust_remote_code=True` loading '
              '(needs `pip install diffem`; written by `diffem publish`)."""\n\n')
    (folder / f"{PIPELINE_MODULE}.py").write_text(header + f"from diffem.pipeline import {name}  # noqa: F401\n")
    index["_class_name"] = [PIPELINE_MODULE, name]
    for component, entry in list(index.items()):
        if component.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or entry[0] is None:
            continue
        module, cls = entry
        if module == "diffem" or module.startswith("diffem."):
            short = _reexport(module)
            (folder / component / f"{short}.py").write_text(header + f"from {module} import {cls}  # noqa: F401\n")
            index[component] = [short, cls]
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return index


def fingerprint(run: Run, lap: int) -> str:
    """SHA-256 of what lap ``lap`` publishes: its folder's files, its metrics record and ``config.yaml``."""
    h = hashlib.sha256()
    folder = _lap_dir(run.run_dir, lap)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    h.update(json.dumps(run.records.get(lap), sort_keys=True).encode())
    h.update(run.config_text.encode())
    return h.hexdigest()


def build_repo_folder(run_dir, lap: int, out_dir, repo_id: str, run: Run | None = None) -> Path:
    """Write the repo folder of lap ``lap`` of ``run_dir`` into ``out_dir`` (replaced if it exists).

    The pipeline is loaded from ``run_dir/lap_KK`` and written with ``save_pretrained``; any other
    file of the lap folder is copied as is; then the re-export files, ``config.yaml``,
    ``metrics.json`` and ``README.md``. See the module docstring for the layout.

    Raises:
        PublishError: for a missing lap, an incomplete lap folder, a lap without a metrics
            record, or a bad ``repo_id``.
    """
    from .pipeline import DiffusionPriorPipeline

    check_repo_id(repo_id)
    run = run or read_run(run_dir)
    if lap not in run.laps:
        raise PublishError(
            f"`{run.run_dir}` has no lap {lap} (laps with a saved prior: {run.laps or 'none'})"
        )
    source = _lap_dir(run.run_dir, lap)
    check_lap_folder(source)
    card = build_model_card(repo_id, lap, run)  # fails early on a missing record
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = DiffusionPriorPipeline.from_pretrained(source)
    pipe.save_pretrained(tmp)
    for path in source.rglob("*"):  # whatever else the lap folder holds
        target = tmp / path.relative_to(source)
        if path.is_file() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    _strip_local_paths(tmp)
    index = _write_reexports(tmp)
    (tmp / "config.yaml").write_text(run.config_text)
    (tmp / "metrics.json").write_text(json.dumps(run.records[lap], indent=2) + "\n")
    files = [str(p.relative_to(tmp)) for p in sorted(tmp.rglob("*")) if p.is_file()]
    card = build_model_card(repo_id, lap, run, index, files)
    card.save(tmp / "README.md")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def check_repo_folder(folder, record: dict | None = None, token: str | None = None) -> None:
    """Check a written repo folder before upload.

    The card loads with ``ModelCard.load`` and has the metadata keys ``library_name``,
    ``pipeline_tag``, ``tags``, ``license``, ``datasets`` and ``model-index`` (when the record
    has metrics); the pipeline files are complete; ``config.yaml`` and ``metrics.json`` exist;
    ``metrics.json`` equals ``record`` when given; no file contains ``token``.

    Raises:
        PublishError: naming the failed check (never the token).
    """
    from huggingface_hub import ModelCard

    folder = Path(folder)
    check_lap_folder(folder)
    for name in RUN_FILES:
        if not (folder / name).is_file():
            raise PublishError(f"repo folder `{folder}` lacks {name}")
    try:
        card = ModelCard.load(folder / "README.md")
    except Exception as e:  # noqa: BLE001 - any parse failure is a failed check
        raise PublishError(f"the model card of `{folder}` does not load: {redact(e, token)}") from None
    meta = card.data.to_dict()
    wanted = [k for k in _CARD_KEYS if k != "model-index"]
    if record is not None and any(_number(record.get(k)) for k in METRICS):
        wanted.append("model-index")
    absent = [k for k in wanted if k not in meta]
    if absent:
        raise PublishError(f"the model card of `{folder}` lacks metadata {absent}")
    if record is not None and json.loads((folder / "metrics.json").read_text()) != record:
        raise PublishError(f"`{folder}/metrics.json` differs from the run's metrics record")
    if token:
        needle = token.encode()
        for path in folder.rglob("*"):
            if path.is_file():
                with open(path, "rb") as f:
                    if needle in f.read():
                        raise PublishError(f"`{path.relative_to(folder)}` contains the Hub token; refusing to upload")


# -- loading ------------------------------------------------------------------------------------------
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

    from .pipeline import DiffusionPriorPipeline

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

    Published: ``_class_name`` is ``["diffem_pipeline", ...]`` (see :func:`build_repo_folder`). A
    Hub repo id costs one ``model_index.json`` download (or a cache hit).
    """
    folder = Path(path_or_repo_id)
    if folder.is_dir():
        if not (folder / "model_index.json").is_file():
            return None
        index = json.loads((folder / "model_index.json").read_text())
    else:
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


# -- uploading ----------------------------------------------------------------------------------------
def _read_ledger(run_dir: Path) -> dict:
    path = Path(run_dir) / LEDGER_NAME
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError:
        logger.warning("ignoring unreadable upload ledger %s", path)
        return {}
    return data if isinstance(data, dict) else {}


def _write_ledger(run_dir: Path, ledger: dict) -> None:
    path = Path(run_dir) / LEDGER_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(ledger, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


@dataclass
class PlannedUpload:
    """One revision to publish: ``revision`` (``lap-KK`` or ``main``) holding lap ``lap``."""

    revision: str
    lap: int
    fingerprint: str
    done: bool  #: already uploaded with this fingerprint (per the ledger)


def plan_uploads(run: Run, repo_id: str, laps: list[int], update_main: bool = True) -> list[PlannedUpload]:
    """The revisions to upload for ``laps``: ``lap-KK`` of each, then ``main`` for the newest lap."""
    entries = _read_ledger(run.run_dir).get(repo_id, {})
    plan = []
    for lap in laps:
        fp = fingerprint(run, lap)
        rev = revision_name(lap)
        plan.append(PlannedUpload(rev, lap, fp, entries.get(rev, {}).get("fingerprint") == fp))
    if update_main and laps:
        newest = max(laps)
        main = entries.get("main", {})
        if main.get("lap") is None or newest >= main["lap"]:
            fp = fingerprint(run, newest)
            plan.append(PlannedUpload("main", newest, fp, main.get("fingerprint") == fp and main.get("lap") == newest))
    return plan


def _select_laps(run: Run, lap: int | None, all_laps: bool) -> list[int]:
    if lap is not None and all_laps:
        raise PublishError("give either a lap (--lap N) or --all-laps, not both")
    if not run.laps:
        raise PublishError(f"`{run.run_dir}` has no finished lap (no lap_KK/ folder with model_index.json)")
    if all_laps:
        return list(run.laps)
    if lap is None:
        return [run.laps[-1]]
    if isinstance(lap, bool) or not isinstance(lap, int) or lap < 0:
        raise PublishError(f"--lap must be a non-negative integer, got {lap!r}")
    if lap not in run.laps:
        raise PublishError(f"`{run.run_dir}` has no lap {lap} (laps with a saved prior: {run.laps})")
    return [lap]


def publish(
    run_dir,
    repo_id: str,
    lap: int | None = None,
    all_laps: bool = False,
    private: bool = False,
    token: str | None = None,
    output_dir=None,
    dry_run: bool = False,
    api=None,
    echo: Callable[[str], None] = print,
) -> list[dict]:
    """Publish laps of a run: write repo folders, or upload them as revisions of ``repo_id``.

    Every check runs before anything is uploaded: the repo id's format, the laps requested
    (default: the last finished lap; ``all_laps``: every finished lap), each lap folder's
    completeness, each lap's metrics record and model card, and, for an upload, that
    ``HF_HUB_OFFLINE`` is not set and a token exists (``token``, ``$HF_TOKEN`` or the login).
    Each folder is checked again (:func:`check_repo_folder`) right before its upload.

    Arguments:
        run_dir: The run folder (``config.yaml``, ``metrics.jsonl``, ``lap_KK/``).
        repo_id: ``namespace/name`` on the Hub (also used in the card's code).
        lap: One lap to publish. all_laps: Every finished lap.
        private: Create the repo private (when it does not exist yet).
        token: A Hub token (default: ``$HF_TOKEN`` or huggingface_hub's login).
        output_dir: Write the repo folder(s) here and upload nothing: one lap -> ``output_dir``
            itself; ``all_laps`` -> ``output_dir/lap-KK`` per lap.
        dry_run: Print what would be uploaded and upload nothing.
        api: An ``HfApi``-like client (``create_repo``, ``create_branch``, ``upload_folder``);
            default ``huggingface_hub.HfApi(token=token)``.
        echo: Where progress lines go (default ``print``); never given the token.

    Returns:
        One dict per revision: ``revision``, ``lap``, ``status`` (``written``, ``planned``,
        ``uploaded`` or ``skipped``) and ``path`` or ``commit``.

    Raises:
        PublishError: on any failed check, before any upload.
        RuntimeError: when the API client fails (message without the token); the ledger keeps
            what was uploaded before, so rerunning the same call resumes.
    """
    check_repo_id(repo_id)
    run = read_run(run_dir)
    laps = _select_laps(run, lap, all_laps)
    return _publish(run, repo_id, laps, per_lap_dirs=all_laps, private=private, token=token,
                    output_dir=output_dir, dry_run=dry_run, api=api, echo=echo)


def _publish(run: Run, repo_id: str, laps: list[int], per_lap_dirs: bool, private: bool, token, output_dir,
             dry_run: bool, api, echo) -> list[dict]:
    for k in laps:
        check_lap_folder(_lap_dir(run.run_dir, k))
        build_model_card(repo_id, k, run)  # every card builds (records present) before anything else
    if output_dir is None and not dry_run:
        if hub_offline():
            raise PublishError("HF_HUB_OFFLINE is set: uploading to the Hub is impossible offline; unset it, or use "
                               "--output-dir DIR to write the repo folder locally")
        token = resolve_token(token)
        if not token:
            raise PublishError("no Hugging Face token: pass --token, set HF_TOKEN, or log in with `hf auth login`")
    elif token is None and not hub_offline():
        token = resolve_token(None)  # only to make sure that no written file contains it
    if token and (token in run.config_text or any(token in json.dumps(run.records.get(k)) for k in laps)):
        raise PublishError(f"`{run.run_dir}` config.yaml or metrics.jsonl contains the Hub token; remove it "
                           "before publishing (refusing to copy it into the repo folder)")

    results = []
    if output_dir is not None:
        out = Path(output_dir)
        if out.exists() and any(out.iterdir()) and not ((out / "model_index.json").exists()
                                                         or any(out.glob("lap-[0-9]*"))):
            raise PublishError(f"--output-dir `{out}` exists, is not empty and is not a repo folder written by "
                               "`diffem publish`; choose an empty folder")
        for k in laps:
            target = out / revision_name(k) if per_lap_dirs else out
            build_repo_folder(run.run_dir, k, target, repo_id, run)
            check_repo_folder(target, run.records[k], token)
            echo(f"{revision_name(k)}: wrote {target}")
            results.append({"revision": revision_name(k), "lap": k, "status": "written", "path": str(target)})
        return results

    plan = plan_uploads(run, repo_id, laps)
    if dry_run:
        echo(f"repo {repo_id} ({'private' if private else 'public'} if created); "
             f"token: {'found (not shown)' if token else 'none found, an upload would fail'}")
        with tempfile.TemporaryDirectory(prefix="diffem-publish-") as tmp:
            for item in plan:
                folder = Path(tmp) / item.revision
                build_repo_folder(run.run_dir, item.lap, folder, repo_id, run)
                check_repo_folder(folder, run.records[item.lap], token)
                files = sorted(p for p in folder.rglob("*") if p.is_file())
                state = "already uploaded, would skip" if item.done else "would upload"
                echo(f"{item.revision} (lap {item.lap}): {state} {len(files)} files, "
                     f"{sum(p.stat().st_size for p in files)} bytes")
                for p in files:
                    echo(f"  {p.relative_to(folder)}  {p.stat().st_size} bytes")
                results.append({"revision": item.revision, "lap": item.lap,
                                "status": "skipped" if item.done else "planned"})
        return results

    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        with tempfile.TemporaryDirectory(prefix="diffem-publish-") as tmp:
            for item in plan:
                if item.done:
                    echo(f"{item.revision} (lap {item.lap}): already uploaded, skipped")
                    results.append({"revision": item.revision, "lap": item.lap, "status": "skipped"})
                    continue
                folder = Path(tmp) / item.revision
                build_repo_folder(run.run_dir, item.lap, folder, repo_id, run)
                check_repo_folder(folder, run.records[item.lap], token)
                if item.revision != "main":
                    api.create_branch(repo_id, branch=item.revision, exist_ok=True, repo_type="model")
                info = api.upload_folder(
                    repo_id=repo_id, folder_path=str(folder), revision=item.revision, repo_type="model",
                    commit_message=f"diffem: {run.config.get('experiment')} lap {item.lap}",
                    delete_patterns=["*"],  # the revision holds exactly this lap's files
                )
                commit = getattr(info, "oid", None)
                ledger = _read_ledger(run.run_dir)
                ledger.setdefault(repo_id, {})[item.revision] = {"lap": item.lap, "fingerprint": item.fingerprint,
                                                                 "commit": commit}
                _write_ledger(run.run_dir, ledger)
                shutil.rmtree(folder, ignore_errors=True)
                echo(f"{item.revision} (lap {item.lap}): uploaded" + (f", commit {commit}" if commit else ""))
                results.append({"revision": item.revision, "lap": item.lap, "status": "uploaded", "commit": commit})
    except PublishError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised without the token
        message = redact(f"{type(e).__name__}: {e}", token)
        raise RuntimeError(f"upload to `{repo_id}` failed: {message}; rerun the same command to resume "
                           "(revisions already uploaded are skipped)") from None
    return results


def push_after_lap(config, api=None, token: str | None = None) -> list[dict]:
    """Push the finished laps of a run to ``config.hub.repo_id``; the trainer calls it after each lap.

    Uploads every finished lap (saved, with its metrics record) not yet uploaded per the ledger,
    so a failed upload is retried at the next lap, each to its ``lap-KK`` branch, and the newest
    to ``main``. Call it from the main process only. Does nothing when ``hub.repo_id`` is empty.
    Never raises: a failure (offline, no token, network, a bad folder) is logged without the
    token and the run goes on; ``diffem publish RUN_DIR --repo-id ... --all-laps`` uploads what
    is missing later.

    Arguments:
        config: The run's :class:`~diffem.config.EMConfig` (``run_dir``, ``hub.repo_id``, ``hub.private``).
        api: An ``HfApi``-like client (default ``huggingface_hub.HfApi``).
        token: A Hub token (default ``$HF_TOKEN`` or the login).

    Returns:
        The revisions handled (see :func:`publish`), or ``[]`` when disabled or on failure.
    """
    hub = getattr(config, "hub", None)
    repo_id = getattr(hub, "repo_id", "") or ""
    if not repo_id:
        return []
    secret = token
    try:
        if hub_offline():
            logger.warning("hub.repo_id is set but HF_HUB_OFFLINE is set: laps not pushed; run `diffem publish %s "
                           "--repo-id %s --all-laps` once online", config.run_dir, repo_id)
            return []
        secret = resolve_token(token)
        run = read_run(config.run_dir)
        laps = [k for k in run.laps if k in run.records]
        if not laps:
            return []
        return _publish(run, check_repo_id(repo_id), laps, per_lap_dirs=True, private=bool(hub.private),
                        token=secret, output_dir=None, dry_run=False, api=api, echo=logger.info)
    except Exception as e:  # noqa: BLE001 - pushing must never stop the run
        logger.warning("pushing %s to the Hub repo %s failed; the run goes on, the upload is retried after the next "
                       "lap or by `diffem publish`: %s", config.run_dir, repo_id,
                       redact(f"{type(e).__name__}: {e}", secret))
        return []
