"""The model card of a published lap: metadata, observations, training, results, usage, limitations.

:func:`build_model_card` writes the ``README.md`` of a repo folder (:mod:`diffem.hub.publish`)
as a ``huggingface_hub.ModelCard``; every number comes from the run folder (``config.yaml`` and
the lap's record of ``metrics.jsonl``, read by :mod:`diffem.runs`). What the card says about an
experiment's data is the experiment's own (:meth:`diffem.tasks.Task.card_facts`).

References:
    Rozet et al., "Learning Diffusion Priors from Observations by Expectation Maximization",
    NeurIPS 2024, arXiv:2405.13712.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

from ..pipeline import PIPELINE_MODULE
from ..runs import Run
from .names import PublishError, revision_name

__all__ = ["METRICS", "CARD_KEYS", "build_model_card", "has_metrics"]

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
    "sinkhorn_validation": ("sinkhorn_divergence", "Sinkhorn divergence against the clean validation set"),
}
#: Metadata keys of every card (``model-index`` only when the lap's record has a metric of :data:`METRICS`).
CARD_KEYS = ("library_name", "pipeline_tag", "tags", "license", "datasets", "model-index")


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


def _task_class(experiment):
    """The task class of ``experiment`` (:func:`diffem.tasks.task_class`), or ``None`` if it is unknown."""
    try:
        from ..tasks import task_class

        return task_class(experiment)
    except (ImportError, ValueError):  # ConfigError is a ValueError
        return None


def _data_options(config: dict) -> dict:
    """``config["data"]`` over the experiment's defaults (what the run used; config.yaml holds only given keys)."""
    cls = _task_class(config.get("experiment"))
    defaults = dict(getattr(cls, "data_defaults", None) or {})
    return defaults | dict(config.get("data") or {})


def _experiment_facts(config: dict, record: dict) -> dict:
    """Dataset ids, pipeline tag, data description and the posterior-sampling snippet of an experiment.

    Each task states its own (:meth:`diffem.tasks.Task.card_facts`); an experiment that states
    none (or an unknown one) is described generically.
    """
    exp = config.get("experiment", "unknown")
    data = _data_options(config)
    n = record.get("observations", data.get("observations", data.get("points")))
    sigma = data.get("noise_std")
    cls = _task_class(exp)
    facts = cls.card_facts(data, n, _fmt) if cls is not None else None
    if facts is None:
        facts = dict(
            datasets=[], pipeline_tag="other", task_type="unconditional-generation", dataset_type=str(exp),
            dataset_name=str(exp), dataset_split=None, kind="other", event="see config.yaml",
            corruption=f"{n} observations of the `{exp}` experiment (operator and noise: see config.yaml)",
            operator="see config.yaml", posterior="A, y = ...  # the experiment's operator and observations",
        )
    return dict(facts, sigma=sigma)





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
    if config.get("experiment") == "custom" and key.startswith(("psnr", "ssim")):
        return (f"the first {record.get('validation_observations')} observations of the clean validation set "
                f"`{Path(str(data.get('validation'))).name}` x {record.get('posterior_samples')} MMPS posterior samples "
                f"({str(est.get('method', '')).upper()} {est.get('steps')} steps, CG {est.get('maxiter')}), data range 4")
    if key == "sinkhorn_validation":
        return (f"{record.get('eval_samples', ev.get('samples'))} prior samples ({sampler}) vs the clean validation set "
                f"`{Path(str(data.get('validation'))).name}` (two halves), entropic OT, minus the same between the halves")
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


def has_metrics(record: dict) -> bool:
    """Whether ``record`` holds a finite value of a metric of :data:`METRICS` (the card then has a ``model-index``)."""
    return any(_number(record.get(k)) for k in METRICS)
