"""Half-precision references for tests/half_precision.rs: transformers' own residual streams in each fixture's
checkpoint dtype (Qwen2-VL and OneVision bf16, LLaVA-1.5 fp16), eager attention, on the CPU, for every case of
tests/fixtures/reference/<family>/cases.json, fed the same input ids and pixel values as the f32 references.

Writes tests/fixtures/reference/<family>/<case>.half.safetensors:
  hidden_states_half  [L+1, S, H] f32 (the half values, widened): layers 0..L-1 as `output_hidden_states` gives
                      them, layer L the last block's raw output (before the final norm), like `last_layer_raw`.
The test holds our half-precision stream to be as close to the f32 reference as this one is.

Usage: python tools/make_half_references.py [--fixtures tests/fixtures]
"""
import argparse
import json
from pathlib import Path

import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

FAMILIES = [("qwen2vl", "qwen2vl-hub", torch.bfloat16), ("llava15", "llava15-hub", torch.float16),
            ("onevision", "onevision-hub", torch.bfloat16)]


@torch.no_grad()
def half_states(model, processor, fixtures: Path, case: dict, ref: dict, dtype):
    image = case.get("image")
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": case["prompt"]}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    images = [Image.open(fixtures / image).convert("RGB")] if image else None
    batch = processor(text=[text], images=images, return_tensors="pt")
    assert torch.equal(batch["input_ids"][0], ref["input_ids"]), f"{case['name']}: input ids differ"
    if "pixel_values" in batch:
        # The f32 reference's pixels, as the Rust tests feed them (the model apart from preprocessing).
        batch["pixel_values"] = ref["pixel_values"].reshape(batch["pixel_values"].shape).to(dtype)
    lm = model.model.language_model
    captured = {}
    hook = lm.layers[-1].register_forward_hook(
        lambda _m, _a, out: captured.__setitem__("raw", (out[0] if isinstance(out, (tuple, list)) else out)))
    try:
        out = model(**batch, output_hidden_states=True, return_dict=True)
    finally:
        hook.remove()
    hs = torch.stack(out.hidden_states)[:, 0]
    return torch.cat([hs[:-1], captured["raw"][0][None]]).float().contiguous()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", type=Path, default=Path(__file__).resolve().parents[1] / "tests" / "fixtures")
    a = ap.parse_args()
    torch.manual_seed(0)
    for family, hub, dtype in FAMILIES:
        model = AutoModelForImageTextToText.from_pretrained(
            str(a.fixtures / hub), dtype=dtype, attn_implementation="eager").eval()
        processor = AutoProcessor.from_pretrained(str(a.fixtures / hub))
        ref_dir = a.fixtures / "reference" / family
        for case in json.loads((ref_dir / "cases.json").read_text()):
            ref = load_file(str(ref_dir / f"{case['name']}.safetensors"))
            states = half_states(model, processor, a.fixtures, case, ref, dtype)
            save_file({"hidden_states_half": states}, str(ref_dir / f"{case['name']}.half.safetensors"),
                      # One metadata key: safetensors writes several in no fixed order (re-runs must be byte-identical).
                      metadata={"made_by": f"tools/make_half_references.py, {str(dtype).removeprefix('torch.')}, "
                                           f"transformers {transformers.__version__}, torch {torch.__version__}"})
            print(family, case["name"], tuple(states.shape), str(dtype))


if __name__ == "__main__":
    main()
