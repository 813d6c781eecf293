#!/usr/bin/env bash
# Everything the GPU must show, in one call on the device machine (results under $OUT):
# versions, the cuda-marked tests, the LoRA and IA3/SSF benchmark tables + plots, the autotuner's
# choices. BENCHES=lora,rescale picks the benchmarks; *_ARGS pass options through. PROFILE=1 adds the
# per-launch GPU profile of a LoRA training step and the epilogue diagnosis (profile.log).
set -uo pipefail
OUT=${OUT:-/tmp/fusedpeft_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee "$OUT/env.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__); import peft, transformers; print('peft', peft.__version__, 'transformers', transformers.__version__)" 2>&1 | tee -a "$OUT/env.txt"
# The GPU tests spend most of their time compiling Triton kernels on the CPU, one at a time per
# process. Wheels carried in .wheels/ (run(..., carry=[".wheels"]); fetch them here with
# `pip download pytest-xdist execnet -d .wheels --no-deps`) let pytest-xdist spread the tests
# over WORKERS processes. TEST_K selects tests by a -k expression.
if [ -d .wheels ] && ! python3 -c "import xdist" 2>/dev/null; then
  python3 -m pip install -q --no-index --find-links .wheels pytest-xdist 2>&1 | tail -2
fi
XDIST=()
if python3 -c "import xdist" 2>/dev/null; then XDIST=(-n "${WORKERS:-8}"); fi
if [ "${SKIP_TESTS:-0}" != "1" ]; then
  FUSEDPEFT_AUTOTUNE=0 timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider "${XDIST[@]}" -m cuda \
    tests/test_cuda.py ${TEST_K:+-k "$TEST_K"} 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
fi
if [ "${SKIP_BENCH:-0}" != "1" ]; then
  timeout ${BENCH_TIMEOUT:-500} python3 - "$OUT" "${BENCHES:-lora,rescale}" "${LORA_ARGS:-}" "${RESCALE_ARGS:-}" <<'PY' 2>&1 | tee "$OUT/bench.log" | tail -80
import json, sys
from benchmarks import lora, rescale
out, benches, lora_args, rescale_args = sys.argv[1:5]
if "lora" in benches.split(","):
    lora.main(["--out", f"{out}/lora_table.md", "--plot", f"{out}/lora.png"] + lora_args.split())
if "rescale" in benches.split(","):
    rescale.main(["--out", f"{out}/rescale_table.md", "--plot", f"{out}/rescale.png"] + rescale_args.split())
from fusedpeft._kernels import triton_kernels
log = triton_kernels.launch.TUNE_LOG
json.dump(log, open(f"{out}/tuning.json", "w"), indent=1, default=str)
for entry in log:
    print("tuned", entry["key"][:3], entry["best"], f"{entry['ms']:.4f} ms", f"tuning {entry['tuning_s']:.1f} s", "failed:", len(entry["failed"]))
    for f in entry["failed"][:2]:
        print("   ", f)
PY
fi
if [ "${PROFILE:-0}" = "1" ]; then
  { timeout ${PROFILE_TIMEOUT:-200} python3 -m benchmarks.profile_kernels; timeout 120 python3 -m benchmarks.diag_epilogue; } \
    2>&1 | grep -v -i warn | tee "$OUT/profile.log" | tail -60
fi
