#!/usr/bin/env bash
# The paper's covariance ablation: MMPS's E-step with the covariance heuristics
# (I + Sigma_t^-1)^-1 and Sigma_t at one corruption level, then tables/cifar10_ablation.md.
#
#   bash experiments/cifar10-ablation/run.sh [PROFILE] [extra `diffem train` arguments, e.g. --set key=value ...]
#   (or: bash reproduce.sh cifar10-ablation [--profile PROFILE])
#
# PROFILE: cpu (default) or smoke: experiments/cifar10-ablation/<PROFILE>.yaml names the
# cifar10 profile it builds on, the level, the covariances to run and the lap they fork at.
# The authors' protocol (issue 24): every row shares lap 0 (the Gaussian) and lap 1 (whose
# E-step samples under the Gaussian with its exact covariance, whatever the heuristic), so
# the driver first trains the cifar10 experiment's own run at this level,
# runs/cifar10-<base>-pNN, up to lap `fork_lap`, then forks it (`diffem fork`: laps 0..fork_lap
# copied, nothing recomputed) into runs/cifar10-ablation-<PROFILE>-<COV> for each heuristic COV
# and trains the fork's later laps with estep.covariance=COV (RUN_ROOT replaces `runs`); each
# resumes when rerun. The Tweedie row is that cifar10 run when it holds every lap, else the
# overlay's `tweedie_results` (the committed cifar10 run). COVARIANCES="sigma_t" runs a
# subset (the others are then "not run" unless committed). A heuristic whose lap stops (its
# E-step samples left the data range: diffem.em.estep.OutlierError) is reported as stopped;
# the driver goes on with the next one. REPORT_ONLY=1 skips training. TABLES_DIR / FIGURES_DIR
# replace `tables` / `figures`; RESULTS_DIR replaces experiments/cifar10-ablation/results.
set -euo pipefail
cd "$(dirname "$0")/../.."

profile="${1:-cpu}"
if [ $# -gt 0 ]; then shift; fi
overlay="experiments/cifar10-ablation/$profile.yaml"
if [ ! -f "$overlay" ]; then
    echo "run.sh: no profile '$profile' (experiments/cifar10-ablation/*.yaml)" >&2
    exit 2
fi
run_root="${RUN_ROOT:-runs}"
tables_dir="${TABLES_DIR:-tables}"
figures_dir="${FIGURES_DIR:-figures}"
results_dir="${RESULTS_DIR:-experiments/cifar10-ablation/results}"
read_key() { python -c "import sys, yaml; v = yaml.safe_load(open('$overlay'))['$1']; print(' '.join(map(str, v)) if isinstance(v, list) else ('' if v is None else v))"; }
base="$(read_key base)"
level="$(read_key level)"
covariances="${COVARIANCES:-$(read_key covariances)}"
tweedie="$(read_key tweedie_results)"
fork_lap="$(read_key fork_lap)"

. experiments/args.sh "$@"  # -> sets, other, launcher

source_dir="$(printf '%s/cifar10-%s-p%02d' "$run_root" "$base" "$(python -c "print(round(100 * $level))")")"
start=$(date +%s)
base_laps="$(python -c "import yaml; print(yaml.safe_load(open('experiments/cifar10/$base.yaml'))['laps'])")"
dirs=()
for cov in $covariances; do
    if [ "$cov" != "tweedie" ]; then dirs+=("$run_root/cifar10-ablation-$profile-$cov"); fi
done
train() {  # train OUTPUT_DIR [extra --set values]
    local out="$1"; shift
    $launcher train cifar10 --profile "$base" --output-dir "$out" ${other[@]+"${other[@]}"} \
        --set ${sets[@]+"${sets[@]}"} "data.drop_prob=$level" "$@"
}
if [ "${REPORT_ONLY:-0}" != "1" ]; then
    for cov in $covariances; do  # check every configuration before any work
        python -m diffem.cli train cifar10 --profile "$base" --output-dir "$run_root/cifar10-ablation-$profile-$cov" \
            --dry-run ${other[@]+"${other[@]}"} --set ${sets[@]+"${sets[@]}"} "data.drop_prob=$level" \
            "estep.covariance=$cov" > /dev/null
    done
    if [[ " $covariances " == *" tweedie "* ]]; then
        echo "== cifar10 ($base), drop_prob $level, covariance tweedie -> $source_dir"
        train "$source_dir"
    elif [ ! -f "$source_dir/lap_$(printf '%02d' "$fork_lap")/model_index.json" ]; then
        echo "== cifar10 ($base), drop_prob $level, laps 0-$fork_lap (shared by every row) -> $source_dir"
        train "$source_dir" "laps=$fork_lap"
    fi
    for cov in $covariances; do
        if [ "$cov" = "tweedie" ]; then continue; fi
        run_dir="$run_root/cifar10-ablation-$profile-$cov"
        echo "== covariance $cov: laps 0-$fork_lap from $source_dir, then its own -> $run_dir"
        cov_start=$(date +%s)
        python -m diffem.cli fork "$source_dir" --lap "$fork_lap" --output-dir "$run_dir" \
            --set ${sets[@]+"${sets[@]}"} "estep.covariance=$cov"
        train "$run_dir" "estep.covariance=$cov" || echo "== covariance $cov stopped (see its log above)"
        echo "== covariance $cov took $(( $(date +%s) - cov_start )) s"
    done
fi

# The Tweedie row: the cifar10 run at this level when it holds every lap of its profile.
if [ -f "$source_dir/lap_$(printf '%02d' "$base_laps")/model_index.json" ]; then dirs=("$source_dir" ${dirs[@]+"${dirs[@]}"}); fi
suffix=""
if [ "$profile" != "cpu" ]; then suffix="_$profile"; fi
tweedie_args=()
if [ -n "$tweedie" ]; then tweedie_args=(--tweedie "$tweedie"); fi
python experiments/cifar10-ablation/report.py ${dirs[@]+"${dirs[@]}"} ${tweedie_args[@]+"${tweedie_args[@]}"} \
    --profile "$profile" --results-dir "$results_dir" --table "$tables_dir/cifar10_ablation$suffix.md" \
    --figure "$figures_dir/cifar10_ablation$suffix.png"
echo "== total $(( $(date +%s) - start )) s"
