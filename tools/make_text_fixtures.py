#!/usr/bin/env python3
"""Make the text-only causal-LM fixtures for logit-lens (family ``causal_lm``): Llama 3, Mistral, Qwen2(.5), Qwen3,
Gemma 2, Gemma 3.

For each architecture it writes, under tests/fixtures/:

* ``<arch>-hub/``  a tiny random checkpoint in the hub's file layout: a hand-written ``config.json`` with the
  hub's older spellings (``torch_dtype``, top-level ``rope_theta``, Llama 3.2's ``rope_scaling`` with
  ``rope_type: llama3``), bf16 weights under the hub names (``model.*``, ``lm_head.weight`` unless tied) in two
  shards with ``model.safetensors.index.json``, ``tokenizer.json``, ``tokenizer_config.json`` with the chat
  template inside, ``special_tokens_map.json``, ``generation_config.json``.
* ``<arch>-tf5/``  the same model as transformers 5.24's own ``save_pretrained`` and the tokenizer's
  ``save_pretrained`` write it (``rope_parameters``, ``dtype``, ``chat_template.jinja``, one
  ``model.safetensors``); nothing rewritten.
* ``reference/<arch>/<case>.safetensors`` + ``cases.json``  what transformers computes (float32, eager attention,
  CPU) from the hub copy: the tensors of reference/qwen2vl (input ids, every hidden state, the raw last layer, the
  lens log-probs at six positions, logits, max-prob / entropy / KL per position, top-5); the tf5 copy must give
  bit-identical hidden states and logits, so both share them. ``cases.json`` also holds each prompt's verbatim ids
  (``tokenizer(prompt)``, the tokenizer's own BOS) for ``chat_template: false``.

Input ids are ``tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
tokenize=True)`` (which adds no special tokens: the template writes BOS itself), checked against the raw
tokenizer.json on the rendered text.

Architectures (random weights as make_fixtures.py: linear N(0, 1/fan_in), biases N(0, 0.1), norm weights
U(0.5, 1.5), embeddings and an untied lm_head N(0, 0.5)):

| fixture | class | special | tokenizer | chat template |
|---|---|---|---|---|
| llama3 | LlamaForCausalLM | rope_type llama3 (factor 32, 8192), rope_theta 5e5, tied (as Llama 3.2 1B) | byte-level BPE with Llama 3's regex and specials, BOS by the post-processor | Meta-Llama-3-8B-Instruct's |
| mistral | MistralForCausalLM | sliding_window 16 (the hub's is 4096: 16 makes both cases, 20 and 29 tokens, and the generated tokens after them attend within it), GQA 4/2, untied | SentencePiece-style BPE (make_llava_fixtures.py's Llama tokenizer) | Mistral-7B-Instruct-v0.2's |
| qwen2 | Qwen2ForCausalLM | q/k/v biases, tied (as Qwen2.5 0.5B) | make_fixtures.py's Qwen2 BPE | Qwen2.5-Instruct's |
| qwen3 | Qwen3ForCausalLM | q/k RMSNorm per head, head_dim 24 != hidden/heads, `use_sliding_window` with sliding_window 16 from `max_window_layers` 1 on (the hub's Qwen3 has it off: on here, layer 0 full and layers 1–2 windowed, so the 22-token case and the generated tokens after the 13-token one attend within it), tied | Qwen2 BPE + `<think>` `</think>` (added, not special) | Qwen3's (namespace, reversed loop, enable_thinking) |
| gemma2 | Gemma2ForCausalLM | scaled embeddings, `1 + w` norms, sandwich norms, query_pre_attn_scalar 24 != head_dim 32, attention and final logit soft-capping (10 and 10: the hub's 50 and 30 barely touch a tiny random model's values, these do), sliding / full layers alternating, tied | Gemma-style BPE (`<pad>` `<eos>` `<bos>` `<unk>` `<mask>` 0–4, byte fallback, spaces as `▁`, no prefix space, BOS by the post-processor) + `<start_of_turn>` `<end_of_turn>` | gemma-2-it's |
| gemma3 | Gemma3ForCausalLM | Gemma 2's block without soft-capping, per-head q/k norms (`1 + w`), sliding layers with their own RoPE (`rope_local_base_freq` 10000) and the global layers with linear RoPE scaling ×8 (as Gemma 3 4B+), `sliding_window_pattern` 2 (so the 3 layers are sliding, global, sliding), sliding_window 16 (the hub's 512: the 24-token case and the generated tokens after the 15-token one attend within it), tied | as gemma2 | gemma-3-it's |

The chat templates are those models' templates as published, written here from memory (no network): what the
tests prove is that logit-lens renders a snapshot's own template as transformers does, whichever it is.

With ``--bench DIR`` it writes only ``DIR/qwen2-text-mid``, a mid-size random Qwen2.5-style checkpoint in the hub
layout for bench/cpu.sh (not committed): 8 layers, width 512, 8 heads / 2 KV heads, intermediate 1536, tied, and the
real 151936-row vocabulary (the small tokenizer's ids, the rest of the rows never produced but scored by the lens).
With ``--bench DIR --wide`` it writes only ``DIR/llama-wide``: 4 of LLaVA-1.5-7B's decoder blocks (width 4096, 32
heads and 32 KV heads of 128, intermediate 11008) and its 32064-row vocabulary, untied, for `generate`'s KV cache
(bench/README.md).

Run from the repository root (deterministic, a few seconds):

    ~/.venvs/tools/bin/python tools/make_text_fixtures.py
    ~/.venvs/tools/bin/python tools/make_text_fixtures.py --bench bench/checkpoints
    ~/.venvs/tools/bin/python tools/make_text_fixtures.py --bench bench/checkpoints --wide
"""
import argparse
import json
import os
import shutil
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402
import make_llava_fixtures as mlf  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers,  # noqa: E402
                        processors, trainers)
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

