#!/usr/bin/env python3
"""Make the LLaVA-1.5 and LLaVA-OneVision test fixtures for logit-lens (and, with --bench, mid-size checkpoints).

The companion of make_fixtures.py (Qwen2-VL); same conventions, same reference tensor names. What it writes
(default mode, under tests/fixtures/ of the repository):

* ``llava15-hub/``  a tiny random LLaVA-1.5 in the file layout of ``llava-hf/llava-1.5-7b-hf``: hand-written
  ``config.json`` (text_config with only the fields the real one has, so the Llama class defaults apply),
  ``preprocessor_config.json`` (CLIPImageProcessor), ``processor_config.json``, ``chat_template.json`` (the real
  template), a small Llama-style ``tokenizer.json`` (BPE + byte fallback + metaspace, BOS prepended),
  ``tokenizer_config.json``, ``special_tokens_map.json``, ``generation_config.json`` and float16 weights with
  the hub names (``language_model.model.*``, ``language_model.lm_head.weight``, ``multi_modal_projector.*``,
  ``vision_tower.vision_model.*``) in two shards plus ``model.safetensors.index.json``.
* ``onevision-hub/``  a tiny random LLaVA-OneVision in the layout of ``llava-hf/llava-onevision-qwen2-0.5b-ov-hf``:
  SigLIP tower, Qwen2 LM with tied embeddings, 28-px tiles with the 36 anyres pinpoints, ``image_newline``,
  the Qwen2-style tokenizer of make_fixtures.py plus ``<image>`` / ``<video>``, float16 weights in a single
  ``model.safetensors`` (no ``lm_head``).
* ``images/square.png`` (28x28) and ``images/wide.png`` (44x32, W x H); the existing images are only read.
* ``reference/{llava15,onevision}/<case>.safetensors`` + ``cases.json``  what transformers computes (float32,
  eager attention, CPU): the tensors of reference/qwen2vl (minus position_ids / image_grid_thw) plus
  ``image_features`` (the rows scattered into the ``<image>`` positions) and, for OneVision, ``image_sizes`` and
  ``num_image_tokens``.
* ``reference/onevision/token_counts.json``  the processor's ``<image>`` count at the REAL scale (384-px tiles,
  729 tokens per tile, 36 pinpoints) and at the fixture scale for a list of (H, W), with the best resolution and
  the packing branch, checked against the full processor and the model's own packing code.
* ``reference/llava15/resize.json``  the CLIP short-side resize (shortest_edge 336) and center-crop offsets.

With ``--bench DIR`` it writes ``DIR/llava15-mid`` and ``DIR/onevision-mid`` instead: mid-size random checkpoints
with the real vocabulary sizes and the real image geometry (CLIP 336/14 -> 576 image tokens; SigLIP 384/14 -> 729
per tile, the real 36 pinpoints), for bench/seed_pipeline.py.

Deterministic (fixed seeds, byte-identical output on re-run). No network (HF_HUB_OFFLINE is forced).
Run from the repository root:

    ~/.venvs/tools/bin/python tools/make_llava_fixtures.py
    ~/.venvs/tools/bin/python tools/make_llava_fixtures.py --bench bench/checkpoints
"""
import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (tokenizer corpus, Qwen2 BPE, safetensors writer, scene images)

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import (AutoConfig, AutoProcessor, CLIPImageProcessor, LlamaTokenizer,  # noqa: E402
                          LlavaForConditionalGeneration, LlavaOnevisionForConditionalGeneration,
                          LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor, Qwen2Tokenizer)
from transformers.image_processing_utils import get_patch_output_size, select_best_resolution  # noqa: E402
from transformers.image_transforms import get_resize_output_image_size  # noqa: E402
from transformers.image_utils import ChannelDimension  # noqa: E402
from transformers.models.llava_onevision.image_processing_llava_onevision import \
    LlavaOnevisionImageProcessor  # noqa: E402
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel  # noqa: E402

REPO = mf.REPO
LLAVA_SEED = 30  # chosen (0..39) for the largest smallest top-5 gap over the cases
ONEVISION_SEED = 51  # chosen (0..109) likewise

# --------------------------------------------------------------------------------------------------------------
# 1. Tokenizers
# --------------------------------------------------------------------------------------------------------------

LLAMA_BASE_SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 as in Llama
LLAMA_ADDED = ["<image>", "<pad>"]  # added by the llava-hf conversion right after the base vocabulary
LLAMA_TRAINED_SIZE = 500  # BPE trainer vocabulary (3 specials + characters + merges); 256 byte tokens come on top
# the chat template's role words, so that they get pieces of their own (as in Llama's vocabulary)
LLAMA_EXTRA_TEXT = ["USER: Describe the image. ASSISTANT: The image shows a cube.", "USER: Hello ASSISTANT: Hi"]

ONEVISION_ADDED = ["<image>", "<video>"]  # after the Qwen2 special tokens


