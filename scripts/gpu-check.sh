#!/usr/bin/env bash
# Every GPU check of the project, in one call of a few minutes, on a machine with an NVIDIA GPU
# and PyTorch 2.11's libraries. It takes already-built release binaries (build them where cargo
# is: `make build`; strip and carry them if they must travel), so nothing is compiled here.
#
#   scripts/gpu-check.sh [OUT_DIR]
#
# Settings (environment):
#   SWEEP_BIN      directory of `sweep` and `sweep-worker`   (default: target/release)
#   SWEEP_PYTHON   a python with torch 2.11 + torchvision     (default: python3)
#   OUT            where results go, if OUT_DIR is not given (default: gpu-check-out)
#   BENCH_BATCH / BENCH_STEPS / BENCH_WARMUP                  (default: 64 / 30 / 10)
#
# Checks, in order (each prints PASS or FAIL; the script exits non-zero if any failed):
#   1. the card (nvidia-smi) and CUDA as libtorch sees it inside sweep-worker (--list-devices);
#   2. an NCCL all-reduce of world size 1 through the training code path (allreduce-check);
#   3. a resnet50 trial trained on cuda:0 by a real coordinator and worker (`sweep run`);
#   4. resnet50 training images/s, sweep-worker vs PyTorch eager on the same card, model and
#      batch, fp32 and fp16 autocast (`sweep-worker bench` vs tools/bench_torch_train.py), and
#      the worker with Adam one parameter at a time (`--adam loop`) against its flat buffers,
#      and both Adam layouts stepped with the same gradients stay bit-identical (--compare-adam);
#   4b. the feature cache on cuda:0: the same trial with SWEEP_FEATURE_CACHE=off and on gives
#      the same metrics, and the worker did not give the cache up (its bit-for-bit check of a
#      batch computed afresh, `worker/src/train.rs`);
#   5. with 2+ GPUs: an all-reduce and a 2-GPU data-parallel trial over NCCL, and the feature
#      cache shared by two replicas (off and on give the same metrics, and it was kept).
# Results: OUT/summary.md (a table ready for docs/benchmarks.md), OUT/*.json, OUT/*.log.

set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=${1:-${OUT:-gpu-check-out}}
BIN=${SWEEP_BIN:-target/release}
PY=${SWEEP_PYTHON:-python3}
BATCH=${BENCH_BATCH:-64}
STEPS=${BENCH_STEPS:-30}
WARMUP=${BENCH_WARMUP:-10}
mkdir -p "$OUT_DIR"
SUMMARY=$OUT_DIR/summary.md
: >"$SUMMARY"
failed=0

say() { echo "$*" | tee -a "$SUMMARY"; }
pass() { say "- PASS: $*"; }
fail() { say "- FAIL: $*"; failed=1; }

# PyTorch's libraries (libtorch, CUDA runtime, NCCL) for the binaries, which were linked against
# the build machine's copy.
SITE=$("$PY" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))' 2>/dev/null) || {
    echo "FAIL: $PY has no torch; set SWEEP_PYTHON" >&2
    exit 2
}
export LD_LIBRARY_PATH="$SITE/torch/lib:$SITE/nvidia/nccl/lib:${LD_LIBRARY_PATH:-}"
export PYTHONUNBUFFERED=1
for b in sweep sweep-worker; do
    [ -x "$BIN/$b" ] || { echo "FAIL: $BIN/$b is missing; build with make build (or set SWEEP_BIN)" >&2; exit 2; }
done

say "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
say ""
CARD=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n1)
GPUS=$(nvidia-smi --list-gpus 2>/dev/null | wc -l)
say "Card: ${CARD:-unknown} (${GPUS} GPU(s)); torch $("$PY" -c 'import torch; print(torch.__version__)')"
say ""

# 1. CUDA visible to the worker --------------------------------------------------------------
"$BIN/sweep-worker" --list-devices >"$OUT_DIR/devices.txt" 2>"$OUT_DIR/devices.log"
if grep -q '^cuda:0' "$OUT_DIR/devices.txt"; then
    pass "CUDA visible to sweep-worker: $(tr '\t\n' ' ;' <"$OUT_DIR/devices.txt")"
