# Where the host time of the host-bound cases goes (see README.md here): one small layer's step per
# variant with the top of cProfile for fusedpeft's (tools.layer_split --top), and the 1 x 512 model
# steps' kernel share (tools.model_split).
source benchmarks/gpu_calls/common.sh
timeout 100 python3 -m tools.layer_split 8192x2048x512 2048x896x128 --r 16 --p 0,0.05 --top 30 > $OUT/host_layers.log 2>&1
pack
timeout 200 python3 -m tools.model_split --models llama3.2-1b,qwen2.5-0.5b --batches 1x512 --adapters lora,lora-dropout,ia3 \
  --warmup-steps 2 --timed-steps 6 --rounds 2 > $OUT/host_model.log 2>&1
pack
grep -v -i "warn\|^ *$\|return Variable" $OUT/host_layers.log | head -n 150; grep -v -i "warn\|^ *$" $OUT/host_model.log | tail -n 30
