"""Image files of the kinds researchers send, and the pixels transformers' processors start from: Pillow's
`Image.open(f).convert("RGB")` (the notebook's reading), or where transformers does more, what it does.

- JPEG above all, at an odd size: baseline 4:2:0 (COCO's and cameras' format) at two qualities, 4:2:2, 4:4:4,
  progressive, optimised tables, restart markers, grayscale, Adobe CMYK, arithmetic-coded (transcoded by
  libjpeg-turbo's `jpegtran -arithmetic`: Debian's libjpeg-turbo-progs), EXIF-rotated (reference rotated with
  `ImageOps.exif_transpose`, as transformers' `load_image` does), and a truncated file, which Pillow refuses;
- lossy and lossless WebP, GIF, LZW TIFF;
- PNGs with transparency (RGBA, LA, a palette with a transparent index) and 16-bit colour PNGs (RGB, RGBA,
  grey + alpha): reference transformers' `convert_to_rgb`, which composites onto white.

The Rust decoder must equal these bit for bit (tests/decode_parity.rs).

    ~/.venvs/tools/bin/python tools/make_decode_reference.py   # deterministic, < 1 s

Writes tests/fixtures/reference/decode/: <case>.<ext>, <case>.pil.png and cases.json.
"""
import io
import json
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, ImageOps, features
from transformers.image_transforms import convert_to_rgb

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "reference" / "decode"

# (name, save options); odd sizes so that chroma upsampling meets the image edges.
CASES = [
    ("baseline_420_q75", dict(quality=75, subsampling=2)),
    ("baseline_420_q95", dict(quality=95, subsampling=2)),
    ("baseline_422_q90", dict(quality=90, subsampling=1)),
    ("baseline_444_q90", dict(quality=90, subsampling=0)),
    ("progressive_420_q85", dict(quality=85, subsampling=2, progressive=True)),
    ("optimized_420_q85", dict(quality=85, subsampling=2, optimize=True)),
    ("restart_markers_420", dict(quality=80, subsampling=2, restart_marker_blocks=3)),
]


