#!/usr/bin/env python3
"""The seed notebook's logit-lens pipeline (transformers, CPU, float32), timed per request, on a checkpoint.

This is `seed_lens` from /work/shared/baselines/seed_baseline.py, run exactly as the notebook runs it:
one forward with ``output_hidden_states=True``, then for every entry of ``hidden_states``
``lm_head(norm(h))`` over the whole sequence, softmax, max, mean over positions, and the top-3 ids at the
last position. As in the notebook, the final norm is also applied to the last entry, which transformers
already returns normed (so the last layer's numbers are those of a doubly-normed state); the model's own
top-3 at the last position is printed separately (``model_top3_last``, computed once, untimed) for
comparison with tools that apply the norm once.

Unlike seed_baseline.py, the checkpoint is loaded from a directory with ``from_pretrained`` (float32, eager
attention) and the inputs are real: the checkpoint's own processor renders the chat template and
preprocesses the image.

Timed per request (model load excluded): chat template + processor call, forward, lens.
Prints one JSON line.

Usage (from the repository root, with the tools venv):

    ~/.venvs/tools/bin/python bench/seed_pipeline.py --model bench/checkpoints/qwen2vl-mid \\
        --image bench/images/coco_640x480.png --prompt "Color of the main object:" --iters 5 --threads 2

The checkpoint comes from ``tools/make_fixtures.py --bench bench/checkpoints/qwen2vl-mid``; the tiny
fixture ``tests/fixtures/qwen2vl-hub`` works too.

LLaVA-1.5 and LLaVA-OneVision checkpoints (llava-hf hub layout) work the same way; the family is read from
``config.json`` (``model_type`` qwen2_vl / llava / llava_onevision) and printed as ``family``. Mid-size ones come
from ``tools/make_llava_fixtures.py --bench bench/checkpoints`` (``llava15-mid``, ``onevision-mid``); the tiny
fixtures ``tests/fixtures/llava15-hub`` and ``tests/fixtures/onevision-hub`` work too. For OneVision the
processor's ``image_sizes`` is printed as well. Qwen2.5-VL (``tools/make_qwen2_5_vl_fixtures.py --bench``) and
text-only causal LMs (``model_type`` llama / mistral / qwen2 / qwen3: the tokenizer's chat template, no image;
``tools/make_text_fixtures.py --bench``) work the same way.
"""
import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import (AutoModelForCausalLM, AutoProcessor, AutoTokenizer,  # noqa: E402
                          LlavaForConditionalGeneration, LlavaOnevisionForConditionalGeneration,
                          Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration)

# config.json model_type -> (family name, model class)
FAMILIES = {
    "qwen2_vl": ("qwen2vl", Qwen2VLForConditionalGeneration),
    "qwen2_5_vl": ("qwen2_5_vl", Qwen2_5_VLForConditionalGeneration),
    "llava": ("llava15", LlavaForConditionalGeneration),
    "llava_onevision": ("onevision", LlavaOnevisionForConditionalGeneration),
    # text-only causal LMs: the tokenizer's chat template, no image
    "llama": ("causal_lm", AutoModelForCausalLM),
    "mistral": ("causal_lm", AutoModelForCausalLM),
    "qwen2": ("causal_lm", AutoModelForCausalLM),
    "qwen3": ("causal_lm", AutoModelForCausalLM),
}


def detect_family(model_dir):
    model_type = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8")).get("model_type")
    if model_type not in FAMILIES:
        raise SystemExit(f"{model_dir}: unsupported model_type {model_type!r} (known: {sorted(FAMILIES)})")
    return FAMILIES[model_type]


def norm_head(model):
    lm = getattr(model.model, "language_model", model.model)  # a causal LM's body is model.model
    return lm.norm, model.lm_head


@torch.no_grad()
def seed_lens(model, batch):
    """The seed notebook's get_hidden_states + get_visuals, minus plotting: every layer's full logits."""
    hs = model(**batch, output_hidden_states=True, return_dict=True).hidden_states
    norm, head = norm_head(model)
    conf, top = [], []
    for h in hs:
        logits = head(norm(h))
        conf.append(torch.softmax(logits, dim=-1).max(dim=-1).values.mean().item())
        top.append(torch.topk(logits, k=3, dim=-1).indices[0, -1].tolist())
    return conf, top


def preprocess(processor, image, prompt):
    if not hasattr(processor, "image_processor"):  # a text-only model's tokenizer
        return processor.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    return processor(text=[text], images=[image] if image is not None else None, return_tensors="pt")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory (hub or transformers-5 layout)")
    ap.add_argument("--image", default=None, help="image file (omit for a text-only prompt)")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--iters", type=int, default=5, help="timed requests (after one untimed warm-up)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    family, model_class = detect_family(a.model)
    t0 = time.perf_counter()
    processor = (AutoTokenizer if family == "causal_lm" else AutoProcessor).from_pretrained(a.model)
    model = model_class.from_pretrained(a.model, dtype=torch.float32, attn_implementation="eager").eval()
    load_s = time.perf_counter() - t0
    image = Image.open(a.image).convert("RGB") if a.image else None

    def request():
        t_a = time.perf_counter()
        batch = preprocess(processor, image, a.prompt)
        t_b = time.perf_counter()
        conf, top = seed_lens(model, batch)
        t_c = time.perf_counter()
        return batch, conf, top, (t_b - t_a) * 1e3, (t_c - t_a) * 1e3

    batch, conf, top, _, _ = request()  # warm-up
    totals, pres = [], []
    for _ in range(a.iters):
        _, c, t, pre_ms, total_ms = request()
        assert t == top, "non-deterministic lens output"
        totals.append(total_ms)
        pres.append(pre_ms)

    model_top3 = torch.topk(model(**batch).logits[0, -1], 3).indices.tolist()
    ids = batch["input_ids"][0]
    print(json.dumps({
        "pipeline": "seed_lens (transformers)",
        "model": a.model,
        "family": family,
        "image": a.image,
        "prompt": a.prompt,
        "threads": a.threads,
        "iters": a.iters,
        "seq_len": int(ids.shape[0]),
        "num_image_tokens": int((ids == getattr(model.config, "image_token_id", -1)).sum()),
        "image_grid_thw": batch["image_grid_thw"][0].tolist() if "image_grid_thw" in batch else None,
        **({"image_sizes": batch["image_sizes"][0].tolist()} if "image_sizes" in batch else {}),
        "median_ms": round(statistics.median(totals), 2),
        "min_ms": round(min(totals), 2),
        "preprocess_median_ms": round(statistics.median(pres), 2),
        "load_s": round(load_s, 2),
        "mean_max_prob": [round(x, 6) for x in conf],
        "top3_last": top,
        "model_top3_last": model_top3,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }), flush=True)


if __name__ == "__main__":
    main()
