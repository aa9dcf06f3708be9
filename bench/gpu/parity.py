"""bf16 parity of `logit-lens serve` against transformers on the same checkpoint and inputs: the lens at
every layer and position, transformers eager attention in the checkpoint dtype on the same GPU, lm_head in
the model dtype and softmax in f32 (MODELS.md §1.1 and §6). Prints one JSON line: top-1 agreement over
layer × position pairs, the largest difference of the top-1 probability and of mean_max_prob.

Usage: python bench/gpu/parity.py --url URL --model NAME --checkpoint DIR --image FILE --prompt TEXT
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import multipart, post  # noqa: E402


@torch.no_grad()
def transformers_lens(ckpt: str, image: str, prompt: str):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    processor = AutoProcessor.from_pretrained(ckpt)
    model = AutoModelForImageTextToText.from_pretrained(
        ckpt, dtype="auto" if dev == "cuda" else torch.float32, attn_implementation="eager").to(dev).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    batch = processor(text=[text], images=[Image.open(image).convert("RGB")], return_tensors="pt").to(dev)
    batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    out = model(**batch, output_hidden_states=True)
    lm = model.model.language_model
    hs = out.hidden_states
    top1, p1, mmp = [], [], []
    for i, h in enumerate(hs):
        x = h[0] if i == len(hs) - 1 else lm.norm(h[0])  # the last entry is already normed
        logp = torch.log_softmax(model.lm_head(x).float(), -1)
        mx = logp.max(-1)
        top1.append(mx.indices.tolist())
        p1.append(mx.values.exp().tolist())
        mmp.append(mx.values.exp().mean().item())
    return batch["input_ids"][0].tolist(), top1, p1, mmp


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default=None)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--prompt", default="Color of the main object:")
    a = ap.parse_args()
    fields = {"prompt": a.prompt, "options": json.dumps({"top_k": 1, "positions": "all", "summary": True})}
    if a.model:
        fields["model"] = a.model
    body, ctype = multipart(fields, open(a.image, "rb").read(), Path(a.image).name)
    _, _, ours, _ = post(a.url.rstrip("/") + "/lens", body, ctype)
    ids, top1, p1, mmp = transformers_lens(a.checkpoint, a.image, a.prompt)
    same_ids = [t["id"] for t in ours["input"]["tokens"]] == ids
    pairs = agree = 0
    worst_p = worst_mmp = 0.0
    for layer in ours["layers"]:
        li = layer["layer"]
        worst_mmp = max(worst_mmp, abs(layer["mean_max_prob"] - mmp[li]))
        for pos in layer["positions"]:
            j, t = pos["position"], pos["top"][0]
            pairs += 1
            agree += t["id"] == top1[li][j]
            if t["id"] == top1[li][j]:
                worst_p = max(worst_p, abs(t["prob"] - p1[li][j]))
    print(json.dumps({"model": a.model, "image": Path(a.image).name, "same_input_ids": same_ids,
                      "layer_position_pairs": pairs, "top1_agreement": round(agree / max(pairs, 1), 5),
                      "max_top1_prob_diff": round(worst_p, 5), "max_mean_max_prob_diff": round(worst_mmp, 5),
                      "pass": same_ids and agree / max(pairs, 1) >= 0.99 and worst_p <= 2e-2}), flush=True)


if __name__ == "__main__":
    main()
