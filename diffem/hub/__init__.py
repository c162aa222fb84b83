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

The package, one module per job (every public name is re-exported here):

- :mod:`diffem.hub.names`: repo ids, revisions, tokens and secrets, :class:`PublishError` (a leaf);
- :mod:`diffem.hub.card`: the model card (:func:`build_model_card`);
- :mod:`diffem.hub.publish`: repo folders, uploads, the ledger, :func:`push_after_lap`.

Reading a run folder is :mod:`diffem.runs`'; loading a published prior is the pipeline's own
(:func:`diffem.pipeline.load_prior`, :meth:`DiffusionPriorPipeline.from_pretrained
<diffem.pipeline.DiffusionPriorPipeline.from_pretrained>`).

References:
    Rozet et al., "Learning Diffusion Priors from Observations by Expectation Maximization",
    NeurIPS 2024, arXiv:2405.13712.
"""

from ..pipeline import PIPELINE_MODULE, load_prior, load_published, published_index
from ..runs import Run, finished_laps
from .card import METRICS, build_model_card
from .names import PublishError, check_repo_id, hub_offline, redact, resolve_token, revision_name
from .publish import (
    LEDGER_NAME,
    RUN_FILES,
    PlannedUpload,
    build_repo_folder,
    check_lap_folder,
    check_repo_folder,
    fingerprint,
    plan_uploads,
    publish,
    push_after_lap,
    read_run,
)

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
