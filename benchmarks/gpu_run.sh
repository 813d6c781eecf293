#!/usr/bin/env bash
# Everything the GPU must show, in one call on the device machine; results under $OUT (at most 8
# files come back: run.log, layers.{md,png,json}, model.{md,png,json}, cache/tuning.json).
#   TESTS=1     every cuda-marked test under tests/ (TEST_FILES narrows it), WORKERS processes
#   TRACE=1     tools.trace_launches at an fp32 shape (each launch synchronised: a faulting one prints last)
#   SPLIT=1     tools.layer_split $SPLIT_SHAPES (event, kernel and host time of each layer-table variant)
#   MSPLIT=1    tools.model_split $MSPLIT_ARGS (step time, kernel time and the GPU's busy share per model variant)
#   LAYERS=1    python -m benchmarks.layers $LAYERS_ARGS
#   MODEL=1     python -m benchmarks.model $MODEL_ARGS
#   SERVING=1   python -m benchmarks.serving $SERVING_ARGS (many adapters in one batch, layer level)
#   BASELINE=DIR  the same layer table, run again from another checkout of fusedpeft in DIR (an A/B of
#               two versions on one machine; its own tuning file), into layers_base.{md,json}
# The tuning file (FUSEDPEFT_CACHE_DIR) starts from .tuning/tuning.json when the call carries one,
# and comes back as cache/tuning.json, so a later call can start tuned.
set -uo pipefail
OUT=${OUT:-/tmp/fusedpeft_out}
mkdir -p "$OUT/cache"
export PYTHONUNBUFFERED=1 FUSEDPEFT_CACHE_DIR="$OUT/cache"
[ -f .tuning/tuning.json ] && cp .tuning/tuning.json "$OUT/cache/tuning.json"
LOG="$OUT/run.log"
stage() { echo "=== $1 $(date +%T)" | tee -a "$LOG"; }
# pytest-xdist's workers (execnet children) outlive a pytest stopped by timeout and go on holding the
# GPU and the CPUs: every later timing would be of a shared machine.
stop_workers() { pkill -9 -f 'exec\(eval\(sys.stdin' 2>/dev/null; pkill -9 -f 'pytest' 2>/dev/null; sleep 1; }
stage env
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton, peft, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee -a "$LOG"
if [ "${TESTS:-1}" = "1" ]; then
  stage tests
  # -v: each test's result on its own line as it ends, so a stage cut short still names its failures.
  FUSEDPEFT_AUTOTUNE=0 timeout "${TEST_TIMEOUT:-330}" python3 -m pytest -v -rf -p no:cacheprovider -n "${WORKERS:-15}" \
    -m cuda ${TEST_FILES:-tests} ${TEST_K:+-k "$TEST_K"} 2>&1 | tee -a "$LOG" | tail -40
  stop_workers
fi
if [ "${TRACE:-0}" = "1" ]; then
  stage trace
  timeout "${TRACE_TIMEOUT:-240}" python3 -m tools.trace_launches --shape 8192x5120x5120 --dtype float32 2>&1 | tail -30 | tee -a "$LOG"
fi
if [ "${SPLIT:-0}" = "1" ]; then
  stage split
  timeout "${SPLIT_TIMEOUT:-170}" python3 -m tools.layer_split ${SPLIT_SHAPES:-8192x4096x1024 2048x2048x512} --top 0 \
    2>&1 | grep -v Warning | tee -a "$LOG" | tail -40
fi
if [ "${MSPLIT:-0}" = "1" ]; then
  stage model_split
  timeout "${MSPLIT_TIMEOUT:-200}" python3 -m tools.model_split ${MSPLIT_ARGS:---models qwen2.5-0.5b --batches 4x2048 --adapters lora} \
    2>&1 | grep -v Warning | tee -a "$LOG" | tail -30
fi
if [ "${LAYERS:-1}" = "1" ]; then
  stage layers
  timeout "${LAYERS_TIMEOUT:-300}" python3 -m benchmarks.layers ${LAYERS_ARGS:-} --out "$OUT/layers.md" \
    --plot "$OUT/layers.png" --json "$OUT/layers.json" 2>&1 | tee -a "$LOG" | tail -70
fi
if [ "${SERVING:-0}" = "1" ]; then
  stage serving
  timeout "${SERVING_TIMEOUT:-300}" python3 -m benchmarks.serving ${SERVING_ARGS:-} --out "$OUT/serving.md" \
    --plot "$OUT/serving.png" 2>&1 | tee -a "$LOG" | tail -60
  timeout "${SERVING_TIMEOUT:-300}" python3 -m benchmarks.serving --model-level 2>&1 | tee -a "$LOG" | tail -8
fi
if [ -n "${BASELINE:-}" ]; then
  stage baseline
  (cd "$BASELINE" && FUSEDPEFT_CACHE_DIR="$OUT/cache_base" timeout "${LAYERS_TIMEOUT:-300}" python3 -m benchmarks.layers \
    ${LAYERS_ARGS:-} --out "$OUT/layers_base.md" --json "$OUT/layers_base.json") 2>&1 | tee -a "$LOG" | tail -70
fi
if [ "${MODEL:-1}" = "1" ]; then
  stage model
  timeout "${MODEL_TIMEOUT:-300}" python3 -m benchmarks.model ${MODEL_ARGS:-} --out "$OUT/model.md" \
    --plot "$OUT/model.png" --json "$OUT/model.json" 2>&1 | tee -a "$LOG" | tail -50
fi
stage done
