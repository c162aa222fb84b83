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

start=$(date +%s)
if [ "${REPORT_ONLY:-0}" != "1" ]; then
    echo "== mri ($profile) -> $run_dir"
    # Check the configuration before any work, then train (or resume).
    python -m diffem.cli train mri --profile "$profile" --output-dir "$run_dir" --dry-run "$@" > /dev/null
    $launcher train mri --profile "$profile" --output-dir "$run_dir" "$@"
    echo "== training took $(( $(date +%s) - start )) s"
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
python experiments/mri/report.py "$source" --results-dir "$results_dir" \
    --table "$tables_dir/mri$suffix.md" --figure "$figures_dir/mri$suffix.png" --laps-figure "$figures_dir/mri_laps$suffix.png"
echo "== total $(( $(date +%s) - start )) s"
