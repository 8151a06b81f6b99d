#!/usr/bin/env bash
# On a CUDA machine, run everything that needs the GPU, building nothing:
#   1. python -m linft_kernels        versions, build info, backend table (is the CUDA library loaded?)
#   2. pytest -m gpu tests            the GPU tests
#   3. bench/harness.py --device cuda the GPU sweep (ops on cuda/triton/reference vs torch; NTK end to end)
# Everything goes under $OUT when set (the device runner collects it), else bench/results/.
#
#   bash bench/gpu_run.sh                       # full sweep (~5 min on one H100; stays under the 10-min device-call limit)
#   QUICK=1 bash bench/gpu_run.sh               # quick sweep (~2 min)
#   PYTHON=/path/to/python SUITE=ops bash bench/gpu_run.sh
#
# Environment: PYTHON (default: .venv/bin/python, else python3) must have a CUDA build of torch and
# linft installed with its kernels built (`make build` on the CUDA machine). SUITE=ops|ntk|all (all),
# QUICK=1, BENCH_TIMEOUT seconds for the sweep (default 300), TEST_TIMEOUT for the tests (240), LARGE_N for the large NTK run (1024).
# Exit status: nonzero if any step failed; later steps still run.
set -uo pipefail
cd "$(dirname "$0")/.."

pick_python() {
  for p in "${PYTHON:-}" .venv/bin/python python3 python; do
    [ -n "$p" ] || continue
    command -v "$p" >/dev/null 2>&1 || [ -x "$p" ] || continue
    if "$p" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)' >/dev/null 2>&1; then
      echo "$p"; return 0
    fi
  done
  return 1
}

DEST="${OUT:-bench/results}"
mkdir -p "$DEST"
STAMP="$(date -u +%Y-%m-%dT%H%M)"
LOG="$DEST/gpu-run-$STAMP.log"
PY="$(pick_python)" || {
  echo "gpu_run.sh: no python with a CUDA-enabled torch found (tried \$PYTHON, .venv/bin/python, python3)" | tee "$LOG"
  exit 2
}
echo "gpu_run.sh: python=$PY out=$DEST $(date -u)" | tee "$LOG"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
rc=0

echo "== 1/3 python -m linft_kernels" | tee -a "$LOG"
"$PY" -m linft_kernels 2>&1 | tee "$DEST/gpu-diag-$STAMP.txt" | tee -a "$LOG"
[ "${PIPESTATUS[0]}" -eq 0 ] || rc=1

echo "== 2/3 pytest -m gpu tests" | tee -a "$LOG"
timeout "${TEST_TIMEOUT:-240}" "$PY" -m pytest -q -m gpu tests --junitxml="$DEST/gpu-tests-$STAMP.xml" 2>&1 \
  | tee "$DEST/gpu-tests-$STAMP.txt" | tail -n 40 | tee -a "$LOG"
[ "${PIPESTATUS[0]}" -eq 0 ] || rc=1

echo "== 3/3 harness --device cuda" | tee -a "$LOG"
args=(--suite "${SUITE:-all}" --device cuda --out "$DEST/cuda-$STAMP.json")
[ -n "${QUICK:-}" ] && args+=(--quick)
[ -n "${LARGE_N:-}" ] && args+=(--large-n "$LARGE_N")
timeout "${BENCH_TIMEOUT:-300}" "$PY" bench/harness.py "${args[@]}" 2>&1 | tee -a "$LOG"
[ "${PIPESTATUS[0]}" -eq 0 ] || rc=1

echo "gpu_run.sh: done, status $rc; results in $DEST" | tee -a "$LOG"
exit "$rc"
