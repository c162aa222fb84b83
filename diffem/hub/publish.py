r"""Publishing a run's laps: building repo folders, uploading them as revisions, the upload ledger.

The repo folder of lap ``k`` (:func:`build_repo_folder`) is the lap's pipeline plus the
re-export files, ``config.yaml``, ``metrics.json`` and the model card (:mod:`diffem.hub.card`);
:func:`publish` writes or uploads it, :func:`push_after_lap` does so from the trainer. See
:mod:`diffem.hub` for the layout, the revisions and the ledger (``hub_uploads.json``).

The API client is an argument, so that uploads can be tested offline; the token is given to it
only, and every message that could quote it passes through :func:`~diffem.hub.names.redact`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import runs
from ..pipeline import PIPELINE_MODULE
from ..runs import LAP_RECORD_FILE, Run, lap_dir
from .card import CARD_KEYS, build_model_card, has_metrics
from .names import PublishError, check_repo_id, hub_offline, redact, resolve_token, revision_name

__all__ = [
    "LEDGER_NAME",
    "RUN_FILES",
    "read_run",
    "check_lap_folder",
    "build_repo_folder",
    "check_repo_folder",
    "fingerprint",
    "PlannedUpload",
    "plan_uploads",
    "publish",
    "push_after_lap",
]

logger = logging.getLogger("diffem.hub")

#: The ledger of uploads, in the run folder.
LEDGER_NAME = "hub_uploads.json"
#: Files every published folder holds besides the pipeline's.
RUN_FILES = ("config.yaml", "metrics.json", "README.md")


def read_run(run_dir) -> Run:
    """Read ``config.yaml``, ``metrics.jsonl`` and the finished laps of a run folder (:func:`diffem.runs.read_run`).

    Raises:
        PublishError: when ``run_dir`` is not a run folder or its files do not parse.
    """
    try:
        return runs.read_run(run_dir)
    except runs.RunFolderError as e:
        raise PublishError(str(e)) from None


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
    folder = lap_dir(run.run_dir, lap)
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
    from ..pipeline import DiffusionPriorPipeline

    check_repo_id(repo_id)
    run = run or read_run(run_dir)
    if lap not in run.laps:
        raise PublishError(
            f"`{run.run_dir}` has no lap {lap} (laps with a saved prior: {run.laps or 'none'})"
        )
    source = lap_dir(run.run_dir, lap)
    check_lap_folder(source)
    card = build_model_card(repo_id, lap, run)  # fails early on a missing record
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = DiffusionPriorPipeline.from_pretrained(source)
    pipe.save_pretrained(tmp)
    for path in source.rglob("*"):  # whatever else the lap folder holds (its training record: metrics.json below)
        target = tmp / path.relative_to(source)
        if path.is_file() and not target.exists() and path.name != LAP_RECORD_FILE:
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
    wanted = [k for k in CARD_KEYS if k != "model-index"]
    if record is not None and has_metrics(record):
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
        check_lap_folder(lap_dir(run.run_dir, k))
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
