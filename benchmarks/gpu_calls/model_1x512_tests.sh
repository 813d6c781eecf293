# The GPU tests never reached in earlier calls, then benchmarks.model at 1 x 512 (see README.md here).
source benchmarks/gpu_calls/common.sh
TESTS=1 WORKERS=16 TEST_TIMEOUT=170 LAYERS=0 MODEL=0 \
TEST_FILES="tests/test_cuda.py tests/test_cuda_new_ops.py tests/test_serving.py tests/test_cuda_paths.py" \
TEST_K="multi_ia3_matches_float64 or test_triton_lora_matches_float64 or cuda_graph_decode_step or (sweep and cublas_autograd) or graph_replays or reduce_overhead or never_waits" \
bash benchmarks/gpu_run.sh > /dev/null 2>&1
pack
TESTS=0 LAYERS=0 MODEL=1 MODEL_TIMEOUT=380 \
MODEL_ARGS="--models llama3-8b,llama3.2-1b,qwen2.5-0.5b,phi3-mini --batches 1x512 --adapters lora,lora-dropout,ia3,dora --timed-steps 8 --warmup-steps 2 --rounds 3 --curve-steps 0" \
bash benchmarks/gpu_run.sh > /dev/null 2>&1
pack
grep -E "FAILED|ERROR|passed|failed" $OUT/run.log | tail -20; grep -c PASSED $OUT/run.log
tail -30 $OUT/run.log
