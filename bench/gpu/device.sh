#!/usr/bin/env bash
# The one command to give the lent GPU machine (`run` tool, carry [".gpu-carry"]), prepared here with
#   bench/gpu/build-carry.sh     # .gpu-carry/: the CUDA binary and unit tests (xz), seed_baseline.py
# then, on the device:  bench/gpu/device.sh [run.sh arguments]
#                  or:  bench/gpu/device.sh --variants all all,warp-softmax ...   (variants.sh)
# It unpacks the binaries, points them at the machine's CUDA 13 libraries (torch's wheels), runs the
# fused kernels' GPU test (gpu-tests.txt) and bench/gpu/run.sh, results under $OUT (what `run` brings back).
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .gpu
# xz's format through Python's lzma (the xz tool may not be installed there).
unxz() { python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$1" "$2"; }
unxz .gpu-carry/logit-lens.xz .gpu/logit-lens
chmod +x .gpu/logit-lens
# Everything lands in $work; $OUT (what `run` brings back: at most 8 files) gets the table, the GPU
# test's output, the fused-kernel verdicts and all of it as results.tgz.
work=/tmp/logit-lens-gpu-results
rm -rf "$work"; mkdir -p "$work"
out=$work
# cu13/lib: the CUDA 13 runtime and cuBLAS; cudnn/lib: libcudnn.so.9, which the cudnn-attention
# kernel dlopens (torch's own copy; nothing of it is carried).
nv=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
export LD_LIBRARY_PATH=$nv/cu13/lib:$nv/cudnn/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
# The cuDNN frontend dlopens a libcudart of its own: libcudart.so.12 wins where both majors are
# found, unless named (the binary is built against CUDA 13).
[[ -e $nv/cu13/lib/libcudart.so.13 ]] && export CUDNN_FRONTEND_CUDART_LIB_NAME=$nv/cu13/lib/libcudart.so.13
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
[[ -f .gpu-carry/seed_baseline.py ]] && export SEED_BASELINE=.gpu-carry/seed_baseline.py
if [[ -f .gpu-carry/lib-tests.xz ]]; then
  # Every fused kernel against the op-by-op path on this card (the ulps allowed: see the test).
  unxz .gpu-carry/lib-tests.xz .gpu/lib-tests && chmod +x .gpu/lib-tests
  # One test at a time: the tests print timings, which tests sharing the card would blur. cuDNN's
  # tests last and on their own: a crash inside cuDNN would otherwise take the tests after it along.
  LOGIT_LENS_FUSED=none timeout 120 .gpu/lib-tests gpu_tests --skip cudnn::gpu_tests --nocapture \
    --test-threads=1 > "$out/gpu-tests.txt" 2>&1 || echo "gpu_tests failed (see gpu-tests.txt)" >&2
  tail -3 "$out/gpu-tests.txt" >&2
  LOGIT_LENS_FUSED=none timeout 120 .gpu/lib-tests cudnn::gpu_tests --nocapture --test-threads=1 \
    >> "$out/gpu-tests.txt" 2>&1 || echo "cudnn gpu_tests failed (see gpu-tests.txt)" >&2
  tail -3 "$out/gpu-tests.txt" >&2
fi
# The device call stops at 600 s: run.sh gets what is left of RUN_TIMEOUT_S (default 540 s since this
# script started),
# and whatever it measured by then still makes the table.
left=$(( ${RUN_TIMEOUT_S:-540} - SECONDS )); (( left > 0 )) || left=1  # timeout 0 would mean none
# run.sh skips a model's profiles where they would leave the next model short of time for its figures.
export RUN_DEADLINE=$(( $(date +%s) + left ))
if [[ ${1:-} == --variants ]]; then
  # bench/gpu/device.sh --variants V1 V2 ...: which fused kernels to serve with (variants.sh).
  shift
  OUT=$out PYTHON=${PYTHON:-python3} timeout --kill-after=5 "$left" bench/gpu/variants.sh \
    --bin .gpu/logit-lens "$@" || echo "variants.sh stopped (exit $?)" >&2
else
  OUT=$out PYTHON=${PYTHON:-python3} timeout --kill-after=5 "$left" bench/gpu/run.sh --bin .gpu/logit-lens "$@" \
    || echo "run.sh stopped (exit $?); the table from what it measured:" >&2
fi
if [[ ! -s $out/table.txt && -s $out/results.jsonl ]]; then
  pkill -f "logit-lens[^ ]* serve" || true  # a server run.sh had started
  ${PYTHON:-python3} bench/gpu/table.py "$out/results.jsonl" "$out/seed.json" | tee "$out/table.txt"
fi
# Issue 17's floor next to the figures: what the card's GEMMs alone allow a request (gpu_tests).
if [[ -s $out/table.txt && -s $out/gpu-tests.txt ]]; then
  grep -h 'gemm floor .* at concurrency 8' "$out/gpu-tests.txt" | tee -a "$out/table.txt" || true
fi
final=${OUT:-bench/results/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$final"
tar -czf "$final/results.tgz" -C "$(dirname "$work")" "$(basename "$work")"
cp "$work"/table.txt "$work"/variants.txt "$work"/gpu-tests.txt "$work"/fused-*.txt "$final"/ 2>/dev/null || true
ls -la "$final"
