"""transformers' processor on the images that examples/prepare_timing.rs times: the same work (resize,
normalisation, patch layout, chat template, tokenization), decoding excluded, median of N.

    python bench/processor_timing.py MODEL_DIR THREADS N IMAGE...   # IMAGE `WxH`: a synthetic quality-90 JPEG
"""
import io
import statistics
import sys
import time

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor


def synthetic(w: int, h: int) -> Image.Image:
    """The same kind of picture as examples/prepare_timing.rs makes (gradients and noise; not the same
    pixels), through a quality-90 JPEG."""
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    a = np.stack([128 + 110 * np.sin(x / 97 + c) * np.cos(y / 61) for c in range(3)], -1)
    a = a + rng.integers(-16, 16, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def main():
    model, threads, n, images = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    torch.set_num_threads(threads)
    proc = AutoProcessor.from_pretrained(model)
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Color of the main object:"}]}]
    text = proc.apply_chat_template(conv, add_generation_prompt=True)
    for arg in images:
        w, _, h = arg.partition("x")
        img = synthetic(int(w), int(h)) if w.isdigit() and h.isdigit() else Image.open(arg).convert("RGB")
        proc(images=img, text=text, return_tensors="pt")
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            out = proc(images=img, text=text, return_tensors="pt")
            times.append((time.perf_counter() - t0) * 1e3)
        print(f"{arg} ({img.width}x{img.height}): processor {statistics.median(times):.2f} ms "
              f"({out['input_ids'].shape[1]} tokens)")


if __name__ == "__main__":
    main()