FIXTURES = mf.REPO / "tests" / "fixtures"
SEED = 7

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN3_ADDED = ["<think>", "</think>"]
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]  # ids 0-4 as in Gemma
GEMMA_ADDED = ["<start_of_turn>", "<end_of_turn>"]
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
QWEN3_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

CASES = [
    ("capital", "The capital of France is"),
    ("describe", "Describe the scene in detail: a red cube, a blue sphere."),
]
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)


# --------------------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------------------

def llama3_tokenizer() -> Tokenizer:
    """Byte-level BPE with Llama 3's pre-tokenizer regex; its special tokens after the BPE vocabulary; BOS
    (``<|begin_of_text|>``) prepended by a TemplateProcessing post-processor, as Meta-Llama-3's tokenizer.json."""
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=mf.BPE_VOCAB_SIZE, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(mf.CORPUS.splitlines(keepends=True) * 3, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIALS])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)]),
    ])
    return tok


def gemma_tokenizer() -> Tokenizer:
    """A small Gemma-style tokenizer, in the pipeline transformers 5's GemmaTokenizer builds from vocab and merges:
    normalizer Replace(" ", "▁") (no prefix space), pre-tokenizer Split(" ", merged_with_previous), BPE with byte
    fallback and fused unknowns, decoder Replace/ByteFallback/Fuse, a post-processor that prepends ``<bos>``.
    Vocabulary: Gemma's five specials at 0-4, the byte tokens, the trained pieces (words as ``▁word``; newlines by
    byte fallback), then ``<start_of_turn>`` and ``<end_of_turn>`` as added special tokens."""
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.normalizer = normalizers.Replace(" ", "▁")
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    trainer = trainers.BpeTrainer(vocab_size=500, min_frequency=1, show_progress=False, special_tokens=GEMMA_SPECIALS)
    lines = [line for line in mf.CORPUS.splitlines() if line.strip()] + ["user model", "Describe the scene."]
    trainer_tok.train_from_iterator(lines * 3, trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    vocab = {t: i for i, t in enumerate(GEMMA_SPECIALS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for t, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        if t not in vocab:
            vocab[t] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    bos = GEMMA_SPECIALS.index("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos>:0 $A:0", pair="<bos>:0 $A:0 <bos>:1 $B:1", special_tokens=[("<bos>", bos)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in GEMMA_SPECIALS + GEMMA_ADDED])
    for i, t in enumerate(GEMMA_SPECIALS):
        assert tok.token_to_id(t) == i, t
    return tok


def qwen_tokenizer(extra: list) -> Tokenizer:
    tok = mf.train_tokenizer()
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in extra])
    return tok


def tokenizer_config(tok: Tokenizer, specials: list, added: list, **fields) -> dict:
    dec = mlf.added_tokens_decoder(tok, specials)
    for t in added:
        dec[str(tok.token_to_id(t))] = {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                        "single_word": False, "special": False}
    return {"added_tokens_decoder": dict(sorted(dec.items(), key=lambda kv: int(kv[0]))),
            "clean_up_tokenization_spaces": False, **fields}


def tokenizer_json(tok: Tokenizer, added: list) -> str:
    tj = json.loads(tok.to_str())
    for a in tj["added_tokens"]:
        a.update(single_word=False, lstrip=False, rstrip=False, normalized=False, special=a["content"] not in added)
    return json.dumps(tj, ensure_ascii=False, indent=2)


def arch_specs():
    """arch -> (transformers class name, tokenizer, tokenizer_config, config fields, untied head)."""
    llama3 = llama3_tokenizer()
    mistral = mlf.train_llama_tokenizer()
    qwen2 = qwen_tokenizer([])
    qwen3 = qwen_tokenizer(QWEN3_ADDED)
    gemma = gemma_tokenizer()
    v = lambda tok: 64 * -(-tok.get_vocab_size() // 64)  # the vocabulary rounded up, as hub models pad it
    gemma_tok_cfg = lambda template: dict(
        add_bos_token=True, add_eos_token=False, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", chat_template=template, spaces_between_special_tokens=False,
        tokenizer_class="GemmaTokenizer", use_default_system_prompt=False, model_max_length=1000000000000000019884624838656)
    gemma_cfg = dict(vocab_size=v(gemma), bos_token_id=2, eos_token_id=1, pad_token_id=0, head_dim=32,
                     query_pre_attn_scalar=24, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
                     tie_word_embeddings=True, attention_bias=False)
    return {
        "llama3": dict(
            cls="LlamaForCausalLM", tok=llama3, added=[], specials=LLAMA3_SPECIALS,
            tok_cfg=dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", chat_template=LLAMA3_TEMPLATE,
                         model_input_names=["input_ids", "attention_mask"], model_max_length=131072,
                         tokenizer_class="PreTrainedTokenizerFast"),
            config=dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=v(llama3),
                        bos_token_id=llama3.token_to_id("<|begin_of_text|>"),
                        eos_token_id=llama3.token_to_id("<|eot_id|>"), rope_theta=500000.0,
                        rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                      "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
                        attention_bias=False, mlp_bias=False, head_dim=16, hidden_act="silu",
                        pretraining_tp=1)),
        "mistral": dict(
            cls="MistralForCausalLM", tok=mistral, added=[], specials=mlf.LLAMA_BASE_SPECIALS + mlf.LLAMA_ADDED,
            tok_cfg=dict(add_bos_token=True, add_eos_token=False, bos_token="<s>", eos_token="</s>",
                         unk_token="<unk>", legacy=False, chat_template=MISTRAL_TEMPLATE,
                         tokenizer_class="LlamaTokenizer", model_max_length=1000000000000000019884624838656),
            config=dict(model_type="mistral", architectures=["MistralForCausalLM"], vocab_size=v(mistral),
                        bos_token_id=1, eos_token_id=2, rope_theta=1000000.0, sliding_window=16,
                        max_position_embeddings=32768, rms_norm_eps=1e-5, tie_word_embeddings=False,
                        hidden_act="silu")),
        "qwen2": dict(
            cls="Qwen2ForCausalLM", tok=qwen2, added=[], specials=mf.SPECIAL_TOKENS,
            tok_cfg=dict(bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>", errors="replace",
                         chat_template=QWEN25_TEMPLATE, additional_special_tokens=mf.SPECIAL_TOKENS[1:],
                         split_special_tokens=False, tokenizer_class="Qwen2Tokenizer", model_max_length=131072),
            config=dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=v(qwen2),
                        bos_token_id=qwen2.token_to_id("<|endoftext|>"), eos_token_id=qwen2.token_to_id("<|im_end|>"),
                        rope_theta=1000000.0, sliding_window=32768, use_sliding_window=False, max_window_layers=21,
                        max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
                        hidden_act="silu")),
        "qwen3": dict(
            cls="Qwen3ForCausalLM", tok=qwen3, added=QWEN3_ADDED, specials=mf.SPECIAL_TOKENS,
            tok_cfg=dict(bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>", errors="replace",
                         chat_template=QWEN3_TEMPLATE, additional_special_tokens=mf.SPECIAL_TOKENS[1:],
                         split_special_tokens=False, tokenizer_class="Qwen2Tokenizer", model_max_length=131072),
            config=dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=v(qwen3),
                        bos_token_id=qwen3.token_to_id("<|endoftext|>"), eos_token_id=qwen3.token_to_id("<|im_end|>"),
                        head_dim=24, rope_theta=1000000.0, sliding_window=16, use_sliding_window=True,
                        max_window_layers=1, attention_bias=False, max_position_embeddings=40960,
                        rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu")),
        "gemma2": dict(
            cls="Gemma2ForCausalLM", tok=gemma, added=[], specials=GEMMA_SPECIALS + GEMMA_ADDED,
            tok_cfg=gemma_tok_cfg(GEMMA2_TEMPLATE), eos_extra="<end_of_turn>", embed_std=0.2,
            config=dict(gemma_cfg, model_type="gemma2", architectures=["Gemma2ForCausalLM"], hidden_act="gelu_pytorch_tanh",
                        rope_theta=10000.0, sliding_window=4096, max_position_embeddings=8192,
                        attn_logit_softcapping=10.0, final_logit_softcapping=10.0, cache_implementation="hybrid")),
        "gemma3": dict(
            cls="Gemma3ForCausalLM", tok=gemma, added=[], specials=GEMMA_SPECIALS + GEMMA_ADDED,
            tok_cfg=gemma_tok_cfg(GEMMA3_TEMPLATE), eos_extra="<end_of_turn>", embed_std=0.2,
            config=dict(gemma_cfg, model_type="gemma3_text", architectures=["Gemma3ForCausalLM"],
                        rope_theta=1000000.0, rope_local_base_freq=10000.0,
                        rope_scaling={"rope_type": "linear", "factor": 8.0}, sliding_window=16,
                        sliding_window_pattern=2, max_position_embeddings=32768, attn_logit_softcapping=None,
                        final_logit_softcapping=None, cache_implementation="hybrid")),
    }


