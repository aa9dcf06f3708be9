#!/usr/bin/env bash
# Throughput of `logit-lens serve` on this machine's CPU: requests per second at concurrency 1, 8 and 32,
# with batching (--max-batch-size 8) and one request at a time (--max-batch-size 1), on the demo model
# (tests/fixtures/qwen2vl-hub) and the mid-size checkpoint (bench/checkpoints/qwen2vl-mid, real vocabulary).
# The notebook's request: summary on, top-5 at the last position, the 480×320 image.
#
# Usage: bench/serve.sh [REQUESTS_PER_RUN]     (python3 only; the mid checkpoint: see bench/README.md)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-64}
cargo build --release -q
port=8799
printf '%-14s %6s %5s %10s %10s %10s\n' model batch conc req_per_s ms_per_req p50_ms
for spec in demo=tests/fixtures/qwen2vl-hub mid=bench/checkpoints/qwen2vl-mid; do
  name=${spec%%=*}; dir=${spec#*=}
  [[ -d $dir ]] || { echo "skip $name: $dir missing" >&2; continue; }
  for batch in 1 8; do
    ./target/release/logit-lens serve --model "$name=$dir" --port $port --max-batch-size $batch \
      --max-queue 512 --device cpu > /tmp/serve-bench.log 2>&1 &
    pid=$!
    until curl -sf "http://127.0.0.1:$port/ready" >/dev/null; do sleep 0.2; done
    for c in 1 8 32; do
      reqs=$n; [[ $name == mid ]] && reqs=$(( c == 1 ? 4 : 2 * c ))
      python3 bench/gpu/load.py --url "http://127.0.0.1:$port" --model "$name" \
        --image bench/images/clevr_480x320.png --concurrency $c --requests $reqs |
      python3 -c "
import json, sys
r = json.loads(sys.stdin.read())
print(f\"{'$name':<14} {$batch:>6} {$c:>5} {1e3 / r['throughput_ms_per_request']:>10.2f} {r['throughput_ms_per_request']:>10.1f} {r['latency_ms_median']:>10.1f}\")"
    done
    kill $pid; wait $pid 2>/dev/null || true
  done
done