def train_llama_tokenizer() -> Tokenizer:
    """A small Llama-style tokenizer, laid out like llava-1.5-7b-hf's tokenizer.json (legacy=false conversion).

    Vocabulary: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, the byte tokens ``<0x00>``..``<0xFF>`` 3..258, then the trained
    pieces (characters, then merges); ``<image>`` and ``<pad>`` are added special tokens after that. Pipeline:
    no normalizer, ``Metaspace(replacement="▁", prepend_scheme="first", split=False)``, BPE with byte fallback
    (``fuse_unk``), decoder Replace/ByteFallback/Fuse/Strip, and a TemplateProcessing post-processor that prepends
    ``<s>``. This is exactly the pipeline transformers 5's LlamaTokenizer rebuilds from the file (it keeps only
    vocab, merges and the post-processor), so the raw tokenizer.json and transformers agree.
    Newlines are not in the training text: ``\\n`` is encoded by byte fallback as ``<0x0A>``, as in Llama.
    """
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # Train on words ("▁word"), so no merge crosses a word boundary (SentencePiece pieces never do either).
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=LLAMA_TRAINED_SIZE, min_frequency=1, show_progress=False,
                                  special_tokens=LLAMA_BASE_SPECIALS)
    lines = [line for line in mf.CORPUS.splitlines() if line.strip()] + LLAMA_EXTRA_TEXT
    trainer_tok.train_from_iterator(lines * 3, trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]

    vocab = {t: i for i, t in enumerate(LLAMA_BASE_SPECIALS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for t, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        if t not in vocab:
            vocab[t] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA_BASE_SPECIALS])
    n_base = tok.get_vocab_size()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA_ADDED])
    for i, t in enumerate(LLAMA_BASE_SPECIALS):
        assert tok.token_to_id(t) == i, t
    for i, t in enumerate(LLAMA_ADDED):
        assert tok.token_to_id(t) == n_base + i, (t, tok.token_to_id(t), n_base + i)
    return tok


def pretty_tokenizer_json(tok: Tokenizer) -> str:
    tj = json.loads(tok.to_str())
    for a in tj["added_tokens"]:
        a.update(single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
    return json.dumps(tj, ensure_ascii=False, indent=2)


def added_tokens_decoder(tok: Tokenizer, names) -> dict:
    return {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                      "single_word": False, "special": True} for t in names}


def write_llama_tokenizer(out: Path, tok: Tokenizer) -> dict:
    (out / "tokenizer.json").write_text(pretty_tokenizer_json(tok), encoding="utf-8")
    mf.write_json(out / "tokenizer_config.json", {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added_tokens_decoder(tok, LLAMA_BASE_SPECIALS + LLAMA_ADDED),
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": False,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<pad>",
        "padding_side": "left",
        "processor_class": "LlavaProcessor",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "trust_remote_code": False,
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    })
    tokd = lambda t: {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    mf.write_json(out / "special_tokens_map.json", {"bos_token": tokd("<s>"), "eos_token": tokd("</s>"),
                                                    "pad_token": "<pad>", "unk_token": tokd("<unk>")})
    return {t: tok.token_to_id(t) for t in LLAMA_BASE_SPECIALS + LLAMA_ADDED}


def train_onevision_tokenizer() -> Tokenizer:
    """make_fixtures.py's Qwen2-style byte-level BPE (728 BPE + 14 Qwen2 special tokens) + <image>, <video>."""
    tok = mf.train_tokenizer()
    n = tok.get_vocab_size()
    tok.add_special_tokens(ONEVISION_ADDED)
    for i, t in enumerate(ONEVISION_ADDED):
        assert tok.token_to_id(t) == n + i, t
    return tok


def write_onevision_tokenizer(out: Path, tok: Tokenizer) -> dict:
    (out / "tokenizer.json").write_text(mf.tokenizer_json_text(tok), encoding="utf-8")
    tj = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    (out / "vocab.json").write_text(json.dumps(tj["model"]["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    specials = mf.SPECIAL_TOKENS + ONEVISION_ADDED
    mf.write_json(out / "tokenizer_config.json", {
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens_decoder(tok, specials),
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "padding_side": "right",
        "processor_class": "LlavaOnevisionProcessor",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    })
    return {t: tok.token_to_id(t) for t in specials}


# --------------------------------------------------------------------------------------------------------------
# 2. Config files, hub layout
# --------------------------------------------------------------------------------------------------------------

# The real llava-1.5-7b-hf chat_template.json (verified against several verbatim copies, e.g. openvino.genai's
# fallback table labelled "llava-1.5 ... (chat_template.json)" and transformers' LLaVA processor test).
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# The llava-onevision-qwen2-0.5b-ov-hf chat_template.json as far as it can be reconstructed offline (MODELS.md
# 4.5): transformers' LLaVA-NeXT-Video / OneVision processor tests use this text, and a third-party collator
# quotes it as "slightly different from .../llava-onevision-qwen2-0.5b-ov-hf/blob/main/chat_template.json"
# (it only moves the assistant's <|im_end|> into the generation block).
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SIGLIP_MEAN = SIGLIP_STD = [0.5, 0.5, 0.5]


def pinpoints(tile: int) -> list:
    """The 36 anyres_max_9 grid pinpoints [a*tile, b*tile], a, b in 1..6, as (height, width), a-major."""
    return [[a * tile, b * tile] for a in range(1, 7) for b in range(1, 7)]


def vocab_rows(n_tokens: int) -> int:
    """Tokenizer size rounded up to a multiple of 64, always with spare rows (the conversions pad like this)."""
    return (n_tokens // 64 + 1) * 64


LLAVA_TINY = dict(vocab_size=None, text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                             num_attention_heads=4),
                  vision=dict(hidden_size=32, image_size=28, intermediate_size=64, num_attention_heads=4,
                              num_hidden_layers=3, patch_size=14, projection_dim=16))
LLAVA_MID = dict(vocab_size=32064, text=dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                                             num_attention_heads=8),
                 vision=dict(hidden_size=256, image_size=336, intermediate_size=1024, num_attention_heads=8,
                             num_hidden_layers=4, patch_size=14, projection_dim=256))
ONEVISION_TINY = dict(vocab_size=None, text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                                 num_attention_heads=4, num_key_value_heads=2),
                      vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                  image_size=28, patch_size=14))
ONEVISION_MID = dict(vocab_size=152000, text=dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                                                  num_attention_heads=8, num_key_value_heads=2),
                     vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                                 image_size=384, patch_size=14))