# --------------------------------------------------------------------------------------------------------------
# Checkpoints and references
# --------------------------------------------------------------------------------------------------------------

def write_hub(arch: str, spec: dict, out: Path, sizes: dict = TINY, embed_std: float = 0.5):
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tok, added = spec["tok"], spec["added"]
    (out / "tokenizer.json").write_text(tokenizer_json(tok, added), encoding="utf-8")
    mf.write_json(out / "tokenizer_config.json", tokenizer_config(tok, spec["specials"], added, **spec["tok_cfg"]))
    tc = spec["tok_cfg"]
    mf.write_json(out / "special_tokens_map.json",
                  {k: tc[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if tc.get(k)})
    cfg = dict(spec["config"], **sizes, torch_dtype="bfloat16", transformers_version="4.45.0", use_cache=True,
               attention_dropout=0.0, initializer_range=0.02)
    mf.write_json(out / "config.json", dict(sorted(cfg.items())))
    eos = cfg["eos_token_id"]
    if spec.get("eos_extra"):  # Gemma's instruction models stop on <end_of_turn> too
        eos = [eos, tok.token_to_id(spec["eos_extra"])]
    mf.write_json(out / "generation_config.json",
                  {"bos_token_id": cfg["bos_token_id"], "eos_token_id": eos, "do_sample": False,
                   "transformers_version": "4.45.0"})
    config = transformers.AutoConfig.from_pretrained(str(out))
    model = getattr(transformers, spec["cls"])(config)
    mf.randomize(model, SEED, embed_std=embed_std)
    if not config.tie_word_embeddings:
        # An untied head drawn like a linear layer (std 1/sqrt(hidden)) gives near-uniform logits over the
        # vocabulary; drawn like the embeddings, the lens is as informative as the tied models'.
        g = torch.Generator().manual_seed(SEED + 1)
        model.lm_head.weight.copy_(torch.randn(model.lm_head.weight.shape, generator=g) * 0.5)
    if config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    sd = {n: t.detach().to(torch.bfloat16).contiguous().clone() for n, t in model.state_dict().items()
          if not (config.tie_word_embeddings and n == "lm_head.weight")}
    names = sorted(sd)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate([names[:half], names[half:]]):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        mf.save_safetensors({n: sd[n] for n in part}, out / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    mf.write_json(out / "model.safetensors.index.json",
                  {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})


def load(path: Path):
    model, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager",
                                                       output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"loading {path}: {bad}"
    return model.eval()


@torch.no_grad()
def reference_case(model, tok, raw_tok: Tokenizer, name: str, prompt: str):
    messages = [{"role": "user", "content": prompt}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    ids = list(ids[0] if ids and isinstance(ids[0], list) else ids)
    # What logit-lens does: the rendered text through tokenizer.json without added special tokens.
    assert raw_tok.encode(text, add_special_tokens=False).ids == ids, f"{name}: raw tokenizer.json differs"
    verbatim = tok(prompt)["input_ids"]
    assert raw_tok.encode(prompt).ids == verbatim, f"{name}: verbatim ids differ"
    input_ids = torch.tensor([ids])
    S = input_ids.shape[1]
    lm = model.model
    L = len(lm.layers)
    captured = {}

    def hook(_module, _args, output):
        captured["raw"] = (output[0] if isinstance(output, (tuple, list)) else output).detach().clone()

    handle = lm.layers[-1].register_forward_hook(hook)
    try:
        out = model(input_ids=input_ids, output_hidden_states=True, return_dict=True)
    finally:
        handle.remove()
    hs = torch.stack(out.hidden_states)[:, 0]
    raw = captured["raw"][0]
    torch.testing.assert_close(lm.norm(raw), hs[L], rtol=0, atol=1e-6)
    lens_pos = torch.tensor(sorted({0, S // 2, S - 3, S - 2, S - 1}), dtype=torch.int64)
    states = torch.cat([hs[:L], raw[None]])
    z = model.lm_head(lm.norm(states))
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is not None:  # the model's own read-out caps its logits (Gemma 2): the lens does too
        z = torch.tanh(z / cap) * cap
    logp = torch.log_softmax(z.float(), dim=-1)
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
        "input_ids": input_ids[0].to(torch.int64), "hidden_states": hs.float(), "last_layer_raw": raw.float(),
        "lens_positions": lens_pos, "lens_logprobs": lens_logprobs.float(), "logits": logits,
        "lens_max_prob": max_prob.float(), "lens_entropy": entropy.float(), "lens_kl_to_final": kl.float(),
        "mean_max_prob": max_prob.mean(-1).float(), "top5_ids": top5.to(torch.int64),
    }
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    case = {"name": name, "image": None, "prompt": prompt, "rendered_prompt": text, "num_tokens": S,
            "num_image_tokens": 0, "image_grid_thw": None, "verbatim_ids": list(verbatim),
            "min_top5_gap_nats": round(gap, 6)}
    meta = {"prompt": prompt, "image": "", "rendered_prompt": text, **mf.versions()}
    stats = {"mean_max_prob": [round(x, 4) for x in max_prob.mean(-1).tolist()],
             "top5_probs_last": [round(x, 4) for x in top5_lp[L, -1].exp().tolist()]}
    return tensors, meta, case, stats, out.logits


BENCH = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=2)
# LLaVA-1.5-7B's decoder blocks (full multi-head attention: a token's keys and values are 512 KiB in f32 over
# 32 blocks, 64 KiB a block), 4 of them: where a generation step's KV cache traffic shows.
WIDE = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=4, num_attention_heads=32,
            num_key_value_heads=32)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", type=Path, help="write DIR/qwen2-text-mid instead of the fixtures")
    ap.add_argument("--wide", action="store_true", help="with --bench: write DIR/llama-wide instead")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    if a.bench and a.wide:
        spec = arch_specs()["mistral"]
        spec["config"] = dict(spec["config"], vocab_size=32064, sliding_window=None, head_dim=128)
        out = a.bench / "llama-wide"
        write_hub("mistral", spec, out, sizes=WIDE, embed_std=0.15)
        print(f"{out}: {mf.dir_size(out) / 2**20:.0f} MiB")
        return
    if a.bench:
        spec = arch_specs()["qwen2"]
        spec["config"] = dict(spec["config"], vocab_size=151936)
        out = a.bench / "qwen2-text-mid"
        write_hub("qwen2", spec, out, sizes=BENCH, embed_std=0.15)
        print(f"{out}: {mf.dir_size(out) / 2**20:.0f} MiB")
        return
    for arch, spec in arch_specs().items():
        hub, tf5, ref_dir = FIXTURES / f"{arch}-hub", FIXTURES / f"{arch}-tf5", FIXTURES / "reference" / arch
        write_hub(arch, spec, hub, embed_std=spec.get("embed_std", 0.5))
        model = load(hub)
        tok = AutoTokenizer.from_pretrained(str(hub))
        # transformers 5's own save of what it loaded
        if tf5.exists():
            shutil.rmtree(tf5)
        model.to(torch.bfloat16).save_pretrained(str(tf5))
        tok.save_pretrained(str(tf5))
        model = load(hub)
        tf5_model, tf5_tok = load(tf5), AutoTokenizer.from_pretrained(str(tf5))
        if ref_dir.exists():
            shutil.rmtree(ref_dir)
        ref_dir.mkdir(parents=True)
        raw_tok = Tokenizer.from_file(str(hub / "tokenizer.json"))
        raw_tf5 = Tokenizer.from_file(str(tf5 / "tokenizer.json"))
        cases = []
        for name, prompt in CASES:
            tensors, meta, case, stats, logits = reference_case(model, tok, raw_tok, name, prompt)
            t2, _, case2, _, logits2 = reference_case(tf5_model, tf5_tok, raw_tf5, name, prompt)
            assert case2["rendered_prompt"] == case["rendered_prompt"], (arch, name)
            assert torch.equal(t2["hidden_states"], tensors["hidden_states"]) and torch.equal(logits2, logits), \
                f"{arch}/{name}: the tf5 copy computes different numbers"
            mf.save_safetensors(tensors, ref_dir / f"{name}.safetensors", metadata=meta)
            cases.append(case)
            print(f"[{arch}] {name}: {case['num_tokens']} tokens {case['rendered_prompt']!r}; "
                  f"gap {case['min_top5_gap_nats']}; {json.dumps(stats)}")
        mf.write_json(ref_dir / "cases.json", cases)
        print(f"[{arch}] hub {sorted(p.name for p in hub.iterdir())}")
        print(f"[{arch}] tf5 {sorted(p.name for p in tf5.iterdir())}")


if __name__ == "__main__":
    main()
