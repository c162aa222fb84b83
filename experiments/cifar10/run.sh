#!/usr/bin/env bash
# Run the CIFAR-10 experiment at the three corruption levels, then write its table and figures.
#
#   bash experiments/cifar10/run.sh [PROFILE] [extra `diffem train` arguments, e.g. --set key=value ...]
#
# PROFILE: cpu (default), paper or smoke (experiments/cifar10/<PROFILE>.yaml). Each level
# (data.drop_prob = 0.25, 0.5, 0.75) trains into runs/cifar10-<PROFILE>-pNN (RUN_ROOT
# replaces `runs`) and resumes there when rerun. LEVELS="0.75" runs a subset; the report
# marks the levels without a run as "not run". Multi-GPU: ACCELERATE="accelerate launch
# --multi_gpu --num_processes 4" bash experiments/cifar10/run.sh paper
set -euo pipefail
cd "$(dirname "$0")/../.."

profile="${1:-cpu}"
if [ $# -gt 0 ]; then shift; fi
levels="${LEVELS:-0.25 0.5 0.75}"
run_root="${RUN_ROOT:-runs}"
if [ ! -f "experiments/cifar10/$profile.yaml" ]; then
    echo "run.sh: no profile '$profile' (experiments/cifar10/*.yaml)" >&2
    exit 2
fi

# `diffem train --set` takes one list: gather the caller's --set values so that the level's
# drop probability joins them instead of replacing them.
sets=()
other=()
while [ $# -gt 0 ]; do
    case "$1" in
        --set)
            shift
            while [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; do sets+=("$1"); shift; done ;;
        --set=*) sets+=("${1#--set=}"); shift ;;
        *) other+=("$1"); shift ;;
    esac
done

launcher="python -m diffem.cli"
if [ -n "${ACCELERATE:-}" ]; then launcher="$ACCELERATE -m diffem.cli"; fi

run_dir_of() { printf '%s/cifar10-%s-p%02d' "$run_root" "$profile" "$(python -c "print(round(100 * $1))")"; }

# Check every level's configuration before any work.
for p in $levels; do
    python -m diffem.cli train cifar10 --profile "$profile" --output-dir "$(run_dir_of "$p")" --dry-run \
        ${other[@]+"${other[@]}"} --set ${sets[@]+"${sets[@]}"} "data.drop_prob=$p" > /dev/null
done

start=$(date +%s)
dirs=()
for p in $levels; do
    run_dir="$(run_dir_of "$p")"
    dirs+=("$run_dir")
    echo "== cifar10 ($profile), drop_prob $p -> $run_dir"
    level_start=$(date +%s)
    $launcher train cifar10 --profile "$profile" --output-dir "$run_dir" \
        ${other[@]+"${other[@]}"} --set ${sets[@]+"${sets[@]}"} "data.drop_prob=$p"
    echo "== drop_prob $p took $(( $(date +%s) - level_start )) s"
done
echo "== training took $(( $(date +%s) - start )) s"

suffix=""
if [ "$profile" != "cpu" ]; then suffix="_$profile"; fi
# All three levels' folders go to the report (missing ones are reported as "not run").
all=()
for p in 0.25 0.5 0.75; do all+=("$(run_dir_of "$p")"); done
for d in "${dirs[@]}"; do
    case " ${all[*]} " in *" $d "*) ;; *) all+=("$d") ;; esac
done
python experiments/cifar10/report.py "${all[@]}" --profile "$profile" \
    --table "tables/cifar10$suffix.md" \
    --posterior-figure "figures/cifar10_posterior_laps$suffix.png" \
    --samples-figure "figures/cifar10_samples$suffix.png"
echo "== total $(( $(date +%s) - start )) s"
