#!/usr/bin/env bash
# Which fused kernels to serve with: one model served with each LOGIT_LENS_FUSED variant in turn,
# driven at concurrency 1 and 8 with the notebook's request (640×480, summary on, top-5 at the last
# position), and each variant's bf16 parity against transformers (with the f32 floor). One table.
#
# Usage (repository root):
#   bench/gpu/variants.sh [--model qwen2vl] [--bin PATH] [--small] VARIANT...
#   e.g. bench/gpu/variants.sh all all,warp-softmax all,flash all,flash,warp-softmax
#   A variant may end in @TILE or @TILE/ROWS: the lens's vocabulary tile (LOGIT_LENS_VOCAB_TILE; `all`:
#   the whole vocabulary per GEMM) and rows per GEMM (LOGIT_LENS_ROW_CHUNK, 512 unless given), e.g.
#   all@all all all,cudnn-attention all,cudnn-attention@8192/1024 (issue 17: tiles, cuDNN).
#   Then +NAME=VALUE, repeatable: more of the server's environment, e.g.
#   all,cudnn-attention+LOGIT_LENS_CUDA_EVENTS=1+LOGIT_LENS_PINNED=0 (cudarc's events and pageable
#   transfers, as before the nineteenth session).
# On the device: bench/gpu/device.sh --variants all all,warp-softmax ... (after the GPU tests).
# Results: $OUT (or bench/results/variants-<date>): variants.jsonl, serve-<model>-<variant>.log,
# variants.txt (the table).
set -uo pipefail
cd "$(dirname "$0")/../.."
model=qwen2vl; bin=${BIN:-}; small=""; variants=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --model) model=$2; shift 2 ;;
    --bin) bin=$2; shift 2 ;;
    --small) small=--small; shift ;;
    -*) echo "unknown argument $1" >&2; exit 2 ;;
    *) variants+=("$1"); shift ;;
  esac
done
(( ${#variants[@]} > 0 )) || { echo "name at least one LOGIT_LENS_FUSED variant" >&2; exit 2; }
[[ -n $bin ]] || bin=$( [[ -x .gpu/logit-lens ]] && echo .gpu/logit-lens || echo target/release/logit-lens )
out=${OUT:-bench/results/variants-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
py=${PYTHON:-python3}
ckpt=${CKPT:-/tmp/logit-lens-ckpt}
res=$out/variants.jsonl
: > "$res"
log() { echo "[$(date +%T)] $*" >&2; }
port=8766
image=bench/images/coco_640x480.png

log "checkpoint $model${small:+ (small)}"
$py bench/gpu/make_checkpoints.py --out "$ckpt" --models "$model" $small > "$out/checkpoint.json" \
  || { log "checkpoint failed"; exit 1; }
for v in "${variants[@]}"; do
  name=${v//,/+}; name=${name//@/-tile-}; name=${name//\//-rows-}; name=${name//=/-}
  spec=${v%%+*}; extra=()
  [[ $v == *+* ]] && IFS=+ read -ra extra <<< "${v#*+}"
  fused=${spec%%@*}; tile=16384; rows=512
  if [[ $spec == *@* ]]; then tile=${spec#*@}; [[ $tile == */* ]] && { rows=${tile#*/}; tile=${tile%%/*}; }; fi
  log "serve $model with LOGIT_LENS_FUSED=$fused LOGIT_LENS_VOCAB_TILE=$tile LOGIT_LENS_ROW_CHUNK=$rows ${extra[*]}"
  env LOGIT_LENS_FUSED=$fused LOGIT_LENS_VOCAB_TILE=$tile LOGIT_LENS_ROW_CHUNK=$rows "${extra[@]}" \
    "$bin" serve --model "$model=$ckpt/$model" --port $port --max-batch-size 8 \
    --max-queue 256 > "$out/serve-$model-$name.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$port/ready" >/dev/null && break
    kill -0 $pid 2>/dev/null || { log "serve exited"; tail -5 "$out/serve-$model-$name.log"; break; }
    sleep 0.5
  done
  for c in 1 8; do
    n=$(( c == 1 ? 10 : 64 )); [[ -n $small ]] && n=$(( c == 1 ? 2 : 8 ))
    line=$($py bench/gpu/load.py --url "http://127.0.0.1:$port" --model "$model" --image "$image" \
      --concurrency $c --requests $n) && echo "{\"variant\": \"$v\", \"load\": $line}" >> "$res" \
      || log "load failed"
  done
  $py bench/gpu/parity.py --url "http://127.0.0.1:$port" --model "$model" --checkpoint "$ckpt/$model" \
    --image "$image" --floor > "$out/parity-$name.jsonl" \
    && $py -c 'import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
print(json.dumps({"variant": sys.argv[2], "parity": rows}))' "$out/parity-$name.jsonl" "$v" >> "$res" \
    || log "parity failed"
  kill $pid; wait $pid 2>/dev/null
done
rm -rf "${ckpt:?}/$model"

$py - "$res" <<'EOF' | tee "$out/variants.txt"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"{'LOGIT_LENS_FUSED':<28} {'conc':>4} {'ms/req':>8} {'p50 ms':>8} {'ok':>4} | server median ms: queue prep fwd lens")
for r in rows:
    if "load" in r:
        l = r["load"]
        st = l.get("server_stage_ms_median", {})
        print(f"{r['variant']:<28} {l['concurrency']:>4} {l['throughput_ms_per_request']:>8} "
              f"{l['latency_ms_median']:>8} {l['ok']:>4} | "
              + " ".join(str(st.get(k, "-")) for k in ("queue", "preprocess", "forward", "lens")))
for r in rows:
    if "parity" in r:
        p = {k: v for x in r["parity"] for k, v in x.items()}
        f32 = p.get("floor", {}).get("ours half vs transformers f32", {})
        tf = p.get("floor", {}).get("transformers half vs transformers f32", {})
        print(f"parity {r['variant']}: top-1 vs transformers half {p.get('top1_agreement', float('nan')):.4f}; "
              f"vs f32: ours {f32.get('top1_agreement', float('nan')):.4f}, transformers' half "
              f"{tf.get('top1_agreement', float('nan')):.4f}; as exact as transformers' half path: "
              f"{p.get('as_exact_as_transformers', '-')}")
EOF
