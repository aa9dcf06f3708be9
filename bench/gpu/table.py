"""Prints bench/gpu/run.sh's results beside the notebook's figures from seed_baseline.py (same call)."""
import json
import sys
from pathlib import Path

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
# parity.py writes its f32 floor as a second line (`floor_of`): merged into its parity row here.
floors = {(r["floor_of"], r["image"]): r for r in rows if "floor_of" in r}
for r in rows:
    if "top1_agreement" in r:
        r.update({k: v for k, v in floors.get((r["model"], r["image"]), {}).items() if k not in ("floor_of", "image")})
seed = json.loads(Path(sys.argv[2]).read_text()) if len(sys.argv) > 2 and Path(sys.argv[2]).exists() else {}
seed_rows = {(r["model"], r["image"]): r for r in seed.get("rows", [])}
name = {"qwen2vl": "qwen2vl", "llava15": "llava15"}
print(f"device: {seed.get('device', '?')}, torch {seed.get('torch', '?')}")
print(f"{'model':<9} {'image':<14} {'conc':>4} {'ms/req':>8} {'p50 ms':>8} {'ok':>4} | "
      f"{'seed lens':>9} {'fused b8':>8} {'fwd only':>8} | server median ms: queue prep fwd lens")
for r in rows:
    if "concurrency" not in r:
        continue
    s = seed_rows.get((name.get(r["model"], r["model"]), r["image"].replace(".png", "")), {})
    print(f"{r['model']:<9} {r['image'].replace('.png', ''):<14} {r['concurrency']:>4} "
          f"{r['throughput_ms_per_request']:>8} {r['latency_ms_median']:>8} {r['ok']:>4} | "
          f"{s.get('seed_lens_ms_median', '-'):>9} {s.get('fused_lens_b8_per_req_ms_median', '-'):>8} "
          f"{s.get('forward_only_ms_median', '-'):>8} | "
          + " ".join(str(r.get("server_stage_ms_median", {}).get(k, "-")) for k in ("queue", "preprocess", "forward", "lens")))
for r in rows:
    if "memory" in r:
        print(f"memory {r['memory']}: weights {r['weights_bytes'] / 2**30:.2f} GiB, peak GPU {r['peak_gpu_mib'] / 1024:.2f} GiB")
    if "top1_agreement" in r:
        print(f"parity {r['model']} {r['image']}: same ids {r['same_input_ids']}, top-1 agreement "
              f"{r['top1_agreement']:.4f} over {r['layer_position_pairs']} pairs, max top-1 prob diff "
              f"{r['max_top1_prob_diff']}, max mean_max_prob diff {r['max_mean_max_prob_diff']}, pass {r['pass']} "
              f"(transformers' rows tied exactly at the top: {r.get('reference_exact_top1_ties', '-')})")
        for name, f in r.get("floor", {}).items():
            print(f"  floor: {name}: top-1 agreement {f['top1_agreement']:.4f}, max top-1 prob diff "
                  f"{f['max_top1_prob_diff']}")
        if "as_exact_as_transformers" in r:
            print(f"  as exact as transformers' half path: {r['as_exact_as_transformers']}; the bar against "
                  f"transformers f32: pass {r.get('pass_against_f32', '-')}")
for r in rows:
    if "serve_with" in r:
        print(f"served {r['fused']} with LOGIT_LENS_FUSED={r['serve_with']} (see fused-{r['fused']}.txt)")

# Where one request's time goes inside the blocks (LOGIT_LENS_PROFILE=2, the last repeat of each probe):
# device ms and the host's issuing ms per group; host ≈ device means bound by per-operation overhead.
out_dir = Path(sys.argv[1]).parent
for prof in sorted(out_dir.glob("profile-*-ops.txt")):
    runs, current = [], []
    for line in prof.read_text(errors="replace").splitlines():
        if line.startswith("profile-op: "):
            current.append(line[len("profile-op: "):])
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    if runs:
        print(f"{prof.name} (group: calls, device ms, host ms):")
        for entry in runs[-1]:
            print(f"  {entry}")
gpu_tests = out_dir / "gpu-tests.txt"
if gpu_tests.exists():
    lines = [l for l in gpu_tests.read_text(errors="replace").splitlines() if "differ" in l or "test result" in l]
    print("gpu_tests (fused kernel vs op by op on the card):")
    for l in lines:
        print(f"  {l}")
