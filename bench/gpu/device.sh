#!/usr/bin/env bash
# The one command to give the lent GPU machine (`run` tool, carry [".gpu-carry"]), prepared here with
#   bench/gpu/build-carry.sh     # .gpu-carry/: the CUDA binary and unit tests (gzipped), seed_baseline.py
# then, on the device:  bench/gpu/device.sh [run.sh arguments]
# It unpacks the binaries, points them at the machine's CUDA 13 libraries (torch's wheels), runs the
# fused kernels' GPU test (gpu-tests.txt) and bench/gpu/run.sh, results under $OUT (what `run` brings back).
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .gpu
gunzip -c .gpu-carry/logit-lens.gz > .gpu/logit-lens
chmod +x .gpu/logit-lens
out=${OUT:-bench/results/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
[[ -f .gpu-carry/seed_baseline.py ]] && export SEED_BASELINE=.gpu-carry/seed_baseline.py
if [[ -f .gpu-carry/lib-tests.gz ]]; then
  # Every fused kernel against the op-by-op path on this card (exact bits expected; see the test).
  gunzip -c .gpu-carry/lib-tests.gz > .gpu/lib-tests && chmod +x .gpu/lib-tests
  env -u LOGIT_LENS_FUSED timeout 120 .gpu/lib-tests gpu_tests --nocapture > "$out/gpu-tests.txt" 2>&1 \
    || echo "gpu_tests failed (see gpu-tests.txt)" >&2
  tail -3 "$out/gpu-tests.txt" >&2
fi
OUT=$out PYTHON=${PYTHON:-python3} bench/gpu/run.sh --bin .gpu/logit-lens "$@"
