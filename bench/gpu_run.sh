#!/usr/bin/env bash
# The whole GPU table in one go (about 5 minutes on an H100/H200; every step has its own time limit so the
# total stays under 8): correctness on the device first, then the timings, then the opt-in compile.
#   bench/gpu_run.sh [PYTHON]        results: bench/results/models-cuda-fp16*.json and gpu_run.log
# Wheels in .whl/ (diffusers and what the image lacks: bench/README.md) are installed first; with $OUT set
# (the device tool), the results are copied there too.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${1:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
LOG=bench/results/gpu_run.log
mkdir -p bench/results
status=0
run() {  # run LIMIT_SECONDS COMMAND...: a step that fails or times out is reported, the rest still run
    local limit=$1; shift
    echo "== $*" | tee -a "$LOG"
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    local code=${PIPESTATUS[0]}
    [ "$code" -eq 0 ] || { echo "== exit $code: $*" | tee -a "$LOG"; status=1; }
}
: > "$LOG"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"
run 60 "$PYTHON" bench/gpu_checks.py
# fp16 tolerance: every variant of ours within 1% of diffusers' output at the output's scale.
run 300 "$PYTHON" bench/bench_models.py --device cuda --runs 30 --stream --max-error 1e-2 \
    --out bench/results/models-cuda-fp16.json
# Compile is opt-in and slow (about 80 s for one shape): one shape, its compile time reported separately;
# our CUDA graphs capture the compiled step, as they capture the eager one.
run 150 "$PYTHON" bench/bench_models.py --device cuda --runs 30 --only unet --families sd15 --batches 2 \
    --compile "${SDGRAPH_BENCH_COMPILE_MODE:-default}" --max-error 1e-2 \
    --out bench/results/models-cuda-fp16-compiled.json
if [ -n "${OUT:-}" ]; then
    cp bench/results/models-cuda-fp16*.json "$LOG" "$OUT"/ 2>/dev/null
fi
exit $status
