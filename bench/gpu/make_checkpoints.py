"""Real-size random checkpoints of Qwen2-VL-2B-Instruct and LLaVA-1.5-7B in the hub's layout, made on
the GPU with the machine's own transformers (no download): the shapes of ../shared/docs/MODELS.md §2 and
§3, the tiny tokenizers of tools/ (their special-token ids written into config.json), random weights with
random norm weights (as tools/make_fixtures.py does), bf16 (Qwen2-VL) / fp16 (LLaVA) shards.

Usage: python bench/gpu/make_checkpoints.py --out /tmp/ckpt [--models qwen2vl,llava15] [--small]
       --small: the same layout with small shapes, for a CPU dry run of bench/gpu/run.sh.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, LlavaForConditionalGeneration, Qwen2VLForConditionalGeneration

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import make_fixtures as mf  # noqa: E402
import make_llava_fixtures as mlf  # noqa: E402

QWEN2VL_2B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, mrope_section=[16, 24, 24],
                  vision=dict(depth=32, embed_dim=1280, num_heads=16),
                  min_pixels=mf.HUB_MIN_PIXELS, max_pixels=mf.HUB_MAX_PIXELS)
LLAVA15_7B = dict(vocab_size=32064, text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                             num_attention_heads=32),
                  vision=dict(hidden_size=1024, image_size=336, intermediate_size=4096, num_attention_heads=16,
                              num_hidden_layers=24, patch_size=14, projection_dim=768))
SMALL = dict(qwen2vl=mf.BENCH, llava15=mlf.LLAVA_MID)


@torch.no_grad()
def randomize(model, seed: int, embed_std: float):
    """tools/make_llava_fixtures.randomize's rules, drawn on the model's own device."""
    dev = next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        parts = name.split(".")
        owner = parts[-2] if len(parts) > 1 else ""
        rnd = lambda: torch.randn(p.shape, generator=g, device=dev, dtype=torch.float32)  # noqa: E731
        if name.endswith("embed_tokens.weight") or name == "lm_head.weight":
            new = rnd() * embed_std
        elif "norm" in owner or owner in ("norm1", "norm2", "ln_q"):
            new = torch.rand(p.shape, generator=g, device=dev) + 0.5 if parts[-1] == "weight" else rnd() * 0.2
        elif name.endswith("class_embedding"):
            new = rnd()
        elif name.endswith("position_embedding.weight"):
            new = rnd() * 0.5
        elif parts[-1] == "bias":
            new = rnd() * 0.1
        elif p.ndim >= 2:
            new = rnd() / math.sqrt(p[0].numel())
        else:
            raise ValueError(f"no init rule for {name} {tuple(p.shape)}")
        p.copy_(new.to(p.dtype))


def save_shards(sd: dict, out: Path, shard_bytes: int = 4 << 30):
    names = sorted(sd)
    shards, cur, size = [], [], 0
    for n in names:
        b = sd[n].numel() * sd[n].element_size()
        if cur and size + b > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(n)
        size += b
    shards.append(cur)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: sd[n].cpu().contiguous() for n in shard}, str(out / fname), metadata={"format": "pt"})
        for n in shard:
            weight_map[n] = fname
            total += sd[n].numel() * sd[n].element_size()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def build(family: str, out: Path, small: bool, device: str):
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    if family == "qwen2vl":
        size = SMALL[family] if small else QWEN2VL_2B
        mf.write_hub_files(out, size, mf.train_tokenizer())
        cls, dtype, tied = Qwen2VLForConditionalGeneration, torch.bfloat16, True
        to_hub = mf.hub_name
    else:
        size = SMALL[family] if small else LLAVA15_7B
        mlf.write_llava_files(out, size, mlf.train_llama_tokenizer())
        cls, dtype, tied = LlavaForConditionalGeneration, torch.float16, False
        to_hub = lambda n: mlf.hub_name(n, tied)  # noqa: E731
    config = AutoConfig.from_pretrained(str(out))
    # Built in the checkpoint's dtype on any device (LLaVA-1.5-7B in f32 is 27 GB): randomize draws in f32 and
    # rounds once, so the files are byte-identical to an f32 build's (checked on the --small shapes).
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(config).eval()
    finally:
        torch.set_default_dtype(old)
    randomize(model, seed=7, embed_std=0.15)
    sd = {}
    for name, t in model.state_dict().items():
        hn = to_hub(name)
        if hn is not None:
            sd[hn] = t.to(dtype)
    save_shards(sd, out)
    n = sum(t.numel() for t in sd.values())
    print(json.dumps({"checkpoint": str(out), "family": family, "params": n, "dtype": str(dtype),
                      "seconds": round(time.time() - t0, 1)}), flush=True)
    del model, sd
    if device != "cpu":
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", default="qwen2vl,llava15")
    ap.add_argument("--small", action="store_true")
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for family in a.models.split(","):
        build(family, a.out / family, a.small, device)


if __name__ == "__main__":
    main()
