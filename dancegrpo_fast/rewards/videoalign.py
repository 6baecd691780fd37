"""VideoAlign's VideoReward (Liu et al. 2025) as a video reward: visual quality (VQ), motion
quality (MQ) and text alignment (TA), the video reward DanceGRPO trains HunyuanVideo with.

The published model (huggingface.co/KwaiVGI/VideoReward, code github.com/KwaiVGI/VideoAlign) is
Qwen2-VL-2B-Instruct fine-tuned with LoRA, plus a bias-free linear reward head `rm_head` on the
last hidden states. Its prompt (the "detailed_special" template) holds three added tokens,
<|VQ_reward|>, <|MQ_reward|> and <|TA_reward|>; the head's output at each of them is that
criterion's raw score. The published inference then standardises each score with the mean/std in
`model_config.json` ("inference_config") and reports Overall = VQ + MQ + TA.

Published layout (what `checkpoint_path` points at):

    VideoReward/
      model_config.json                 data_config (fps, max_frame_pixels, prompt_template_type,
                                        eval_dim), model_config (model_name_or_path, output_dim,
                                        use_special_tokens, reward_token), peft_lora_config
                                        (lora_r, lora_alpha, use_rslora), inference_config
                                        (VQ_mean, VQ_std, MQ_mean, ...)
      checkpoint-<step>/model.pth       the whole PEFT-wrapped model's state dict:
                                        base_model.model.{visual.*, model.*, lm_head.*, rm_head.*},
                                        LoRA layers as <name>.base_layer.* + <name>.lora_{A,B}.default.*
      checkpoint-<step>/tokenizer/      Qwen2 tokenizer with the three reward tokens added

plus the base model's folder (`base_model_path`, Qwen/Qwen2-VL-2B-Instruct) for its config.json
(the architecture) and preprocessor_config.json (patch sizes, mean/std); its weights are not read,
model.pth holds them all. LoRA is merged into the base weights on loading (W + s * B @ A with
s = lora_alpha / lora_r, or / sqrt(lora_r) with rslora), so scoring runs plain transformers
Qwen2VLModel layers, without peft.

Videos are scored as the published inference reads an mp4 of them: frames sampled uniformly at
`fps` (2) from a clip of `video_fps` frames per second (at least 4, an even count), each frame
resized so its area lies in [128*28*28, max_frame_pixels] with sides multiples of 28 (bicubic,
antialiased, on 8-bit values), then normalised and cut into Qwen2-VL's patches, all in torch and
batched. Every video is scored against its own prompt.
"""

from __future__ import annotations

import glob
import inspect
import json
import math
import os
import re
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Reward, register_reward, validate_inputs
from .clip_models import read_state_dict, resolve_dtype

__all__ = ["VideoAlignReward", "VideoAlignModel", "VideoAlignLayout", "load_videoalign", "read_layout",
           "convert_checkpoint", "read_reward_tokens", "smart_resize", "sample_frame_indices", "patchify",
           "build_prompt", "DIMENSIONS", "REWARD_TOKENS"]

DIMENSIONS = ("VQ", "MQ", "TA")
REWARD_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
CRITERIA = DIMENSIONS + ("Overall",)

# qwen-vl-utils' video constants, as VideoAlign's vision_process.py uses them.
IMAGE_FACTOR = 28
VIDEO_MIN_PIXELS = 128 * 28 * 28
FRAME_FACTOR = 2
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
MAX_RATIO = 200

