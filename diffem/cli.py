"""The ``diffem`` command.

    diffem train <experiment> [--profile P] [--config FILE] [--output-dir DIR] [--set key=value ...] [--dry-run]
    diffem train custom --data PATH_OR_ID [--profile cpu | paper]   (your own observations: diffem.data.custom)
    diffem evaluate <run_dir> [--lap K | --missing] [--samples N] [--set eval.key=value ...]
    diffem fork <run_dir> --lap K --output-dir DIR [--set estep.key=value ...]
    diffem setup-inception
    diffem reconstruct <prior_dir> (--h5 FILE.h5 | --nifti FILE.nii.gz | --npy FILE.npy) --acceleration R [--samples K]
    diffem publish <run_dir> --repo-id NAME [--lap K | --all-laps] [--private] [--token T] [--output-dir DIR] [--dry-run]

``train`` runs (or resumes) EM; launch it with ``accelerate launch -m diffem.cli train ...``
for several processes or GPUs. ``--dry-run`` prints the resolved configuration and exits.
``evaluate`` fills in (or redoes) the evaluation of saved laps, with the run's ``eval.*``
keys or changed ones, and updates their records in ``metrics.jsonl``; it exits with 1 if
an evaluation fails (the failure is recorded). ``fork`` starts a run from copies of another
run's laps ``0..K`` with changed E-step / M-step keys (:mod:`diffem.em.fork`); ``train`` on
the new folder then resumes at lap ``K + 1``.
"""

from __future__ import annotations

import argparse
import json
import sys

import yaml

from .config import ConfigError, config_to_dict, load_config

__all__ = ["main"]


def _default_profile() -> str:
    try:
        import torch

        return "paper" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover
        return "cpu"


def _train(args) -> int:
    profile = args.profile or _default_profile()
    if args.profile is None and args.config is None:  # say which profile runs, and why, before any work
        why = "CUDA found" if profile == "paper" else "no CUDA"
        print(f"diffem: profile {profile} ({why}; --profile cpu | paper chooses)", file=sys.stderr)
    overrides = list(args.set) + ([f"data.path={args.data}"] if args.data else [])
    overrides += [f"data.validation={args.validation}"] if args.validation else []
    config = load_config(args.experiment, profile, path=args.config, overrides=overrides)
    if args.output_dir:
        config.output_dir = args.output_dir
    # Experiment-specific options are checked here too, before any work.
    from .tasks import get_task

    get_task(config)
    if args.dry_run:
        print(yaml.safe_dump(config_to_dict(config) | {"run_dir": str(config.run_dir)}, sort_keys=False), end="")
        return 0
    from .train import run_em

    run_em(config, progress=not args.no_progress)
    return 0


def _evaluate(args) -> int:
    from pathlib import Path

    from .config import config_from_dict
    from .em import make_accelerator
    from .train import make_trainer

    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").exists():
        raise ConfigError(f"`{run_dir}` is not a run folder (no config.yaml)")
    data = yaml.safe_load((run_dir / "config.yaml").read_text())
    if args.samples is not None:
        args.set.append(f"eval.samples={args.samples}")
    from .tasks import task_class

    allowed = task_class(data.get("experiment", "")).eval_data_keys
    for item in args.set:  # only the evaluation's keys may change for a saved run
        key, _, raw = item.partition("=")
        section, _, name = key.partition(".")
        if not raw or not name or not (section == "eval" or (section == "data" and name in allowed)):
            raise ConfigError(f"`diffem evaluate --set {item}`: only `eval.<key>=<value>` and the evaluation's "
                              f"data keys ({', '.join(f'data.{k}' for k in allowed) or 'none'}) may be set")
        data.setdefault(section, {})[name] = yaml.safe_load(raw)
    config = config_from_dict(data)
    config.output_dir = str(run_dir)
    accelerator = make_accelerator(config)
    trainer = make_trainer(config, accelerator, progress=not args.no_progress)
    done = trainer.laps_done()
    if not done:
        raise FileNotFoundError(f"`{run_dir}` has no finished lap (no lap_KK/ checkpoint) to evaluate")
    if args.missing:
        laps = trainer.missing_evaluations()
    else:
        laps = [done[-1] if args.lap is None else args.lap]
        if laps[0] not in done:
            raise FileNotFoundError(f"lap {laps[0]} of `{run_dir}` has no checkpoint (finished laps: {done})")
    failed = 0
    for lap in laps:
        record = trainer.evaluate(lap)  # updates the lap's record in metrics.jsonl
        failed += record.get("eval_status") != "ok"
        if accelerator.is_main_process:
            print(json.dumps({k: v for k, v in record.items() if k != "lr_log"}))
    accelerator.end_training()
    return 1 if failed else 0


