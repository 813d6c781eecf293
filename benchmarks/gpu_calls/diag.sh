# Diagnostics for the host-bound misses (see README.md here): where a serving decode step goes
# (tools.serving_split), the small layers' variants and what the tuner measured for them
# (tools.layer_split), and DoRA's loss curves at 1 x 512 after its bf16 fix.
source benchmarks/gpu_calls/common.sh
timeout 150 python3 -m tools.serving_split > $OUT/serving_split.log 2>&1
pack
timeout 170 python3 -m tools.layer_split 8192x2048x512 2048x2048x512 8192x896x128 8192x4096x1024 --r 16 --p 0,0.05 \
  --top 0 > $OUT/layer_split.log 2>&1
pack
timeout 230 python3 -m benchmarks.model --models llama3-8b,phi3-mini --batches 1x512 --adapters dora --timed-steps 3 \
  --warmup-steps 1 --rounds 2 --curve-steps 20 --out $OUT/model_dora_curves.md --json $OUT/model_dora_curves.json \
  > $OUT/model_dora_curves.log 2>&1
pack
tail -n 45 $OUT/serving_split.log; grep -v "^ *$" $OUT/layer_split.log | tail -n 70; tail -n 22 $OUT/model_dora_curves.log