# The "detailed_special" prompt of VideoAlign's prompt_template.py, character for character (the
# model was trained on exactly this text; the trailing double spaces are part of it).
DETAILED_SPECIAL_TEMPLATE = """
You are tasked with evaluating a generated video based on three distinct criteria: Visual Quality, Motion Quality, and Text Alignment. Please provide a rating from 0 to 10 for each of the three categories, with 0 being the worst and 10 being the best. Each evaluation should be independent of the others.

**Visual Quality:**  
Evaluate the overall visual quality of the video, with a focus on static factors. The following sub-dimensions should be considered:
- **Reasonableness:** The video should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the video. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the video, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The video should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. 

Please provide the ratings of Visual Quality: <|VQ_reward|>
END

**Motion Quality:**  
Assess the dynamic aspects of the video, with a focus on dynamic factors. Consider the following sub-dimensions:
- **Stability:** Evaluate the continuity and stability between frames. There should be no sudden, unnatural jumps, and the video should maintain stable attributes (e.g., no fluctuating colors, textures, or missing body parts).
- **Naturalness:** The movement should align with physical laws and be realistic. For example, clothing should flow naturally with motion, and facial expressions should change appropriately (e.g., blinking, mouth movements).
- **Aesthetic Quality:** The movement should be smooth and fluid. The transitions between different motions or camera angles should be seamless, and the overall dynamic feel should be visually pleasing.
- **Fusion:** Ensure that elements in motion (e.g., edges of the subject, hair, clothing) blend naturally with the background, without obvious artifacts or the feeling of cut-and-paste effects.
- **Clarity of Motion:** The video should be clear and smooth in motion. Pay attention to any areas where the video might have blurry or unsteady sections that hinder visual continuity.
- **Amplitude:** If the video is largely static or has little movement, assign a low score for motion quality.

Please provide the ratings of Motion Quality: <|MQ_reward|>
END

**Text Alignment:**  
Assess how well the video matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the video (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Motion Relevance:** Evaluate if the dynamic actions (e.g., gestures, posture, facial expressions like talking or blinking) align with the described prompt. The motion should match the prompt in terms of type, scale, and direction.
- **Environment Relevance:** Assess whether the background and scene fit the prompt. This includes checking if real-world locations or scenes are accurately represented, though some stylistic adaptation is acceptable.  
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the video adheres to this style.
- **Camera Movement Relevance:** Check if the camera movements (e.g., following the subject, focus shifts) are consistent with the expected behavior from the prompt.

Textual prompt - {text_prompt}
Please provide the ratings of Text Alignment: <|TA_reward|>
END
"""


def build_prompt(prompt: str) -> str:
    """The text VideoReward reads for `prompt` (str.format, as VideoAlign does)."""
    return DETAILED_SPECIAL_TEMPLATE.format(text_prompt=prompt)


# ----------------------------------------------------------------------------------------------
# Frames: sampling, resizing, patches