def _fork(args) -> int:
    from pathlib import Path

    from .em.fork import fork_run
    from .runs import RunFolderError, read_config
    from .tasks import task_class

    source = Path(args.run_dir)
    try:
        experiment = read_config(source)[0].get("experiment", "")
    except RunFolderError as e:
        raise ConfigError(str(e)) from None
    keys = task_class(experiment).eval_data_keys if experiment else ()
    config = fork_run(source, args.lap, args.output_dir, args.set, eval_data_keys=keys)
    print(f"diffem: forked laps 0-{args.lap} of {source} into {config.run_dir}; "
          f"`diffem train --config {config.run_dir / 'config.yaml'}` resumes it at lap {args.lap + 1}")
    return 0


def _publish(args) -> int:
    from .hub import PublishError, publish

    try:
        publish(args.run_dir, args.repo_id, lap=args.lap, all_laps=args.all_laps, private=args.private,
                token=args.token, output_dir=args.output_dir, dry_run=args.dry_run)
    except (PublishError, RuntimeError) as e:  # messages never hold the token (diffem.hub.redact)
        print(f"diffem: error: {e}", file=sys.stderr)
        return 2
    return 0


def _reconstruct(args) -> int:
    from .reconstruct import reconstruct_command

    try:
        return reconstruct_command(args)
    except ValueError as e:  # a missing key, a wrong shape, non-finite k-space, not an MRI prior
        print(f"diffem: error: {e}", file=sys.stderr)
        return 2


