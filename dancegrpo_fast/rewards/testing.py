"""Tiny random reward models written in the published on-disk layouts, for tests and smoke runs.

Real reward weights are gigabytes; these writers build models of the SAME classes from tiny
configs (random weights) and save them the way their authors publish them, so the real loading
code is exercised end to end: a transformers CLIP folder (config.json, model.safetensors,
vocab.json, merges.txt, tokenizer_config.json, preprocessor_config.json), an HPS checkpoint
({"state_dict": open_clip state dict}) and a LAION aesthetic head state dict. The scores of these
models mean nothing.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Dict, Iterable, Optional, Tuple

import torch

from .clip_models import AestheticHead
from .hps import OpenCLIPConfig, OpenCLIPModel
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

__all__ = [
    "write_tiny_clip_tokenizer",
    "write_tiny_clip_folder",
    "write_tiny_preprocessor_config",
    "hf_clip_to_open_clip_state_dict",
    "tiny_open_clip_config",
    "write_tiny_hps_checkpoint",
    "write_tiny_aesthetic_head",
    "write_tiny_qwen2_tokenizer",
    "write_tiny_videoalign",
]

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# A few English merges, enough for short prompts to become multi-character tokens.
_MERGES = [("t", "h"), ("th", "e</w>"), ("o", "n"), ("i", "n"), ("e", "r"), ("a", "t"),
           ("o", "f</w>"), ("a", "n"), ("an", "d</w>"), ("c", "a"), ("ca", "t</w>"), ("d", "o"),
           ("do", "g</w>"), ("r", "e"), ("e", "d</w>"), ("i", "s</w>")]


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map (BPE works on these characters)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def write_tiny_clip_tokenizer(path: str, model_max_length: int = 77) -> Tuple[int, int, int]:
    """Write a CLIP BPE tokenizer (vocab.json, merges.txt, tokenizer_config.json,
    special_tokens_map.json) with CLIP's structure: 256 byte tokens, the same with the
    end-of-word mark, a few merges, then <|startoftext|> and <|endoftext|> as the two largest ids.
    Returns (vocab_size, bos_id, eos_id)."""
    os.makedirs(path, exist_ok=True)
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(pair) for pair in _MERGES] + [BOS, EOS]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    with open(os.path.join(path, "vocab.json"), "w") as handle:
        json.dump(vocab, handle)
    with open(os.path.join(path, "merges.txt"), "w") as handle:
        handle.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _MERGES))
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    with open(os.path.join(path, "tokenizer_config.json"), "w") as handle:
        json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length,
                   "do_lower_case": True, "errors": "replace", **specials}, handle)
    with open(os.path.join(path, "special_tokens_map.json"), "w") as handle:
        json.dump(specials, handle)
    return len(vocab), vocab[BOS], vocab[EOS]


def write_tiny_preprocessor_config(path: str, image_size: int, legacy_ints: bool = False) -> None:
    """CLIPImageProcessor's preprocessor_config.json (openai's older int form with legacy_ints)."""
    size = image_size if legacy_ints else {"shortest_edge": image_size}
    crop = image_size if legacy_ints else {"height": image_size, "width": image_size}
    config = {"crop_size": crop, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
              "do_rescale": True, "do_resize": True, "image_mean": list(OPENAI_CLIP_MEAN),
              "image_processor_type": "CLIPImageProcessor", "image_std": list(OPENAI_CLIP_STD),
              "resample": 3, "rescale_factor": 1 / 255, "size": size}
    with open(os.path.join(path, "preprocessor_config.json"), "w") as handle:
        json.dump(config, handle, indent=2)


def write_tiny_clip_folder(path: str, seed: int = 0, image_size: int = 32, projection_dim: int = 16,
                           hidden_act: str = "gelu", with_processor: bool = True, legacy_ints: bool = False):
    """Save a tiny random transformers CLIPModel (plus tokenizer and preprocessor config when
    with_processor) to `path`, as openai/clip-vit-large-patch14 is laid out. Returns the model."""
    from transformers import CLIPConfig, CLIPModel

    os.makedirs(path, exist_ok=True)
    vocab_size, bos_id, eos_id = write_tiny_clip_tokenizer(path)
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=bos_id,
                         eos_token_id=eos_id, pad_token_id=eos_id, hidden_act=hidden_act),
        vision_config=dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, hidden_act=hidden_act),
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    model.save_pretrained(path)
    if not with_processor:
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
            if os.path.exists(os.path.join(path, name)):
                os.remove(os.path.join(path, name))
    else:
        write_tiny_preprocessor_config(path, image_size, legacy_ints)
    return model


def hf_clip_to_open_clip_state_dict(model) -> Dict[str, torch.Tensor]:
    """A transformers CLIPModel's weights under open_clip's keys (the inverse of transformers'
    open_clip conversion): q/k/v projections concatenated into `in_proj_*`, projections
    transposed into `proj` / `text_projection`."""
    source = model.state_dict()
    state: Dict[str, torch.Tensor] = {}

    def block(prefix_from: str, prefix_to: str, layers: int) -> None:
        for i in range(layers):
            src, dst = f"{prefix_from}.encoder.layers.{i}", f"{prefix_to}.resblocks.{i}"
            for part in ("weight", "bias"):
                state[f"{dst}.ln_1.{part}"] = source[f"{src}.layer_norm1.{part}"]
                state[f"{dst}.ln_2.{part}"] = source[f"{src}.layer_norm2.{part}"]
                state[f"{dst}.attn.in_proj_{part}"] = torch.cat(
                    [source[f"{src}.self_attn.{p}_proj.{part}"] for p in ("q", "k", "v")])
                state[f"{dst}.attn.out_proj.{part}"] = source[f"{src}.self_attn.out_proj.{part}"]
                state[f"{dst}.mlp.c_fc.{part}"] = source[f"{src}.mlp.fc1.{part}"]
                state[f"{dst}.mlp.c_proj.{part}"] = source[f"{src}.mlp.fc2.{part}"]

    vision = "vision_model"
    state["visual.conv1.weight"] = source[f"{vision}.embeddings.patch_embedding.weight"]
    state["visual.class_embedding"] = source[f"{vision}.embeddings.class_embedding"]
    state["visual.positional_embedding"] = source[f"{vision}.embeddings.position_embedding.weight"]
    for part in ("weight", "bias"):
        state[f"visual.ln_pre.{part}"] = source[f"{vision}.pre_layrnorm.{part}"]
        state[f"visual.ln_post.{part}"] = source[f"{vision}.post_layernorm.{part}"]
        state[f"ln_final.{part}"] = source[f"text_model.final_layer_norm.{part}"]
    block(vision, "visual.transformer", model.config.vision_config.num_hidden_layers)
    state["visual.proj"] = source["visual_projection.weight"].T.contiguous()
    state["token_embedding.weight"] = source["text_model.embeddings.token_embedding.weight"]
    state["positional_embedding"] = source["text_model.embeddings.position_embedding.weight"]
    block("text_model", "transformer", model.config.text_config.num_hidden_layers)
    state["text_projection"] = source["text_projection.weight"].T.contiguous()
    state["logit_scale"] = source["logit_scale"]
    return {key: value.clone() for key, value in state.items()}


def tiny_open_clip_config(vocab_size: int, image_size: int = 32, embed_dim: int = 16) -> Dict:
    """A tiny open_clip model config (open_clip's JSON format) matching write_tiny_clip_folder."""
    return {"embed_dim": embed_dim, "quick_gelu": False,
            "vision_cfg": {"image_size": image_size, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8,
                           "mlp_ratio": 2.0},
            "text_cfg": {"context_length": 77, "vocab_size": vocab_size, "width": 32, "heads": 2, "layers": 2,
                         "mlp_ratio": 2.0}}


def write_tiny_hps_checkpoint(path: str, vocab_size: int, seed: int = 0, image_size: int = 32,
                              state_dict: Optional[Dict[str, torch.Tensor]] = None) -> Dict:
    """Save {"state_dict": open_clip state dict} to `path` (the HPS_v2.1_compressed.pt layout),
    from `state_dict` or a tiny random OpenCLIPModel. Returns the open_clip config dict used."""
    config = tiny_open_clip_config(vocab_size, image_size)
    if state_dict is None:
        torch.manual_seed(seed)
        state_dict = OpenCLIPModel(OpenCLIPConfig.from_open_clip_dict(config)).state_dict()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({"epoch": 1, "name": "tiny", "state_dict": dict(state_dict)}, path)
    return config


def write_tiny_aesthetic_head(path: str, input_dim: int, linear: bool = False, seed: int = 0,
                              hidden: Iterable[int] = (1024, 128, 64, 16)) -> AestheticHead:
    """Save a random LAION aesthetic head state dict (MLP `layers.N.*`, or linear `weight`/`bias`)."""
    torch.manual_seed(seed)
    head = AestheticHead(input_dim, hidden=() if linear else tuple(hidden)).eval()
    torch.save(head.state_dict_in_published_layout(), path)
    return head


# ----------------------------------------------------------------------------------------------
# VideoAlign (KwaiVGI/VideoReward)

# Qwen2-VL-2B-Instruct's chat template (its tokenizer_config.json / chat_template.json).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
QWEN2_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                        "<|image_pad|>", "<|video_pad|>")
VIDEOALIGN_REWARD_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
@functools.lru_cache(maxsize=4)
def _train_byte_merges(text: str, count: int) -> tuple:
    """`count` byte-level BPE merges learnt greedily from `text` (GPT-2-style words with their
    leading space), so a tiny tokenizer cuts a long prompt into few tokens."""
    import re
    from collections import Counter

    byte_map = _bytes_to_unicode()
    words = Counter(tuple(byte_map[b] for b in word.encode("utf-8"))
                    for word in re.findall(r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+", text))
    merges = []
    for _ in range(count):
        pairs = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs.items(), key=lambda item: (item[1], item[0]))[0]
        merges.append(best)
        merged = Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return tuple(merges)


def write_tiny_qwen2_tokenizer(path: str, reward_tokens: bool = True, merges_from: str = "", merges: int = 0):
    """A Qwen2 byte-level BPE tokenizer (256 byte tokens, `merges` merges learnt from the text
    `merges_from`, Qwen2-VL's special tokens and, with `reward_tokens`, VideoAlign's three added
    reward tokens) with Qwen2-VL's chat template, saved with save_pretrained. Returns the tokenizer."""
    from transformers import Qwen2Tokenizer

    os.makedirs(path, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    merges = list(_train_byte_merges(merges_from, merges)) if merges else []
    tokens = chars + ["".join(pair) for pair in merges]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", model_max_length=32768)
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN2_SPECIAL_TOKENS[1:])})
    tokenizer.add_tokens(["<|endoftext|>"], special_tokens=True)
    if reward_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(VIDEOALIGN_REWARD_TOKENS)},
                                     replace_extra_special_tokens=False)
    tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
    tokenizer.padding_side = "right"
    tokenizer.save_pretrained(path)
    return tokenizer


