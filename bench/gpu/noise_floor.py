"""How far apart two honest implementations of the same checkpoint land in half precision: the noise floor
under bench/gpu/parity.py's bar (top-1 agreement over layer × position pairs, top-1 probability difference).

It computes the logit lens at every layer and position four ways on the same checkpoint, image and prompt:
transformers in f32 and in the half dtype (eager attention, lm_head in the model dtype, softmax in f32, as
parity.py does), and `logit-lens probe` in f32 and in the half dtype. Then it compares pairs:

  torch-half vs torch-f32    what rounding to half precision alone does to the reference (the floor)
  ours-half  vs torch-half   what parity.py measures
  ours-half  vs torch-f32    ours against the exact answer
  ours-f32   vs torch-f32    the f32 parity (should agree everywhere)

If ours-half vs torch-f32 is as close as torch-half vs torch-f32, our half path is as exact as the
reference's, and ours-half vs torch-half cannot be expected to beat two independent roundings.

Usage: python bench/gpu/noise_floor.py --checkpoint DIR --bin target/release/logit-lens \
           --image bench/images/coco_640x480.png [--half bf16|f16] [--device cpu|cuda] [--out FILE.json]
           [--f32-layerwise]   (the f32 reference for a model too large for memory in f32)
"""
import argparse
import gc
import json
import subprocess
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


