#!/usr/bin/env bash
# References for the CIFAR-10 table at equal compute (oracle, naive, Ambient Diffusion's loss,
# EM with a DPS E-step, EM with MMPS), then tables/cifar10_baselines.md and figures/cifar10_baselines.png.
#
#   bash experiments/cifar10-baselines/run.sh [PROFILE] [extra `diffem train` arguments, e.g. --set key=value ...]
#   (or: bash reproduce.sh cifar10-baselines [--profile PROFILE])
#
# PROFILE: cpu (default) or smoke: experiments/cifar10-baselines/<PROFILE>.yaml names the
# cifar10 profile every row builds on, the levels and the methods (its comments say what each
# row is). Each run trains into runs/cifar10-baselines-<PROFILE>-<METHOD>-pNN (RUN_ROOT replaces
# `runs`; EM-MMPS is the cifar10 experiment's own runs/cifar10-<base>-pNN) and resumes when
# rerun. METHODS="oracle naive" runs a subset, LEVELS="0.75" a subset of the levels; the
# report takes the other rows from the committed results (RESULTS_DIR, default
# experiments/cifar10-baselines/results) and says where each row comes from. REPORT_ONLY=1
# skips training. TABLES_DIR / FIGURES_DIR replace `tables` / `figures`.
set -euo pipefail
cd "$(dirname "$0")/../.."

profile="${1:-cpu}"
if [ $# -gt 0 ]; then shift; fi
overlay="experiments/cifar10-baselines/$profile.yaml"
if [ ! -f "$overlay" ]; then
    echo "run.sh: no profile '$profile' (experiments/cifar10-baselines/*.yaml)" >&2
    exit 2
fi
run_root="${RUN_ROOT:-runs}"
tables_dir="${TABLES_DIR:-tables}"
figures_dir="${FIGURES_DIR:-figures}"
results_dir="${RESULTS_DIR:-experiments/cifar10-baselines/results}"
read_key() { python -c "import sys, yaml; v = yaml.safe_load(open('$overlay'))['$1']; print(' '.join(map(str, v)) if isinstance(v, list) else ('' if v is None else v))"; }
base="$(read_key base)"
levels="${LEVELS:-$(read_key levels)}"
naive_levels="${LEVELS:-$(read_key naive_levels)}"
oracle_level="$(read_key oracle_level)"
methods="${METHODS:-$(read_key methods)}"
read -r -a reference_sets <<< "$(read_key reference_sets)"
read -r -a oracle_sets <<< "$(read_key oracle_sets)"
dps_zeta="${DPS_ZETA:-$(read_key dps_zeta)}"
em_results="$(read_key em_results)"

. experiments/args.sh "$@"  # -> sets, other, launcher

tag() { python -c "print('p%02d' % round(100 * $1))"; }
# One line per run: METHOD LEVEL RUN_DIR then its --set values.
plan=()
for method in $methods; do
    case "$method" in
        oracle) plan+=("oracle $oracle_level $run_root/cifar10-baselines-$profile-oracle train_on=clean ${oracle_sets[*]-}") ;;
        naive) for p in $naive_levels; do
                   plan+=("naive $p $run_root/cifar10-baselines-$profile-naive-$(tag "$p") train_on=observed ${reference_sets[*]-}")
               done ;;
        em-mmps) for p in $levels; do plan+=("em-mmps $p $run_root/cifar10-$base-$(tag "$p")"); done ;;
        ambient) for p in $levels; do
                     plan+=("ambient $p $run_root/cifar10-baselines-$profile-ambient-$(tag "$p") train_on=ambient ${reference_sets[*]-}")
                 done ;;
        em-dps)
            if [ -z "$dps_zeta" ]; then
                echo "run.sh: em-dps needs \`dps_zeta\` in $overlay (or DPS_ZETA=...): python experiments/cifar10-baselines/dps_zeta.py" >&2
                exit 2
            fi
            for p in $levels; do
                plan+=("em-dps $p $run_root/cifar10-baselines-$profile-em-dps-$(tag "$p") estep.guidance=dps estep.dps_zeta=$dps_zeta")
            done ;;
        *) echo "run.sh: unknown method '$method' (oracle, naive, ambient, em-mmps, em-dps)" >&2; exit 2 ;;
    esac
done

start=$(date +%s)
dirs=()
for line in "${plan[@]}"; do read -r -a f <<< "$line"; dirs+=("${f[2]}"); done
if [ "${REPORT_ONLY:-0}" != "1" ]; then
    for line in "${plan[@]}"; do  # check every configuration before any work
        read -r -a f <<< "$line"
        python -m diffem.cli train cifar10 --profile "$base" --output-dir "${f[2]}" --dry-run ${other[@]+"${other[@]}"} \
            --set ${sets[@]+"${sets[@]}"} "data.drop_prob=${f[1]}" "${f[@]:3}" > /dev/null
    done
    for line in "${plan[@]}"; do
        read -r -a f <<< "$line"
        echo "== ${f[0]}, drop_prob ${f[1]} -> ${f[2]}"
        run_start=$(date +%s)
        $launcher train cifar10 --profile "$base" --output-dir "${f[2]}" ${other[@]+"${other[@]}"} \
            --set ${sets[@]+"${sets[@]}"} "data.drop_prob=${f[1]}" "${f[@]:3}" || echo "== ${f[0]} at ${f[1]} stopped (see its log above)"
        echo "== ${f[0]} at ${f[1]} took $(( $(date +%s) - run_start )) s"
    done
fi

suffix=""
if [ "$profile" != "cpu" ]; then suffix="_$profile"; fi
existing=()
for d in "${dirs[@]}"; do if [ -f "$d/metrics.jsonl" ]; then existing+=("$d"); fi; done
python experiments/cifar10-baselines/report.py ${existing[@]+"${existing[@]}"} --profile "$profile" \
    --results-dir "$results_dir" --em-results "$em_results" --base "$base" \
    --table "$tables_dir/cifar10_baselines$suffix.md" --figure "$figures_dir/cifar10_baselines$suffix.png"
echo "== total $(( $(date +%s) - start )) s"