def tiny_qwen2_vl_config_dict(vocab_size: int, ids: Dict[str, int], hidden: int = 32, layers: int = 2,
                              vision_depth: int = 2) -> Dict:
    """A Qwen2-VL config.json in the published (pre-transformers-5, flat) layout of
    Qwen/Qwen2-VL-2B-Instruct, with tiny sizes."""
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
        "attention_dropout": 0.0, "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|image_pad|>"], "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"], "hidden_act": "silu", "hidden_size": hidden,
        "initializer_range": 0.02, "intermediate_size": 2 * hidden, "max_position_embeddings": 32768,
        "max_window_layers": layers, "num_attention_heads": 4, "num_hidden_layers": layers,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "sliding_window": 32768,
        "tie_word_embeddings": True, "torch_dtype": "float32", "use_cache": True, "use_sliding_window": False,
        "vision_config": {"depth": vision_depth, "embed_dim": 32, "mlp_ratio": 2, "num_heads": 4, "in_chans": 3,
                          "hidden_size": hidden, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
                          "temporal_patch_size": 2},
        "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
        "vocab_size": vocab_size,
    }


QWEN2_VL_PREPROCESSOR = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD),
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
}

VIDEOALIGN_LLM_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def write_tiny_videoalign(root: str, base_path: str, seed: int = 0, output_dim: int = 1, step: int = 12,
                          lora_r: int = 4, lora_alpha: int = 8,
                          inference_config: Optional[Dict[str, float]] = None) -> Dict[str, str]:
    """A tiny random VideoReward in the published layout, beside a tiny base Qwen2-VL folder:

        base_path/config.json, preprocessor_config.json     (Qwen/Qwen2-VL-2B-Instruct's files)
        root/model_config.json                              (data/model/peft/inference sections)
        root/checkpoint-<step>/model.pth                    (the PEFT-wrapped model's state dict in
                                                             transformers 4.45 names: base_model.model.
                                                             {visual.*, model.*, lm_head.*, rm_head.*},
                                                             LoRA on every LLM linear, random A and B)
        root/checkpoint-<step>/tokenizer/                   (Qwen2 tokenizer + the reward tokens)

    Returns the paths {"root", "base", "weights", "tokenizer"}."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    os.makedirs(base_path, exist_ok=True)
    checkpoint = os.path.join(root, f"checkpoint-{step}")
    from .videoalign import DETAILED_SPECIAL_TEMPLATE

    tokenizer = write_tiny_qwen2_tokenizer(os.path.join(checkpoint, "tokenizer"), merges_from=DETAILED_SPECIAL_TEMPLATE,
                                           merges=1500)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN2_SPECIAL_TOKENS}
    base_vocab = len(tokenizer) - len(VIDEOALIGN_REWARD_TOKENS) + 5  # the base has unused rows, as Qwen2-VL has
    config_dict = tiny_qwen2_vl_config_dict(base_vocab, ids)
    with open(os.path.join(base_path, "config.json"), "w") as handle:
        json.dump(config_dict, handle, indent=2)
    with open(os.path.join(base_path, "preprocessor_config.json"), "w") as handle:
        json.dump(QWEN2_VL_PREPROCESSOR, handle, indent=2)

    torch.manual_seed(seed)
    config = Qwen2VLConfig.from_pretrained(base_path)
    config.text_config.vocab_size = len(tokenizer)  # the trainer's resize_token_embeddings
    model = Qwen2VLForConditionalGeneration(config)
    hidden = config.text_config.hidden_size
    state: Dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key.startswith("model.visual."):
            key = "visual." + key[len("model.visual."):]
        elif key.startswith("model.language_model."):
            key = "model." + key[len("model.language_model."):]
        value = value.clone()
        module = key.rsplit(".", 1)[0]
        if key.startswith("model.layers.") and module.split(".", 3)[3] in VIDEOALIGN_LLM_LINEARS:
            key = f"{module}.base_layer.{key.rsplit('.', 1)[1]}"
            if key.endswith(".weight"):
                out_features, in_features = value.shape
                state[f"base_model.model.{module}.lora_A.default.weight"] = torch.randn(lora_r, in_features) * 0.2
                state[f"base_model.model.{module}.lora_B.default.weight"] = torch.randn(out_features, lora_r) * 0.2
        state["base_model.model." + key] = value
    state["base_model.model.rm_head.weight"] = torch.randn(output_dim, hidden) * hidden ** -0.5
    torch.save(state, os.path.join(checkpoint, "model.pth"))

    if inference_config is None:
        inference_config = {"VQ_mean": 0.5, "VQ_std": 2.0, "MQ_mean": -1.0, "MQ_std": 0.5, "TA_mean": 0.25, "TA_std": 4.0}
    model_config = {
        "data_config": {"max_frame_pixels": 200704, "num_frames": None, "fps": 2.0, "p_shuffle_frames": 0.0,
                        "p_color_jitter": 0.0, "eval_dim": ["VQ", "MQ", "TA"],
                        "prompt_template_type": "detailed_special", "add_noise": False, "sample_type": "uniform",
                        "use_tied_data": True},
        "training_args": {"output_dir": "rm_output", "bf16": True},
        "model_config": {"model_name_or_path": "Qwen/Qwen2-VL-2B-Instruct", "model_revision": "main",
                         "output_dim": output_dim, "use_special_tokens": True, "freeze_vision_tower": False,
                         "freeze_llm": False, "tune_merger": True, "torch_dtype": "bfloat16",
                         "reward_token": "special", "loss_type": "btt"},
        "peft_lora_config": {"lora_enable": True, "vision_lora": False, "lora_r": lora_r, "lora_alpha": lora_alpha,
                             "lora_dropout": 0.05, "lora_target_modules": None,
                             "lora_namespan_exclude": ["lm_head", "rm_head", "embed_tokens", "visual"],
                             "lora_modules_to_save": None, "lora_task_type": "CAUSAL_LM", "use_rslora": False,
                             "num_lora_modules": -1},
        "inference_config": inference_config,
    }
    with open(os.path.join(root, "model_config.json"), "w") as handle:
        json.dump(model_config, handle, indent=2)
    return {"root": root, "base": base_path, "weights": os.path.join(checkpoint, "model.pth"),
            "tokenizer": os.path.join(checkpoint, "tokenizer")}
