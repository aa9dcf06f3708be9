#!/usr/bin/env bash
# One prepared GPU benchmark (issue 5), to run on a lent H100/H200 in one call:
#   real-size random Qwen2-VL-2B-Instruct and LLaVA-1.5-7B checkpoints made with the machine's transformers,
#   `logit-lens serve` on the GPU (bf16 / fp16), concurrent clients at concurrency 1 and 8 on a 640×480 and a
#   480×320 image (summary on, top-5 at the last position), peak GPU memory, bf16 parity against transformers,
#   and ../shared/baselines/seed_baseline.py in the same call, then one table.
#
# Usage (repository root):  bench/gpu/run.sh [--small] [--models qwen2vl,llava15] [--bin PATH]
#                                             [--fused all,flash] [--quick]
#   --small  small shapes on whatever device is there (the CPU dry run of this script).
# Results: $OUT (or bench/results/gpu-<date>) holds results.jsonl, the server logs (serve-<model>.log, and
# serve-<model>-profile.log: a second server with LOGIT_LENS_PROFILE=2, stage and op-group times of each
# batch at concurrency 1 and 8), table.txt,
# profile-<model>-{none,fused}.txt (stage timings of one request, LOGIT_LENS_PROFILE=1, op by op and
# with LOGIT_LENS_FUSED=all), profile-<model>-{none,fused}-ops.txt (LOGIT_LENS_PROFILE=2: per group of
# operations, device and host-issue time) and fused-<model>.txt (whether the two agree, which is faster;
# the server runs with the fused kernels, the default on a GPU, unless they disagree).
set -uo pipefail
cd "$(dirname "$0")/../.."
small=""; models=qwen2vl,llava15; bin=${BIN:-}; fused=all; ref=none; quick=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --small) small=--small; shift ;;
    # --fused LIST: the kernels served and probed as "fused" (LOGIT_LENS_FUSED; default all)
    --fused) fused=$2; shift 2 ;;
    # --quick: a short check of a new kernel: no seed baseline, no per-group profiles, no profiled
    # server; the "none" probe runs with LOGIT_LENS_FUSED=all (the path served before), LLaVA's
    # parity without the f32 floor
    --quick) quick=1; ref=all; shift ;;
    --models) models=$2; shift 2 ;;
    --bin) bin=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
