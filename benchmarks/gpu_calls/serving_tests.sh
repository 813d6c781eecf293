# Issue 14 and the GPU tests: the tests not yet passed on a GPU (the multi-adapter float64 cases,
# computed on the GPU now, the CUDA-graph decode steps, the seeded sweep through cublas_autograd,
# DoRA's), after tools.serving_split (where a decode step and a generate call go); then the serving layer table and generate throughput (see README.md here).
source benchmarks/gpu_calls/common.sh
timeout 140 python3 -m tools.serving_split > $OUT/serving_split.log 2>&1
pack
TESTS=1 WORKERS=16 TEST_TIMEOUT=150 LAYERS=0 MODEL=0 \
TEST_FILES="tests/test_cuda.py tests/test_cuda_new_ops.py tests/test_serving.py tests/test_cuda_paths.py" \
TEST_K="multi_ia3_matches_float64 or multi_lora_matches_float64 or per_sequence_matches_float64 or cuda_graph_decode_step or decode_step_captures or (sweep and cublas_autograd) or dora" \
bash benchmarks/gpu_run.sh > /dev/null 2>&1
pack
timeout 170 python3 -m benchmarks.serving --warmup-ms 5 --rep-ms 30 --out $OUT/serving.md --plot $OUT/serving.png > $OUT/serving.log 2>&1
timeout 100 python3 -m benchmarks.serving --model-level --repeats 2 >> $OUT/serving.log 2>&1
pack
grep -E "FAILED|ERROR|passed|failed" $OUT/run.log | tail -20; grep -c PASSED $OUT/run.log
tail -n 8 $OUT/serving.log; grep -v "^ *$" $OUT/serving_split.log | grep -v -i warn | tail -n 75