@torch.no_grad()
def torch_lens(ckpt: str, image: str, prompt: str, dtype: str, device: str):
    """dtype: f32, bf16, f16, or auto (the checkpoint's)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    processor = AutoProcessor.from_pretrained(ckpt)
    layerwise = dtype == "f32-layerwise"
    model = AutoModelForImageTextToText.from_pretrained(
        ckpt, dtype="auto" if layerwise else DTYPES.get(dtype, dtype), attn_implementation="eager").to(device).eval()
    if layerwise:
        widen_layer_by_layer(model)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    batch = processor(text=[text], images=[Image.open(image).convert("RGB")], return_tensors="pt").to(device)
    batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    out = model(**batch, output_hidden_states=True)
    lm = model.model.language_model
    hs = out.hidden_states
    top1, p1, p2, mmp = [], [], [], []
    for i, h in enumerate(hs):
        x = h[0] if i == len(hs) - 1 else lm.norm(h[0])  # the last entry is already normed
        logp = torch.log_softmax(model.lm_head(x).float(), -1)
        top = logp.topk(2, -1)
        top1.append(top.indices[:, 0].tolist())
        p1.append(top.values[:, 0].exp().tolist())
        p2.append(top.values[:, 1].exp().tolist())
        mmp.append(top.values[:, 0].exp().mean().item())
    ids = batch["input_ids"][0].tolist()
    del model, out, hs
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"ids": ids, "top1": top1, "p1": p1, "p2": p2, "mmp": mmp}


def widen_layer_by_layer(model):
    """The f32 computation of a half-precision checkpoint in little more than the half-precision model's memory:
    everything but the decoder layers in f32, and each decoder layer widened to f32 just before it runs and
    narrowed back after (widening a half-precision weight is exact, so each layer computes what it computes in an
    f32 model; bit-identical lens on the small LLaVA). For LLaVA-1.5-7B (27 GB in f32) on a 24 GiB machine."""
    lm = model.model.language_model
    layers, half = lm.layers, lm.layers[0].mlp.down_proj.weight.dtype
    lm.layers = torch.nn.ModuleList()
    model.float()
    lm.layers = layers

    def widen(module, args):
        module.float()

    def narrow(module, args, output):
        module.to(half)

    for layer in layers:
        layer.register_forward_pre_hook(widen)
        layer.register_forward_hook(narrow)


def ours_lens(binary: str, ckpt: str, image: str, prompt: str, dtype: str, device: str):
    cmd = [binary, "probe", "--model", ckpt, "--image", image, "--prompt", prompt, "--top-k", "2",
           "--positions", "all", "--dtype", dtype, "--device", device]
    return run_from_body(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))


def run_from_body(body):
    """A /lens response body (`probe` prints the same) asked with top_k 2 and positions all, as a run:
    per layer and position the top-1 id and the two highest probabilities; mmp: the summary, if there."""
    n = len(body["input"]["tokens"])
    run = {"ids": [t["id"] for t in body["input"]["tokens"]], "top1": [], "p1": [], "p2": [], "mmp": []}
    for layer in body["layers"]:
        top1, p1, p2 = [0] * n, [0.0] * n, [0.0] * n
        for pos in layer["positions"]:
            j, t = pos["position"], pos["top"]
            top1[j], p1[j], p2[j] = t[0]["id"], t[0]["prob"], t[1]["prob"]
        for key, v in [("top1", top1), ("p1", p1), ("p2", p2), ("mmp", layer.get("mean_max_prob"))]:
            run[key].append(v)
    return run


def exact_ties(run):
    """Rows whose two most probable tokens have exactly the same probability (top-1 is a tie-break)."""
    return sum(x == y for r1, r2 in zip(run["p1"], run["p2"]) for x, y in zip(r1, r2))


def compare(a, b):
    """Top-1 agreement over layer × position pairs and the largest top-1 probability difference where they
    agree (parity.py's two numbers), plus where the disagreements sit: how many of them are near-ties (top-1
    and top-2 within 1e-2 in the first run) and in which layers."""
    assert a["ids"] == b["ids"], "different input ids"
    pairs = agree = near_ties = 0
    worst_p = 0.0
    per_layer = []
    for li, (ta, tb) in enumerate(zip(a["top1"], b["top1"])):
        bad = 0
        for j, (x, y) in enumerate(zip(ta, tb)):
            pairs += 1
            if x == y:
                agree += 1
                worst_p = max(worst_p, abs(a["p1"][li][j] - b["p1"][li][j]))
            else:
                bad += 1
                near_ties += a["p1"][li][j] - a["p2"][li][j] < 1e-2
        per_layer.append(bad)
    return {"pairs": pairs, "top1_agreement": round(agree / pairs, 5), "max_top1_prob_diff": round(worst_p, 5),
            "disagreements": pairs - agree, "of_which_near_ties": near_ties, "disagreements_per_layer": per_layer}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--bin", default="target/release/logit-lens")
    ap.add_argument("--image", required=True)
    ap.add_argument("--prompt", default="Color of the main object:")
    ap.add_argument("--half", default="bf16", choices=["bf16", "f16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    ap.add_argument("--cache", type=Path, default=None,
                    help="keep each run's lens here (NAME.json) and reuse what is already there")
    ap.add_argument("--f32-layerwise", action="store_true",
                    help="transformers' f32 run from the half-precision weights, one decoder layer widened at a "
                         "time (the same numbers in about 60 %% of the memory), and no f32 run of ours")
    a = ap.parse_args()
    runs, seconds = {}, {}
    ours_device = "cuda" if a.device == "cuda" else "cpu"
    plan = [("torch-f32", "f32-layerwise" if a.f32_layerwise else "f32"), (f"torch-{a.half}", a.half),
            ("ours-f32", "f32"), (f"ours-{a.half}", a.half)]
    if a.f32_layerwise:
        plan.remove(("ours-f32", "f32"))
    for name, dtype in plan:
        cached = a.cache / f"{name}.json" if a.cache else None
        if cached and cached.exists():
            runs[name] = json.loads(cached.read_text())
            continue
        t0 = time.time()
        if name.startswith("torch"):
            runs[name] = torch_lens(a.checkpoint, a.image, a.prompt, dtype, a.device)
        else:
            runs[name] = ours_lens(a.bin, a.checkpoint, a.image, a.prompt, dtype, ours_device)
        seconds[name] = round(time.time() - t0, 1)
        if cached:
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps(runs[name]))
    h = a.half
    result = {"checkpoint": a.checkpoint, "image": a.image, "device": a.device, "seconds": seconds}
    for x, y in [(f"torch-{h}", "torch-f32"), (f"ours-{h}", f"torch-{h}"), (f"ours-{h}", "torch-f32"),
                 ("ours-f32", "torch-f32"), (f"ours-{h}", "ours-f32")]:
        if x not in runs or y not in runs:
            continue
        result[f"{x} vs {y}"] = compare(runs[y], runs[x])
        r = result[f"{x} vs {y}"]
        print(f"{x:>10} vs {y:<10} agreement {r['top1_agreement']:.4f} over {r['pairs']} pairs, "
              f"max top-1 prob diff {r['max_top1_prob_diff']:.4f}, disagreements {r['disagreements']} "
              f"({r['of_which_near_ties']} near ties in {y})", flush=True)
    for name, run in runs.items():
        result[f"{name} exact top-1 ties"] = exact_ties(run)
        print(f"{name:>10}: {exact_ties(run)} rows tie exactly at the top", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
