"""CLIP-family rewards loaded from local transformers folders: CLIP score, PickScore, LAION aesthetic.

Every image is scored against ITS OWN prompt: score_i = scale * cos(image_i, prompt_i). (The
DanceGRPO reference scores every image of a batch against the first caption; we do not.)

Expected local layouts (as published on the Hugging Face Hub, downloaded with e.g.
`huggingface-cli download openai/clip-vit-large-patch14 --local-dir /models/clip-vit-large-patch14`):

- CLIP score: one CLIPModel folder with config.json, model.safetensors (or pytorch_model.bin),
  the tokenizer files (tokenizer.json, or vocab.json + merges.txt) and preprocessor_config.json;
  e.g. openai/clip-vit-large-patch14. A separate processor folder may be given.
- PickScore: the model folder yuvalkirstain/PickScore_v1 (a CLIPModel) and the processor folder
  laion/CLIP-ViT-H-14-laion2B-s32B-b79K (tokenizer + preprocessor_config.json), as its authors use.
- Aesthetic: the LAION head file (sac+logos+ava1-l14-linearMSE.pth, a state dict of an MLP
  `layers.{0,2,4,6,7}`, or a linear head `weight`/`bias`) and the CLIP ViT-L/14 folder whose
  L2-normalised image embeddings it was trained on (openai/clip-vit-large-patch14).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from .base import Reward, register_reward, validate_inputs
from .preprocess import ImagePreprocess

__all__ = [
    "ImageTextSimilarityReward",
    "CLIPScoreReward",
    "PickScoreReward",
    "AestheticReward",
    "AestheticHead",
    "load_aesthetic_head",
    "resolve_dtype",
]

_WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: Union[str, torch.dtype, None]) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or a torch.dtype, got {dtype!r}")


def _check_model_folder(path: str, what: str) -> None:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what} path must be a folder path, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} folder not found: {path}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{what} folder {path} lacks config.json")
    if not any(os.path.isfile(os.path.join(path, name)) for name in _WEIGHT_FILES):
        raise FileNotFoundError(
            f"{what} folder {path} lacks weights (one of {', '.join(_WEIGHT_FILES)})"
        )


def _check_processor_folder(path: str, what: str, need_tokenizer: bool, need_image: bool) -> None:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} processor folder not found: {path}")
    if need_tokenizer:
        has_fast = os.path.isfile(os.path.join(path, "tokenizer.json"))
        has_bpe = all(os.path.isfile(os.path.join(path, n)) for n in ("vocab.json", "merges.txt"))
        if not (has_fast or has_bpe):
            raise FileNotFoundError(
                f"{what} processor folder {path} lacks tokenizer files (tokenizer.json, or vocab.json and merges.txt)"
            )
    if need_image and not os.path.isfile(os.path.join(path, "preprocessor_config.json")):
        raise FileNotFoundError(f"{what} processor folder {path} lacks preprocessor_config.json")


def load_clip_model(path: str, what: str = "CLIP"):
    """Load a transformers CLIPModel from a local folder (no network), eval mode, float32."""
    _check_model_folder(path, what)
    from transformers import CLIPModel

    try:
        model = CLIPModel.from_pretrained(os.fspath(path), local_files_only=True)
    except Exception as error:  # transformers raises many types for a malformed folder
        raise ValueError(f"cannot load the {what} model from {path}: {error}") from error
    return model.eval().requires_grad_(False)


def load_clip_tokenizer(path: str, what: str = "CLIP"):
    """Load a CLIP tokenizer (tokenizer.json or vocab.json + merges.txt) from a local folder."""
    _check_processor_folder(path, what, need_tokenizer=True, need_image=False)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(os.fspath(path), local_files_only=True)
    except Exception as error:
        raise ValueError(f"cannot load the {what} tokenizer from {path}: {error}") from error


def _pooled(output: Any) -> torch.Tensor:
    # transformers < 5 returns the projected features; >= 5 a ModelOutput whose pooler_output
    # holds them.
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


class ImageTextSimilarityReward(Reward):
    """Base of the two-tower rewards: score_i = scale * <f(image_i), g(prompt_i)> with f, g
    L2-normalised. Subclasses implement `encode_images` and `encode_prompts` and set `scale`."""

    scale: float = 1.0

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """images (b, 3, H, W) in [0, 1] on self.device -> (b, D) float32, L2-normalised."""
        raise NotImplementedError

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """n strings -> (n, D) float32 on self.device, L2-normalised."""
        raise NotImplementedError

    def _score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        image_features = self.encode_images(images)
        text_features = self.encode_prompts(prompts)
        return self.scale * (image_features * text_features).sum(dim=-1)

    def similarity_matrix(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Every image against every prompt: (B_images, N_prompts) float32 on the CPU, the same
        scale as the scores (scores are its diagonal when prompts are the batch's prompts)."""
        validate_inputs(images, None, self.modality)
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a list of strings")
        with torch.no_grad():
            image_features = self.encode_images(images.clamp(0, 1).to(self.device))
            text_features = self.encode_prompts(list(prompts))
            return (self.scale * image_features @ text_features.T).float().cpu()