out=${OUT:-bench/results/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
py=${PYTHON:-python3}
[[ -n $bin ]] || bin=$( [[ -x .gpu/logit-lens ]] && echo .gpu/logit-lens || echo target/release/logit-lens )
ckpt=${CKPT:-/tmp/logit-lens-ckpt}
res=$out/results.jsonl
: > "$res"
log() { echo "[$(date +%T)] $*" >&2; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
# Fail fast (device time is scarce): the binary must start and see the device it is meant for.
"$bin" --version || { ldd "$bin" | grep "not found"; exit 1; }
"$bin" probe --model tests/fixtures/qwen2vl-hub --prompt "smoke test" --top-k 1 --layers -1 > "$out/smoke.json" \
  || { log "the binary cannot run the demo model here"; exit 1; }

if [[ -z $quick ]]; then
  log "seed baseline (the notebook's pipeline and torch variants, same card)"
  seed_script=${SEED_BASELINE:-../shared/baselines/seed_baseline.py}
  [[ -f $seed_script ]] || seed_script=.gpu/seed_baseline.py  # carried next to the binary
  $py "$seed_script" --iters 5 ${small:+--tiny} --models "$models" --out "$out/seed.json" \
    > "$out/seed.log" 2>&1 || log "seed baseline failed"
fi

peak_mem() {  # samples used GPU memory (MiB) until the flag file disappears
  local peak=0 m
  while [[ -e $1 ]]; do
    m=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -1)
    [[ -n $m && $m -gt $peak ]] && peak=$m
    sleep 0.05
  done
  echo "$peak"
}

# The optional steps of a model (per-group profiles) run only if, by RUN_DEADLINE (epoch seconds,
# set by device.sh), the models after it keep the time their figures and parity need (~300 s for
# LLaVA-1.5-7B: a 7B checkpoint made, two probes, the server under load, parity with f32).
time_for() {  # time_for <family>: true without a deadline, or with enough of it left
  [[ -z ${RUN_DEADLINE:-} ]] && return 0
  local after=0 seen="" f
  for f in ${models//,/ }; do
    if [[ -n $seen ]]; then
      if [[ $f == llava15 ]]; then after=$(( after + 300 )); else after=$(( after + 150 )); fi
    fi
    [[ $f == "$1" ]] && seen=1
  done
  # and ~60 s for these profiles themselves
  (( RUN_DEADLINE - $(date +%s) > after + 60 ))
}

port=8765
for family in ${models//,/ }; do
  dir=$ckpt/$family
  log "checkpoint $family${small:+ (small)}"
  $py bench/gpu/make_checkpoints.py --out "$ckpt" --models "$family" $small >> "$res" || { log "checkpoint failed"; continue; }
  # One request, three ways, before serving (each probe loads the model afresh):
  #   LOGIT_LENS_PROFILE=1, LOGIT_LENS_FUSED=none and all: stage timings with device syncs at stage
  #     boundaries, the answer at every layer × position (top-1), op by op and with every fused kernel;
  #   LOGIT_LENS_PROFILE=2 for both: where the time goes inside the blocks, device time and the host's
  #     time issuing it per group of operations (host ≈ device: bound by per-operation overhead).
  # bench/gpu/compare_fused.py says whether the fused kernels give the op-by-op answer (top-1 on at
  # least 99.5 % of layer × position pairs) and are faster; then the server runs with them.
  probe() {  # probe <fused> <profile level> <repeat> <name>
    LOGIT_LENS_FUSED=$1 LOGIT_LENS_PROFILE=$2 timeout 150 "$bin" probe --model "$dir" \
      --image bench/images/coco_640x480.png --prompt "Color of the main object:" --top-k 1 \
      --positions all --repeat "$3" > "$out/probe-$family-$4.json" 2> "$out/profile-$family-$4.txt" \
      || log "probe $4 failed"
  }
  probe "$ref" 1 3 none
  probe "$fused" 1 3 fused
  # The fused kernels are the default on a GPU; the server runs op by op only if they disagree (or
  # their probe failed). A list beyond `all` (all,cudnn-attention: kernels never run on a card before)
  # that fails falls back to `all`, the setting served since run 5, so that one failing kernel does
  # not leave the call with op-by-op figures only.
  fused_env=$fused
  if ! $py bench/gpu/compare_fused.py "$out/probe-$family-none.json" "$out/probe-$family-fused.json" \
       "$out/profile-$family-none.txt" "$out/profile-$family-fused.txt" | tee "$out/fused-$family.txt"; then
    fused_env=$ref
    if [[ $fused != all && $ref != all ]]; then
      log "LOGIT_LENS_FUSED=$fused not served (see fused-$family.txt, profile-$family-fused.txt); trying all"
      probe all 1 3 fused-all
      $py bench/gpu/compare_fused.py "$out/probe-$family-none.json" "$out/probe-$family-fused-all.json" \
        "$out/profile-$family-none.txt" "$out/profile-$family-fused-all.txt" | tee "$out/fused-$family-all.txt" \
        && fused_env=all
    fi
  fi
  echo "{\"fused\": \"$family\", \"serve_with\": \"$fused_env\"}" >> "$res"
  serve() {  # serve <log name> [env assignments]: starts the server, waits for /ready; sets pid
    env LOGIT_LENS_FUSED=$fused_env "${@:2}" "$bin" serve --model "$family=$dir" --port $port \
      --max-batch-size 8 --max-queue 256 > "$out/$1.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 600); do
      curl -sf "http://127.0.0.1:$port/ready" >/dev/null && break
      kill -0 $pid 2>/dev/null || { log "serve exited"; tail -20 "$out/$1.log"; break; }
      sleep 0.5
    done
  }
  log "serve $family"
  serve "serve-$family"
  weights=$(du -cb "$dir"/*.safetensors | tail -1 | cut -f1)
  flag=$out/sampling; touch "$flag"
  if command -v nvidia-smi >/dev/null; then peak_mem "$flag" > "$out/peak-$family.txt" & fi
  for img in coco_640x480 clevr_480x320; do
    for c in 1 8; do
      n=$(( c == 1 ? 10 : 64 ))
      [[ -n $small ]] && n=$(( c == 1 ? 3 : 16 ))
      $py bench/gpu/load.py --url "http://127.0.0.1:$port" --model "$family" --image "bench/images/$img.png" \
        --concurrency $c --requests $n >> "$res" || log "load failed"
    done
  done
  # `generate` on the card (never run on one before the nineteenth session): 8 answers of 16 tokens,
  # 4 at a time (prompts started together, steps shared, the rest joining), the lens at each new
  # token; a smoke test and its time, in table.txt (not in results.jsonl: not the table's rows).
  $py bench/gpu/load.py --url "http://127.0.0.1:$port" --model "$family" --image bench/images/coco_640x480.png \
    --concurrency 4 --requests $([[ -n $small ]] && echo 4 || echo 8) \
    --options '{"top_k": 1, "positions": "last", "summary": false, "generate": 16}' \
    > "$out/generate-$family.json" || log "generate failed"
  rm -f "$flag"; sleep 0.3
  peak=$(cat "$out/peak-$family.txt" 2>/dev/null || echo 0)
  echo "{\"memory\": \"$family\", \"weights_bytes\": $weights, \"peak_gpu_mib\": ${peak:-0}}" >> "$res"
  log "parity $family"
  # --floor: transformers in f32 too, for the noise floor of two half-precision runs and our half path
  # against the exact answer (PARITY_FLOOR: the families that get it, default both; LLaVA-1.5-7B in f32
  # is 27 GB, next to the server's 13, and about a minute more).
  floors=${PARITY_FLOOR:-qwen2vl,llava15}; [[ -n $quick ]] && floors=${PARITY_FLOOR:-qwen2vl}
  floor=""; [[ ",$floors," == *",$family,"* ]] && floor=--floor
  $py bench/gpu/parity.py --url "http://127.0.0.1:$port" --model "$family" --checkpoint "$dir" \
    --image bench/images/coco_640x480.png $floor >> "$res" || log "parity failed"
  kill $pid; wait $pid 2>/dev/null
  if [[ -n $quick ]]; then rm -rf "$dir"; continue; fi
  # What follows for this model explains the figures above rather than giving them: where there is
  # a deadline (device.sh's), it runs only with the time the models still to come need for theirs.
  if ! time_for "$family"; then
    log "no time left for $family's profiles (${RUN_DEADLINE:+$(( RUN_DEADLINE - $(date +%s) )) s left})"
    rm -rf "$dir"; continue
  fi
  probe "$ref" 2 2 none-ops
  probe "$fused" 2 2 fused-ops
  # Where a served batch's time goes: the server again with LOGIT_LENS_PROFILE=2 (stage and
  # per-group device times, with synchronisations, so not the timed run above), alone and at 8.
  log "serve $family, profiled"
  serve "serve-$family-profile" LOGIT_LENS_PROFILE=2
  for c in 1 8; do
    $py bench/gpu/load.py --url "http://127.0.0.1:$port" --model "$family" \
      --image bench/images/coco_640x480.png --concurrency $c --requests $(( c == 1 ? 3 : 16 )) \
      > "$out/load-$family-profile-c$c.json" || log "profiled load failed"
    echo "=== end of concurrency $c" >> "$out/serve-$family-profile.log"
  done
  kill $pid; wait $pid 2>/dev/null
  rm -rf "$dir"  # the next checkpoint needs the disk
done


$py bench/gpu/table.py "$res" "$out/seed.json" | tee "$out/table.txt"
for f in "$out"/generate-*.json; do
  [[ -s $f ]] && echo "generate 16 tokens, 4 at a time, $(basename "$f" .json | sed 's/^generate-//'): $(cat "$f")"
done | tee -a "$out/table.txt"