def smart_resize(height: int, width: int, factor: int = IMAGE_FACTOR, min_pixels: int = VIDEO_MIN_PIXELS,
                 max_pixels: int = 448 * 448) -> Tuple[int, int]:
    """qwen-vl-utils' rule: sides multiples of `factor`, area in [min_pixels, max_pixels], the
    aspect ratio kept as closely as that allows."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"VideoAlign: frames of {height}x{width} have an aspect ratio above {MAX_RATIO}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def sample_frame_indices(total: int, video_fps: float, fps: Optional[float] = 2.0,
                         num_frames: Optional[int] = None) -> List[int]:
    """The frames the published inference reads from a clip of `total` frames at `video_fps`:
    `num_frames` of them (rounded to even) when given, else `fps` per second clamped to
    [4, min(768, total)] and rounded to even; never more than `total`; evenly spaced, first and
    last included (qwen-vl-utils' smart_nframes and linspace(...).round())."""
    if num_frames is not None:
        count = round(num_frames / FRAME_FACTOR) * FRAME_FACTOR
    else:
        low = math.ceil(FPS_MIN_FRAMES / FRAME_FACTOR) * FRAME_FACTOR
        high = math.floor(min(FPS_MAX_FRAMES, total) / FRAME_FACTOR) * FRAME_FACTOR
        count = min(max(total / video_fps * fps, low), high)
        count = round(count / FRAME_FACTOR) * FRAME_FACTOR
    count = min(count, total)
    if not FRAME_FACTOR <= count <= total:
        raise ValueError(f"VideoAlign reads {FRAME_FACTOR} to {total} frames of a {total}-frame video, got {count} "
                         f"(videos need at least {FRAME_FACTOR} frames)")
    return torch.linspace(0, total - 1, count, dtype=torch.float64).round().long().tolist()


def resize_frames(frames: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """(n, 3, H, W) in [0, 1] -> (n, 3, h, w) in [0, 1] on the 8-bit grid: the published pipeline
    decodes 8-bit video and resizes it with torchvision (bicubic, antialiased, rounded to 8 bits)."""
    pixels = (frames.float() * 255.0).round()
    if tuple(pixels.shape[-2:]) != tuple(size):
        pixels = F.interpolate(pixels, size=tuple(size), mode="bicubic", align_corners=False, antialias=True)
        pixels = pixels.round().clamp(0.0, 255.0)
    return pixels / 255.0


def patchify(videos: torch.Tensor, patch_size: int, temporal_patch_size: int,
             merge_size: int) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
    """(B, T, C, H, W) normalised -> (B, grid_t*grid_h*grid_w, C*tp*p*p) Qwen2-VL patches, ordered
    so that each merge_size x merge_size block of patches is contiguous (the merger's input), and
    grid (grid_t, grid_h, grid_w). T is padded to a multiple of temporal_patch_size with the last
    frame, as Qwen2-VL's processor does."""
    batch, frames, channels, height, width = videos.shape
    pad = -frames % temporal_patch_size
    if pad:
        videos = torch.cat([videos, videos[:, -1:].expand(-1, pad, -1, -1, -1)], dim=1)
        frames += pad
    grid_t, grid_h, grid_w = frames // temporal_patch_size, height // patch_size, width // patch_size
    if height % (patch_size * merge_size) or width % (patch_size * merge_size):
        raise ValueError(f"frames of {height}x{width} are not multiples of patch_size * merge_size")
    x = videos.reshape(batch, grid_t, temporal_patch_size, channels,
                       grid_h // merge_size, merge_size, patch_size,
                       grid_w // merge_size, merge_size, patch_size)
    # -> batch, t, h-block, w-block, h-in-block, w-in-block | channels, tp, patch rows, patch cols
    x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return x.reshape(batch, grid_t * grid_h * grid_w, -1), (grid_t, grid_h, grid_w)


# ----------------------------------------------------------------------------------------------
# The published layout


@dataclass
class VideoAlignLayout:
    """The files of a VideoReward folder and of its base model, and the settings they hold."""

    root: str
    checkpoint_dir: str
    weights: str
    tokenizer_dir: str
    base_model_path: str
    model_config: Dict[str, Any]

    @property
    def data(self) -> Dict[str, Any]:
        return self.model_config.get("data_config") or {}

    @property
    def model(self) -> Dict[str, Any]:
        return self.model_config.get("model_config") or {}

    @property
    def peft(self) -> Dict[str, Any]:
        return self.model_config.get("peft_lora_config") or {}

    @property
    def inference(self) -> Optional[Dict[str, Any]]:
        return self.model_config.get("inference_config")


def _step(path: str) -> int:
    match = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(path))
    return int(match.group(1)) if match else -1


def read_layout(checkpoint_path: str, base_model_path: Optional[str] = None, step: Optional[int] = None) -> VideoAlignLayout:
    """Check a VideoReward folder (and its base model folder) and return its files. Anything
    missing or of the wrong kind is a one-line FileNotFoundError/ValueError naming it."""
    if not isinstance(checkpoint_path, (str, os.PathLike)):
        raise TypeError(f"VideoAlign checkpoint_path must be a folder path, got {type(checkpoint_path).__name__}")
    root = os.fspath(checkpoint_path)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"VideoAlign folder not found: {root}")
    config_file = os.path.join(root, "model_config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"VideoAlign folder {root} lacks model_config.json (the published KwaiVGI/VideoReward layout)")
    try:
        with open(config_file) as handle:
            config = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {config_file}: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} must hold a JSON object")
    for section in ("data_config", "model_config"):
        if not isinstance(config.get(section), dict):
            raise ValueError(f"{config_file} lacks its {section!r} section")
    for section in ("peft_lora_config", "inference_config"):
        if config.get(section) is not None and not isinstance(config[section], dict):
            raise ValueError(f"{config_file}: {section!r} must be an object")
    checkpoints = sorted((p for p in glob.glob(os.path.join(root, "checkpoint-*")) if _step(p) >= 0 and os.path.isdir(p)),
                         key=_step)
    if not checkpoints:
        raise FileNotFoundError(f"VideoAlign folder {root} has no checkpoint-<step> folder")
    if step is None or step == -1:
        checkpoint_dir = checkpoints[-1]
    else:
        matching = [p for p in checkpoints if _step(p) == step]
        if not matching:
            raise FileNotFoundError(f"VideoAlign folder {root} has no checkpoint-{step} "
                                    f"(it has {', '.join(os.path.basename(p) for p in checkpoints)})")
        checkpoint_dir = matching[0]
    weights = os.path.join(checkpoint_dir, "model.pth")
    if not os.path.isfile(weights):
        if os.path.isfile(os.path.join(checkpoint_dir, "adapter_model.safetensors")):
            raise FileNotFoundError(
                f"VideoAlign {checkpoint_dir} lacks model.pth: it holds the LoRA-only layout (adapter_model.safetensors "
                f"+ non_lora_state_dict.pth), which this loader does not read; the published VideoReward ships model.pth")
        raise FileNotFoundError(f"VideoAlign {checkpoint_dir} lacks model.pth (the whole model's state dict)")
    tokenizer_dir = os.path.join(checkpoint_dir, "tokenizer")
    if not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer_config.json")):
        raise FileNotFoundError(f"VideoAlign {checkpoint_dir} lacks tokenizer/tokenizer_config.json "
                                f"(the Qwen2 tokenizer with the reward tokens)")
    if base_model_path is None:
        named = config["model_config"].get("model_name_or_path")
        if isinstance(named, str) and os.path.isdir(named):
            base_model_path = named
        elif os.path.isfile(os.path.join(root, "config.json")) and os.path.isfile(os.path.join(root, "preprocessor_config.json")):
            base_model_path = root
        else:
            raise ValueError(f"VideoAlign needs base_model_path: a local folder of {named or 'the base Qwen2-VL model'} "
                             f"with config.json and preprocessor_config.json (model_config.json names it, but not "
                             f"as a local folder)")
    base = os.fspath(base_model_path)
    for name in ("config.json", "preprocessor_config.json"):
        if not os.path.isfile(os.path.join(base, name)):
            raise FileNotFoundError(f"VideoAlign base model folder {base} lacks {name}")
    return VideoAlignLayout(root, checkpoint_dir, weights, tokenizer_dir, base, config)


_OLD_PREFIXES = (("visual.", "visual."), ("model.", "language_model."))
_NEW_PREFIXES = (("model.visual.", "visual."), ("model.language_model.", "language_model."))


def convert_checkpoint(state: Mapping[str, torch.Tensor], lora_scaling: float, source: str = "model.pth",
                       merged_dtype: Optional[torch.dtype] = None) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """model.pth's state dict -> (Qwen2VLModel state dict, rm_head weight).

    Removes PEFT's `base_model.model.` prefix, merges each LoRA pair into its layer
    (W + lora_scaling * B @ A, computed in float32 and stored as `merged_dtype`, by default the
    weight's own dtype; bias kept), keeps PEFT `modules_to_save` copies over the
    originals, drops lm_head (scoring never uses it), and maps both transformers layouts (< 4.52:
    visual.*, model.*; >= 4.52: model.visual.*, model.language_model.*) to Qwen2VLModel's keys.
    """
    state = {key.removeprefix("module."): value for key, value in state.items()}
    state = {key.removeprefix("base_model.model."): value for key, value in state.items()}
    if any("lora_embedding_" in key for key in state):
        raise ValueError(f"VideoAlign {source}: LoRA on embeddings (lora_embedding_*) is not supported")
    saved_copies = {key for key in state if ".modules_to_save." in key}
    merged: Dict[str, torch.Tensor] = {}
    lora_a = {key[: -len(".lora_A.default.weight")]: value for key, value in state.items()
              if key.endswith(".lora_A.default.weight")}
    lora_b = {key[: -len(".lora_B.default.weight")]: value for key, value in state.items()
              if key.endswith(".lora_B.default.weight")}
    if set(lora_a) != set(lora_b):
        raise ValueError(f"VideoAlign {source}: LoRA layers without their pair: {sorted(set(lora_a) ^ set(lora_b))[:4]}")
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key or ".original_module." in key:
            continue
        if key in saved_copies:  # PEFT's trained copy replaces the original_module skipped above
            key = key.replace(".modules_to_save.default.", ".")
        if ".base_layer." in key:
            module = key.split(".base_layer.")[0]
            key = key.replace(".base_layer.", ".")
            if key.endswith(".weight") and module in lora_a:
                a, b = lora_a[module].float(), lora_b[module].float()
                if b.shape[1] != a.shape[0] or (b.shape[0], a.shape[1]) != tuple(value.shape):
                    raise ValueError(f"VideoAlign {source}: LoRA of {module} has shapes A {tuple(a.shape)}, B "
                                     f"{tuple(b.shape)} for a weight of {tuple(value.shape)}")
                value = (value.float() + lora_scaling * (b @ a)).to(merged_dtype or value.dtype)
        merged[key] = value
    rm_head = merged.pop("rm_head.weight", None)
    if rm_head is None:
        raise ValueError(f"VideoAlign {source} has no rm_head.weight (the reward head)")
    merged.pop("lm_head.weight", None)
    prefixes = _NEW_PREFIXES if any(key.startswith("model.language_model.") for key in merged) else _OLD_PREFIXES
    converted = {}
    for key, value in merged.items():
        for old, new in prefixes:
            if key.startswith(old):
                converted[new + key[len(old):]] = value
                break
        else:
            converted[key] = value  # reported as unexpected by the caller
    return converted, rm_head


def read_reward_tokens(head_outputs: torch.Tensor, input_ids: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    """(B, L, N) head outputs -> (B, 3) raw scores: criterion k is read at the position of its
    token token_ids[k], from output 0 when N == 1 or output k when N == 3 (VideoAlign's special-token
    read-out: its diagonal for output_dim 3). A row whose prompt does not hold each token exactly
    once gets NaN (a prompt that itself spells a reward token)."""
    batch = head_outputs.shape[0]
    outputs = head_outputs.shape[-1]
    if outputs not in (1, len(token_ids)):
        raise ValueError(f"VideoAlign reward head has {outputs} outputs; expected 1 or {len(token_ids)}")
    scores = torch.full((batch, len(token_ids)), float("nan"), dtype=torch.float32, device=head_outputs.device)
    for k, token in enumerate(token_ids):
        hits = input_ids == token
        once = hits.sum(dim=1) == 1
        position = hits.int().argmax(dim=1)
        value = head_outputs[torch.arange(batch, device=head_outputs.device), position, 0 if outputs == 1 else k]
        scores[:, k] = torch.where(once, value.float(), scores[:, k])
    return scores


class VideoAlignModel(nn.Module):
    """Qwen2-VL (transformers' Qwen2VLModel: vision tower + language model) and the reward head
    (float32, on the last hidden states cast to float32)."""

    def __init__(self, backbone: nn.Module, rm_head: nn.Linear):
        super().__init__()
        self.backbone = backbone
        self.rm_head = rm_head
        self._takes_token_types = "mm_token_type_ids" in inspect.signature(backbone.forward).parameters

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values_videos: torch.Tensor,
                video_grid_thw: torch.Tensor) -> torch.Tensor:
        """-> (B, L, output_dim) head outputs at every position."""
        extra = {}
        if self._takes_token_types:
            # transformers >= 5 places M-RoPE positions by token type (2: video); older versions
            # find the video tokens themselves.
            video_token = int(self.backbone.config.video_token_id)
            extra["mm_token_type_ids"] = (input_ids == video_token).int() * 2
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
                               use_cache=False, **extra).last_hidden_state
        return self.rm_head(hidden.float())