def _setup_inception(args) -> int:
    from .metrics import setup_inception

    print(setup_inception())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffem", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="run or resume an EM experiment")
    train.add_argument("experiment", nargs="?", help="experiment name (experiments/<name>/)")
    train.add_argument("--profile", default=None, help="config profile (default: paper with CUDA, else cpu)")
    train.add_argument("--config", default=None, help="explicit YAML config file")
    train.add_argument("--output-dir", default=None)
    train.add_argument("--data", default=None, metavar="PATH_OR_ID",
                       help="`diffem train custom`: your observation dataset (diffem.data.custom: a save_to_disk "
                            "folder, parquet, .npz or a Hub dataset id); sets data.path")
    train.add_argument("--validation", default=None, metavar="PATH_OR_ID",
                       help="`diffem train custom`: an optional clean validation dataset (the same schema plus a column "
                            "`x`), scored by the evaluation only; sets data.validation")
    train.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE", help="config overrides, e.g. mstep.lr=1e-3")
    train.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    train.add_argument("--no-progress", action="store_true")
    train.set_defaults(func=_train)

    evaluate = sub.add_parser("evaluate", help="evaluate saved laps of a run and update their records")
    evaluate.add_argument("run_dir")
    which = evaluate.add_mutually_exclusive_group()
    which.add_argument("--lap", type=int, default=None, help="the lap to evaluate (default: the last saved)")
    which.add_argument("--missing", action="store_true", help="every saved lap due an evaluation that has none")
    evaluate.add_argument("--samples", type=int, default=None, help="shorthand for --set eval.samples=N")
    evaluate.add_argument("--set", nargs="*", action="extend", default=[], metavar="eval.KEY=VALUE")
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.set_defaults(func=_evaluate)

    fork = sub.add_parser("fork", help="start a run from copies of another run's first laps, with changed E-/M-step keys")
    fork.add_argument("run_dir", help="the source run folder")
    fork.add_argument("--lap", type=int, required=True, help="the last lap to share (copied, not recomputed)")
    fork.add_argument("--output-dir", required=True, help="the new run folder")
    fork.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                      help="changed keys: estep.*, mstep.*, precision, laps, eval.*, hub.*")
    fork.set_defaults(func=_fork)

    pub = sub.add_parser("publish", help="publish laps of a run to the Hugging Face Hub (one revision lap-KK per lap)")
    pub.add_argument("run_dir")
    pub.add_argument("--repo-id", required=True, help="namespace/name on the Hub")
    laps = pub.add_mutually_exclusive_group()
    laps.add_argument("--lap", type=int, default=None, help="the lap to publish (default: the last saved)")
    laps.add_argument("--all-laps", action="store_true", help="every saved lap, each to its branch lap-KK; main = last")
    pub.add_argument("--private", action="store_true", help="create the repo private")
    pub.add_argument("--token", default=None, help="Hub token (default: $HF_TOKEN or `hf auth login`)")
    pub.add_argument("--output-dir", default=None, help="write the repo folder(s) here and upload nothing")
    pub.add_argument("--dry-run", action="store_true", help="print what would be uploaded and upload nothing")
    pub.set_defaults(func=_publish)

    rec = sub.add_parser(
        "reconstruct", help="reconstruct an MRI slice from undersampled k-space with a saved prior",
        description="Resize policy. --h5 / --nifti / --npy: the magnitude slice is padded to a square with its "
                    "background and resized to the prior's size S (the fully sampled slice, undersampled here at "
                    "--acceleration). --kspace: the centred S x S block of the acquired k-space, an image of the "
                    "same field of view at a lower resolution when the grid is larger (the output says which). "
                    "Sampler settings default to the prior's own E-step (its sampling.json); the flags override.")
    rec.add_argument("prior_dir", help="a saved prior (lap_KK folder) or a run folder (its last lap)")
    source = rec.add_mutually_exclusive_group(required=True)
    source.add_argument("--h5", default=None, help="fastMRI .h5 file: its fully sampled 'kspace', undersampled here")
    source.add_argument("--nifti", default=None, help="NIfTI volume (magnitudes), undersampled here")
    source.add_argument("--npy", default=None, help=".npy slice (H, W) or volume (N, H, W) of magnitudes (the first "
                        "axis is slices, never coils: coil data goes to --kspace), undersampled here")
    source.add_argument("--kspace", default=None, help="acquired, undersampled k-space as it is: .npy (H, W) or "
                        "(coils, H, W) complex, fastMRI .h5 (single- or multi-coil) or BART .cfl/.hdr; coil maps "
                        "by ESPIRiT, the mask from --mask or the nonzero pattern")
    rec.add_argument("--mask", default=None, help="--kspace: the sampling mask (.npy bool, (H, W)); default: the "
                     "nonzero pattern of the k-space")
    rec.add_argument("--slice", type=int, default=None, help="slice of a volume (default: the middle one)")
    rec.add_argument("--axis", type=int, default=2, help="slicing axis of a NIfTI volume (RAS; 2: axial)")
    rec.add_argument("--acceleration", type=float, default=8.0, help="nominal acceleration R of the column mask")
    rec.add_argument("--samples", type=int, default=4, help="posterior samples (mean and std over them)")
    rec.add_argument("--steps", type=int, default=None, help="sampler steps (default: the prior's E-step, sampling.json)")
    rec.add_argument("--maxiter", type=int, default=None, help="CG iterations of MMPS (default: the prior's E-step)")
    rec.add_argument("--noise-std", type=float, default=None, help="k-space noise std: data units of the prior for "
                     "--h5 / --nifti / --npy (default 1e-2), k-space units for --kspace (default: estimated from "
                     "the outer k-space)")
    rec.add_argument("--seed", type=int, default=0, help="seed of the mask, the noise and the samples")
    rec.add_argument("--no-dc-step", action="store_true",
                     help="--kspace: skip the final data-consistency step (diffem.posterior.data_consistency_step: the "
                          "posterior mean conditioned on y under N(mean, tau^2 I), tau^2 the samples' mean variance); "
                          "the raw posterior mean is written either way")
    rec.add_argument("--output-dir", default="reconstruction")
    rec.set_defaults(func=_reconstruct)

    setup = sub.add_parser("setup-inception", help="convert the offline FID Inception weights")
    setup.set_defaults(func=_setup_inception)

    args = parser.parse_args(argv)
    if args.command == "train" and args.experiment is None and args.config is None:
        parser.error("give an experiment name or --config")
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"diffem: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
