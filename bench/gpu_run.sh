#!/usr/bin/env bash
# Everything that needs a GPU, in one call (a lent GPU machine is bare and its time is short):
#   0. build the native libraries in place (BUILD=1; skipped when they are already built)
#   1. python -m linft_kernels        versions, build info, backend table (is the CUDA library loaded?)
#   2. pytest -m gpu tests            the GPU tests (kernels on every backend, NTK on CUDA vs float64 CPU)
#   3. bench/harness.py --suite ops   the op sweep (cuda/triton vs torch matmul / einsum; GEMM peak)
#   4. bench/harness.py --ntk-preset llama-1b   LoRA NTK of a 1.1B Llama-shaped model vs fwd+bwd
#   5. (stage "ntk") the GPT-2 NTK suite (full + LoRA vs vmap(jacrev) and NTK-vector products)
#   6. (stage "profile") bench/profile_ntk_gpu.py: where the LoRA NTK's time goes (torch.profiler tables
#      and a per-tile host/GPU phase breakdown: host-bound or not, allocator retries, synchronizations)
#   7. (stage "ffma") the gram rows again with LINFT_CUDA_GRAM_MMA=0: the native CUDA gram on CUDA cores,
#      the A/B for its tensor-core paths that stage "ops" measures (wgmma on an H100/H200, beside
#      its second form and mma.sync)
#   8. (stage "llamab") stage 4 with LINFT_BATCHED_OUTPUT_GRADS=1: one batched backward pass per tile
#      instead of one per output (slower on an H200: its tile's memory halves the auto tile)
#   9. (stage "psg") bench/profile_psg_gpu.py: psg_gram's two stages timed alone (F build, its Gram by
#      Triton at several split-K counts and by cuBLAS) beside the whole op, at the ops sweep's shape
#  10. (stage "host") bench/profile_host_gpu.py: host work against GPU work per call of the sweep's
#      sub-millisecond ops (issue time, synchronous time, do_bench, cudaMallocs, cProfile of linft's)
#  11. (stage "ptxas") python -m linft_kernels.triton._compile: every Triton variant's registers and
#      spills under this machine's Triton (no GPU time; ~1-2 min of CPU)
# Every stage has its own time limit and writes its files as it goes, so a stage that hangs or is
# killed costs only itself. Results go under $OUT when set (the device runner collects it), else
# bench/results/.
#
#   BUILD=1 bash bench/gpu_run.sh                      # bare machine: build, then everything
#   QUICK=1 bash bench/gpu_run.sh                      # quick op sweep
#   STAGES="diag tests ops llama" LLAMA_N=1024 ...     # choose stages
#
# Environment: PYTHON (default: .venv/bin/python, else python3) with a CUDA build of torch;
# STAGES (default "diag tests ops llama"); TEST_PATHS (default "tests"); TEST_TIMEOUT (150 s), PSG_TIMEOUT (90), HOST_TIMEOUT (90), OPS_TIMEOUT (150), FFMA_TIMEOUT (OPS_TIMEOUT),
# LLAMA_TIMEOUT (200), PROFILE_TIMEOUT (150), NTK_TIMEOUT (300), NTK_ROUNDS (1: the harness's default is 3), PTXAS_TIMEOUT (240); TEST_WORKERS (pytest-xdist workers, 8; 0 = none);
# OPS_ONLY, OPS_DTYPES (harness --only, --dtypes: comma lists); PROFILE_TILES, PROFILE_N, PROFILE_TILE;
# LLAMA_N (1024), LLAMA_T (256), SAMPLE_TILE (empirical_ntk's, for the llama stage), LLAMA_UNFUSED=1 (the llama
# stage also times linft with fuse_activations=False: RMSNorms as written), LLAMA_METHODS / LLAMAB_METHODS (the
# methods each of those stages times: harness --llama-methods; llamab defaults to "linft" alone, against the
# llama stage's baseline); LINFT_CUDA_ARCHS for the build (default "90a" here: the sm_90a code alone, so that
# the H100/H200 runs it, gram on wgmma included; setup.py adds compute_90 PTX).
# Exit status: nonzero if any stage failed; later stages still run.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/python:$PWD${PYTHONPATH:+:$PYTHONPATH}"  # linft from the tree (no install needed)

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