def png16(path: Path, samples: np.ndarray, color_type: int):
    """A 16-bit PNG (Pillow cannot write 16-bit colour): rows of big-endian samples, filter 0."""
    h = samples.shape[0]
    raw = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", samples.shape[1], h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
                     + chunk(b"IEND", b""))


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    # natural content: a crop of the benchmark's COCO-sized scene, at an odd size
    src = Image.open(ROOT / "bench" / "images" / "coco_640x480.png").convert("RGB").crop((101, 77, 262, 194))
    cases = []
    for name, opts in CASES:
        buf = io.BytesIO()
        src.save(buf, "JPEG", **opts)
        (OUT / f"{name}.jpg").write_bytes(buf.getvalue())
        cases.append({"name": name, "file": f"{name}.jpg", "save": opts})
    buf = io.BytesIO()
    src.convert("L").save(buf, "JPEG", quality=90)
    (OUT / "grayscale.jpg").write_bytes(buf.getvalue())
    cases.append({"name": "grayscale", "file": "grayscale.jpg", "save": {"mode": "L", "quality": 90}})
    buf = io.BytesIO()
    src.convert("CMYK").save(buf, "JPEG", quality=90)  # Adobe-inverted CMYK, as Photoshop writes
    (OUT / "cmyk.jpg").write_bytes(buf.getvalue())
    cases.append({"name": "cmyk", "file": "cmyk.jpg", "save": {"mode": "CMYK", "quality": 90}})
    for name, ext, opts in [
        ("webp_lossy_q80", "webp", dict(quality=80)),
        ("webp_lossless", "webp", dict(lossless=True)),
        ("gif", "gif", {}),
        ("tiff_lzw", "tiff", dict(compression="tiff_lzw")),
    ]:
        src.save(OUT / f"{name}.{ext}", **opts)
        cases.append({"name": name, "file": f"{name}.{ext}", "save": opts})
    # Arithmetic coding: the same coefficients, transcoded losslessly by libjpeg-turbo's jpegtran.
    subprocess.run(["jpegtran", "-arithmetic", "-outfile", str(OUT / "arithmetic_420.jpg"),
                    str(OUT / "baseline_420_q75.jpg")], check=True)
    cases.append({"name": "arithmetic_420", "file": "arithmetic_420.jpg",
                  "save": "jpegtran -arithmetic baseline_420_q75.jpg"})
    for case in cases:
        img = Image.open(OUT / case["file"])
        case["pil_mode"] = img.mode
        img.convert("RGB").save(OUT / f"{case['name']}.pil.png", optimize=True)
    # EXIF orientation 6 (the camera was turned: rotate 90° clockwise to view), as phones write it.
    exif = Image.Exif()
    exif[0x0112] = 6
    src.save(OUT / "exif_rotated.jpg", "JPEG", quality=90, exif=exif.tobytes())
    ImageOps.exif_transpose(Image.open(OUT / "exif_rotated.jpg")).convert("RGB").save(
        OUT / "exif_rotated.pil.png", optimize=True)
    cases.append({"name": "exif_rotated", "file": "exif_rotated.jpg", "save": {"quality": 90, "exif_orientation": 6},
                  "reference": "PIL.ImageOps.exif_transpose, as transformers.image_utils.load_image"})
    # Transparency: what transformers' processors do with it (alpha-composited onto white).
    small = src.crop((0, 0, 61, 47))
    alpha = Image.fromarray(np.random.default_rng(0).integers(0, 256, (small.height, small.width), dtype=np.uint8))
    rgba, la = small.copy(), small.convert("L")
    rgba.putalpha(alpha)
    la.putalpha(alpha)
    rgba.save(OUT / "png_rgba.png")
    la.save(OUT / "png_la.png")
    small.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(OUT / "png_palette_transparent.png", transparency=3)
    # 16-bit colour PNGs: Pillow keeps each sample's high byte. (16-bit grey alone, Pillow's "I;16", is
    # clipped to 255 by convert_to_rgb, a nearly white image: not copied, so not here.)
    rng = np.random.default_rng(1)
    png16(OUT / "png_rgb16.png", rng.integers(0, 65536, (23, 31, 3), dtype=np.uint16), 2)
    png16(OUT / "png_rgba16.png", rng.integers(0, 65536, (23, 31, 4), dtype=np.uint16), 6)
    png16(OUT / "png_la16.png", rng.integers(0, 65536, (23, 31, 2), dtype=np.uint16), 4)
    for name in ["png_rgba", "png_la", "png_palette_transparent", "png_rgb16", "png_rgba16", "png_la16"]:
        img = Image.open(OUT / f"{name}.png")
        Image.fromarray(convert_to_rgb(img, return_numpy=True)).save(OUT / f"{name}.pil.png", optimize=True)
        cases.append({"name": name, "file": f"{name}.png", "pil_mode": img.mode,
                      "reference": "transformers.image_transforms.convert_to_rgb"})
    whole = (OUT / "baseline_420_q75.jpg").read_bytes()
    (OUT / "truncated.jpg").write_bytes(whole[: len(whole) * 2 // 3])
    try:
        Image.open(OUT / "truncated.jpg").convert("RGB")
        raise SystemExit("Pillow decoded the truncated file")
    except OSError as e:
        truncated = str(e)
    meta = {
        "what": 'Image.open(f).convert("RGB") of each case\'s file (or, where "reference" says so, transformers\' '
                'convert_to_rgb), as <case>.pil.png',
        "pillow": PIL.__version__,
        "libjpeg_turbo": features.version("libjpeg_turbo"),
        "cases": cases,
        "truncated": {"file": "truncated.jpg", "pillow_error": truncated},
    }
    (OUT / "cases.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main()
