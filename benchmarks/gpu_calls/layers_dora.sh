set -x
# The layer table of every family, then DoRA layer rows in both output_scale_grad modes (see README.md here).
nvidia-smi --query-gpu=name --format=csv
TESTS=0 MODEL=0 LAYERS=1 LAYERS_TIMEOUT=380 \
LAYERS_ARGS="--models llama3-8b,llama3.2-1b,qwen2.5-0.5b,phi3-mini --tokens 8192,2048 --ranks 16 --dropouts 0,0.05 --methods lora --warmup-ms 5 --rep-ms 25" \
bash benchmarks/gpu_run.sh > /dev/null 2>&1
mv $OUT/layers.md $OUT/layers_lora.md; mv $OUT/layers.json $OUT/layers_lora.json; rm -f $OUT/layers.png
for mode in save recompute; do
FUSEDPEFT_OUTPUT_SCALE_GRAD=$mode FUSEDPEFT_CACHE_DIR=$OUT/cache timeout 70 python3 -m benchmarks.layers --methods dora --models llama3-8b --tokens 8192 --ranks 16,64 --dropouts 0 --warmup-ms 5 --rep-ms 20 --out $OUT/dora_$mode.md --json $OUT/dora_$mode.json > $OUT/dora_$mode.log 2>&1
done
tail -5 $OUT/run.log
cd $OUT && tar czf all.tgz run.log layers_lora.md layers_lora.json dora_* cache
