"""torchvision's uint8 antialiased bicubic resize, which transformers 5's image processors run, on
synthetic images at sizes that stress every part of the resampler: upscaling, near-identity, one axis
only, and downscaling by up to ×140 (windows of hundreds of taps). The Rust resize must equal it bit for
bit (tests/resize_parity.rs).

    ~/.venvs/tools/bin/python tools/make_resize_reference.py   # deterministic, < 1 s

Writes tests/fixtures/reference/resize/: <case>.in.png, <case>.out.png and cases.json.
"""
import json
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as tvF

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "reference" / "resize"

# (name, (in_w, in_h), (out_w, out_h))
CASES = [
    ("up_both", (47, 31), (150, 101)),
    ("down_both_x7", (97, 61), (13, 9)),
    ("near_identity_width", (640, 23), (644, 23)),
    ("near_identity_both", (61, 97), (56, 98)),
    ("height_only_x91", (23, 640), (23, 7)),
    ("width_only_x140", (700, 30), (5, 30)),
    ("one_pixel_up", (1, 1), (28, 56)),
    ("thin_down", (3, 400), (28, 28)),
]


def image(w: int, h: int, seed: int) -> np.ndarray:
    """Smooth gradients with noise and a few hard edges, so that every tap matters and values clip at 0
    and 255 (the bicubic kernel overshoots at edges)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    base = np.stack([128 + 127 * np.sin(x / max(w, 1) * 6.1 + c) * np.cos(y / max(h, 1) * 4.3 - c) for c in range(3)], -1)
    base[(x.astype(int) // 7 + y.astype(int) // 5) % 3 == 0] = [255, 0, 255]
    noise = rng.normal(0, 40, size=base.shape)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    cases = []
    for seed, (name, (iw, ih), (ow, oh)) in enumerate(CASES):
        src = image(iw, ih, seed)
        t = torch.from_numpy(src).permute(2, 0, 1).contiguous()
        out = tvF.resize(t, [oh, ow], interpolation=InterpolationMode.BICUBIC, antialias=True)
        Image.fromarray(src).save(OUT / f"{name}.in.png", optimize=True)
        Image.fromarray(out.permute(1, 2, 0).numpy()).save(OUT / f"{name}.out.png", optimize=True)
        cases.append({"name": name, "in": [iw, ih], "out": [ow, oh]})
    meta = {
        "what": "torchvision.transforms.v2.functional.resize(uint8 CHW, [out_h, out_w], BICUBIC, antialias=True)",
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "sizes": "[width, height]",
        "cases": cases,
    }
    (OUT / "cases.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main()
