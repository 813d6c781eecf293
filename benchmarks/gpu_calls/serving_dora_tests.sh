# Issues 14 and 15 in one call: the GPU tests never reached before, the serving layer table and its
# generate throughput, DoRA's layer rows in both output_scale_grad modes and with dropout, then
# DoRA's model rows (Llama-3-8B-shaped, 4 x 2048) (see README.md here).
source benchmarks/gpu_calls/common.sh
TESTS=1 WORKERS=16 TEST_TIMEOUT=90 LAYERS=0 MODEL=0 \
TEST_FILES="tests/test_cuda.py tests/test_cuda_new_ops.py tests/test_serving.py tests/test_cuda_paths.py" \
TEST_K="multi_ia3_matches_float64 or test_triton_lora_matches_float64 or cuda_graph_decode_step or (sweep and cublas_autograd)" \
bash benchmarks/gpu_run.sh > /dev/null 2>&1
pack
timeout 100 python3 -m benchmarks.serving --warmup-ms 5 --rep-ms 30 --out $OUT/serving.md --plot $OUT/serving.png > $OUT/serving.log 2>&1
timeout 70 python3 -m benchmarks.serving --model-level --repeats 2 >> $OUT/serving.log 2>&1
pack
for mode in save recompute; do
  FUSEDPEFT_OUTPUT_SCALE_GRAD=$mode timeout 50 python3 -m benchmarks.layers --methods dora --models llama3-8b --tokens 8192 \
    --ranks 16,64 --dropouts 0 --warmup-ms 5 --rep-ms 20 --out $OUT/dora_$mode.md --json $OUT/dora_$mode.json > $OUT/dora_$mode.log 2>&1
done
# DoRA with dropout (peft's formula, the second base GEMM on dropout(x)), against peft's DoRA with dropout
timeout 35 python3 -m benchmarks.layers --methods dora --models llama3-8b --tokens 8192 --ranks 16 --dropouts 0.05 \
  --warmup-ms 5 --rep-ms 20 --out $OUT/dora_dropout.md --json $OUT/dora_dropout.json > $OUT/dora_dropout.log 2>&1
pack
timeout 110 python3 -m benchmarks.model --models llama3-8b --batches 4x2048 --adapters dora --timed-steps 4 --warmup-steps 2 \
  --rounds 2 --curve-steps 20 --curve-batch 1x512 --out $OUT/model_dora.md --json $OUT/model_dora.json > $OUT/model_dora.log 2>&1
pack
grep -E "FAILED|ERROR|passed|failed" $OUT/run.log | tail -20; grep -c PASSED $OUT/run.log
tail -3 $OUT/serving.log $OUT/model_dora.log
