#!/usr/bin/env python3
"""Make the Qwen2-VL test fixtures for logit-lens (and, with --bench, a mid-size benchmark checkpoint).

What it writes (default mode, under tests/fixtures/ of the repository):

* ``qwen2vl-hub/``  a tiny random Qwen2-VL checkpoint in the Hugging Face hub's file layout: a flat
  ``config.json`` (text fields at the top level), ``preprocessor_config.json``, ``chat_template.json``,
  ``tokenizer.json`` (a small byte-level BPE built like Qwen2's), ``tokenizer_config.json``, ``vocab.json``,
  ``merges.txt``, ``generation_config.json``, and bf16 weights with the hub's legacy names (``visual.*``,
  ``model.*``, no ``lm_head.weight``) in two shards plus ``model.safetensors.index.json``.
* ``qwen2vl-tf5/``  the same model written by transformers 5 ``save_pretrained`` (nested ``text_config`` with
  ``rope_parameters``, ``processor_config.json``, ``chat_template.jinja``), with the weights under the
  in-memory names (``model.language_model.*``, ``model.visual.*``), bfloat16.
* ``images/``  three small synthetic PNG scenes (landscape 640x480, portrait 300x500, tiny 20x30).
* ``reference/qwen2vl/<case>.safetensors`` + ``cases.json``  what transformers computes (float32, eager
  attention, CPU) for four prompts: input ids, pixel values, M-RoPE position ids, all hidden states, the raw
  last-layer output, logit-lens log-probs / statistics, top-5 ids.
* ``reference/qwen2vl/smart_resize.json``  transformers' ``smart_resize`` for a list of (H, W) pairs.

It also (re)writes ``bench/images/coco_640x480.png`` and ``bench/images/clevr_480x320.png``.

Everything is deterministic (fixed seeds). No network access is needed (HF_HUB_OFFLINE is forced).

Run from the repository root:

    ~/.venvs/tools/bin/python tools/make_fixtures.py             # fixtures under tests/fixtures/
    ~/.venvs/tools/bin/python tools/make_fixtures.py --bench bench/checkpoints/qwen2vl-mid
                                                                 # mid-size checkpoint (real vocab size), not committed
"""
import argparse
import copy
import json
import math
import os
import shutil
import struct
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import PIL  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
import transformers  # noqa: E402
from PIL import Image, ImageDraw, ImageFilter  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save as safetensors_save  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import AutoConfig, AutoProcessor, Qwen2VLForConditionalGeneration  # noqa: E402
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SEED = 11  # chosen so that every top-5 in the references is separated by > 0.008 nats

# --------------------------------------------------------------------------------------------------------------
# 1. Tokenizer
# --------------------------------------------------------------------------------------------------------------

CORPUS = """\
Describe the image. The image shows a red cube next to a blue sphere on a grey floor. A small green cylinder
stands behind the large yellow object. What color is the main object? The color of the main object is red.
Answer with one word. What is the person doing? The person is walking. The person is riding a bicycle.
A person is reading a book in the park. Two people are playing tennis, and a dog is running after the ball.
The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome.
Paris is a large city in France, and many people visit the city every year to see its old buildings.
Question: how many objects are in the picture? Answer: there are three objects in the picture.
Describe the scene in detail. In the scene there is a purple metal sphere, a brown rubber cylinder and a cyan
cube. The cube is to the left of the sphere; the cylinder is in front of the cube. Colors: red, blue, green,
yellow, purple, brown, cyan, grey, black, white, orange and pink. Shapes: cube, sphere, cylinder, cone.
The woman is cooking dinner in the kitchen. The man is sitting on a bench and looking at the sky.
A child is holding a red balloon. The cat is sleeping on a blue sofa. What is the object on the table?
It is a white cup. Is there a person in the image? Yes, a person is standing near the door.
You are a helpful assistant. The assistant answers the question of the user about the image.
The system message tells the assistant how to help the user; the user asks and the assistant answers.
system
user
assistant
The picture was taken outside on a sunny day; the light comes from the left and the shadows point right.
What is the shape of the large metal object? The large metal object is a sphere. The answer is sphere.
Count the red objects. There are 2 red objects and 1 blue object, so 3 objects in total.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 20 42 100 2024. Punctuation: "quoted", (parens), [brackets], a-b, a/b, 50%!
It's the person's bag; they're doing their homework, we've seen it, I'm sure you'll like it, he'd agree.
"""

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
BPE_VOCAB_SIZE = 800  # byte alphabet (256) + merges; the 14 special tokens come after

