#!/usr/bin/env bash
# The paper's covariance ablation: MMPS's E-step with the covariance heuristics
# (I + Sigma_t^-1)^-1 and Sigma_t at one corruption level, then tables/cifar10_ablation.md.
#
#   bash experiments/cifar10-ablation/run.sh [PROFILE] [extra `diffem train` arguments, e.g. --set key=value ...]
#   (or: bash reproduce.sh cifar10-ablation [--profile PROFILE])
#
# PROFILE: cpu (default) or smoke: experiments/cifar10-ablation/<PROFILE>.yaml names the
# cifar10 profile it builds on, the level and the covariances to run. Each covariance COV
# trains into runs/cifar10-ablation-<PROFILE>-<COV> (RUN_ROOT replaces `runs`) and resumes
# there when rerun. The Tweedie row comes from the overlay's `tweedie_results` (the committed
# cifar10 run) unless tweedie is among the covariances. COVARIANCES="sigma_t" runs a subset
# (the others are then "not run" unless committed). REPORT_ONLY=1 skips training.
# TABLES_DIR replaces `tables`; RESULTS_DIR replaces experiments/cifar10-ablation/results.
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
results_dir="${RESULTS_DIR:-experiments/cifar10-ablation/results}"
read_key() { python -c "import sys, yaml; v = yaml.safe_load(open('$overlay'))['$1']; print(' '.join(map(str, v)) if isinstance(v, list) else ('' if v is None else v))"; }
base="$(read_key base)"
level="$(read_key level)"
covariances="${COVARIANCES:-$(read_key covariances)}"
tweedie="$(read_key tweedie_results)"

. experiments/args.sh "$@"  # -> sets, other, launcher

start=$(date +%s)
dirs=()
for cov in $covariances; do dirs+=("$run_root/cifar10-ablation-$profile-$cov"); done
if [ "${REPORT_ONLY:-0}" != "1" ]; then
    for cov in $covariances; do  # check every configuration before any work
        python -m diffem.cli train cifar10 --profile "$base" --output-dir "$run_root/cifar10-ablation-$profile-$cov" \
            --dry-run ${other[@]+"${other[@]}"} --set ${sets[@]+"${sets[@]}"} "data.drop_prob=$level" \
            "estep.covariance=$cov" > /dev/null
    done
    for cov in $covariances; do
        run_dir="$run_root/cifar10-ablation-$profile-$cov"
        echo "== cifar10 ($base), drop_prob $level, covariance $cov -> $run_dir"
        cov_start=$(date +%s)
        $launcher train cifar10 --profile "$base" --output-dir "$run_dir" \
            ${other[@]+"${other[@]}"} --set ${sets[@]+"${sets[@]}"} "data.drop_prob=$level" "estep.covariance=$cov"
        echo "== covariance $cov took $(( $(date +%s) - cov_start )) s"
    done
fi

suffix=""
if [ "$profile" != "cpu" ]; then suffix="_$profile"; fi
tweedie_args=()
if [ -n "$tweedie" ]; then tweedie_args=(--tweedie "$tweedie"); fi
python experiments/cifar10-ablation/report.py "${dirs[@]}" ${tweedie_args[@]+"${tweedie_args[@]}"} \
    --profile "$profile" --results-dir "$results_dir" --table "$tables_dir/cifar10_ablation$suffix.md"
echo "== total $(( $(date +%s) - start )) s"
