# The LoRA layer table of every family at r = ${RANK:-16} (see README.md here): RANK=64 for the r = 64 half.
source benchmarks/gpu_calls/common.sh
TESTS=0 MODEL=0 LAYERS=1 LAYERS_TIMEOUT=540 \
LAYERS_ARGS="--models llama3-8b,llama3.2-1b,qwen2.5-0.5b,phi3-mini --tokens 8192,2048 --ranks ${RANK:-16} --dropouts 0,0.05 --methods lora --warmup-ms 5 --rep-ms 25" \
bash benchmarks/gpu_run.sh > /dev/null 2>&1
pack
tail -5 $OUT/run.log