def write_llava_files(out: Path, size: dict, tok: Tokenizer) -> dict:
    """Everything of the llava-1.5-7b-hf layout except the weights. Returns the config dict."""
    out.mkdir(parents=True, exist_ok=True)
    ids = write_llama_tokenizer(out, tok)
    vocab = size["vocab_size"] or vocab_rows(tok.get_vocab_size())
    v = size["vision"]
    # As on the hub: text_config holds only these fields (num_key_value_heads, rope_theta, hidden_act are left
    # to the Llama defaults: MHA, 10000, silu); no image_seq_length (LlavaConfig's default 576 is wrong here).
    cfg = {
        "architectures": ["LlavaForConditionalGeneration"],
        "ignore_index": -100,
        "image_token_index": ids["<image>"],
        "model_type": "llava",
        "pad_token_id": ids["<pad>"],
        "projector_hidden_act": "gelu",
        "text_config": {
            "_name_or_path": "lmsys/vicuna-7b-v1.5",
            "architectures": ["LlamaForCausalLM"],
            **size["text"],
            "max_position_embeddings": 4096,
            "model_type": "llama",
            "rms_norm_eps": 1e-05,
            "torch_dtype": "float16",
            "vocab_size": vocab,
        },
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "transformers_version": "4.36.0.dev0",
        "vision_config": {**v, "model_type": "clip_vision_model", "vocab_size": 32000},
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "vocab_size": vocab,
    }
    mf.write_json(out / "config.json", cfg)
    mf.write_json(out / "preprocessor_config.json", {
        "crop_size": {"height": v["image_size"], "width": v["image_size"]},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": mf.CLIP_MEAN,
        "image_processor_type": "CLIPImageProcessor",
        "image_std": mf.CLIP_STD,
        "processor_class": "LlavaProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": v["image_size"]},
    })
    mf.write_json(out / "processor_config.json", {
        "image_token": "<image>",
        "num_additional_image_tokens": 1,
        "patch_size": v["patch_size"],
        "processor_class": "LlavaProcessor",
        "vision_feature_select_strategy": "default",
    })
    mf.write_json(out / "chat_template.json", {"chat_template": LLAVA_CHAT_TEMPLATE})
    mf.write_json(out / "generation_config.json", {
        "_from_model_config": True, "bos_token_id": ids["<s>"], "eos_token_id": ids["</s>"],
        "pad_token_id": ids["<pad>"], "transformers_version": "4.36.0.dev0"})
    return cfg


