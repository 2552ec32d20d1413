#!/usr/bin/env bash
# Run a grid of `metabench run --budget quick` jobs, PARALLEL at a time with one thread each.
#
#   scripts/run_grid.sh JOBS.txt OUT_DIR [PARALLEL]      # PARALLEL defaults to 2
#   metabench publish OUT_DIR/*/*.json && metabench leaderboard build
#
# JOBS.txt: one job per line, "TASK LEARNER SEED" (scripts/grid-quick.txt is the grid behind the
# committed leaderboards). A job whose result exists (OUT_DIR/.done/...) is skipped, so an
# interrupted grid resumes where it stopped. Each finished job appends a line to
# OUT_DIR/summary.txt: exit status, wall seconds, load average and time.
# For results that record a clean commit, run it from a clean checkout of metabench.
set -u
jobs=${1:?usage: run_grid.sh JOBS.txt OUT_DIR [PARALLEL]}
out=${2:?usage: run_grid.sh JOBS.txt OUT_DIR [PARALLEL]}
parallel=${3:-2}
[ -r "$jobs" ] || { echo "run_grid.sh: cannot read jobs file $jobs" >&2; exit 2; }
case $parallel in ''|*[!0-9]*|0) echo "run_grid.sh: PARALLEL must be a positive integer, got $parallel" >&2; exit 2;; esac
mkdir -p "$out/.done" "$out/logs"

one() {
    local task=$1 learner=$2 seed=$3 out=$4
    local key="$task-$learner-s$seed"
    [ -e "$out/.done/$key" ] && return 0
    local start=$(date +%s)
    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE metabench run --learner "$learner" --task "$task" --seed "$seed" \
        --budget quick --out "$out/$task" > "$out/logs/$key.log" 2>&1
    local rc=$?
    echo "$task $learner $seed rc=$rc wall=$(( $(date +%s) - start ))s load=$(cut -d' ' -f1-3 /proc/loadavg) $(date -u +%H:%M:%S)" >> "$out/summary.txt"
    [ $rc = 0 ] && touch "$out/.done/$key"
    return 0
}
export -f one
grep -v '^\s*\(#\|$\)' "$jobs" | xargs -P "$parallel" -L 1 bash -c 'one "$0" "$1" "$2" "'"$out"'"'