class _HFCLIPReward(ImageTextSimilarityReward):
    """A transformers CLIPModel with its tokenizer and image preprocessing from local folders."""

    def __init__(self, model_path: str, processor_path: Optional[str], what: str, device, dtype,
                 batch_size: Optional[int], use_logit_scale: bool):
        super().__init__(device=device, batch_size=batch_size)
        processor_path = model_path if processor_path is None else processor_path
        _check_model_folder(model_path, what)
        _check_processor_folder(processor_path, what, need_tokenizer=True, need_image=True)
        self.dtype = resolve_dtype(dtype)
        self.preprocess = ImagePreprocess.from_hf_config(os.fspath(processor_path))
        self.tokenizer = load_clip_tokenizer(processor_path, what)
        self.model = load_clip_model(model_path, what).to(device=self.device, dtype=self.dtype)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        self.use_logit_scale = bool(use_logit_scale)
        self.scale = float(self.model.logit_scale.exp()) if self.use_logit_scale else 1.0
        self.model_path, self.processor_path = os.fspath(model_path), os.fspath(processor_path)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.preprocess(images, dtype=self.dtype)
        features = _pooled(self.model.get_image_features(pixel_values=pixels)).float()
        return features / features.norm(dim=-1, keepdim=True)

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        # Padding to the model's full context keeps the text tower's input shape independent of
        # the batch, so a batch scores exactly as its samples scored one by one.
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                                max_length=self.max_length, return_tensors="pt")
        features = _pooled(self.model.get_text_features(
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device),
        )).float()
        return features / features.norm(dim=-1, keepdim=True)

    def describe(self) -> Dict[str, Any]:
        return {**super().describe(), "model_path": self.model_path, "processor_path": self.processor_path,
                "scale": self.scale, "dtype": str(self.dtype)}


@register_reward("clip")
class CLIPScoreReward(_HFCLIPReward):
    """CLIP score: cos(image_i, prompt_i) of a transformers CLIPModel (e.g. openai ViT-L/14),
    optionally times the model's logit scale (exp(logit_scale) = 100 for openai CLIP).

    model_path: CLIPModel folder; processor_path: tokenizer + preprocessor_config.json folder
    (default: model_path)."""

    name = "clip"

    def __init__(self, model_path: str, processor_path: Optional[str] = None, device="cpu",
                 dtype="float32", batch_size: Optional[int] = None, use_logit_scale: bool = False):
        super().__init__(model_path, processor_path, "CLIP", device, dtype, batch_size, use_logit_scale)


@register_reward("pickscore")
class PickScoreReward(_HFCLIPReward):
    """PickScore (Kirstain et al. 2023): exp(logit_scale) * cos(image_i, prompt_i) of the
    PickScore_v1 CLIP-H model, as its authors compute it (about 18-23 for typical images).

    model_path: the yuvalkirstain/PickScore_v1 folder; processor_path: the
    laion/CLIP-ViT-H-14-laion2B-s32B-b79K folder (tokenizer + preprocessor_config.json)."""

    name = "pickscore"

    def __init__(self, model_path: str, processor_path: str, device="cpu", dtype="float32",
                 batch_size: Optional[int] = None, use_logit_scale: bool = True):
        super().__init__(model_path, processor_path, "PickScore", device, dtype, batch_size, use_logit_scale)


# ----------------------------------------------------------------------------------------------
# LAION aesthetic predictor


