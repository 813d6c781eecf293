# Sourced by every script here. The device tool returns at most 8 files from $OUT, so the stages
# write under a work folder (exported as OUT, which benchmarks/gpu_run.sh writes to) and pack()
# tars it into the tool's $OUT as all.tgz, the one file that comes back. Scripts pack after each
# stage, so a call cut short by its time limit still brings back what finished.
set -x
RETURN=$OUT
export OUT=/tmp/gpu_call_out FUSEDPEFT_CACHE_DIR=/tmp/gpu_call_out/cache PYTHONUNBUFFERED=1
mkdir -p $OUT/cache
pack() { (cd $OUT && tar czf $RETURN/all.tgz.tmp . && mv $RETURN/all.tgz.tmp $RETURN/all.tgz); }
nvidia-smi --query-gpu=name --format=csv
