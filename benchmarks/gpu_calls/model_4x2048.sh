# benchmarks.model at 4 x 2048 for every family and adapter kind (see README.md here).
source benchmarks/gpu_calls/common.sh
TESTS=0 LAYERS=0 MODEL=1 MODEL_TIMEOUT=560 \
MODEL_ARGS="--models llama3-8b,llama3.2-1b,qwen2.5-0.5b,phi3-mini --batches 4x2048 --adapters lora,lora-dropout,ia3,dora --timed-steps 5 --warmup-steps 2 --rounds 2 --curve-steps 20 --curve-batch 1x512" \
bash benchmarks/gpu_run.sh > /dev/null 2>&1
pack
tail -30 $OUT/run.log
