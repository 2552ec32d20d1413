#!/usr/bin/env bash
# One call on a lent GPU machine (no network there): unpack the kanji cache, install the peer
# wheels and metabench without downloading anything, then run benchmarks/bench_gpu.py.
#
#   OUT=/some/folder DEADLINE=330 bash benchmarks/gpu_run.sh
#
# Expects, next to the tracked files (both ignored by git, prepared on a machine with network):
#   .gpu/kanji-v2-28px.npy.gz   gzip of the rendered kanji cache ($METABENCH_CACHE/kanji-v2-28px.npy)
#   .whl/*.whl                  optional peer wheels for the remote Python (learn2learn, higher, ...)
set -uo pipefail
OUT="${OUT:-/tmp/metabench-gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 METABENCH_CACHE="${METABENCH_CACHE:-/tmp/metabench-cache}"
PY="${PYTHON:-python3}"
mkdir -p "$METABENCH_CACHE"
if [ -f .gpu/kanji-v2-28px.npy.gz ]; then
    gunzip -c .gpu/kanji-v2-28px.npy.gz >"$METABENCH_CACHE/kanji-v2-28px.npy"
fi
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/metabench-peers .whl/*.whl \
        && export PYTHONPATH="/tmp/metabench-peers${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . || { echo "metabench did not install" >&2; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>/dev/null || true
"$PY" benchmarks/bench_gpu.py --json "$OUT/gpu.json" --deadline-s "${DEADLINE:-330}" "$@" 2>&1 | tee "$OUT/log.txt"
