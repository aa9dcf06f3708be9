#!/usr/bin/env python3
"""The seed notebook's dataset loop, timed: for every image × prompt, the notebook's lens
(``seed_lens`` of bench/seed_pipeline.py: one forward with ``output_hidden_states=True``, then every
layer's full logits, softmax, max, mean over positions) plus the top-5 tokens at the last position per
layer, and one matplotlib figure per case (the confidence curve and a table of the top tokens), saved as
PNG. This is what ``logit-lens run`` replaces; run both on the same folder and prompts file.

The model loads once (untimed in ``loop_s``, reported as ``load_s``). Prints one JSON line.

Usage (from the repository root, with the tools venv and ``pip install matplotlib``):

    ~/.venvs/tools/bin/python bench/notebook_loop.py --model tests/fixtures/qwen2vl-hub \\
        --images /tmp/ds/images --prompts /tmp/ds/prompts.txt --out /tmp/ds/notebook --threads 2
"""
import argparse
import json
import os
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoProcessor  # noqa: E402

from seed_pipeline import detect_family, norm_head, preprocess  # noqa: E402

EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


@torch.no_grad()
def notebook_lens(model, batch, k=5):
    """seed_lens, keeping the top-k tokens and probabilities at the last position for the table."""
    hs = model(**batch, output_hidden_states=True, return_dict=True).hidden_states
    norm, head = norm_head(model)
    conf, top = [], []
    for h in hs:
        probs = torch.softmax(head(norm(h)), dim=-1)
        conf.append(probs.max(dim=-1).values.mean().item())
        p, i = torch.topk(probs[0, -1], k)
        top.append(list(zip(i.tolist(), p.tolist())))
    return conf, top


def figure(path, title, conf, top, tokenizer):
    fig, (ax, tab) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [1, 1.4]})
    ax.plot(range(len(conf)), conf, marker="o")
    ax.set_xlabel("layer")
    ax.set_ylabel("mean max prob")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    cells = [[f"{tokenizer.decode([i])!r} {p:.2f}" for i, p in row] for row in reversed(top)]
    tab.axis("off")
    tab.table(cellText=cells, rowLabels=[str(i) for i in reversed(range(len(top)))],
              colLabels=[f"#{r + 1}" for r in range(len(top[0]))], loc="center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--images", required=True, help="folder of images (name order)")
    ap.add_argument("--prompts", required=True, help="one prompt per line; blank lines and # comments skipped")
    ap.add_argument("--out", required=True, help="folder for the PNGs")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    family, model_class = detect_family(a.model)
    t0 = time.perf_counter()
    processor = AutoProcessor.from_pretrained(a.model)
    model = model_class.from_pretrained(a.model, dtype=torch.float32, attn_implementation="eager").eval()
    load_s = time.perf_counter() - t0

    images = sorted(p for p in Path(a.images).iterdir() if p.suffix.lower() in EXTENSIONS)
    prompts = [line.strip() for line in Path(a.prompts).read_text(encoding="utf-8").splitlines()
               if line.strip() and not line.strip().startswith("#")]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t1 = time.perf_counter()
    lens_s = 0.0
    for img_path in images:
        image = Image.open(img_path).convert("RGB")
        for j, prompt in enumerate(prompts):
            t_a = time.perf_counter()
            conf, top = notebook_lens(model, preprocess(processor, image, prompt))
            lens_s += time.perf_counter() - t_a
            figure(out / f"{img_path.stem}_{j}.png", f"{img_path.name}: {prompt}", conf, top, processor.tokenizer)
    loop_s = time.perf_counter() - t1
    print(json.dumps({
        "pipeline": "notebook loop (transformers + matplotlib)",
        "model": a.model,
        "family": family,
        "cases": len(images) * len(prompts),
        "threads": a.threads,
        "load_s": round(load_s, 2),
        "loop_s": round(loop_s, 2),
        "lens_s": round(lens_s, 2),
        "figures_s": round(loop_s - lens_s, 2),
    }), flush=True)


if __name__ == "__main__":
    main()