class AestheticHead(nn.Module):
    """LAION improved-aesthetic-predictor head. hidden=() is the plain linear head (keys
    `weight`, `bias`); otherwise the MLP of `sac+logos+ava1-l14-linearMSE.pth` whose state dict
    keys are `layers.{0,2,4,6,7}.{weight,bias}`: Linear(D,1024), Dropout(0.2), Linear(1024,128),
    Dropout(0.2), Linear(128,64), Dropout(0.1), Linear(64,16), Linear(16,1)."""

    def __init__(self, input_dim: int = 768, hidden=(1024, 128, 64, 16)):
        super().__init__()
        self.input_dim = input_dim
        if not hidden:
            self.linear = nn.Linear(input_dim, 1)
            self.layers = None
            return
        h0, h1, h2, h3 = hidden
        self.layers = nn.Sequential(
            nn.Linear(input_dim, h0), nn.Dropout(0.2),
            nn.Linear(h0, h1), nn.Dropout(0.2),
            nn.Linear(h1, h2), nn.Dropout(0.1),
            nn.Linear(h2, h3),
            nn.Linear(h3, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (b, D) L2-normalised -> (b,)."""
        head = self.layers if self.layers is not None else self.linear
        return head(features).squeeze(-1)

    def state_dict_in_published_layout(self) -> Dict[str, torch.Tensor]:
        """The state dict as the LAION files store it (linear head: bare `weight`/`bias`)."""
        if self.layers is not None:
            return self.state_dict()
        return {key.removeprefix("linear."): value for key, value in self.state_dict().items()}


_MLP_KEYS = {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}


def read_state_dict(checkpoint_path: str, what: str, mmap: bool = False) -> Dict[str, torch.Tensor]:
    """A checkpoint file as a state dict: .safetensors, or a torch file holding a state dict or
    {"state_dict": ...}; a DistributedDataParallel `module.` prefix is removed. Errors name `what`
    and the file. mmap: a torch file is memory-mapped, not read into memory (multi-GB checkpoints)."""
    checkpoint_path = os.fspath(checkpoint_path)
    if not os.path.isfile(checkpoint_path):
        raise FileNotFoundError(f"{what} checkpoint not found: {checkpoint_path}")
    try:
        if checkpoint_path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(checkpoint_path)
        else:
            state = torch.load(checkpoint_path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:
        raise ValueError(f"cannot read the {what} checkpoint {checkpoint_path}: {error}") from error
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{what} checkpoint {checkpoint_path} is not a state dict of tensors")
    return {key.removeprefix("module."): value for key, value in state.items()}


def load_aesthetic_head(head_path: str) -> AestheticHead:
    """Load an aesthetic head (.pth/.pt state dict, or .safetensors) in LAION's layout."""
    state = read_state_dict(head_path, "aesthetic head")
    head_path = os.fspath(head_path)
    keys = set(state)
    if keys == _MLP_KEYS:
        sizes = tuple(state[f"layers.{i}.weight"].shape[0] for i in (0, 2, 4, 6))
        head = AestheticHead(state["layers.0.weight"].shape[1], hidden=sizes)
        target = head
    elif keys == {"weight", "bias"}:
        head = AestheticHead(state["weight"].shape[1], hidden=())
        target = head.linear
    else:
        raise ValueError(
            f"aesthetic head checkpoint {head_path} has keys {sorted(keys)[:12]}; expected the LAION MLP "
            f"layout ({sorted(_MLP_KEYS)}) or a linear head (weight, bias)"
        )
    try:
        target.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as error:
        raise ValueError(f"aesthetic head checkpoint {head_path} has inconsistent shapes: {error}") from error
    return head.eval().requires_grad_(False)


@register_reward("aesthetic")
class AestheticReward(Reward):
    """LAION aesthetic score (about 1-10): the head applied to the L2-normalised CLIP image
    embedding (CLIP ViT-L/14 for the published heads). Prompts are ignored.

    head_path: the head file, e.g. /models/sac+logos+ava1-l14-linearMSE.pth;
    clip_model_path: the CLIP folder, e.g. /models/clip-vit-large-patch14 (it must hold
    preprocessor_config.json too, or pass processor_path)."""

    name = "aesthetic"

    def __init__(self, head_path: str, clip_model_path: str, processor_path: Optional[str] = None,
                 device="cpu", dtype="float32", batch_size: Optional[int] = None):
        super().__init__(device=device, batch_size=batch_size)
        processor_path = clip_model_path if processor_path is None else processor_path
        _check_model_folder(clip_model_path, "CLIP")
        _check_processor_folder(processor_path, "CLIP", need_tokenizer=False, need_image=True)
        self.head = load_aesthetic_head(head_path)
        self.dtype = resolve_dtype(dtype)
        self.preprocess = ImagePreprocess.from_hf_config(os.fspath(processor_path))
        clip = load_clip_model(clip_model_path, "CLIP")
        embed_dim = int(clip.config.projection_dim)
        if embed_dim != self.head.input_dim:
            raise ValueError(
                f"aesthetic head {head_path} expects {self.head.input_dim}-dim CLIP embeddings but the CLIP "
                f"model in {clip_model_path} produces {embed_dim}-dim ones (the LAION heads need ViT-L/14)"
            )
        self.clip = clip.to(device=self.device, dtype=self.dtype)
        self.head = self.head.to(self.device)
        self.head_path, self.clip_model_path = os.fspath(head_path), os.fspath(clip_model_path)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.preprocess(images, dtype=self.dtype)
        features = _pooled(self.clip.get_image_features(pixel_values=pixels)).float()
        return features / features.norm(dim=-1, keepdim=True)

    def _score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.head(self.encode_images(images))

    def describe(self) -> Dict[str, Any]:
        return {**super().describe(), "head_path": self.head_path, "clip_model_path": self.clip_model_path}
