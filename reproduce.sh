#!/usr/bin/env bash
# Regenerate an experiment's table and figure from a real run.
#
#   bash reproduce.sh [<experiment>] [--profile P] [extra `diffem train` arguments]
#
# experiments: cifar10 (the default: the paper's headline table), cifar10-ablation, cifar10-baselines
# (the references at equal compute), manifold, mnist, mri. The
# profile defaults to `paper` on a CUDA machine and `cpu` otherwise. Runs resume: rerun the
# same command after an interruption.
# Multi-GPU: ACCELERATE="accelerate launch --multi_gpu --num_processes 4" bash reproduce.sh ...
set -euo pipefail
cd "$(dirname "$0")"

experiment=cifar10
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then experiment="$1"; shift; fi
if [ ! -d "experiments/$experiment" ]; then
    echo "usage: bash reproduce.sh [<experiment>] [--profile P] [--set key=value ...]" >&2
    echo "experiments: $(ls experiments | grep -v '\.py$' | grep -v '\.sh$' | grep -v __pycache__ | tr '\n' ' ')" >&2
    exit 2
fi
profile=""
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --profile) profile="$2"; shift 2 ;;
        --profile=*) profile="${1#--profile=}"; shift ;;
        *) args+=("$1"); shift ;;
    esac
done
if [ -z "$profile" ]; then
    profile=$(python -c "import torch; print('paper' if torch.cuda.is_available() else 'cpu')")
    if [ "$profile" = "paper" ]; then why="CUDA found"; else why="no CUDA"; fi
    echo "reproduce.sh: profile $profile ($why; --profile cpu | paper chooses)" >&2
fi
if [ ! -f "experiments/$experiment/$profile.yaml" ]; then
    echo "reproduce.sh: no profile '$profile' for experiment '$experiment' (experiments/$experiment/*.yaml)" >&2
    exit 2
fi
# Experiments with several runs (e.g. cifar10's three corruption levels) bring their own driver.
if [ -f "experiments/$experiment/run.sh" ]; then
    exec bash "experiments/$experiment/run.sh" "$profile" ${args[@]+"${args[@]}"}
fi
run_dir="${RUN_DIR:-runs/$experiment-$profile}"
launcher="${ACCELERATE:-python -m diffem.cli}"
if [ -n "${ACCELERATE:-}" ]; then launcher="$ACCELERATE -m diffem.cli"; fi

echo "== $experiment ($profile) -> $run_dir"
# Check the configuration before any work, then train (or resume).
python -m diffem.cli train "$experiment" --profile "$profile" --output-dir "$run_dir" --dry-run ${args[@]+"${args[@]}"} > /dev/null
start=$(date +%s)
$launcher train "$experiment" --profile "$profile" --output-dir "$run_dir" ${args[@]+"${args[@]}"}
echo "== training took $(( $(date +%s) - start )) s"

suffix=""
if [ "$profile" != "cpu" ]; then suffix="_$profile"; fi
python "experiments/$experiment/report.py" "$run_dir" \
    --table "tables/$experiment$suffix.md" --figure "figures/$experiment$suffix.png"
echo "== total $(( $(date +%s) - start )) s"