else
    fail "sweep-worker sees no CUDA device: $(cat "$OUT_DIR/devices.txt" "$OUT_DIR/devices.log" | head -5)"
fi

# 2. NCCL all-reduce, world size 1, through the training code path ----------------------------
if "$BIN/sweep-worker" allreduce-check --devices cuda:0 --output json >"$OUT_DIR/allreduce-1.json" 2>"$OUT_DIR/allreduce-1.log"; then
    pass "NCCL all-reduce, world size 1: $(cat "$OUT_DIR/allreduce-1.json")"
else
    fail "NCCL all-reduce, world size 1: $(tail -3 "$OUT_DIR/allreduce-1.log")"
fi

# 3. A trial on cuda:0 through a real coordinator and worker ----------------------------------
cat >"$OUT_DIR/cuda-trial.yaml" <<'EOF'
name: gpu-check
dataset: { kind: synthetic, classes: 10, train_per_class: 64, val_per_class: 16, image_size: 224, seed: 1 }
training: { batch_size: 64 }
grid:
  backbone: [resnet50]
  lr_decay: [{ strategy: exponential, head_lr: 1.0e-3, factor: 3 }]
  epoch_split: [[1, 1]]
EOF
rm -rf "$OUT_DIR/state"
if "$BIN/sweep" run "$OUT_DIR/cuda-trial.yaml" --workers 1 --state-dir "$OUT_DIR/state" --output json \
    >"$OUT_DIR/cuda-trial.json" 2>"$OUT_DIR/cuda-trial.log" \
    && grep -q 'devices=cuda:0 .*attempt started\|attempt started.*devices=cuda:0' "$OUT_DIR"/state/logs/worker-1.log; then
    pass "resnet50 trial trained on cuda:0: $("$PY" -c 'import json,sys; e=json.load(open(sys.argv[1]))[0]; print(e["state"], "fe", e["fe_val_accuracy"], "best", e["best_val_accuracy"], "wall", round(e["wall_seconds"],1), "s")' "$OUT_DIR/cuda-trial.json")"
else
    fail "resnet50 trial on cuda:0: $(tail -5 "$OUT_DIR/cuda-trial.log")"
fi
cp "$OUT_DIR/state/logs/worker-1.log" "$OUT_DIR/cuda-trial-worker.log" 2>/dev/null
rm -rf "$OUT_DIR/state"

# 4. Training throughput vs PyTorch eager ------------------------------------------------------
say ""
say "| resnet50, batch $BATCH, 224 px, Adam | sweep-worker (tch) images/s | PyTorch eager images/s | ratio |"
say "|---|--:|--:|--:|"
for precision in fp32 fp16; do
    ours=$("$BIN/sweep-worker" bench --device cuda:0 --backbone resnet50 --batch "$BATCH" --image-size 224 \
        --steps "$STEPS" --warmup "$WARMUP" --precision "$precision" --output json 2>"$OUT_DIR/bench-$precision.log")
    theirs=$("$PY" tools/bench_torch_train.py --device cuda:0 --backbone resnet50 --batch "$BATCH" --image-size 224 \
        --steps "$STEPS" --warmup "$WARMUP" --precision "$precision" 2>>"$OUT_DIR/bench-$precision.log")
    echo "$ours" >"$OUT_DIR/bench-$precision-sweep.json"
    echo "$theirs" >"$OUT_DIR/bench-$precision-torch.json"
    if row=$("$PY" - "$ours" "$theirs" "$precision" <<'EOF'
import json, sys
o, t = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"| {sys.argv[3]} | {o['images_per_second']:.0f} | {t['images_per_second']:.0f} | {o['images_per_second'] / t['images_per_second']:.2f}× |")
EOF
    ); then
        say "$row"
    else
        fail "bench $precision: $(tail -3 "$OUT_DIR/bench-$precision.log")"
    fi
