# The tables the issues quote, refreshed for the code in the tree, stage by stage in the order of
# $STAGES (default: the first call's), packing after each (see README.md here):
#   ext        the CUDA extension built, its tests and the serving ops' GPU tests (captures included)
#   table      the decode and prefill rows of the serving table (no peft)
#   probe      the extension's error paths, each in a fresh process; its GPU tests; generate throughput
#   graphs     the serving layer table with every forward captured in a CUDA graph (GPU time)
#   static     generate with a static cache (transformers compiles the decode steps of both models)
#   dora_tests the GPU tests of DoRA (the op at real sizes, every backend and mode; $DORA_K narrows them;
#              about 630 cases: 374 took 170 s on an H100, so $DORA_TEST_S is 300 unless set)
#   fp32       every float32 GPU test of test_cuda.py and test_cuda_new_ops.py (LoRA's and DoRA's Triton paths)
#   dora_split tools.dora_norm_parts (the norm: composition and kernel), tools.layer_split --method dora
#   serving_split  tools.serving_split: the tuner's serving choices, decode and prefill layers kernel by
#              kernel, generate calls in turns
#   philox     tools.profile_kernels with and without dropout (triton, cublas) at 10 and at the tree's
#              philox rounds (triton_kernels/dropout.py PHILOX_ROUNDS), the tree restored after
#   lora_tests the GPU tests of LoRA's paths: the seeded sweep of every candidate (dropout on and off),
#              the float64 comparisons, float32 adapters, CUDA-graph replays, the fresh-process fp32 step
#   profile    tools.profile_kernels with and without dropout (triton, cublas) at the tree's code
#   fault      each test of $FAULT_TESTS alone (seed $FAULT_SEED), CUDA_LAUNCH_BLOCKING=1, whole tracebacks
#   scenarios  tools.config_faults for each ;-separated argument list in $SCENARIOS, concurrently
#              (with --sanitize, under compute-sanitizer)
#   wgrad      tools.diag_weight_grad with dropout, writing grad_x's masked term beside and apart
#   gsweep     tools.grouped_sweep at 64 decode rows ($SLOTS adapters): the shrink's splits, the expand's
#              blocks, the whole calls, each in a CUDA graph
#   launch     tools.launch_path: the Triton launch path, and Triton's hooks after torch.profiler
#   tests      the GPU tests of the cuBLAS LoRA paths, product_in, the serving ops and captures, DoRA
#   split      tools.layer_split at the host-bound shapes (every layer-table variant)
#   serving    the serving layer table, peft's mixed batch included, and its plot (issue 14)
#   generate   generate throughput, mixed batch against the merged adapter, for each of $TARGETS
#              (default: all-linear, then peft's default q_proj,v_proj)
#   dora       DoRA's layer rows (save, recompute, dropout) and model rows, Llama-3-8B shape, r = $RANKS (16)
#   model512   benchmarks.model at 1 x 512, LoRA, LoRA with dropout, IA3, every family
#   model2048  benchmarks.model at 4 x 2048, LoRA and LoRA with dropout, every family
#   layers     the LoRA layer table at 8192 tokens, r = 16, every family ($FAMILIES: fewer)
source benchmarks/gpu_calls/common.sh
FAMILIES=${FAMILIES:-llama3-8b,llama3.2-1b,qwen2.5-0.5b,phi3-mini}
# GPU tests: at their time limit pytest gets SIGINT, not SIGKILL, so it still prints its summary and
# names each failure and error (-rfE, one line each).
# Each launch's GPU time in a LoRA training step with and without dropout, both backends that mask.
profile_dropout() {
  for backend in ${PROFILE_BACKENDS:-triton cublas}; do
    timeout 100 python3 -m tools.profile_kernels 8192x4096x4096 8192x14336x4096 --ranks 16 --dropouts 0,0.05 \
      --backend $backend
  done
}
PYTEST_TIMED="timeout -s INT"
PYTEST="python3 -m pytest -q -m cuda -n 16 -p no:cacheprovider -rfE --tb=line"
for stage in ${STAGES:-launch tests split serving}; do
  echo "=== $stage $(date +%T)" | tee -a $OUT/stages.log
  case $stage in
    ext) timeout 200 python3 -c "from fusedpeft import _cuda_ext; print(_cuda_ext.load())" > $OUT/ext.log 2>&1
      $PYTEST_TIMED ${TEST_S:-170} $PYTEST tests/test_cuda_ext.py tests/test_cuda_new_ops.py \
        tests/test_serving.py -k "not timing and (test_cuda_ext or multi_lora or per_sequence or decode_step or capture or test_serving)" >> $OUT/ext.log 2>&1 ;;
    table) timeout ${SERVING_S:-150} python3 -m benchmarks.serving --no-peft --adapters ${ADAPTERS:-8,32,128} --ranks ${RANKS:-16,mixed} --warmup-ms 5 --rep-ms 30 \
        --out $OUT/serving.md > $OUT/serving.log 2>&1 ;;
    probe) timeout 200 python3 -c "from fusedpeft import _cuda_ext; print(_cuda_ext.load())" > $OUT/probe.log 2>&1
      timeout 150 python3 -m tools.bgmv_errors >> $OUT/probe.log 2>&1
      $PYTEST_TIMED ${TEST_S:-150} $PYTEST tests/test_cuda_ext.py tests/test_cuda_new_ops.py \
        tests/test_serving.py -k "not timing and (test_cuda_ext or multi_lora or per_sequence or decode_step or test_serving)" >> $OUT/probe.log 2>&1; pack
      timeout 200 python3 -m benchmarks.serving --model-level --repeats 7 > $OUT/model_level.log 2>&1; pack ;;
    graphs) timeout ${SERVING_S:-150} python3 -m benchmarks.serving --no-peft --graphs --adapters ${ADAPTERS:-8,32,128} --ranks ${RANKS:-16,mixed} \
        --warmup-ms 5 --rep-ms 30 --out $OUT/serving_graphs.md > $OUT/serving_graphs.log 2>&1 ;;
    static) timeout ${MODEL_S:-300} python3 -m benchmarks.serving --model-level --static-cache --repeats 5 > $OUT/model_static.log 2>&1 ;;
    dora_tests) $PYTEST_TIMED ${DORA_TEST_S:-300} $PYTEST tests/test_cuda_new_ops.py tests/test_dora.py \
        -k "${DORA_K:-dora}" > $OUT/dora_tests.log 2>&1 ;;
    fp32) $PYTEST_TIMED ${TEST_S:-170} $PYTEST tests/test_cuda.py tests/test_cuda_new_ops.py \
        -k "float32" > $OUT/fp32_tests.log 2>&1 ;;
    dora_split) timeout 90 python3 -m tools.dora_norm_parts > $OUT/dora_split.log 2>&1
      timeout 120 python3 -m tools.layer_split 8192x4096x4096 8192x4096x1024 --r 16 --p 0 --method dora --top 0 >> $OUT/dora_split.log 2>&1 ;;
    serving_split) timeout ${SPLIT_S:-170} python3 -m tools.serving_split --top 0 --repeats 5 > $OUT/serving_split.log 2>&1 ;;
    philox) tree=$(sed -n "s/^PHILOX_ROUNDS = tl.constexpr(\([0-9]*\))/\1/p" triton_kernels/dropout.py)
      if [ -z "$tree" ]; then echo "philox: no PHILOX_ROUNDS line in triton_kernels/dropout.py" > $OUT/philox.log; continue; fi
      for rounds in 10 $tree; do  # the tree's count last, so the stages after this one run the tree's code
        sed -i "s/^PHILOX_ROUNDS = tl.constexpr([0-9]*)/PHILOX_ROUNDS = tl.constexpr($rounds)/" triton_kernels/dropout.py
        profile_dropout > $OUT/philox_$rounds.log 2>&1
      done ;;
    lora_tests) $PYTEST_TIMED ${TEST_S:-200} $PYTEST tests/test_cuda.py tests/test_cuda_paths.py ${LORA_FILES:-} \
        -k "${LORA_K:-sweep or replays or lora_matches_float64 or float32_adapters or large_backward or term_by}" \
        > $OUT/lora_tests.log 2>&1 ;;
    profile) profile_dropout > $OUT/profile.log 2>&1 ;;
    fault) for test in $FAULT_TESTS; do  # each alone, launches synchronous, the whole traceback
        FUSEDPEFT_TEST_SEED=${FAULT_SEED:-0} CUDA_LAUNCH_BLOCKING=1 timeout 150 python3 -m pytest -q -p no:cacheprovider \
          "$test" --tb=long >> $OUT/fault.log 2>&1
      done
      (which compute-sanitizer; ls /usr/local/cuda/bin | grep -i sanit) >> $OUT/fault.log 2>&1 ;;
    scenarios) IFS=';' read -ra lines <<< "$SCENARIOS"
      for scenario in "${lines[@]}"; do  # each a tools.config_faults command line, all at once
        (timeout 200 python3 -m tools.config_faults $scenario > "$OUT/scenario_${scenario// /_}.log" 2>&1) &
      done; wait ;;
    wgrad) timeout 150 python3 -m tools.diag_weight_grad 8192x4096 8192x14336 8192x2048 8192x896 --ranks 16 \
        --per-sm 2,4 --dropout 0.05 --update > $OUT/wgrad.log 2>&1 ;;
    launch) timeout 60 python3 -m tools.launch_path > $OUT/launch.log 2>&1 ;;
    gsweep) timeout ${GSWEEP_S:-150} python3 -m tools.grouped_sweep --groups 64 --rows-per-group 1 --slots ${SLOTS:-32} \
        > $OUT/gsweep.log 2>&1 ;;
    tests) TESTS=1 WORKERS=16 TEST_TIMEOUT=${TEST_S:-170} LAYERS=0 MODEL=0 \
      TEST_FILES="tests/test_ops.py tests/test_cuda.py tests/test_cuda_new_ops.py tests/test_serving.py tests/test_cuda_paths.py tests/test_dora.py" \
      TEST_K="product_in or float32_adapters or reductions_write or (sweep and cublas) or per_sequence_matches_float64 or decode_step_captures or cuda_graph_decode_step or dora" \
      bash benchmarks/gpu_run.sh > /dev/null 2>&1 ;;
    split) timeout 120 python3 -m tools.layer_split 8192x2048x512 8192x896x128 --r 16 --p 0,0.05 --top 0 > $OUT/split.log 2>&1 ;;
    serving) timeout ${SERVING_S:-170} python3 -m benchmarks.serving --warmup-ms 5 --rep-ms 30 --out $OUT/serving.md --plot $OUT/serving.png > $OUT/serving.log 2>&1 ;;
    generate) for targets in ${TARGETS:-all-linear q_proj,v_proj}; do
        timeout ${GENERATE_S:-120} python3 -m benchmarks.serving --model-level --repeats ${REPEATS:-3} --target-modules $targets \
          >> $OUT/generate.log 2>&1; pack
      done ;;
    dora) RANKS=${RANKS:-16} MODELS=${MODELS:-llama3-8b} CURVES=${CURVES:-0} LAYER_S=${LAYER_S:-70} MODEL_S=${DORA_MODEL_S:-160} \
        bash benchmarks/gpu_calls/dora.sh > /dev/null 2>&1 ;;
    model512) timeout ${MODEL_S:-240} python3 -m benchmarks.model --models $FAMILIES --batches 1x512 --adapters lora,lora-dropout,ia3 \
      --timed-steps 8 --warmup-steps 2 --rounds 3 --curve-steps 0 --out $OUT/model512.md --json $OUT/model512.json > $OUT/model512.log 2>&1 ;;
    model2048) timeout ${MODEL_S:-300} python3 -m benchmarks.model --models $FAMILIES --batches 4x2048 --adapters lora,lora-dropout \
      --timed-steps 5 --warmup-steps 2 --rounds 2 --curve-steps 0 --out $OUT/model2048.md --json $OUT/model2048.json > $OUT/model2048.log 2>&1 ;;
    layers) timeout ${LAYERS_S:-330} python3 -m benchmarks.layers --models $FAMILIES --tokens 8192 --ranks 16 --dropouts 0,0.05 --methods lora \
      --warmup-ms 5 --rep-ms 25 --out $OUT/layers.md --json $OUT/layers.json > $OUT/layers.log 2>&1 ;;
    *) echo "unknown stage $stage" ;;
  esac
  pack