def _lora_scaling(peft: Mapping[str, Any], source: str) -> float:
    rank, alpha = peft.get("lora_r", 16), peft.get("lora_alpha", 32)
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)):
        raise ValueError(f"{source}: peft_lora_config.lora_r must be a positive int and lora_alpha a number, "
                         f"got {rank!r} and {alpha!r}")
    return float(alpha) / (math.sqrt(rank) if peft.get("use_rslora") else rank)


def load_videoalign(layout: VideoAlignLayout, dtype: torch.dtype = torch.float32):
    """Build (VideoAlignModel, tokenizer, token ids, output_dim, preprocessor dict) from a checked
    layout. Key, shape and token mismatches are one-line ValueErrors naming what differs."""
    from transformers import AutoTokenizer, Qwen2VLConfig, Qwen2VLModel

    source = layout.root
    model_cfg = layout.model
    if not model_cfg.get("use_special_tokens", False) or model_cfg.get("reward_token", "special") != "special":
        raise ValueError(f"VideoAlign {source}: model_config must have use_special_tokens true and reward_token "
                         f"'special' (the published read-out), got {model_cfg.get('use_special_tokens')!r} and "
                         f"{model_cfg.get('reward_token')!r}")
    template = layout.data.get("prompt_template_type", "detailed_special")
    if template != "detailed_special":
        raise ValueError(f"VideoAlign {source}: data_config.prompt_template_type must be 'detailed_special', got {template!r}")
    output_dim = model_cfg.get("output_dim", 1)
    if output_dim not in (1, 3):
        raise ValueError(f"VideoAlign {source}: model_config.output_dim must be 1 or 3, got {output_dim!r}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(layout.tokenizer_dir, local_files_only=True)
    except Exception as error:
        raise ValueError(f"cannot load the VideoAlign tokenizer from {layout.tokenizer_dir}: {error}") from None
    vocab = tokenizer.get_vocab()
    missing_tokens = [token for token in REWARD_TOKENS + ("<|video_pad|>",) if token not in vocab]
    if missing_tokens:
        raise ValueError(f"VideoAlign tokenizer {layout.tokenizer_dir} lacks the tokens {missing_tokens}")
    if not getattr(tokenizer, "chat_template", None):
        chat_file = os.path.join(layout.base_model_path, "chat_template.json")
        if os.path.isfile(chat_file):
            with open(chat_file) as handle:
                tokenizer.chat_template = json.load(handle).get("chat_template")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"VideoAlign tokenizer {layout.tokenizer_dir} has no chat template (nor has "
                             f"{layout.base_model_path}/chat_template.json)")
    if tokenizer.pad_token_id is None:
        raise ValueError(f"VideoAlign tokenizer {layout.tokenizer_dir} has no pad token")
    token_ids = [int(vocab[token]) for token in REWARD_TOKENS]

    try:
        config = Qwen2VLConfig.from_pretrained(layout.base_model_path, local_files_only=True)
    except Exception as error:
        raise ValueError(f"cannot read the Qwen2-VL config in {layout.base_model_path}: {error}") from None
    if int(config.video_token_id) != int(vocab["<|video_pad|>"]):
        raise ValueError(f"VideoAlign: the base config's video_token_id {config.video_token_id} is not the tokenizer's "
                         f"<|video_pad|> id {vocab['<|video_pad|>']}")
    with open(os.path.join(layout.base_model_path, "preprocessor_config.json")) as handle:
        preprocessor = json.load(handle)

    state = read_state_dict(layout.weights, "VideoAlign", mmap=True)
    # Merged weights are kept in the scoring dtype: a float32 model gets the exact sum, not the
    # sum rounded back to the checkpoint's bfloat16.
    backbone_state, head = convert_checkpoint(state, _lora_scaling(layout.peft, source), layout.weights, dtype)
    del state

    text = config.text_config
    embed = backbone_state.get("language_model.embed_tokens.weight")
    if embed is not None:
        # The trainer resized the embeddings to the tokenizer with the reward tokens added.
        text.vocab_size = int(embed.shape[0])
    if len(tokenizer) > text.vocab_size:
        raise ValueError(f"VideoAlign tokenizer has {len(tokenizer)} tokens, more than the {text.vocab_size} "
                         f"embeddings in {layout.weights}")
    if tuple(head.shape) != (output_dim, text.hidden_size):
        raise ValueError(f"VideoAlign rm_head.weight in {layout.weights} has shape {tuple(head.shape)}; model_config "
                         f"and the base config give ({output_dim}, {text.hidden_size})")
    with torch.device("meta"):
        expected = {key: tuple(v.shape) for key, v in Qwen2VLModel(config).state_dict().items()}
    missing = sorted(set(expected) - set(backbone_state))
    unexpected = sorted(set(backbone_state) - set(expected))
    mismatched = [f"{key}: {tuple(backbone_state[key].shape)} vs {expected[key]}"
                  for key in sorted(set(expected) & set(backbone_state)) if tuple(backbone_state[key].shape) != expected[key]]
    if missing or unexpected or mismatched:
        raise ValueError(f"VideoAlign weights {layout.weights} do not match the Qwen2-VL architecture of "
                         f"{layout.base_model_path}/config.json: {len(missing)} missing {missing[:4]}, "
                         f"{len(unexpected)} unexpected {unexpected[:4]}, {len(mismatched)} mis-shaped {mismatched[:3]}")
    backbone = Qwen2VLModel.from_pretrained(None, config=config, state_dict=backbone_state, dtype=dtype)
    # The head runs in float32 whatever the model's dtype: bfloat16 scores (3 significant digits)
    # would tie samples of a group that the model tells apart.
    rm_head = nn.Linear(text.hidden_size, output_dim, bias=False, dtype=torch.float32)
    with torch.no_grad():
        rm_head.weight.copy_(head.float())
    model = VideoAlignModel(backbone, rm_head).eval().requires_grad_(False)
    return model, tokenizer, token_ids, output_dim, preprocessor