done
# The worker's Adam one parameter at a time, against its flat buffers (fp32).
loop=$("$BIN/sweep-worker" bench --device cuda:0 --backbone resnet50 --batch "$BATCH" --image-size 224 \
    --steps "$STEPS" --warmup "$WARMUP" --precision fp32 --adam loop --output json 2>"$OUT_DIR/bench-loop.log")
echo "$loop" >"$OUT_DIR/bench-fp32-loop.json"
if row=$("$PY" - "$loop" "$OUT_DIR/bench-fp32-sweep.json" <<'EOF'
import json, sys
l, f = json.loads(sys.argv[1]), json.load(open(sys.argv[2]))
opt = f"optimizer {f['phases']['optimizer'] * 1e3:.1f} ms flat, {l['phases']['optimizer'] * 1e3:.1f} ms per parameter"
print(f"| fp32, Adam per parameter ({opt}) | {l['images_per_second']:.0f} | — | flat / per parameter {f['images_per_second'] / l['images_per_second']:.2f}× |")
EOF
); then
    say "$row"
else
    fail "bench --adam loop: $(tail -3 "$OUT_DIR/bench-loop.log")"
fi
# The flat-buffer Adam against the per-parameter loop, same gradients: bit for bit on the card.
if "$BIN/sweep-worker" bench --device cuda:0 --backbone resnet50 --batch 16 --image-size 224 --steps 3 \
    --compare-adam --output json >"$OUT_DIR/adam-compare.json" 2>"$OUT_DIR/adam-compare.log"; then
    pass "flat-buffer Adam bit-identical to the per-parameter loop on cuda:0 (resnet50, 3 steps, same gradients)"
else
    fail "flat-buffer Adam against the loop on cuda:0: $(cat "$OUT_DIR/adam-compare.json") $(tail -3 "$OUT_DIR/adam-compare.log")"
fi
say ""

# 4b. The feature cache on the GPU: bit-identical, or given up ---------------------------------
cat >"$OUT_DIR/cache-trial.yaml" <<'EOF'
name: gpu-cache
dataset: { kind: synthetic, classes: 10, train_per_class: 40, val_per_class: 10, image_size: 160, seed: 1 }
training: { batch_size: 48, freeze_bn_stats: true, feature_extraction: { augment: false } }
grid:
  backbone: [resnet50]
  lr_decay: [{ strategy: exponential, head_lr: 1.0e-3, factor: 3 }]
  epoch_split: [[3, 1]]
EOF
# cache_check WHAT YAML DEVICES RANKS: the trial in YAML with SWEEP_FEATURE_CACHE=off and on;
# PASS when the metrics are the same, the worker trained on DEVICES (its log's `devices=`), and
# each of RANKS replicas built the cache (`feature cache built … rank=R`) and none gave it up.
cache_check() {
    local what=$1 yaml=$2 devices=$3 ranks=$4 tag ok=1 same cache r missing=""
    tag=$(basename "$yaml" .yaml)
    for cache in off on; do
        rm -rf "$OUT_DIR/state"
        if ! SWEEP_FEATURE_CACHE=$cache "$BIN/sweep" run "$yaml" --workers 1 \
            --state-dir "$OUT_DIR/state" --output json >"$OUT_DIR/$tag-$cache.json" 2>"$OUT_DIR/$tag-$cache.log"; then
            ok=0
            fail "feature cache $cache, $what: $(tail -3 "$OUT_DIR/$tag-$cache.log")"
        fi
        cp "$OUT_DIR/state/logs/worker-1.log" "$OUT_DIR/$tag-$cache-worker.log" 2>/dev/null
    done
    rm -rf "$OUT_DIR/state"
    [ "$ok" = 1 ] || return
    same=$("$PY" - "$OUT_DIR/$tag-off.json" "$OUT_DIR/$tag-on.json" <<'EOF'
import json, sys
keys = ("state", "fe_val_accuracy", "best_val_accuracy", "val_accuracy", "val_loss")
a, b = (json.load(open(p))[0] for p in sys.argv[1:3])
print("yes" if all(a.get(k) == b.get(k) for k in keys) else f"NO: {[(k, a.get(k), b.get(k)) for k in keys]}")
EOF
    )
    local log=$OUT_DIR/$tag-on-worker.log
    for r in $(seq 0 $((ranks - 1))); do
        grep "feature cache built" "$log" 2>/dev/null | grep -q "rank=$r" || missing="$missing $r"
    done
    if ! grep -q "devices=$devices" "$log" 2>/dev/null; then
        fail "feature cache, $what: the trial did not train on $devices (see $(basename "$log"))"
    elif grep -q "feature cache given up" "$log" 2>/dev/null; then
        fail "feature cache, $what, given up: $(grep -m1 'feature cache given up' "$log")"
    elif [ -n "$missing" ]; then
        fail "feature cache, $what, was not built by replica(s)$missing (see $(basename "$log"))"
    elif [ -z "$same" ]; then
        fail "feature cache, $what: could not compare the runs' results"
    elif [ "$same" = yes ]; then
        pass "feature cache, $what: same metrics with and without it (wall seconds off / on: $("$PY" -c 'import json,sys; print(*(round(json.load(open(p))[0]["wall_seconds"], 1) for p in sys.argv[1:]), sep=" / ")' "$OUT_DIR/$tag-off.json" "$OUT_DIR/$tag-on.json"))"
    else
        fail "feature cache, $what, changed the metrics: $same"
    fi
}
cache_check "on cuda:0" "$OUT_DIR/cache-trial.yaml" cuda:0 1

