#!/usr/bin/env bash
# The one command to give the lent GPU machine (`run` tool, carry [".gpu-carry"]), prepared here:
#   ../shared/gpu/cuda-build.sh                                  # .gpu/logit-lens, built with --features cuda
#   mkdir -p .gpu-carry && gzip -c .gpu/logit-lens > .gpu-carry/logit-lens.gz     # 18 MB instead of 65
#   cp ../shared/baselines/seed_baseline.py .gpu-carry/          # the notebook's figures in the same call
# then, on the device:  bench/gpu/device.sh [run.sh arguments]
# It unpacks the binary, points it at the machine's CUDA 13 libraries (torch's wheels) and runs
# bench/gpu/run.sh with the results under $OUT (what the `run` tool brings back).
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .gpu
gunzip -c .gpu-carry/logit-lens.gz > .gpu/logit-lens
chmod +x .gpu/logit-lens
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
[[ -f .gpu-carry/seed_baseline.py ]] && export SEED_BASELINE=.gpu-carry/seed_baseline.py
OUT=${OUT:-bench/results/gpu-$(date +%Y%m%d-%H%M%S)} PYTHON=${PYTHON:-python3} \
  bench/gpu/run.sh --bin .gpu/logit-lens "$@"