# The device runner returns at most 8 files from $OUT, so under $OUT the results are written to a scratch
# folder and packed into $OUT/gpu-results.tgz every 15 s and at the end (a run killed at its limit still
# returns what it had); gpu-run.log is copied beside it.
if [ -n "${OUT:-}" ]; then
  DEST="$(mktemp -d /tmp/linft-gpu.XXXX)"
  # one pack at a time (the exit's waits for the loop's); tar's status 1 is "a file changed while
  # read" (the running stage's log grows), which still packs a usable archive
  pack() { ( command -v flock >/dev/null && flock 9
             tar czf "$OUT/.pack.tgz" --warning=no-file-changed -C "$DEST" . 2>/dev/null
             if [ $? -le 1 ]; then mv -f "$OUT/.pack.tgz" "$OUT/gpu-results.tgz"; fi
             rm -f "$OUT/.pack.tgz"
             cp -f "$DEST/gpu-run.log" "$OUT/" 2>/dev/null ) 9>"$DEST.lock"; }
  ( while sleep 15; do pack; done ) &
  PACKER=$!
  trap 'kill $PACKER 2>/dev/null; pack' EXIT
else
  DEST=bench/results
fi
mkdir -p "$DEST"
STAMP="$(date -u +%Y-%m-%dT%H%M)"
LOG="$DEST/gpu-run.log"
PY="$(pick_python)" || {
  echo "gpu_run.sh: no python with a CUDA-enabled torch found (tried \$PYTHON, .venv/bin/python, python3)" | tee "$LOG"
  exit 2
}
STAGES="${STAGES:-diag tests ops llama}"
echo "gpu_run.sh: python=$PY out=$DEST stages='$STAGES' $(date -u)" | tee "$LOG"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
  --format=csv 2>&1 | tee -a "$LOG"
"$PY" -c 'import torch, triton, transformers, peft, sys; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "triton", triton.__version__, "transformers", transformers.__version__, "peft", peft.__version__)' \
  2>&1 | tee -a "$LOG"
rc=0
stage() { echo "== $1 ($(date -u +%T))" | tee -a "$LOG"; }

if [ -n "${BUILD:-}" ]; then
  stage "build"
  t0=$(date +%s)
  LINFT_CUDA_ARCHS="${LINFT_CUDA_ARCHS:-90a}" timeout 300 "$PY" setup.py -q build_ext --inplace \
    >"$DEST/gpu-build.log" 2>&1 || { rc=1; echo "build FAILED" | tee -a "$LOG"; }
  grep -iE "warn|error|spill|registers" "$DEST/gpu-build.log" | head -20 | tee -a "$LOG"
  echo "build took $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
fi