def write_onevision_files(out: Path, size: dict, tok: Tokenizer) -> dict:
    """Everything of the llava-onevision-qwen2-0.5b-ov-hf layout except the weights. Returns the config dict."""
    out.mkdir(parents=True, exist_ok=True)
    ids = write_onevision_tokenizer(out, tok)
    vocab = size["vocab_size"] or vocab_rows(tok.get_vocab_size())
    v = size["vision"]
    tile = v["image_size"]
    per_tile = (tile // v["patch_size"]) ** 2
    cfg = {
        "architectures": ["LlavaOnevisionForConditionalGeneration"],
        "ignore_index": -100,
        "image_grid_pinpoints": pinpoints(tile),
        "image_token_index": ids["<image>"],
        "model_type": "llava_onevision",
        "projector_hidden_act": "gelu",
        "text_config": {
            "_name_or_path": "Qwen/Qwen2-0.5B-Instruct",
            "architectures": ["Qwen2ForCausalLM"],
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            **size["text"],
            "max_position_embeddings": 32768,
            "model_type": "qwen2",
            "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0,
            "tie_word_embeddings": True,
            "torch_dtype": "bfloat16",
            "vocab_size": vocab,
        },
        "torch_dtype": "float16",
        "transformers_version": "4.45.0.dev0",
        "use_image_newline_parameter": True,
        "video_token_index": ids["<video>"],
        "vision_aspect_ratio": "anyres_max_9",
        "vision_config": {**v, "model_type": "siglip_vision_model", "vision_use_head": False},
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
    }
    mf.write_json(out / "config.json", cfg)
    mf.write_json(out / "preprocessor_config.json", {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_pad": True,
        "do_rescale": True,
        "do_resize": True,
        "image_grid_pinpoints": pinpoints(tile),
        "image_mean": SIGLIP_MEAN,
        "image_processor_type": "LlavaOnevisionImageProcessor",
        "image_std": SIGLIP_STD,
        "processor_class": "LlavaOnevisionProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"height": tile, "width": tile},
    })
    mf.write_json(out / "processor_config.json", {
        "image_token": "<image>",
        "num_image_tokens": per_tile,
        "processor_class": "LlavaOnevisionProcessor",
        "video_token": "<video>",
        "vision_aspect_ratio": "anyres_max_9",
        "vision_feature_select_strategy": "full",
    })
    mf.write_json(out / "chat_template.json", {"chat_template": ONEVISION_CHAT_TEMPLATE})
    mf.write_json(out / "generation_config.json", {
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"], "transformers_version": "4.45.0.dev0"})
    return cfg


# --------------------------------------------------------------------------------------------------------------
# 3. Weights
# --------------------------------------------------------------------------------------------------------------

def randomize(model: torch.nn.Module, seed: int, embed_std: float):
    """Overwrite every parameter so that each one matters for the outputs (cf. make_fixtures.randomize):

    * linear / conv weights ~ N(0, 1/fan_in), every other bias ~ N(0, 0.1),
    * every RMSNorm / LayerNorm weight ~ U(0.5, 1.5) and LayerNorm bias ~ N(0, 0.2) (LM norms incl. the final
      one, CLIP pre_layrnorm / layer_norm1/2 / post_layernorm, SigLIP layer_norm1/2 / post_layernorm),
    * token embeddings and the (untied) lm_head ~ N(0, embed_std): sets how peaked the lens distributions are,
    * CLIP class_embedding ~ N(0, 1), vision position embeddings ~ N(0, 0.5), OneVision image_newline ~ N(0, 1).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            parts = name.split(".")
            owner = parts[-2] if len(parts) > 1 else ""
            if name.endswith("embed_tokens.weight") or name == "lm_head.weight":
                new = torch.randn(p.shape, generator=g) * embed_std
            elif "norm" in owner:  # norm, input_layernorm, layer_norm1, pre_layrnorm, post_layernorm, ...
                new = torch.rand(p.shape, generator=g) + 0.5 if parts[-1] == "weight" \
                    else torch.randn(p.shape, generator=g) * 0.2
            elif name.endswith("class_embedding") or name.endswith("image_newline"):
                new = torch.randn(p.shape, generator=g)
            elif name.endswith("position_embedding.weight"):
                new = torch.randn(p.shape, generator=g) * 0.5
            elif parts[-1] == "bias":
                new = torch.randn(p.shape, generator=g) * 0.1
            elif parts[-1] == "weight" and p.ndim >= 2:
                new = torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel())
            else:
                raise ValueError(f"no init rule for {name} {tuple(p.shape)}")
            p.copy_(new.to(p.dtype))


def hub_name(name: str, tied: bool) -> str | None:
    """transformers-5 in-memory name -> llava-hf hub name; None for a tied lm_head."""
    if name == "lm_head.weight":
        return None if tied else "language_model.lm_head.weight"
    for mem, hub in (("model.language_model.", "language_model.model."),
                     ("model.vision_tower.", "vision_tower.vision_model."),
                     ("model.multi_modal_projector.", "multi_modal_projector.")):
        if name.startswith(mem):
            return hub + name[len(mem):]
    if name == "model.image_newline":
        return "image_newline"
    raise ValueError(name)


def save_hub_weights(model, out: Path, tied: bool, n_shards: int, dtype=torch.float16) -> dict:
    """float16 weights with the hub names: one model.safetensors, or n_shards shards + index."""
    sd = {}
    for name, t in model.state_dict().items():
        hn = hub_name(name, tied)
        if hn is not None:
            sd[hn] = t.detach().to(dtype).contiguous().clone()
    names = sorted(sd)
    if n_shards == 1:
        mf.save_safetensors({n: sd[n] for n in names}, out / "model.safetensors", metadata={"format": "pt"})
        return sd
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
        mf.save_safetensors({n: sd[n] for n in shard}, out / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
    mf.write_json(out / "model.safetensors.index.json",
                  {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    return sd


def load_reference_model(cls, path: Path):
    model, info = cls.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager",
                                      output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"loading {path}: {bad}"
    return model.eval()


def build_checkpoint(family: str, out: Path, size: dict, seed: int, embed_std: float, n_shards: int):
    """Write config/tokenizer/processor files and random float16 weights; reload as transformers does."""
    if family == "llava15":
        tok, cls, tied = train_llama_tokenizer(), LlavaForConditionalGeneration, False
        cfg = write_llava_files(out, size, tok)
    else:
        tok, cls, tied = train_onevision_tokenizer(), LlavaOnevisionForConditionalGeneration, True
        cfg = write_onevision_files(out, size, tok)
    config = AutoConfig.from_pretrained(str(out))
    torch.manual_seed(seed)
    model = cls(config).to(torch.float32).eval()
    randomize(model, seed, embed_std)
    saved = save_hub_weights(model, out, tied=tied, n_shards=n_shards)
    model = load_reference_model(cls, out)
    # the reference model holds exactly the float16-rounded weights, under the expected names
    sd = model.state_dict()
    for name, t in sd.items():
        hn = hub_name(name, tied)
        ref = saved[hn] if hn else saved["language_model.model.embed_tokens.weight"]
        assert torch.equal(t, ref.float()), name
    lm_tied = model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    assert lm_tied == tied, f"lm_head tied: {lm_tied}"
    return tok, cfg, model


def describe_config(config) -> dict:
    t, v = config.text_config, config.vision_config
    keys_t = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "hidden_act", "rms_norm_eps", "rope_parameters", "max_position_embeddings",
              "attention_bias", "mlp_bias", "bos_token_id", "eos_token_id", "tie_word_embeddings")
    keys_v = ("hidden_size", "num_hidden_layers", "num_attention_heads", "hidden_act", "layer_norm_eps",
              "image_size", "patch_size")
    top = ("image_token_id", "tie_word_embeddings", "image_seq_length", "vision_feature_layer",
           "vision_feature_select_strategy", "multimodal_projector_bias", "vision_aspect_ratio")
    return {"top": {k: getattr(config, k, None) for k in top if hasattr(config, k)},
            "text_config": {k: getattr(t, k, None) for k in keys_t},
            "vision_config": {k: getattr(v, k, None) for k in keys_v}}


# --------------------------------------------------------------------------------------------------------------
# 4. Image geometry: what the processors compute
# --------------------------------------------------------------------------------------------------------------

def dummy(h: int, w: int) -> torch.Tensor:
    """A (3, h, w) tensor that takes no memory, for the size-only helpers of transformers."""
    return torch.zeros(1, 1, 1, dtype=torch.uint8).expand(3, h, w)


def clip_geometry(h: int, w: int, shortest_edge: int, crop: int) -> dict:
    """CLIP resize (short side -> shortest_edge, long side truncated) and center-crop offsets, as transformers 5."""
    rh, rw = get_resize_output_image_size(dummy(h, w), size=shortest_edge, default_to_square=False,
                                          input_data_format=ChannelDimension.FIRST)
    # TorchvisionBackend.center_crop: int((H - crop) / 2.0) (no padding needed: both sides >= crop here)
    return {"height": h, "width": w, "resized_height": int(rh), "resized_width": int(rw),
            "crop_top": int((rh - crop) / 2.0), "crop_left": int((rw - crop) / 2.0)}


def onevision_layout(h: int, w: int, grid_pinpoints: list, tile: int, per_tile: int, max_tiles: int = 9) -> dict:
    """Everything the anyres_max_9 path decides for one image of (h, w), computed step by step with transformers'
    own helpers where it has them (select_best_resolution, get_patch_output_size, the padding of the image
    processor) and the processor's arithmetic for the feature grid."""
    best_h, best_w = select_best_resolution([h, w], grid_pinpoints)
    new_h, new_w = get_patch_output_size(dummy(h, w), (best_h, best_w), ChannelDimension.FIRST)
    pad_l, pad_t, pad_r, pad_b = LlavaOnevisionImageProcessor._get_padding_size(None, (new_h, new_w),
                                                                                (best_h, best_w))
    sh, sw = best_h // tile, best_w // tile
    p = int(math.isqrt(per_tile))
    cur_h, cur_w = p * sh, p * sw
    if w / h > cur_w / cur_h:  # crop rows
        axis, new = "rows", int(round(h * (cur_w / w), 7))
        pad = (cur_h - new) // 2
        un_h, un_w = cur_h - 2 * pad, cur_w
    else:  # crop columns
        axis, new = "cols", int(round(w * (cur_h / h), 7))
        pad = (cur_w - new) // 2
        un_h, un_w = cur_h, cur_w - 2 * pad
    ratio = math.sqrt(un_h * un_w / (max_tiles * p * p))
    downscaled = ratio > 1.1
    fin_h, fin_w = (int(un_h // ratio), int(un_w // ratio)) if downscaled else (un_h, un_w)
    return {"height": h, "width": w, "best_resolution": [best_h, best_w], "resized_for_patching": [new_h, new_w],
            "padding_ltrb": [pad_l, pad_t, pad_r, pad_b], "tiles": [sh, sw], "num_patches": 1 + sh * sw,
            "feature_grid": [cur_h, cur_w], "unpad_axis": axis, "unpad_each_side": pad,
            "unpadded_grid": [un_h, un_w], "ratio": round(ratio, 6), "downscaled": downscaled,
            "final_grid": [fin_h, fin_w],
            "num_image_tokens": per_tile + fin_h * fin_w + fin_h}  # base + grid + one newline per row


def model_packed_length(h: int, w: int, grid_pinpoints: list, tile: int, patch: int) -> int | str:
    """The number of rows LlavaOnevisionModel.pack_image_features produces for an image of (h, w), with 1-channel
    dummy features (the model's own code path, not a re-implementation). Returns the error text if it raises."""
    per_side = tile // patch
    stub = SimpleNamespace(config=SimpleNamespace(
        vision_config=SimpleNamespace(image_size=tile, patch_size=patch), image_grid_pinpoints=grid_pinpoints))
    best_h, best_w = select_best_resolution([h, w], grid_pinpoints)
    n_patches = 1 + (best_h // tile) * (best_w // tile)
    feats = torch.zeros(n_patches, per_side * per_side, 1)
    try:
        packed, lens = LlavaOnevisionModel.pack_image_features(
            stub, [feats], torch.tensor([[h, w]]), image_newline=torch.ones(1), vision_aspect_ratio="anyres_max_9")
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return int(lens[0])


# Real-scale OneVision token counts (H, W). (899, 1024) is the transformers integration-test image (6551).
TOKEN_COUNT_SIZES = [(899, 1024), (384, 384), (480, 640), (640, 480), (320, 480), (1, 1), (10, 2000), (2000, 10),
                     (1000, 300), (4000, 3000), (3000, 4000), (500, 300), (336, 336), (768, 768), (1152, 1152),
                     (1080, 1920), (1920, 1080), (224, 224), (383, 385), (100, 1000), (50, 2304), (2304, 2304),
                     (800, 1200), (700, 2000), (401, 1600), (20, 30), (28, 32), (1, 2000), (1, 10000)]


def count_rows(processor, sizes, tile: int, per_tile: int, patch: int, run_max_side: int) -> list:
    """For each (H, W): the step-by-step layout, checked against the processor's _get_number_of_features and
    _get_num_multimodal_tokens and the model's packing (model_packed_length); for images with a long side up to
    run_max_side the full processor is run on a synthetic image too (expanded <image> count, patches)."""
    pins = processor.image_processor.image_grid_pinpoints
    rows = []
    for h, w in sizes:
        row = onevision_layout(h, w, pins, tile, per_tile)
        n_proc = processor._get_number_of_features(h, w, tile, tile)
        n_multi = processor._get_num_multimodal_tokens(image_sizes=[[h, w]])["num_image_tokens"][0]
        assert n_proc == n_multi == row["num_image_tokens"], (h, w, n_proc, n_multi, row)
        row["model_packed_length"] = model_packed_length(h, w, pins, tile, patch)
        assert row["model_packed_length"] == n_proc, row
        if max(h, w) <= run_max_side:
            img = Image.new("RGB", (w, h), (120, 60, 200))
            text = "<|im_start|>user <image>\nx<|im_end|><|im_start|>assistant\n"
            b = processor(text=[text], images=[img], return_tensors="pt")
            row["processor_pixel_values_shape"] = list(b["pixel_values"].shape)
            row["processor_expanded_count"] = int((b["input_ids"] == processor.image_token_id).sum())
            assert row["processor_expanded_count"] == n_proc
            assert b["pixel_values"].shape[1] == row["num_patches"]
        rows.append(row)
    return rows


# Fixture-scale (28-px tiles, 2x2 patches per tile) sizes: the cases, two that unpad to an EMPTY grid (only the 4
# base tokens remain), ones that unpad and downscale, and degenerate shapes.
FIXTURE_COUNT_SIZES = [(480, 640), (500, 300), (28, 28), (32, 44), (30, 20), (8, 20), (20, 8), (60, 148),
                       (88, 104), (1, 1), (1, 10000), (2000, 10)]


def token_count_table(tok: Tokenizer, fixture_processor) -> dict:
    """Processor counts at the REAL hub scale (384-px tiles, 729 per tile, 36 pinpoints of 384; processor built in
    memory with the hub's settings) and at the fixture scale (the onevision-hub processor)."""
    tile, per_tile = 384, 729
    image_processor = LlavaOnevisionImageProcessor(size={"height": tile, "width": tile},
                                                   image_grid_pinpoints=pinpoints(tile), image_mean=SIGLIP_MEAN,
                                                   image_std=SIGLIP_STD, resample=3, do_pad=True)
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / "llava_fixture_tokenizer"
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "tokenizer.json").write_text(mf.tokenizer_json_text(tok), encoding="utf-8")
    hf_tok = Qwen2Tokenizer(tokenizer_file=str(tmp / "tokenizer.json"))
    processor = LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=hf_tok,
                                        video_processor=LlavaOnevisionVideoProcessor(),
                                        num_image_tokens=per_tile, vision_feature_select_strategy="full",
                                        vision_aspect_ratio="anyres_max_9", chat_template=ONEVISION_CHAT_TEMPLATE)
    settings = lambda t, n: {"tile": t, "patch_size": 14, "num_image_tokens_per_tile": n,
                             "vision_aspect_ratio": "anyres_max_9", "vision_feature_select_strategy": "full",
                             "image_grid_pinpoints": pinpoints(t)}
    return {"note": "num_image_tokens = per-tile count (base image) + final_grid[0] * final_grid[1] + final_grid[0] "
                    "(one newline per row). model_packed_length is LlavaOnevisionModel.pack_image_features run "
                    "on dummy features. Sizes are (height, width).",
            "real": {"settings": settings(tile, per_tile),
                     "rows": count_rows(processor, TOKEN_COUNT_SIZES, tile, per_tile, 14, run_max_side=2304)},
            "fixture": {"settings": settings(28, 4),
                        "rows": count_rows(fixture_processor, FIXTURE_COUNT_SIZES, 28, 4, 14, run_max_side=10000)}}


RESIZE_PAIRS = [(480, 640), (640, 480), (500, 300), (333, 500), (1, 1000), (1000, 1), (336, 336), (337, 1000),
                (899, 1024), (30, 20), (224, 224), (335, 447), (1080, 1920), (4000, 3000), (100, 20000)]


def resize_table() -> dict:
    rows = [clip_geometry(h, w, 336, 336) for h, w in RESIZE_PAIRS]
    # check the size arithmetic against the real processor where the resized image is small enough to make
    proc = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                              do_center_crop=False)
    for r in rows:
        if r["resized_height"] * r["resized_width"] <= 4_000_000:
            out = proc(images=[Image.new("RGB", (r["width"], r["height"]), (10, 20, 30))], return_tensors="pt")
            assert list(out["pixel_values"].shape[-2:]) == [r["resized_height"], r["resized_width"]], r
            r["checked_with_processor"] = True
    return {"settings": {"shortest_edge": 336, "crop_size": [336, 336]},
            "note": "resized = (short side -> 336, long side -> int(336 * long / short)); crop offsets "
                    "int((resized - 336) / 2.0); sizes are (height, width)",
            "rows": rows}


# --------------------------------------------------------------------------------------------------------------
# 5. References
# --------------------------------------------------------------------------------------------------------------

LLAVA_CASES = [
    ("landscape_color", "landscape.png", "Color of the main object:"),
    ("portrait_doing", "portrait.png", "Answer with one word. What is the person doing:"),
    ("text_only", None, "The capital of France is"),
]
ONEVISION_CASES = [
    ("landscape_color", "landscape.png", "Color of the main object:"),
    ("portrait_doing", "portrait.png", "Answer with one word. What is the person doing:"),
    ("square_describe", "square.png", "Describe the image."),
    ("wide_count", "wide.png", "Count the red objects."),
    ("text_only", None, "The capital of France is"),
]


def image_features_of(family: str, model, batch) -> torch.Tensor:
    """What get_image_features returns (for OneVision: packed with the newlines), concatenated: [N, H]."""
    cfg = model.config
    if family == "llava15":
        out = model.model.get_image_features(pixel_values=batch["pixel_values"],
                                             vision_feature_layer=cfg.vision_feature_layer,
                                             vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    elif family == "llava_next":  # tools/make_llava_next_fixtures.py
        out = model.model.get_image_features(pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"],
                                             vision_feature_layer=cfg.vision_feature_layer,
                                             vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    else:
        out = model.model.get_image_features(pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"],
                                             vision_feature_layer=cfg.vision_feature_layer,
                                             vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                             vision_aspect_ratio=cfg.vision_aspect_ratio,
                                             batch_num_images=batch.get("batch_num_images"))
    return torch.cat(list(out.pooler_output), dim=0)


@torch.no_grad()
def reference_case(family, model, processor, raw_tok, name, image_rel, prompt, fixtures: Path,
                   check_layout: bool = True):
    """The reference tensors of one case. ``check_layout=False`` skips OneVision's anyres bookkeeping, which
    calls transformers 5.24's image-processor internals (tools/make_saved_fixtures.py runs other versions)."""
    image_path = fixtures / "images" / image_rel if image_rel else None
    text, batch = mf.make_inputs(processor, image_path, prompt)
    ids = batch["input_ids"]
    S = ids.shape[1]
    cfg = model.config
    lm = model.model.language_model
    L = len(lm.layers)
    img_id = cfg.image_token_id
    n_img = int((ids[0] == img_id).sum())

    # the raw tokenizer.json (the Rust path: add_special_tokens=True) gives the processor's ids when fed the
    # processor's expanded text, and the transformers tokenizer agrees on the unexpanded prompt
    expanded = text.replace("<image>", "<image>" * n_img) if image_rel else text
    assert raw_tok.encode(expanded).ids == ids[0].tolist(), f"{name}: raw tokenizer.json differs"
    assert processor.tokenizer(text)["input_ids"] == raw_tok.encode(text).ids, name

    captured = {}

    def hook(_module, _args, output):
        captured["raw"] = (output[0] if isinstance(output, (tuple, list)) else output).detach().clone()

    handle = lm.layers[-1].register_forward_hook(hook)
    try:
        out = model(**batch, output_hidden_states=True, return_dict=True)
    finally:
        handle.remove()
    hs = torch.stack(out.hidden_states)[:, 0]  # [L+1, S, H]
    assert hs.shape[0] == L + 1
    raw = captured["raw"][0]
    torch.testing.assert_close(lm.norm(raw), hs[L], rtol=0, atol=1e-6)

    cand = [0, S // 2, S - 3, S - 2, S - 1]
    if n_img:
        cand.append(int((ids[0] == img_id).nonzero()[0, 0]))
    lens_pos = torch.tensor(sorted(set(p for p in cand if 0 <= p < S)), dtype=torch.int64)

    states = torch.cat([hs[:L], raw[None]])  # all pre-norm
    logp = torch.log_softmax(model.lm_head(lm.norm(states)).float(), dim=-1)  # [L+1, S, V]
    p = logp.exp()
    max_prob = p.max(-1).values
    entropy = -(p * logp).sum(-1)
    kl = (p[L] * (logp[L] - logp)).sum(-1)
    logits = out.logits[0, lens_pos].float()
    lens_logprobs = logp[:, lens_pos]
    torch.testing.assert_close(lens_logprobs[L], torch.log_softmax(logits, -1), rtol=0, atol=1e-5)
    top5_lp, top5 = lens_logprobs.topk(5, dim=-1)
    gap = float((top5_lp[..., :-1] - top5_lp[..., 1:]).min())
    assert gap > 1e-4, f"{name}: top-5 too close: {gap}"

    tensors = {
        "input_ids": ids[0].to(torch.int64),
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
    case = {"name": name, "image": f"images/{image_rel}" if image_rel else None, "prompt": prompt,
            "rendered_prompt": text, "num_tokens": S, "num_image_tokens": n_img, "image_sizes": None}
    if image_rel:
        feats = image_features_of(family, model, batch)
        assert feats.shape[0] == n_img, (feats.shape, n_img)
        assert torch.equal(feats, hs[0][ids[0] == img_id]), f"{name}: image features != hidden_states[0] rows"
        tensors["pixel_values"] = batch["pixel_values"].float()
        tensors["image_features"] = feats.float()
        with Image.open(image_path) as im:
            w, h = im.size
        case["image_sizes"] = [h, w]
        case["pixel_values_shape"] = list(batch["pixel_values"].shape)
        if family == "llava15":
            crop = cfg.vision_config.image_size
            g = clip_geometry(h, w, crop, crop)
            case["clip_resize"] = [g["resized_height"], g["resized_width"]]
            case["clip_crop_top_left"] = [g["crop_top"], g["crop_left"]]
            per_side = cfg.vision_config.image_size // cfg.vision_config.patch_size
            assert n_img == per_side ** 2, "LLaVA image tokens must be (image_size / patch_size)^2"
        else:
            assert batch["image_sizes"][0].tolist() == [h, w]
            tensors["image_sizes"] = batch["image_sizes"].to(torch.int64)
            tensors["num_image_tokens"] = torch.tensor([n_img], dtype=torch.int64)
        if family != "llava15" and check_layout:
            v = cfg.vision_config
            lay = onevision_layout(h, w, cfg.image_grid_pinpoints, v.image_size, (v.image_size // v.patch_size) ** 2)
            assert lay["num_image_tokens"] == n_img, (lay, n_img)
            assert lay["num_patches"] == batch["pixel_values"].shape[1]
            case["anyres"] = {k: lay[k] for k in ("best_resolution", "resized_for_patching", "padding_ltrb",
                                                  "tiles", "num_patches", "feature_grid", "unpad_axis",
                                                  "unpad_each_side", "unpadded_grid", "ratio", "downscaled",
                                                  "final_grid")}
    case["min_top5_gap_nats"] = round(gap, 6)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    meta = {"prompt": prompt, "image": f"images/{image_rel}" if image_rel else "", "rendered_prompt": text,
            **mf.versions()}
    stats = {"lens_positions": lens_pos.tolist(), "mean_max_prob": [round(x, 4) for x in max_prob.mean(-1).tolist()],
             "last_logits_std": round(float(logits.std()), 3),
             "top5_probs_last": [round(x, 4) for x in top5_lp[L, -1].exp().tolist()],
             "mean_kl_to_final": [round(x, 4) for x in kl.mean(-1).tolist()]}
    return tensors, meta, case, stats


# --------------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------------

def processor_report(processor) -> dict:
    ip = processor.image_processor
    return {"processor": type(processor).__name__, "image_processor": type(ip).__name__,
            "backend": getattr(ip, "backend", None), "tokenizer": type(processor.tokenizer).__name__}


def make_family(family: str, fixtures: Path):
    hub = fixtures / ("llava15-hub" if family == "llava15" else "onevision-hub")
    ref_dir = fixtures / "reference" / family
    for d in (hub, ref_dir):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    if family == "llava15":
        tok, cfg, model = build_checkpoint(family, hub, LLAVA_TINY, LLAVA_SEED, embed_std=0.5, n_shards=2)
        specials, cases_def = LLAMA_BASE_SPECIALS + LLAMA_ADDED, LLAVA_CASES
    else:
        tok, cfg, model = build_checkpoint(family, hub, ONEVISION_TINY, ONEVISION_SEED, embed_std=0.5, n_shards=1)
        specials, cases_def = mf.SPECIAL_TOKENS + ONEVISION_ADDED, ONEVISION_CASES
    processor = AutoProcessor.from_pretrained(str(hub))
    print(f"[{family}] tokenizer: {tok.get_vocab_size()} tokens, config vocab_size "
          f"{cfg['text_config']['vocab_size']}")
    print(f"[{family}] special token ids:", {t: tok.token_to_id(t) for t in specials})
    print(f"[{family}] config read as:", json.dumps(describe_config(model.config), default=str))
    print(f"[{family}] processor:", json.dumps(processor_report(processor)))
    raw_tok = Tokenizer.from_file(str(hub / "tokenizer.json"))
    # transformers 5.24 loads llava's tokenizer as TokenizersBackend (tokenizer.json verbatim: "llava" is in
    # MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS), while the class named in tokenizer_config.json rebuilds the
    # pipeline from vocab + merges; the fixture must give the same ids both ways (checked per case below).
    named_tok = (LlamaTokenizer if family == "llava15" else Qwen2Tokenizer).from_pretrained(str(hub))

    cases = []
    for name, image_rel, prompt in cases_def:
        tensors, meta, case, stats = reference_case(family, model, processor, raw_tok, name, image_rel, prompt,
                                                    fixtures)
        assert named_tok(case["rendered_prompt"])["input_ids"] == raw_tok.encode(case["rendered_prompt"]).ids
        mf.save_safetensors(tensors, ref_dir / f"{name}.safetensors", metadata=meta)
        cases.append(case)
        extra = case.get("anyres") or {k: case[k] for k in ("clip_resize", "clip_crop_top_left") if k in case}
        print(f"[{family}] case {name}: tokens {case['num_tokens']}, image tokens {case['num_image_tokens']}, "
              f"image_sizes {case['image_sizes']}, {json.dumps(extra)}, gap {case['min_top5_gap_nats']}, "
              f"{json.dumps(stats)}")
        if name == cases_def[0][0]:
            pieces = raw_tok.encode(case["rendered_prompt"]).tokens
            print(f"[{family}] rendered {case['rendered_prompt']!r} -> {pieces}")
    mf.write_json(ref_dir / "cases.json", cases)
    return hub, ref_dir, tok


def make_fixtures(fixtures: Path):
    torch.set_grad_enabled(False)
    img_dir = fixtures / "images"
    for fname, (w, h, seed) in {"square.png": (28, 28, 4), "wide.png": (44, 32, 5)}.items():
        mf.write_png(mf.scene(w, h, seed=seed), img_dir / fname)
    dirs = []
    for family in ("llava15", "onevision"):
        hub, ref_dir, tok = make_family(family, fixtures)
        dirs += [hub, ref_dir]
    mf.write_json(fixtures / "reference" / "llava15" / "resize.json", resize_table())
    counts = token_count_table(tok, AutoProcessor.from_pretrained(str(hub)))
    mf.write_json(fixtures / "reference" / "onevision" / "token_counts.json", counts)
    for scale in ("real", "fixture"):
        print(f"token counts ({scale} scale), (H, W) -> best resolution, unpadded grid, ratio, final grid, tokens:")
        for r in counts[scale]["rows"]:
            print(f"  ({r['height']}, {r['width']}) -> {r['best_resolution']}, {r['unpadded_grid']}, {r['ratio']}, "
                  f"{r['final_grid']}, {r['num_image_tokens']}")
    total = 0
    for d in dirs:
        total += mf.dir_size(d)
        print(f"{d}: {mf.dir_size(d) / 1024:.0f} KiB")
    print(f"total (new fixture dirs): {total / 1024:.0f} KiB")


def make_bench(out: Path):
    """Mid-size random checkpoints, hub layout, float16: DIR/llava15-mid and DIR/onevision-mid."""
    torch.set_grad_enabled(False)
    image = REPO / "bench" / "images" / "coco_640x480.png"  # made by make_fixtures.py (read only here)
    for family, size, seed, shards in (("llava15", LLAVA_MID, LLAVA_SEED + 1, 2),
                                       ("onevision", ONEVISION_MID, ONEVISION_SEED + 1, 1)):
        d = out / f"{family}-mid"
        if d.exists():
            shutil.rmtree(d)
        _, _, model = build_checkpoint(family, d, size, seed, embed_std=0.15, n_shards=shards)
        processor = AutoProcessor.from_pretrained(str(d))
        _, batch = mf.make_inputs(processor, image, "Color of the main object:")
        n_img = int((batch["input_ids"] == model.config.image_token_id).sum())
        print(f"bench checkpoint {d}: {mf.dir_size(d) / 2**20:.1f} MiB, seq_len {batch['input_ids'].shape[1]}, "
              f"image tokens {n_img}, pixel_values {list(batch['pixel_values'].shape)}", flush=True)
        del model


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures", help="fixtures directory")
    ap.add_argument("--bench", type=Path, default=None, metavar="DIR",
                    help="write DIR/llava15-mid and DIR/onevision-mid instead of the fixtures")
    a = ap.parse_args()
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    if a.bench is not None:
        make_bench(a.bench.resolve())
    else:
        make_fixtures(a.out.resolve())


if __name__ == "__main__":
    sys.exit(main())
