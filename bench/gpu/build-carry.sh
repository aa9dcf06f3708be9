#!/usr/bin/env bash
# Fills .gpu-carry/ (git-ignored) for the device call (bench/gpu/device.sh), here, without a GPU:
#   logit-lens.xz   the service binary built with --features cudnn (CUDA, and cuDNN's attention behind
#                   LOGIT_LENS_FUSED=...,cudnn-attention; ../shared/gpu/cuda-build.sh, headers from
#                   bench/gpu/cudnn-headers.sh)
#   lib-tests.xz    the library's unit tests built with --features cudnn: device.sh runs `gpu_tests`
#                   (every fused kernel against the op-by-op path on the card) before the benchmark
#   seed_baseline.py  the notebook's pipeline, timed in the same call
set -euo pipefail
cd "$(dirname "$0")/../.."
source bench/gpu/cudnn-headers.sh
../shared/gpu/cuda-build.sh --features cudnn
mkdir -p .gpu-carry
# xz, not gzip: 10 + 7 MB instead of 19 + 16, so that the working tree (31 MB tracked, fixtures most of
# it) and the carry stay well under the device call's 64 MiB.
rm -f .gpu-carry/*.gz
xz -9 -T2 -c .gpu/logit-lens > .gpu-carry/logit-lens.xz
# The same environment as cuda-build.sh (it exports nothing to us): rebuild it for the test binary.
venv=${CUDA_PIP_VENV:-$HOME/.cache/cuda13-pip}
cuda=$("$venv/bin/python" -c 'import sys; print(sys.prefix)')/lib/python3.$("$venv/bin/python" -c 'import sys; print(sys.version_info.minor)')/site-packages/nvidia/cu13
export CUDA_HOME=$cuda CUDA_ROOT=$cuda CUDA_PATH=$cuda NVCC=$cuda/bin/nvcc PATH=$cuda/bin:$PATH
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} CUDARC_CUDA_VERSION=13000
export CUDAFORGE_THREADS=$(nproc) LIBRARY_PATH=$cuda/lib:$cuda/lib/stubs
test_bin=$(nice -n 10 cargo test --release --features cudnn --target-dir target/cuda --lib --no-run \
  --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["lib"]:
        print(m["executable"])')
strip -o .gpu/lib-tests "$test_bin"
xz -9 -T2 -c .gpu/lib-tests > .gpu-carry/lib-tests.xz
cp ../shared/baselines/seed_baseline.py .gpu-carry/
ls -la .gpu-carry