for s in $STAGES; do
  case "$s" in
    ptxas)
      stage "ptxas: Triton register / spill report (sm_90)"
      timeout "${PTXAS_TIMEOUT:-240}" env -u TRITON_INTERPRET "$PY" -m linft_kernels.triton._compile \
        --out "$DEST/triton-ptxas.json" >"$DEST/triton-ptxas.txt" 2>&1 || rc=1
      grep -c "spill st/ld 0/0" "$DEST/triton-ptxas.txt" | sed 's/^/variants without spills: /' | tee -a "$LOG" ;;
    diag)
      stage "diag: python -m linft_kernels"
      timeout 120 "$PY" -m linft_kernels >"$DEST/gpu-diag.txt" 2>&1 || rc=1
      tail -n 30 "$DEST/gpu-diag.txt" | tee -a "$LOG" ;;
    tests)
      stage "tests: pytest -m gpu"
      xd=()
      [ "${TEST_WORKERS:-8}" != "0" ] && "$PY" -c 'import xdist' 2>/dev/null && xd=(-n "${TEST_WORKERS:-8}")
      timeout "${TEST_TIMEOUT:-150}" "$PY" -m pytest -q -m gpu ${TEST_PATHS:-tests} "${xd[@]}" -p no:cacheprovider \
        -o addopts="--import-mode=importlib" -rfEs \
        >"$DEST/gpu-tests.txt" 2>&1 || rc=1
      grep -E "^(FAILED|ERROR)|passed|failed|error" "$DEST/gpu-tests.txt" | tail -n 40 | tee -a "$LOG" ;;
    ops)
      stage "ops: harness --suite ops --device cuda"
      args=(--suite ops --device cuda --out "$DEST/cuda-ops.json")
      [ -n "${QUICK:-}" ] && args+=(--quick)
      [ -n "${OPS_ONLY:-}" ] && args+=(--only "$OPS_ONLY")
      [ -n "${OPS_DTYPES:-}" ] && args+=(--dtypes "$OPS_DTYPES")
      timeout "${OPS_TIMEOUT:-150}" "$PY" bench/harness.py "${args[@]}" >"$DEST/cuda-ops.log" 2>&1 || rc=1
      grep -E "^\[ops\]|ratio|peak|ERROR|Error" "$DEST/cuda-ops.log" | tail -n 60 | tee -a "$LOG" ;;
    llama|llamab)
      # llamab: the same with the C backward passes of a tile batched (LINFT_BATCHED_OUTPUT_GRADS=1)
      batched=0; b=""
      if [ "$s" = llamab ]; then batched=1; b="-batched"; fi
      stage "$s: LoRA NTK of a 1.1B Llama-shaped model, N=${LLAMA_N:-1024} T=${LLAMA_T:-256}"
      only="${LLAMA_METHODS:-}"; unf="${LLAMA_UNFUSED:-}"
      if [ "$s" = llamab ]; then only="${LLAMAB_METHODS:-linft}"; unf=""; fi
      LINFT_BATCHED_OUTPUT_GRADS=$batched \
      timeout "${LLAMA_TIMEOUT:-200}" "$PY" bench/harness.py --suite ntk --ntk-preset llama-1b --device cuda \
        --ntk-n "${LLAMA_N:-1024}" --ntk-t "${LLAMA_T:-256}" --worker-timeout "${LLAMA_WORKER_TIMEOUT:-150}" \
        ${SAMPLE_TILE:+--sample-tile "$SAMPLE_TILE"} ${unf:+--unfused} ${only:+--llama-methods "$only"} --out "$DEST/cuda-llama$b.json" \
        >"$DEST/cuda-llama$b.log" 2>&1 || rc=1
      grep -vE "Warning|warn\(" "$DEST/cuda-llama$b.log" | tail -n 25 | tee -a "$LOG" ;;
    profile)
      stage "profile: bench/profile_ntk_gpu.py N=${LLAMA_N:-1024}"
      timeout "${PROFILE_TIMEOUT:-150}" "$PY" bench/profile_ntk_gpu.py --n "${LLAMA_N:-1024}" --t "${LLAMA_T:-256}" \
        --tiles "${PROFILE_TILES:-16,64}" --profile-n "${PROFILE_N:-32}" --profile-tile "${PROFILE_TILE:-16}" --out "$DEST/gpu-profile.txt" >"$DEST/gpu-profile.log" 2>"$DEST/gpu-profile.err" || {
        rc=1; tail -n 20 "$DEST/gpu-profile.err" | tee -a "$LOG"; }
      grep -E "^(fwd|empirical|GPU|NVIDIA|  tile)" "$DEST/gpu-profile.txt" 2>/dev/null | tee -a "$LOG" ;;
    host)
      stage "host: bench/profile_host_gpu.py (per call: the host's work against the GPU's)"
      timeout "${HOST_TIMEOUT:-90}" "$PY" bench/profile_host_gpu.py --out "$DEST/gpu-host.txt" >"$DEST/gpu-host.log" 2>&1 || rc=1
      head -n 12 "$DEST/gpu-host.log" | tee -a "$LOG" ;;
    psg)
      stage "psg: bench/profile_psg_gpu.py (psg_gram's stages alone: F build, its Gram, the whole op)"
      timeout "${PSG_TIMEOUT:-90}" "$PY" bench/profile_psg_gpu.py --out "$DEST/gpu-psg.txt" >"$DEST/gpu-psg.log" 2>&1 || rc=1
      tail -n 25 "$DEST/gpu-psg.log" | tee -a "$LOG" ;;
    ffma)
      stage "ffma: harness --suite ops --only gram with LINFT_CUDA_GRAM_MMA=0"
      LINFT_CUDA_GRAM_MMA=0 timeout "${FFMA_TIMEOUT:-${OPS_TIMEOUT:-150}}" "$PY" bench/harness.py --suite ops --device cuda \
        --only "${FFMA_ONLY:-gram_sym}" --out "$DEST/cuda-ops-ffma.json" >"$DEST/cuda-ops-ffma.log" 2>&1 || rc=1
      grep -E "ratio|ERROR|Error" "$DEST/cuda-ops-ffma.log" | tail -n 20 | tee -a "$LOG" ;;
    ntk)
      stage "ntk: GPT-2 suite"
      timeout "${NTK_TIMEOUT:-300}" "$PY" bench/harness.py --suite ntk --device cuda --rounds "${NTK_ROUNDS:-1}" \
        --out "$DEST/cuda-ntk.json" >"$DEST/cuda-ntk.log" 2>&1 || rc=1
      tail -n 25 "$DEST/cuda-ntk.log" | tee -a "$LOG" ;;
    *) echo "unknown stage $s" | tee -a "$LOG"; rc=1 ;;
  esac
done

echo "gpu_run.sh: done, status $rc ($(date -u +%T)); results in $DEST" | tee -a "$LOG"
exit "$rc"
