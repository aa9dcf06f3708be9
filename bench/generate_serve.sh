#!/usr/bin/env bash
# `generate` under concurrency on `logit-lens serve`: text-only requests (no image: the decoder and the lens,
# not the vision tower), top-3, summary on, two scenarios per server start:
#   together: 8 requests at once, each generating 16 tokens (wall time for all, mean lens ms per request);
#   joining:  one request generating 32 tokens, then 4 generating 4, sent a second later (each one's latency);
#   lens:     one request generating 32 tokens, then one that does not generate, a second later (each one's
#             latency).
# Several binaries alternate round by round (A/B in one sitting), and each round checks that their responses
# are identical apart from timings.
#
# Usage: bench/generate_serve.sh MODEL_DIR [ROUNDS]     (python3 only)
#        BINS="old/logit-lens new/logit-lens" compares binaries (default: target/release/logit-lens, built)
#        DEVICE=cuda runs the servers on the GPU (default: cpu)
set -euo pipefail
cd "$(dirname "$0")/.."
model=$1
rounds=${2:-2}
bins=${BINS:-}
if [[ -z $bins ]]; then
    cargo build --release -q
    bins=./target/release/logit-lens
fi
port=8798
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for round in $(seq "$rounds"); do
  k=0
  for bin in $bins; do
    k=$((k + 1))
    "$bin" serve --model "$model" --port $port --max-batch-size 8 --device "${DEVICE:-cpu}" > "$out/serve.log" 2>&1 &
    pid=$!
    until curl -sf "http://127.0.0.1:$port/ready" > /dev/null; do sleep 0.5; done
    python3 - "$port" "$out/$k" "$round" "$bin" <<'PY'
import json, sys, threading, time, urllib.request
port, prefix, rnd, binary = sys.argv[1:5]
url = f"http://127.0.0.1:{port}/lens"

def post(name, generate, results):
    body = json.dumps({"prompt": f"Question {name}: describe the colour of the sky at noon in a few words.",
                       "options": {"top_k": 3, "generate": generate}}).encode()
    t = time.perf_counter()
    req = urllib.request.Request(url, body, {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=3600) as r:
        results[name] = (time.perf_counter() - t, json.loads(r.read()))

def run(plan):
    results, threads = {}, []
    for delay, name, generate in plan:
        time.sleep(delay)
        th = threading.Thread(target=post, args=(name, generate, results))
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    return results

t = time.perf_counter()
together = run([(0, f"t{i}", 16) for i in range(8)])
wall = time.perf_counter() - t
lens = sum(r["timing_ms"]["lens"] for _, r in together.values()) / len(together)
joining = run([(0, "long", 32)] + [(1 if i == 0 else 0, f"short{i}", 4) for i in range(4)])
lat = {n: s for n, (s, _) in joining.items()}
short = [lat[f"short{i}"] for i in range(4)]
between = run([(0, "long2", 32), (1, "lens", 0)])
print(f"round {rnd} {binary}: together {wall:.2f} s (mean lens {lens:.0f} ms); "
      f"joining: long {lat['long']:.2f} s, short {min(short):.2f}-{max(short):.2f} s; "
      f"lens: long {between['long2'][0]:.2f} s, lens {between['lens'][0]:.2f} s")

def strip(x):
    if isinstance(x, dict):
        return {k: strip(v) for k, v in x.items() if k != "timing_ms"}
    if isinstance(x, list):
        return [strip(v) for v in x]
    return x
json.dump({n: strip(r) for n, (_, r) in {**together, **joining, **between}.items()}, open(prefix + ".json", "w"))
PY
    kill $pid; wait $pid 2> /dev/null || true
  done
  if (( k > 1 )); then
    python3 - "$out" "$k" <<'PY'
import json, sys
out, k = sys.argv[1], int(sys.argv[2])
runs = [json.load(open(f"{out}/{i}.json")) for i in range(1, k + 1)]

def diff(a, b, worst, field=""):
    """The largest |a - b| over numbers, and its field, in worst; False where anything else (a token, a
    length) differs."""
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return all(diff(a[x], b[x], worst, x) for x in a)
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return all(diff(x, y, worst, field) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, (int, float)) or isinstance(b, float) and isinstance(a, (int, float)):
        if abs(a - b) > worst[0]:
            worst[:] = [abs(a - b), field]
        return True
    return a == b

for i, run in enumerate(runs[1:], 2):
    worst = [0.0, ""]
    if run == runs[0]:
        print(f"  binary {i}: responses identical to binary 1's apart from timings")
    elif diff(runs[0], run, worst):
        # Requests that shared a pass with others in one run and not in the other: float rounding (a GEMM's
        # sums in another order over more rows, on a CPU without AMX).
        print(f"  binary {i}: the same tokens, ids and ranks as binary 1's; numbers within {worst[0]:.1e} "
              f"(largest in {worst[1]})")
    else:
        print(f"  binary {i}: RESPONSES DIFFER from binary 1's beyond numbers (tokens, ids or ranks)")
PY
  fi
done
