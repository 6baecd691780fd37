"""Tiny random reward models written in the published on-disk layouts, for tests and smoke runs.

Real reward weights are gigabytes; these writers build models of the SAME classes from tiny
configs (random weights) and save them the way their authors publish them, so the real loading
code is exercised end to end: a transformers CLIP folder (config.json, model.safetensors,
vocab.json, merges.txt, tokenizer_config.json, preprocessor_config.json), an HPS checkpoint
({"state_dict": open_clip state dict}) and a LAION aesthetic head state dict. The scores of these
models mean nothing.
"""

from __future__ import annotations

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
