#!/usr/bin/env bash
# Run the MRI experiment, then write tables/mri.md, figures/mri.png and figures/mri_laps.png.
#
#   bash experiments/mri/run.sh [PROFILE] [extra `diffem train` arguments, e.g. --set key=value ...]
#
# PROFILE: cpu (default), paper or smoke (experiments/mri/<PROFILE>.yaml). The run trains into
# RUN_DIR (default runs/mri-<PROFILE>) and resumes there when rerun. On a shared CPU machine run
# it single-threaded: OMP_NUM_THREADS=1 (see experiments/mri/cpu.yaml). REPORT_ONLY=1 skips
# training and rebuilds the table and figures from the run folder if it exists, else from the
# committed result files experiments/mri/results/<PROFILE>/ (RESULTS_DIR replaces
# experiments/mri/results). TABLES_DIR / FIGURES_DIR replace tables / figures.
# VARIANTS (default "oracle complex multicoil"; "" for none) names the reference and variant runs
# trained after the main run, on the same held-out slices, each into RUN_DIR-<name> and reported
# beside it (`cpu`, measured on 2 cores with one torch thread each: about 20 / 50 / 55 min):
#   oracle     the same U-Net and M-step steps on the clean slices (train_on: clean), no E-step
#   complex    complex images (a synthetic smooth phase) from single-coil k-space (data.complex)
#   multicoil  complex images from simulated 8-coil SENSE k-space (data.complex, data.coils: 8), with
#              4 lap-0 Gaussian EM iterations, not 16: the 8 coils' FFTs make an iteration 13x dearer
#              (160 s on one thread), and the coils' redundancy makes the observations more informative
# Multi-GPU: ACCELERATE="accelerate launch --multi_gpu --num_processes 4" bash experiments/mri/run.sh paper --set data.path=...
set -euo pipefail
cd "$(dirname "$0")/../.."

profile="${1:-cpu}"
if [ $# -gt 0 ]; then shift; fi
if [ ! -f "experiments/mri/$profile.yaml" ]; then
    echo "run.sh: no profile '$profile' (experiments/mri/*.yaml)" >&2
    exit 2
fi
run_dir="${RUN_DIR:-runs/mri-$profile}"
results_dir="${RESULTS_DIR:-experiments/mri/results}"
tables_dir="${TABLES_DIR:-tables}"
figures_dir="${FIGURES_DIR:-figures}"
launcher="python -m diffem.cli"
if [ -n "${ACCELERATE:-}" ]; then launcher="$ACCELERATE -m diffem.cli"; fi

variants="${VARIANTS-oracle complex multicoil}"
variant_args() {
    case "$1" in
        oracle) echo "train_on=clean" ;;
        complex) echo "data.complex=true" ;;
        multicoil) echo "data.complex=true data.coils=8 lap0.iterations=4" ;;
        *) echo "run.sh: unknown variant '$1' (VARIANTS: oracle complex multicoil)" >&2; return 2 ;;
    esac
}
for variant in $variants; do variant_args "$variant" > /dev/null; done

train() {  # train RUN_DIR [--set ...]: check the configuration before any work, then train (or resume)
    local dir="$1"; shift
    python -m diffem.cli train mri --profile "$profile" --output-dir "$dir" --dry-run "$@" > /dev/null
    $launcher train mri --profile "$profile" --output-dir "$dir" "$@"
}

start=$(date +%s)
if [ "${REPORT_ONLY:-0}" != "1" ]; then
    echo "== mri ($profile) -> $run_dir"
    train "$run_dir" "$@"
    echo "== training took $(( $(date +%s) - start )) s"
    for variant in $variants; do
        echo "== mri ($profile, $variant) -> $run_dir-$variant"
        # shellcheck disable=SC2046  # the variant's keys are words
        train "$run_dir-$variant" "$@" --set $(variant_args "$variant")
    done
fi

source="$run_dir"
if [ ! -f "$run_dir/metrics.jsonl" ]; then
    source="$results_dir/$profile"
    if [ ! -f "$source/metrics.jsonl" ]; then
        echo "run.sh: neither $run_dir nor $source holds a run (metrics.jsonl)" >&2
        exit 2
    fi
    echo "== report from the committed results $source"
fi
suffix=""
if [ "$profile" != "cpu" ]; then suffix="_$profile"; fi
variant_dirs=()
for variant in $variants; do  # a variant's run folder when it holds a run, else its committed results
    if [ -f "$run_dir-$variant/metrics.jsonl" ]; then variant_dirs+=("--$variant" "$run_dir-$variant"); fi
done
python experiments/mri/report.py "$source" --results-dir "$results_dir" ${variant_dirs[@]+"${variant_dirs[@]}"} \
    --table "$tables_dir/mri$suffix.md" --figure "$figures_dir/mri$suffix.png" --laps-figure "$figures_dir/mri_laps$suffix.png"
echo "== total $(( $(date +%s) - start )) s"
