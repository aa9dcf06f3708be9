#!/usr/bin/env bash
# The notebook's pipeline (transformers on the CPU, bench/seed_pipeline.py) beside `logit-lens probe`
# on the same mid-size random checkpoints (Qwen2-VL, LLaVA-1.5, LLaVA-OneVision, each with its real
# vocabulary) and the same inputs: summary over every position and layer, top-3 at the last position.
# Model load excluded on both sides.
#
# Usage: bench/cpu.sh [ITERS] [MODELS]   (needs the tools venv: see tools/README.md)
#        MODELS defaults to "qwen2vl-mid qwen2_5_vl-mid llava15-mid onevision-mid qwen2-text-mid"
#        (a *-text-* model is text only: one row, no image)
#        BIN=path/to/logit-lens uses that binary instead of building target/release/logit-lens
set -euo pipefail
cd "$(dirname "$0")/.."
iters=${1:-5}
py=${PYTHON:-$HOME/.venvs/tools/bin/python}
models=${2:-qwen2vl-mid qwen2_5_vl-mid llava15-mid onevision-mid qwen2-text-mid}
[[ -d bench/checkpoints/qwen2vl-mid ]] || "$py" tools/make_fixtures.py --bench bench/checkpoints/qwen2vl-mid
[[ -d bench/checkpoints/qwen2_5_vl-mid ]] ||
    "$py" tools/make_qwen2_5_vl_fixtures.py --bench bench/checkpoints/qwen2_5_vl-mid
[[ -d bench/checkpoints/llava15-mid ]] || "$py" tools/make_llava_fixtures.py --bench bench/checkpoints
[[ -d bench/checkpoints/qwen2-text-mid ]] || "$py" tools/make_text_fixtures.py --bench bench/checkpoints
bin=${BIN:-}
if [[ -z $bin ]]; then
    cargo build --release -q
    bin=./target/release/logit-lens
fi
threads=$(nproc)
prompt="Color of the main object:"
printf '%-15s %-15s %6s %10s %10s %8s %s\n' model image tokens seed_ms rust_ms speedup same_outputs
for model in $models; do
ckpt=bench/checkpoints/$model
images="coco_640x480 clevr_480x320"
[[ $model == *-text-* ]] && images=none
for img in $images; do
  image_arg=()
  [[ $img == none ]] || image_arg=(--image bench/images/$img.png)
  "$py" bench/seed_pipeline.py --model $ckpt "${image_arg[@]}" --prompt "$prompt" \
         --iters "$iters" --threads "$threads" 2>/dev/null | tail -1 > /tmp/seed.json
  "$bin" probe --model $ckpt "${image_arg[@]}" --prompt "$prompt" \
              --top-k 3 --repeat "$iters" > /tmp/rust.json 2>/tmp/rust_timings.txt
  python3 - /tmp/seed.json /tmp/rust.json /tmp/rust_timings.txt "$img" "$model" <<'PY'
import json, statistics, sys
seed, rust = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
timings, img, model = sys.argv[3], sys.argv[4], sys.argv[5]
runs = [json.loads(l)["total"] for l in open(timings) if l.startswith("{")] or [rust["timing_ms"]["total"]]
rust_ms = statistics.median(runs)
curve = [l["mean_max_prob"] for l in rust["layers"]]
top3 = [[t["id"] for t in l["positions"][0]["top"]] for l in rust["layers"]]
# The notebook norms transformers' already-normed last hidden state again (MODELS.md §1.1), so its
# last layer is compared with the model's own top-3 instead.
same = (all(abs(a - b) < 1e-4 for a, b in zip(curve[:-1], seed["mean_max_prob"][:-1]))
        and top3[:-1] == seed["top3_last"][:-1] and top3[-1] == seed["model_top3_last"])
print(f'{model:<15} {img:<15} {seed["seq_len"]:>6} {seed["median_ms"]:>10.0f} {rust_ms:>10.0f} {seed["median_ms"]/rust_ms:>7.2f}x {same}')
PY
done
done
