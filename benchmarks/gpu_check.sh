#!/usr/bin/env bash
# The GPU checks of one lent GPU machine, in one call, well under 8 minutes, one summary file:
#   1. benchmarks/bench_gpu.py: every learner's CUDA path at budget smoke, quick runs of protonet,
#      maml and mtl, evaluation (episodes per forward), the MAML step table (deadline-bounded);
#   2. a 2-process torchrun run on the one GPU (gloo backend: NCCL wants one GPU per process);
#   3. $OUT/summary.json: each step's exit status and seconds, the torchrun result's figures.
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh                 # on the GPU machine (after gpu_run.sh's setup)
#   DEVICE=cpu QUICK=1 OUT=/tmp/x bash benchmarks/gpu_check.sh    # a dry run of the same steps on a CPU
set -uo pipefail
OUT="${OUT:-/tmp/metabench-gpu-check}"
DEVICE="${DEVICE:-cuda}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
quick=()
[ -n "${QUICK:-}" ] && quick=(--quick)
: >"$OUT/steps.txt"

step() {  # step NAME COMMAND...: run it, keep its log, exit status and seconds
    local name=$1; shift
    local start=$(date +%s)
    "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name $rc $(( $(date +%s) - start ))" >>"$OUT/steps.txt"
    echo "$name: exit $rc" >&2
}

step bench_gpu "$PY" benchmarks/bench_gpu.py --device "$DEVICE" --json "$OUT/gpu.json" \
    --deadline-s "${DEADLINE:-300}" "${quick[@]}"
step torchrun env METABENCH_DIST_BACKEND=gloo OMP_NUM_THREADS=1 "$PY" -m torch.distributed.run --standalone \
    --nproc-per-node 2 -m metabench run --learner maml --budget smoke --device "$DEVICE" --set meta_batch=4 \
    --episodes 20 --no-save --out "$OUT/torchrun"

"$PY" - "$OUT" <<'PY'
import glob, json, sys
out = sys.argv[1]
steps = {}
for line in open(f"{out}/steps.txt").read().splitlines():
    name, rc, seconds = line.split()
    steps[name] = {"exit": int(rc), "seconds": round(float(seconds), 1)}
summary = {"steps": steps}
results = glob.glob(f"{out}/torchrun/*.json")
if results:
    doc = json.load(open(results[0]))
    summary["torchrun"] = {"distributed": doc.get("distributed"), "device": doc["environment"]["device"],
                           "mean": doc["summary"]["mean"], "episodes": doc["summary"]["n"]}
try:
    summary["bench_gpu"] = sorted(json.load(open(f"{out}/gpu.json")))
except (OSError, ValueError):
    summary["bench_gpu"] = None
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
print(json.dumps(summary, indent=1))
PY
