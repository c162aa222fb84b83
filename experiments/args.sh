# Sourced by the experiment drivers (experiments/*/run.sh): `. experiments/args.sh "$@"`.
# `diffem train --set` takes one list, so the caller's --set values are gathered into `sets`
# (a driver appends its own, e.g. a level's drop probability, instead of replacing them);
# every other argument goes to `other`. `launcher` runs the CLI, under $ACCELERATE if set.
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