# ----------------------------------------------------------------------------------------------
# The reward


class _Shared:
    """One loaded model, shared by every VideoAlignReward built on the same files, device and
    dtype (e.g. a VQ entry and an MQ entry of one run), with the last batch's scores, so that
    scoring one batch for several criteria runs the model once."""

    def __init__(self, model, tokenizer, token_ids, output_dim, preprocessor):
        self.model, self.tokenizer, self.token_ids = model, tokenizer, token_ids
        self.output_dim, self.preprocessor = output_dim, preprocessor
        self.lock = threading.Lock()
        self.last: Optional[tuple] = None


_SHARED: "weakref.WeakValueDictionary[tuple, _Shared]" = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.Lock()


@register_reward("videoalign")
class VideoAlignReward(Reward):
    """VideoAlign's VideoReward: VQ, MQ and TA of each video against its prompt.

    checkpoint_path: the KwaiVGI/VideoReward folder (model_config.json, checkpoint-<step>/);
    base_model_path: the Qwen/Qwen2-VL-2B-Instruct folder (config.json, preprocessor_config.json;
    default: model_config.json's model_name_or_path when that is a local folder);
    criterion: what a call returns, "VQ", "MQ", "TA" or "Overall" (VQ + MQ + TA, the published
    total); `criteria(videos, prompts)` returns all four. normalize: standardise each score with
    model_config.json's inference_config mean/std, as the published inference does by default.
    video_fps: frames per second of the videos given (for the 2-fps sampling); fps / num_frames /
    max_pixels: override data_config's sampling rate, a fixed frame count, the largest frame area;
    min_pixels: the smallest frame area (qwen-vl-utils' 128*28*28 for videos); step:
    which checkpoint-<step> (default the latest).
    """

    name = "videoalign"
    modality = "video"

    def __init__(self, checkpoint_path: str, base_model_path: Optional[str] = None, criterion: str = "Overall",
                 normalize: bool = True, video_fps: float = 24.0, fps: Optional[float] = None,
                 num_frames: Optional[int] = None, max_pixels: Optional[int] = None,
                 min_pixels: int = VIDEO_MIN_PIXELS, step: Optional[int] = None,
                 device="cpu", dtype="float32", batch_size: Optional[int] = None):
        super().__init__(device=device, batch_size=batch_size)
        if criterion not in CRITERIA:
            raise ValueError(f"videoalign criterion must be one of {list(CRITERIA)}, got {criterion!r}")
        if not (isinstance(video_fps, (int, float)) and video_fps > 0):
            raise ValueError(f"videoalign video_fps must be > 0, got {video_fps!r}")
        if num_frames is not None and (isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 2):
            raise ValueError(f"videoalign num_frames must be an int >= 2 or None, got {num_frames!r}")
        self.layout = read_layout(checkpoint_path, base_model_path, step)
        data = self.layout.data
        self.fps = float(data.get("fps", 2.0) if fps is None else fps)
        if num_frames is None and data.get("num_frames") is not None and fps is None:
            num_frames = int(data["num_frames"])
        self.num_frames = num_frames
        self.max_pixels = int(data.get("max_frame_pixels", 448 * 448) if max_pixels is None else max_pixels)
        self.min_pixels = int(min_pixels)
        if self.fps <= 0 or not IMAGE_FACTOR * IMAGE_FACTOR <= self.min_pixels <= self.max_pixels:
            raise ValueError(f"videoalign needs fps > 0 and {IMAGE_FACTOR ** 2} <= min_pixels <= max_pixels, got fps "
                             f"{self.fps!r}, min_pixels {self.min_pixels!r}, max_pixels {self.max_pixels!r}")
        self.criterion, self.normalize, self.video_fps = criterion, bool(normalize), float(video_fps)
        self.dtype = resolve_dtype(dtype)
        inference = self.layout.inference
        if self.normalize and inference is not None:
            try:
                mean = [float(inference[f"{d}_mean"]) for d in DIMENSIONS]
                std = [float(inference[f"{d}_std"]) for d in DIMENSIONS]
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"VideoAlign {self.layout.root}/model_config.json: inference_config must hold numbers "
                                 f"VQ_mean, VQ_std, MQ_mean, MQ_std, TA_mean, TA_std") from None
            if not all(s > 0 for s in std):
                raise ValueError(f"VideoAlign inference_config stds must be > 0, got {std}")
            self.mean, self.std = torch.tensor(mean), torch.tensor(std)
        else:
            self.mean, self.std = torch.zeros(3), torch.ones(3)
        key = (os.path.realpath(self.layout.weights), os.path.realpath(self.layout.base_model_path),
               str(self.device), str(self.dtype))
        with _SHARED_LOCK:
            shared = _SHARED.get(key)
            if shared is None:
                model, tokenizer, token_ids, output_dim, preprocessor = load_videoalign(self.layout, self.dtype)
                shared = _Shared(model.to(self.device), tokenizer, token_ids, output_dim, preprocessor)
                _SHARED[key] = shared
        self._shared = shared
        pre = shared.preprocessor
        self.patch_size = int(pre.get("patch_size", 14))
        self.temporal_patch_size = int(pre.get("temporal_patch_size", 2))
        self.merge_size = int(pre.get("merge_size", 2))
        self.image_mean = tuple(float(v) for v in pre.get("image_mean", (0.48145466, 0.4578275, 0.40821073)))
        self.image_std = tuple(float(v) for v in pre.get("image_std", (0.26862954, 0.26130258, 0.27577711)))
        self.factor = self.patch_size * self.merge_size

    # --- scoring --------------------------------------------------------------------------------
    def _settings(self) -> tuple:
        return (self.fps, self.num_frames, self.min_pixels, self.max_pixels, self.video_fps, self.normalize,
                tuple(self.mean.tolist()), tuple(self.std.tolist()), self.batch_size)

    def prepare(self, videos: torch.Tensor, prompts: Sequence[str]) -> Dict[str, torch.Tensor]:
        """(b, T, 3, H, W) in [0, 1] -> the model's inputs: input_ids, attention_mask (right
        padded), pixel_values_videos, video_grid_thw."""
        batch, total, _, height, width = videos.shape
        index = sample_frame_indices(total, self.video_fps, None if self.num_frames else self.fps, self.num_frames)
        frames = videos[:, index]
        size = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        frames = resize_frames(frames.reshape(-1, 3, height, width), size).reshape(batch, len(index), 3, *size)
        mean = torch.tensor(self.image_mean, device=frames.device).view(1, 1, 3, 1, 1)
        std = torch.tensor(self.image_std, device=frames.device).view(1, 1, 3, 1, 1)
        patches, grid = patchify((frames - mean) / std, self.patch_size, self.temporal_patch_size, self.merge_size)
        video_tokens = grid[0] * grid[1] * grid[2] // (self.merge_size ** 2)
        tokenizer = self._shared.tokenizer
        video_pad = tokenizer.convert_tokens_to_ids("<|video_pad|>")
        rows = []
        for prompt in prompts:
            messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": build_prompt(prompt)}]}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if ids.count(video_pad) != 1:
                raise ValueError(f"the VideoAlign chat template gave {ids.count(video_pad)} <|video_pad|> tokens, expected 1")
            at = ids.index(video_pad)
            rows.append(ids[:at] + [video_pad] * video_tokens + ids[at + 1:])
        length = max(len(row) for row in rows)
        input_ids = torch.full((batch, length), int(tokenizer.pad_token_id), dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
        return {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device),
                "pixel_values_videos": patches.reshape(-1, patches.shape[-1]).to(self.dtype),
                "video_grid_thw": torch.tensor([list(grid)] * batch, dtype=torch.long, device=self.device)}

    def raw_scores(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """One valid chunk on self.device -> (b, 3) raw VQ, MQ, TA (before normalisation)."""
        inputs = self.prepare(videos, prompts)
        head = self._shared.model(**inputs)
        return read_reward_tokens(head, inputs["input_ids"], self._shared.token_ids).cpu()

    def _table(self, videos: torch.Tensor, prompts: Sequence[str]) -> Dict[str, torch.Tensor]:
        validate_inputs(videos, prompts, self.modality)
        prompts = list(prompts)
        shared = self._shared
        key = (self._settings(), tuple(prompts), tuple(videos.shape), videos._version)
        with shared.lock:
            last = shared.last
            if last is not None and last[0]() is videos and last[1] == key:
                return last[2]
            raw = []
            chunk = self.batch_size or max(videos.shape[0], 1)
            with torch.no_grad():
                for start in range(0, videos.shape[0], chunk):
                    part = videos[start:start + chunk].clamp(0.0, 1.0).to(self.device, non_blocking=True)
                    raw.append(self.raw_scores(part, prompts[start:start + chunk]))
            raw = torch.cat(raw) if raw else torch.zeros(0, 3)
            scores = (raw - self.mean) / self.std
            table = {name: scores[:, k].contiguous() for k, name in enumerate(DIMENSIONS)}
            table["Overall"] = scores.sum(dim=1)
            try:
                shared.last = (weakref.ref(videos), key, table)
            except TypeError:
                shared.last = None
            return table

    def _score(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self._table(videos, prompts)[self.criterion]

    def __call__(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """(B,) float32 CPU: the `criterion` score of each video (NaN where its prompt spells a
        reward token)."""
        return self._table(videos, prompts)[self.criterion].clone()

    def criteria(self, videos: torch.Tensor, prompts: Sequence[str]) -> Dict[str, torch.Tensor]:
        """{"VQ", "MQ", "TA", "Overall"}: (B,) float32 CPU each, from one pass of the model."""
        return {name: value.clone() for name, value in self._table(videos, prompts).items()}

    def describe(self) -> Dict[str, Any]:
        return {**super().describe(), "checkpoint": self.layout.checkpoint_dir, "base_model_path": self.layout.base_model_path,
                "criterion": self.criterion, "normalize": self.normalize, "fps": self.fps, "num_frames": self.num_frames,
                "video_fps": self.video_fps, "min_pixels": self.min_pixels, "max_pixels": self.max_pixels,
                "dtype": str(self.dtype)}
