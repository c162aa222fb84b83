#!/usr/bin/env bash
# Run the CIFAR-10 experiment at the three corruption levels, then write its table and figures.
#
#   bash experiments/cifar10/run.sh [PROFILE] [extra `diffem train` arguments, e.g. --set key=value ...]
#
# PROFILE: cpu (default), paper or smoke (experiments/cifar10/<PROFILE>.yaml). Each level
# (data.drop_prob = 0.25, 0.5, 0.75) trains into runs/cifar10-<PROFILE>-pNN (RUN_ROOT
# replaces `runs`) and resumes there when rerun. LEVELS="0.75" runs a subset; the report
# takes the other levels from the committed result files experiments/cifar10/results/
# <PROFILE>-pNN (RESULTS_DIR replaces that folder) and says which rows this run produced;
# a level with neither is "not run". REPORT_ONLY=1 skips training and rebuilds the table
# and figures from the LEVELS' existing run folders. TABLES_DIR / FIGURES_DIR replace
# `tables` / `figures`. Multi-GPU: ACCELERATE="accelerate launch --multi_gpu
# --num_processes 4" bash experiments/cifar10/run.sh paper
set -euo pipefail
cd "$(dirname "$0")/../.."

profile="${1:-cpu}"
if [ $# -gt 0 ]; then shift; fi
levels="${LEVELS:-0.25 0.5 0.75}"
run_root="${RUN_ROOT:-runs}"
results_dir="${RESULTS_DIR:-experiments/cifar10/results}"
tables_dir="${TABLES_DIR:-tables}"
figures_dir="${FIGURES_DIR:-figures}"
report_only="${REPORT_ONLY:-0}"
if [ ! -f "experiments/cifar10/$profile.yaml" ]; then
    echo "run.sh: no profile '$profile' (experiments/cifar10/*.yaml)" >&2
    exit 2
fi

. experiments/args.sh "$@"  # -> sets, other, launcher


run_dir_of() { printf '%s/cifar10-%s-p%02d' "$run_root" "$profile" "$(python -c "print(round(100 * $1))")"; }

start=$(date +%s)
dirs=()
for p in $levels; do dirs+=("$(run_dir_of "$p")"); done
if [ "$report_only" != "1" ]; then
    # Check every level's configuration before any work.
    for p in $levels; do
        python -m diffem.cli train cifar10 --profile "$profile" --output-dir "$(run_dir_of "$p")" --dry-run \
            ${other[@]+"${other[@]}"} --set ${sets[@]+"${sets[@]}"} "data.drop_prob=$p" > /dev/null
    done
    for p in $levels; do
        run_dir="$(run_dir_of "$p")"
        echo "== cifar10 ($profile), drop_prob $p -> $run_dir"
        level_start=$(date +%s)
        $launcher train cifar10 --profile "$profile" --output-dir "$run_dir" \
            ${other[@]+"${other[@]}"} --set ${sets[@]+"${sets[@]}"} "data.drop_prob=$p"
        echo "== drop_prob $p took $(( $(date +%s) - level_start )) s"
    done
    echo "== training took $(( $(date +%s) - start )) s"
fi

suffix=""
if [ "$profile" != "cpu" ]; then suffix="_$profile"; fi
# This run's levels go to the report; it takes the others from the committed result files.
python experiments/cifar10/report.py "${dirs[@]}" --profile "$profile" --results-dir "$results_dir" \
    --table "$tables_dir/cifar10$suffix.md" \
    --posterior-figure "$figures_dir/cifar10_posterior_laps$suffix.png" \
    --samples-figure "$figures_dir/cifar10_samples$suffix.png"
echo "== total $(( $(date +%s) - start )) s"