done
grep -E "passed|failed|FAILED|Error" $OUT/ext.log $OUT/dora_tests.log $OUT/fp32_tests.log 2>/dev/null | tail -20
grep -v -i "warn\|^ *$" $OUT/dora_split.log 2>/dev/null | head -60
cat $OUT/serving_graphs.md 2>/dev/null | cut -d'|' -f2-6; grep -v -i warn $OUT/serving_graphs.log 2>/dev/null | tail -3; grep -v -i warn $OUT/model_static.log 2>/dev/null | tail -8
cat $OUT/serving.md $OUT/probe.log $OUT/model_level.log 2>/dev/null | grep -v -i warn | tail -40; grep -E "^\| (64|256) rows" $OUT/decode.md | cut -d'|' -f2-6
grep -v "^ *$" $OUT/serving_split.log 2>/dev/null | grep -v -i warn | head -60
cat $OUT/launch.log 2>/dev/null | grep -v -i warn
grep -E "FAILED|ERROR|passed|failed" $OUT/run.log 2>/dev/null | tail -20
grep -h "step" $OUT/philox_*.log 2>/dev/null
grep -E "passed|failed|FAILED|ERROR" $OUT/lora_tests.log 2>/dev/null | tail -12
grep -v -i "warn" $OUT/profile.log 2>/dev/null | grep -v "^ *$"
grep -E "Error|error|passed|failed|^tests|\.py:[0-9]+" $OUT/fault.log 2>/dev/null | tail -40
for f in $OUT/scenario_*.log; do [ -f "$f" ] && echo "## $f" && grep -E "^\[|error|Error" "$f" | cut -c1-200; done
grep -v -i "warn" $OUT/wgrad.log 2>/dev/null | grep -v "^ *$"
grep -v -i "warn\|^ *$" $OUT/split.log 2>/dev/null | head -40
tail -n 6 $OUT/serving.log 2>/dev/null; grep -v -i warn $OUT/generate.log 2>/dev/null
for f in model512 model2048 layers; do tail -n 25 $OUT/$f.log 2>/dev/null; done