# The real Qwen2-VL-2B-Instruct chat template.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_tokenizer() -> Tokenizer:
    """A small byte-level BPE with exactly Qwen2's pipeline (NFC, Split(regex, isolated), ByteLevel)."""
    tok = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    # Qwen2's tokenizer.json has a ByteLevel post-processor: it only fixes offsets, it adds no token.
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB_SIZE, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    # Repeat the corpus so the trainer sees stable counts; train line by line.
    tok.train_from_iterator(CORPUS.splitlines(keepends=True) * 3, trainer=trainer)
    n_bpe = tok.get_vocab_size()
    # Added (special) tokens go right after the BPE vocabulary, in Qwen2's order.
    tok.add_special_tokens(SPECIAL_TOKENS)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == n_bpe + i, (t, tok.token_to_id(t), n_bpe + i)
    return tok


def tokenizer_json_text(tok: Tokenizer) -> str:
    """tokenizer.json, with the BPE model fields spelled as in Qwen2's file."""
    tj = json.loads(tok.to_str())
    m = tj["model"]
    m.update(dropout=None, unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
             fuse_unk=False, byte_fallback=False, ignore_merges=False)
    # (the Python ByteLevel decoder constructor ignores these options; Qwen2's file spells them out)
    tj["decoder"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    for a in tj["added_tokens"]:
        a.update(single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
    return json.dumps(tj, ensure_ascii=False, indent=2)


def write_tokenizer(out: Path, tok: Tokenizer):
    (out / "tokenizer.json").write_text(tokenizer_json_text(tok), encoding="utf-8")
    tj = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = tj["model"]["vocab"]
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = tj["model"]["merges"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in merges]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    cfg = {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                          "single_word": False, "special": True}
            for t in SPECIAL_TOKENS
        },
        "additional_special_tokens": SPECIAL_TOKENS[1:],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    write_json(out / "tokenizer_config.json", cfg)
    return ids


# --------------------------------------------------------------------------------------------------------------
# 2. Config files, hub layout
# --------------------------------------------------------------------------------------------------------------

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
HUB_MIN_PIXELS, HUB_MAX_PIXELS = 3136, 12845056
FIXTURE_MIN_PIXELS, FIXTURE_MAX_PIXELS = 3136, 40 * 28 * 28  # small on purpose: photos get downscaled

TINY = dict(vocab_size=None, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, mrope_section=[2, 3, 3],
            vision=dict(depth=2, embed_dim=32, num_heads=4), min_pixels=FIXTURE_MIN_PIXELS,
            max_pixels=FIXTURE_MAX_PIXELS)
BENCH = dict(vocab_size=151936, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=2, mrope_section=[16, 8, 8],
             vision=dict(depth=4, embed_dim=256, num_heads=8), min_pixels=HUB_MIN_PIXELS,
             max_pixels=HUB_MAX_PIXELS)


def save_safetensors(tensors: dict, path: Path, metadata: dict):
    """safetensors.torch.save_file, but byte-for-byte reproducible: the library writes the metadata map in
    hash order, so the header is rewritten here with sorted keys (tensor offsets are relative to the data
    section, so they do not change)."""
    blob = safetensors_save(tensors, metadata=metadata)
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(text)) + text + blob[8 + n:])


