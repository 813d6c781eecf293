# Issue 15: DoRA's layer rows in the output_scale_grad modes of $MODES (default: output, save) and with dropout (against peft's DoRA
# with dropout), then DoRA's model rows with the loss curves (Llama-3-8B- and Phi-3-shaped,
# 4 x 2048, curves at 1 x 512) (see README.md here). A shorter call:
#   RANKS=16 MODELS=llama3-8b CURVES=0 LAYER_S=60 MODEL_S=150 bash benchmarks/gpu_calls/dora.sh
source benchmarks/gpu_calls/common.sh
RANKS=${RANKS:-16,64} MODELS=${MODELS:-llama3-8b,phi3-mini} CURVES=${CURVES:-20}
for mode in ${MODES:-output save}; do
  FUSEDPEFT_OUTPUT_SCALE_GRAD=$mode timeout ${LAYER_S:-90} python3 -m benchmarks.layers --methods dora --models llama3-8b --tokens 8192 \
    --ranks $RANKS --dropouts 0 --warmup-ms 5 --rep-ms 20 --out $OUT/dora_$mode.md --json $OUT/dora_$mode.json > $OUT/dora_$mode.log 2>&1
done
timeout 60 python3 -m benchmarks.layers --methods dora --models llama3-8b --tokens 8192 --ranks 16 --dropouts 0.05 \
  --warmup-ms 5 --rep-ms 20 --out $OUT/dora_dropout.md --json $OUT/dora_dropout.json > $OUT/dora_dropout.log 2>&1
pack
timeout ${MODEL_S:-300} python3 -m benchmarks.model --models $MODELS --batches 4x2048 --adapters dora --timed-steps 4 --warmup-steps 2 \
  --rounds 2 --curve-steps $CURVES --curve-batch 1x512 --out $OUT/model_dora.md --json $OUT/model_dora.json > $OUT/model_dora.log 2>&1
pack
for f in ${MODES:-output save} dropout; do grep -E "^\| llama3-8b" $OUT/dora_$f.md | cut -c1-260; done
tail -n 20 $OUT/model_dora.log
