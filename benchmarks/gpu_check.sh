#!/usr/bin/env bash
# The GPU checks of one lent GPU machine, in one call, under 8 minutes, one summary file:
#   1. benchmarks/bench_gpu.py: every learner's CUDA path at budget smoke, quick runs of protonet,
#      maml and mtl, evaluation (episodes per forward), the MAML step table (loop, vmap, grouped,
#      learn2learn; float64 meta-gradients against the loop), the time targets (MAML's paper
#      configurations of Omniglot and mini-ImageNet 5w1s projected to 60,000 steps) (deadline-bounded);
#   2. a 2-process torchrun run on the one GPU (gloo backend: NCCL wants one GPU per process);
#   3. repeatability: protonet and maml smoke runs twice each (same command): per-episode values
#      identical? (PASS/FAIL; where not, whether the trained states differ, i.e. training); the
#      protonet learner evaluated twice at --eval-batch 16 (evaluation alone: PASS/FAIL);
#   4. --eval-batch 16 against --eval-batch 1 on the same learner: per-episode values (equal up to
#      float rounding on a GPU, identical on a CPU) and eval time;
#   5. a --precision bf16 protonet run (quick; smoke with QUICK=1);
#   6. $OUT/summary.json: each step's exit status and seconds, the torchrun result's figures, the
#      checks of 3-5 ("checks": name -> PASS/FAIL).
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
    --deadline-s "${DEADLINE:-240}" "${quick[@]}"
step torchrun env METABENCH_DIST_BACKEND=gloo OMP_NUM_THREADS=1 "$PY" -m torch.distributed.run --standalone \
    --nproc-per-node 2 -m metabench run --learner maml --budget smoke --device "$DEVICE" --set meta_batch=4 \
    --episodes 20 --no-save --out "$OUT/torchrun"

# 3. the same run twice (a fresh process each, learner kept for the state comparison)
for learner in protonet maml; do
    for copy in a b; do
        step "repeat_${learner}_$copy" "$PY" -m metabench run --learner "$learner" --task kanji-5w1s --budget smoke \
            --seed 0 --device "$DEVICE" --out "$OUT/repeat/$learner-$copy"
    done
done
# 3-4. one trained protonet evaluated at --eval-batch 16 twice and at 1
saved=$(ls "$OUT"/repeat/protonet-a/*.learner.pt 2>/dev/null | head -n 1)
episodes=600
[ -n "${QUICK:-}" ] && episodes=40
for tag in 16 16-again 1; do
    step "eval_batch_$tag" "$PY" -m metabench eval "${saved:-missing.learner.pt}" --task kanji-5w1s \
        --episodes "$episodes" --device "$DEVICE" --eval-batch "${tag%-again}" --out "$OUT/eval-batch/$tag"
done
# 5. bf16 training
budget=quick
[ -n "${QUICK:-}" ] && budget=smoke
step bf16 "$PY" -m metabench run --learner protonet --task kanji-5w1s --budget "$budget" --seed 0 \
    --device "$DEVICE" --precision bf16 --no-save --out "$OUT/bf16"

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


def result(folder):
    """The result document in ``folder`` (None if the step left none)."""
    found = sorted(glob.glob(f"{out}/{folder}/*.json"))
    return json.load(open(found[0])) if found else None


def state(folder):
    import torch

    found = sorted(glob.glob(f"{out}/{folder}/*.learner.pt"))
    if not found:
        return None
    flat = {}

    def walk(x, prefix):
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{prefix}.{k}")
        else:
            flat[prefix] = x

    walk(torch.load(found[0], weights_only=True, map_location="cpu")["state"], "")
    return flat


def same_state(a, b):
    import torch

    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


checks = {}
for learner in ("protonet", "maml"):
    a, b = result(f"repeat/{learner}-a"), result(f"repeat/{learner}-b")
    if a is None or b is None:
        checks[f"repeat {learner}"] = "FAIL"
        summary[f"repeat_{learner}"] = {"error": "a run left no result"}
        continue
    identical = a["per_episode"] == b["per_episode"]
    sa, sb = state(f"repeat/{learner}-a"), state(f"repeat/{learner}-b")
    checks[f"repeat {learner}"] = "PASS" if identical else "FAIL"
    summary[f"repeat_{learner}"] = {
        "per_episode_identical": identical, "episodes": len(a["per_episode"]),
        "episodes_differing": sum(x != y for x, y in zip(a["per_episode"], b["per_episode"])),
        "trained_state_identical": None if sa is None or sb is None else same_state(sa, sb),
        "mean": [a["summary"]["mean"], b["summary"]["mean"]], "evaluation": a.get("evaluation"),
        "device": a["environment"]["device"]}
e16, again, e1 = result("eval-batch/16"), result("eval-batch/16-again"), result("eval-batch/1")
if e16 is not None and again is not None:
    checks["eval repeat (batch 16)"] = "PASS" if e16["per_episode"] == again["per_episode"] else "FAIL"
else:
    checks["eval repeat (batch 16)"] = "FAIL"
if e16 is not None and e1 is not None:
    pairs = list(zip(e1["per_episode"], e16["per_episode"]))
    checks["eval batch 16 vs 1 ran"] = "PASS"
    summary["eval_batch"] = {  # equal up to float rounding is expected; identical on a CPU
        "identical": e1["per_episode"] == e16["per_episode"],
        "episodes": len(pairs), "batch": [e1["evaluation"]["batch"], e16["evaluation"]["batch"]],
        "episodes_differing": sum(x != y for x, y in pairs),
        "max_abs_difference": max(abs(x - y) for x, y in pairs),
        "mean": [e1["summary"]["mean"], e16["summary"]["mean"]],
        "eval_s": [e1["timing"]["eval_s"], e16["timing"]["eval_s"]],
        "speedup": round(e1["timing"]["eval_s"] / max(e16["timing"]["eval_s"], 1e-9), 2)}
else:
    checks["eval batch 16 vs 1 ran"] = "FAIL"
bf16 = result("bf16")
checks["bf16 run"] = "PASS" if bf16 is not None and bf16.get("precision") == "bf16" else "FAIL"
if bf16 is not None:
    summary["bf16"] = {"precision": bf16.get("precision"), "budget": bf16["budget"], "mean": bf16["summary"]["mean"],
                       "ci95": bf16["summary"]["ci95"], "meta_train_s": bf16["timing"]["meta_train_s"],
                       "eval_s": bf16["timing"]["eval_s"], "evaluation": bf16.get("evaluation")}
summary["checks"] = checks
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
print(json.dumps(summary, indent=1))
for name, verdict in checks.items():
    print(f"{verdict}: {name}")
PY