def write_json(path: Path, obj, indent=2):
    path.write_text(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")


def hub_config(size: dict, ids: dict) -> dict:
    """config.json as the hub ships Qwen2-VL-2B-Instruct: flat text fields. attention_dropout,
    initializer_range, use_cache are left out on purpose (class defaults apply)."""
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "hidden_act": "silu",
        "hidden_size": size["hidden_size"],
        "intermediate_size": size["intermediate_size"],
        "max_position_embeddings": 32768,
        "max_window_layers": size["num_hidden_layers"],
        "model_type": "qwen2_vl",
        "num_attention_heads": size["num_attention_heads"],
        "num_hidden_layers": size["num_hidden_layers"],
        "num_key_value_heads": size["num_key_value_heads"],
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.41.2",
        "use_sliding_window": False,
        "vision_config": {
            "depth": size["vision"]["depth"],
            "embed_dim": size["vision"]["embed_dim"],
            "mlp_ratio": 4,
            "num_heads": size["vision"]["num_heads"],
            "in_chans": 3,
            "hidden_size": size["hidden_size"],
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "temporal_patch_size": 2,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": size["mrope_section"]},
        "vocab_size": size["vocab_size"],
    }


def preprocessor_config(size: dict) -> dict:
    return {
        "min_pixels": size["min_pixels"],
        "max_pixels": size["max_pixels"],
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
    }


def write_hub_files(out: Path, size: dict, tok: Tokenizer) -> dict:
    """Everything of the hub layout except the weights. Returns the config dict."""
    out.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer(out, tok)
    size = dict(size)
    if size["vocab_size"] is None:  # tokenizer size rounded up to a multiple of 64, with spare rows
        size["vocab_size"] = (tok.get_vocab_size() // 64 + 1) * 64
    cfg = hub_config(size, ids)
    write_json(out / "config.json", cfg)
    write_json(out / "preprocessor_config.json", preprocessor_config(size))
    write_json(out / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    write_json(out / "generation_config.json", {
        "bos_token_id": ids["<|endoftext|>"], "pad_token_id": ids["<|endoftext|>"], "do_sample": True,
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "repetition_penalty": 1.0,
        "temperature": 0.01, "top_p": 0.001, "top_k": 1, "transformers_version": "4.41.2"})
    return cfg


# --------------------------------------------------------------------------------------------------------------
# 3. Weights
# --------------------------------------------------------------------------------------------------------------

def randomize(model: torch.nn.Module, seed: int, embed_std: float):
    """Overwrite every parameter so that each one matters for the outputs:

    * linear / conv weights ~ N(0, 1/fan_in) (unit gain: every layer changes the residual stream noticeably),
    * all biases ~ N(0, 0.1) (a missing bias shows up),
    * RMSNorm / LayerNorm weights ~ U(0.5, 1.5) (a norm applied twice or not at all shows up),
    * LayerNorm biases ~ N(0, 0.2),
    * token embeddings (= lm_head, tied) ~ N(0, embed_std): sets how peaked the lens distributions are.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("embed_tokens.weight"):
                new = torch.randn(p.shape, generator=g) * embed_std
            elif "norm" in name.split(".")[-2] or name.split(".")[-2] in ("norm1", "norm2", "ln_q"):
                if name.endswith(".weight"):
                    new = torch.rand(p.shape, generator=g) + 0.5
                else:
                    new = torch.randn(p.shape, generator=g) * 0.2
            elif name.endswith(".bias"):
                new = torch.randn(p.shape, generator=g) * 0.1
            elif name.endswith(".weight") and p.ndim >= 2:
                fan_in = p[0].numel()
                new = torch.randn(p.shape, generator=g) / math.sqrt(fan_in)
            else:
                raise ValueError(f"no init rule for {name} {tuple(p.shape)}")
            p.copy_(new.to(p.dtype))


def hub_name(name: str) -> str | None:
    """In-memory (transformers >= 4.52) name -> hub (legacy) name; None for the tied lm_head."""
    if name == "lm_head.weight":
        return None
    if name.startswith("model.visual."):
        return name[len("model."):]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    raise ValueError(name)


def save_hub_weights(model, out: Path, dtype=torch.bfloat16, n_shards=2):
    """bf16 shards with hub names and a model.safetensors.index.json, as the hub ships them."""
    sd = {}
    for name, t in model.state_dict().items():
        hn = hub_name(name)
        if hn is not None:
            sd[hn] = t.detach().to(dtype).contiguous().clone()
    names = sorted(sd)
    total = sum(sd[n].numel() * sd[n].element_size() for n in names)
    shards, cur, cur_size = [], [], 0
    for n in names:  # greedy split at ~total/n_shards, keeping the sorted order
        sz = sd[n].numel() * sd[n].element_size()
        if cur and cur_size + sz > total / n_shards and len(shards) < n_shards - 1:
            shards.append(cur)
            cur, cur_size = [], 0
        cur.append(n)
        cur_size += sz
    shards.append(cur)
    assert len(shards) == n_shards, len(shards)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_safetensors({n: sd[n] for n in shard}, out / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
    write_json(out / "model.safetensors.index.json",
               {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    return sorted(sd)


def load_reference_model(path: Path):
    model, info = Qwen2VLForConditionalGeneration.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"loading {path}: {bad}"
    return model.eval()


# --------------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------------

def scene(width: int, height: int, seed: int) -> Image.Image:
    """A smooth CLEVR-like scene: vertical gradient background, a soft floor, a few flat-coloured shapes."""
    rng = np.random.default_rng(seed)
    top, bottom = rng.uniform(120, 220, 3), rng.uniform(40, 120, 3)
    t = np.linspace(0.0, 1.0, height)[:, None, None]
    bg = (top * (1 - t) + bottom * t) * np.ones((1, width, 1))
    img = Image.fromarray(bg.round().astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    palette = [(200, 40, 40), (40, 80, 200), (40, 160, 70), (220, 200, 50), (140, 60, 170), (40, 190, 200)]
    s = min(width, height)
    for k in range(4):
        color = palette[(k + seed) % len(palette)]
        cx, cy = rng.uniform(0.15, 0.85) * width, rng.uniform(0.35, 0.85) * height
        r = rng.uniform(0.08, 0.18) * s
        if k % 2 == 0:
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        else:
            d.rectangle([cx - r, cy - r * 0.8, cx + r, cy + r * 0.8], fill=color)
    return img


def write_png(img: Image.Image, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG", optimize=True)


# --------------------------------------------------------------------------------------------------------------
# 5. References
# --------------------------------------------------------------------------------------------------------------

CASES = [
    ("landscape_color", "landscape.png", "Color of the main object:"),
    ("portrait_doing", "portrait.png", "Answer with one word. What is the person doing:"),
    ("tiny_describe", "tiny.png", "Describe the image."),
    ("text_only", None, "The capital of France is"),
]


def make_inputs(processor, image_path: Path | None, prompt: str):
    content = ([{"type": "image"}] if image_path is not None else []) + [{"type": "text", "text": prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    images = [Image.open(image_path).convert("RGB")] if image_path is not None else None
    batch = processor(text=[text], images=images, return_tensors="pt")
    return text, batch


def versions() -> dict:
    return {"transformers": transformers.__version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "Pillow": PIL.__version__}


@torch.no_grad()
def reference_case(model, processor, name, image_rel, prompt, fixtures: Path):
    image_path = fixtures / "images" / image_rel if image_rel else None
    text, batch = make_inputs(processor, image_path, prompt)
    ids = batch["input_ids"]
    S = ids.shape[1]
    cfg = model.config
    lm = model.model.language_model
    L = len(lm.layers)

    captured = {}

    def hook(_module, _args, output):
        captured["raw"] = (output[0] if isinstance(output, (tuple, list)) else output).detach().clone()

    # DeepStack (Qwen3-VL) adds vision features into the residual stream after the first blocks; transformers'
    # hidden_states are the block outputs before that addition. The reference is the stream the next block
    # reads: the model's own `_deepstack_process` results, recorded in call order (block 0, 1, ...).
    deepstack = []
    orig_deepstack = getattr(lm, "_deepstack_process", None)
    if orig_deepstack is not None:
        def record(*args, **kwargs):
            out = orig_deepstack(*args, **kwargs)
            deepstack.append(out.detach().clone())
            return out
        lm._deepstack_process = record

    handle = lm.layers[-1].register_forward_hook(hook)
    try:
        out = model(**batch, output_hidden_states=True, return_dict=True)
    finally:
        handle.remove()
        if orig_deepstack is not None:
            del lm._deepstack_process
    hs = torch.stack(out.hidden_states)[:, 0]  # [L+1, S, H]
    assert hs.shape[0] == L + 1
    if deepstack:
        assert len(deepstack) < L, "DeepStack into the last block would change the normed last state"
        img = ids[0] == cfg.image_token_id
        for i, after in enumerate(deepstack):
            after = after[0]
            assert torch.equal(after[~img], hs[i + 1][~img]), "DeepStack touched a text position"
            assert not torch.equal(after[img], hs[i + 1][img]), "DeepStack added nothing"
            hs[i + 1] = after
    raw = captured["raw"][0]  # [S, H]
    # transformers' last hidden state is the final-normed raw output of the last layer
    torch.testing.assert_close(lm.norm(raw), hs[L], rtol=0, atol=1e-6)

    mm = batch.get("mm_token_type_ids")
    if mm is None:
        mm = torch.zeros_like(ids)
    pos, _ = model.model.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=batch.get("image_grid_thw"))
    pos = pos[:, 0]  # [3, S]
    if image_rel is None:
        assert torch.equal(pos, torch.arange(S).expand(3, S)), "text-only positions must be arange"

    n_img = int((ids[0] == cfg.image_token_id).sum())
    cand = [0, S // 2, S - 3, S - 2, S - 1]
    if n_img:
        cand.append(int((ids[0] == cfg.image_token_id).nonzero()[0, 0]))
    lens_pos = torch.tensor(sorted(set(p for p in cand if 0 <= p < S)), dtype=torch.int64)

    # Logit lens: norm then lm_head for every layer; the last one from the raw output (norm applied once).
    states = torch.cat([hs[:L], raw[None]])  # [L+1, S, H], all pre-norm
    logp = torch.log_softmax(model.lm_head(lm.norm(states)).float(), dim=-1)  # [L+1, S, V]
    p = logp.exp()
    max_prob = p.max(-1).values
    entropy = -(p * logp).sum(-1)
    kl = (p[L] * (logp[L] - logp)).sum(-1)
    logits = out.logits[0, lens_pos].float()
    lens_logprobs = logp[:, lens_pos]
    torch.testing.assert_close(lens_logprobs[L], torch.log_softmax(logits, -1), rtol=0, atol=1e-5)
    top5 = lens_logprobs.topk(5, dim=-1).indices

    # Sanity: the lens must be informative, no near-ties in any top-5 (the smallest gap, in nats, is
    # recorded in cases.json so that tests comparing top-5 order know their margin).
    top5_lp = lens_logprobs.topk(5, dim=-1).values
    gap = float((top5_lp[..., :-1] - top5_lp[..., 1:]).min())
    assert gap > 1e-4, f"top-5 too close: {gap}"
    last_p = top5_lp[L].exp()

    tensors = {
        "input_ids": ids[0].to(torch.int64),
        "position_ids": pos.to(torch.int64),
        "hidden_states": hs.float(),
        "last_layer_raw": raw.float(),
        "lens_positions": lens_pos,
        "lens_logprobs": lens_logprobs.float(),
        "logits": logits,
        "lens_max_prob": max_prob.float(),
        "lens_entropy": entropy.float(),
        "lens_kl_to_final": kl.float(),
        "mean_max_prob": max_prob.mean(-1).float(),
        "top5_ids": top5.to(torch.int64),
    }
    if image_rel is not None:
        tensors["pixel_values"] = batch["pixel_values"].float()
        tensors["image_grid_thw"] = batch["image_grid_thw"].to(torch.int64)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    meta = {"prompt": prompt, "image": f"images/{image_rel}" if image_rel else "", "rendered_prompt": text,
            **versions()}
    case = {
        "name": name,
        "image": f"images/{image_rel}" if image_rel else None,
        "prompt": prompt,
        "rendered_prompt": text,
        "num_tokens": S,
        "num_image_tokens": n_img,
        "image_grid_thw": batch["image_grid_thw"][0].tolist() if image_rel else None,
        "min_top5_gap_nats": round(gap, 6),
    }
    stats = {"lens_positions": lens_pos.tolist(), "mean_max_prob": [round(x, 4) for x in max_prob.mean(-1).tolist()],
             "last_logits_std": round(float(logits.std()), 3),
             "top5_probs_last": [round(x, 4) for x in last_p[-1].tolist()],
             "mean_kl_to_final": [round(x, 4) for x in kl.mean(-1).tolist()]}
    return tensors, meta, case, stats, batch


def save_tf5_and_check(cls, config, model, processor, tf5_dir: Path, hub_names, batches: dict, load):
    """transformers 5's own save of a model built from `config` (``cls(config)`` + ``load_state_dict``), in bf16
    (the weights are bf16 already), and the processor's; then that copy, reloaded with ``load``, must give the
    hub copy's inputs for every case and bit-identical logits (``batches``: each case's hub inputs)."""
    fresh = cls(config)
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.to(torch.bfloat16).save_pretrained(str(tf5_dir))
    processor.save_pretrained(str(tf5_dir))
    with safe_open(str(tf5_dir / "model.safetensors"), "pt") as f:
        names = sorted(f.keys())
    print(f"save_pretrained wrote {len(names)} tensors; prefixes "
          f"{sorted({'.'.join(n.split('.')[:2]) for n in names})}; hub names: {names == hub_names}")
    tf5_model = load(tf5_dir)
    tf5_processor = AutoProcessor.from_pretrained(str(tf5_dir))
    for name, image_rel, prompt in CASES:
        image_path = REPO / "tests" / "fixtures" / "images" / image_rel if image_rel else None
        _, b = make_inputs(tf5_processor, image_path, prompt)
        ref = batches[name]
        assert torch.equal(b["input_ids"], ref["input_ids"]), name
        if image_rel:
            assert torch.equal(b["pixel_values"], ref["pixel_values"]), name
        assert torch.equal(tf5_model(**ref).logits, model(**ref).logits), f"{name}: tf5 logits differ"
    print("tf5 fixture: same inputs and logits as the hub fixture for every case")


SMART_RESIZE_PAIRS = [(480, 640), (406, 406), (1, 1), (10, 10), (28, 5000), (500, 300), (1000, 1000), (4000, 3000),
                      (30, 20), (56, 56), (1, 199), (1, 200), (1, 201), (14, 14), (42, 42), (70, 70), (27, 29),
                      (320, 480), (224, 224), (448, 448), (1080, 1920), (3000, 4000), (8000, 8000), (100, 20000),
                      (20000, 100), (150, 50), (123, 457), (785, 1000), (6, 1000)]


def smart_resize_table():
    rows = []
    for mn, mx in [(FIXTURE_MIN_PIXELS, FIXTURE_MAX_PIXELS), (HUB_MIN_PIXELS, HUB_MAX_PIXELS)]:
        for h, w in SMART_RESIZE_PAIRS:
            row = {"height": h, "width": w, "min_pixels": mn, "max_pixels": mx}
            try:
                rh, rw = smart_resize(h, w, factor=28, min_pixels=mn, max_pixels=mx)
                row.update(resized_height=int(rh), resized_width=int(rw))
            except ValueError as e:
                row["error"] = str(e)
            rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------------

def build_model(hub_dir: Path, seed: int, embed_std: float):
    """Read the flat hub config the way from_pretrained does, build the model, randomize it."""
    config = AutoConfig.from_pretrained(str(hub_dir))
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).to(torch.float32).eval()
    randomize(model, seed, embed_std)
    return config, model


def describe_config(config) -> dict:
    t, v = config.text_config, config.vision_config
    return {"text_config": {k: getattr(t, k, None) for k in (
                "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "rms_norm_eps", "rope_parameters", "attention_dropout", "initializer_range", "layer_types",
                "sliding_window", "bos_token_id", "eos_token_id", "tie_word_embeddings")},
            "tie_word_embeddings": config.tie_word_embeddings,
            "vision_config": {k: getattr(v, k, None) for k in (
                "depth", "embed_dim", "hidden_size", "num_heads", "hidden_act", "in_channels", "patch_size")}}


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def write_bench_images():
    write_png(scene(640, 480, seed=11), REPO / "bench" / "images" / "coco_640x480.png")
    write_png(scene(480, 320, seed=12), REPO / "bench" / "images" / "clevr_480x320.png")


def make_fixtures(fixtures: Path):
    torch.set_grad_enabled(False)
    hub_dir, tf5_dir = fixtures / "qwen2vl-hub", fixtures / "qwen2vl-tf5"
    ref_dir, img_dir = fixtures / "reference" / "qwen2vl", fixtures / "images"
    for d in (hub_dir, tf5_dir, ref_dir):
        if d.exists():
            shutil.rmtree(d)
    for d in (hub_dir, tf5_dir, ref_dir, img_dir):
        d.mkdir(parents=True, exist_ok=True)

    # images
    write_png(scene(640, 480, seed=1), img_dir / "landscape.png")
    write_png(scene(300, 500, seed=2), img_dir / "portrait.png")
    write_png(scene(20, 30, seed=3).filter(ImageFilter.SMOOTH), img_dir / "tiny.png")
    write_bench_images()

    # 1-2: tokenizer + hub config files
    tok = train_tokenizer()
    cfg = write_hub_files(hub_dir, TINY, tok)
    print(f"tokenizer: {tok.get_vocab_size()} tokens ({tok.get_vocab_size() - len(SPECIAL_TOKENS)} BPE + "
          f"{len(SPECIAL_TOKENS)} special), config vocab_size {cfg['vocab_size']}")
    print("special token ids:", {t: tok.token_to_id(t) for t in SPECIAL_TOKENS})

    # 3: weights
    config, model = build_model(hub_dir, SEED, embed_std=0.5)
    print("flat hub config read as:", json.dumps(describe_config(config), default=str))
    hub_names = save_hub_weights(model, hub_dir)
    model = load_reference_model(hub_dir)
    processor = AutoProcessor.from_pretrained(str(hub_dir))
    # the reference model holds exactly the bf16-rounded weights
    on_disk = {}
    for f in sorted(hub_dir.glob("model-*.safetensors")):
        on_disk.update(load_file(str(f)))
    sd = model.state_dict()
    for name, t in sd.items():
        hn = hub_name(name)
        ref = on_disk[hn] if hn else on_disk["model.embed_tokens.weight"]
        assert torch.equal(t, ref.float()), name
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()

    # the HF tokenizer (rebuilt by Qwen2Tokenizer from vocab/merges) must agree with the raw tokenizer.json
    raw_tok = Tokenizer.from_file(str(hub_dir / "tokenizer.json"))
    for _, _, prompt in CASES:
        text = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": prompt}]}],
                                             add_generation_prompt=True, tokenize=False)
        assert processor.tokenizer(text)["input_ids"] == raw_tok.encode(text).ids, prompt

    # 5: references
    cases, batches = [], {}
    for name, image_rel, prompt in CASES:
        tensors, meta, case, stats, batch = reference_case(model, processor, name, image_rel, prompt, fixtures)
        save_safetensors(tensors, ref_dir / f"{name}.safetensors", metadata=meta)
        cases.append(case)
        batches[name] = batch
        print(f"case {name}: tokens {case['num_tokens']}, image tokens {case['num_image_tokens']}, "
              f"grid {case['image_grid_thw']}, {json.dumps(stats)}")
    write_json(ref_dir / "cases.json", cases)
    write_json(ref_dir / "smart_resize.json", smart_resize_table())

    # 4: transformers-5 layout. Saved in bfloat16 (half the size of float32; the weights are bf16-rounded
    # already, so nothing is lost and the tf5 fixture gives exactly the same outputs).
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    model_bf16.save_pretrained(str(tf5_dir))
    processor.save_pretrained(str(tf5_dir))
    saved = sorted(f.name for f in tf5_dir.glob("*.safetensors"))
    assert saved == ["model.safetensors"], saved
    with safe_open(str(tf5_dir / "model.safetensors"), "pt") as f:
        saved_names = sorted(f.keys())
        saved_meta = f.metadata()
    reverted = saved_names == hub_names
    print(f"save_pretrained wrote {len(saved_names)} tensors, e.g. {saved_names[:2]} ... {saved_names[-2:]}; "
          f"{'legacy hub names (reverted)' if reverted else 'NOT the hub names'}")
    if reverted or not all(n.startswith(("model.language_model.", "model.visual.")) for n in saved_names):
        # Rewrite with the in-memory names, so the two fixtures cover both weight-name layouts.
        new = {n: t.detach().contiguous().clone() for n, t in model_bf16.state_dict().items()
               if n != "lm_head.weight"}
        save_safetensors(new, tf5_dir / "model.safetensors", metadata=saved_meta or {"format": "pt"})
        print("rewrote qwen2vl-tf5/model.safetensors with the in-memory names "
              "(model.language_model.*, model.visual.*)")
    tf5_model = load_reference_model(tf5_dir)
    tf5_sd = tf5_model.state_dict()
    assert all(torch.equal(t, tf5_sd[n]) for n, t in model.state_dict().items()), "tf5 weights differ"
    tf5_processor = AutoProcessor.from_pretrained(str(tf5_dir))
    for name, image_rel, prompt in CASES:
        image_path = img_dir / image_rel if image_rel else None
        _, b = make_inputs(tf5_processor, image_path, prompt)
        ref = batches[name]
        assert torch.equal(b["input_ids"], ref["input_ids"]), name
        if image_rel:
            assert torch.equal(b["pixel_values"], ref["pixel_values"]), name
            assert torch.equal(b["image_grid_thw"], ref["image_grid_thw"]), name
        a = model(**ref).logits
        c = tf5_model(**ref).logits
        assert torch.equal(c, a), f"{name}: tf5 logits differ by {(c - a).abs().max()}"
    print("tf5 fixture: same inputs and logits as the hub fixture for every case")

    for d in (hub_dir, tf5_dir, ref_dir, img_dir):
        print(f"{d}: {dir_size(d) / 1024:.0f} KiB")
    print(f"total {fixtures}: {dir_size(fixtures) / 1024:.0f} KiB")


def make_bench(out: Path):
    """Mid-size random checkpoint with the real vocabulary size (151936 rows), hub layout, bf16 shards."""
    torch.set_grad_enabled(False)
    if out.exists():
        shutil.rmtree(out)
    tok = train_tokenizer()
    write_hub_files(out, BENCH, tok)
    _, model = build_model(out, SEED + 1, embed_std=0.15)
    save_hub_weights(model, out)
    write_bench_images()
    model = load_reference_model(out)
    processor = AutoProcessor.from_pretrained(str(out))
    _, batch = make_inputs(processor, REPO / "bench" / "images" / "coco_640x480.png", "Color of the main object:")
    logits = model(**batch).logits[0, -1]
    p = torch.softmax(logits, -1)
    print(f"bench checkpoint {out}: {dir_size(out) / 2**20:.1f} MiB, seq_len {batch['input_ids'].shape[1]}, "
          f"last-position max prob {p.max():.3f}, logits std {logits.std():.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures", help="fixtures directory")
    ap.add_argument("--bench", type=Path, default=None, metavar="DIR",
                    help="write the mid-size benchmark checkpoint to DIR instead of the fixtures")
    a = ap.parse_args()
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    if a.bench is not None:
        make_bench(a.bench.resolve())
    else:
        make_fixtures(a.out.resolve())


if __name__ == "__main__":
    sys.exit(main())