# 5. Several GPUs: NCCL over all of them and a data-parallel trial ------------------------------
if [ "$GPUS" -ge 2 ]; then
    all=$(seq -s, -f 'cuda:%g' 0 $((GPUS - 1)))
    if "$BIN/sweep-worker" allreduce-check --devices "$all" --output json >"$OUT_DIR/allreduce-n.json" 2>"$OUT_DIR/allreduce-n.log"; then
        pass "NCCL all-reduce, world size $GPUS: $(cat "$OUT_DIR/allreduce-n.json")"
    else
        fail "NCCL all-reduce, world size $GPUS: $(tail -3 "$OUT_DIR/allreduce-n.log")"
    fi
    sed 's/^training: .*/training: { batch_size: 32 }\nresources: { gpus_per_trial: 2 }/; s/^name: .*/name: gpu-check-dp/' \
        "$OUT_DIR/cuda-trial.yaml" >"$OUT_DIR/dp-trial.yaml"
    rm -rf "$OUT_DIR/state"
    if "$BIN/sweep" run "$OUT_DIR/dp-trial.yaml" --workers 1 --state-dir "$OUT_DIR/state" --output json \
        >"$OUT_DIR/dp-trial.json" 2>"$OUT_DIR/dp-trial.log" \
        && grep -q 'devices=cuda:0,cuda:1' "$OUT_DIR"/state/logs/worker-1.log; then
        pass "resnet50 trial data-parallel on cuda:0,cuda:1 (NCCL): $(head -c 400 "$OUT_DIR/dp-trial.json")"
    else
        fail "data-parallel trial on 2 GPUs: $(tail -5 "$OUT_DIR/dp-trial.log")"
    fi
    cp "$OUT_DIR/state/logs/worker-1.log" "$OUT_DIR/dp-trial-worker.log" 2>/dev/null
    rm -rf "$OUT_DIR/state"
    # The feature cache shared between two replicas: each computes half, the halves are broadcast.
    sed 's/^name: .*/name: gpu-cache-dp\nresources: { gpus_per_trial: 2 }/' "$OUT_DIR/cache-trial.yaml" \
        >"$OUT_DIR/cache-dp-trial.yaml"
    cache_check "data parallel on cuda:0,cuda:1" "$OUT_DIR/cache-dp-trial.yaml" cuda:0,cuda:1 2
else
    say "- (one GPU: the multi-GPU all-reduce and data-parallel checks do not apply)"
fi

say ""
if [ "$failed" -eq 0 ]; then say "ALL PASSED"; else say "SOME CHECKS FAILED"; fi
exit "$failed"
