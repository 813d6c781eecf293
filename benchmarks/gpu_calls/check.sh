# A short check of the newest kernel and tuner changes (see README.md here): the GPU tests of DoRA's
# Triton path and LoRA's Triton float64 cases, the L2-scrubbed tuner timing, DoRA's layer rows in the
# default mode at r = 16, the serving table's mixed-rank prefill rows (no peft). About 5 minutes.
source benchmarks/gpu_calls/common.sh
timeout -s INT ${TEST_S:-100} python3 -m pytest -q -m cuda -n 16 -p no:cacheprovider -rfE --tb=short \
  tests/test_cuda_new_ops.py tests/test_cuda.py tests/test_tuning.py \
  -k "(dora_matches_float64 and triton and not float16) or (triton_lora_matches_float64 and bfloat16) or cold_l2" \
  > $OUT/check_tests.log 2>&1; pack
timeout ${LAYER_S:-75} python3 -m benchmarks.layers --methods dora --models llama3-8b --tokens 8192 --ranks 16 --dropouts 0 \
  --warmup-ms 5 --rep-ms 20 --out $OUT/dora_output.md --json $OUT/dora_output.json > $OUT/dora_output.log 2>&1; pack
timeout ${SERVING_S:-90} python3 -m benchmarks.serving --no-peft --rows 32x128 --adapters 8,32 --ranks mixed --warmup-ms 5 \
  --rep-ms 30 --out $OUT/serving_prefill.md > $OUT/serving_prefill.log 2>&1; pack
grep -E "passed|failed|FAILED|ERROR" $OUT/check_tests.log | tail -15
grep -E "^\| llama3-8b" $OUT/dora_output.md | cut -d'|' -f2-8
grep -E "^\| 32x128" $OUT/serving_prefill.md | cut -d'|' -f2-6
