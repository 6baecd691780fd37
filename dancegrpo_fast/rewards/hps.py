"""HPS-v2.1 (Human Preference Score v2.1, Wu et al. 2023) as a reward, on open_clip's model
where open_clip imports and on a built-in copy of the architecture elsewhere.

HPS-v2.1 is an open_clip ViT-H-14 fine-tuned on human preferences; its checkpoint
`HPS_v2.1_compressed.pt` (huggingface.co/xswu/HPSv2) is `{"state_dict": <open_clip CLIP state
dict>}`. The model that scores (`backend`):

- "open_clip": open_clip's own `CLIP`, the authors' code (needs open_clip_torch and a
  torchvision built for the installed torch, as the CUDA builds of torch have);
- "builtin": the same architecture in plain PyTorch, with state-dict keys identical to
  open_clip's (`visual.conv1.weight`, `visual.transformer.resblocks.N.attn.in_proj_weight`,
  `token_embedding.weight`, `text_projection`, `logit_scale`, ...; 686 for ViT-H-14), so the
  real checkpoint loads strictly into it; for where open_clip does not import (torchvision
  missing or built for another torch, e.g. beside a CPU torch);
- "auto" (the default): open_clip when it imports, else builtin. Which one ran is logged when
  the reward is built and is part of the reward's description in the run's start block.

The score is the authors': the cosine similarity of the L2-normalised image and text embeddings
(no logit scale), about 0.2-0.35 for real images.

Preprocessing follows HPSv2's eval transform: resize the longest side to 224 (bicubic), pad to a
square with black, normalise with OpenAI CLIP's mean/std.

Tokenizer: the ViT-H-14 tokenizer is OpenAI CLIP's BPE. Pass `tokenizer_path`, a folder with a
transformers CLIP tokenizer (e.g. the laion/CLIP-ViT-H-14-laion2B-s32B-b79K download that
PickScore also uses); without it, open_clip's bundled tokenizer is used when open_clip imports.
The two give the same token ids for ordinary prompts (open_clip also runs ftfy/html unescaping).
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .base import register_reward
from .clip_models import ImageTextSimilarityReward, load_clip_tokenizer, read_state_dict, resolve_dtype
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImagePreprocess

__all__ = ["OpenCLIPConfig", "OpenCLIPModel", "HPSv2Reward", "load_open_clip_state_dict", "HPS_BACKENDS",
           "select_hps_backend"]

logger = logging.getLogger(__name__)

HPS_BACKENDS = ("auto", "open_clip", "builtin")


@dataclass
class OpenCLIPConfig:
    """An open_clip CLIP architecture; the defaults are ViT-H-14 (open_clip's ViT-H-14.json)."""

    embed_dim: int = 1024
    image_size: int = 224
    patch_size: int = 14
    vision_width: int = 1280
    vision_layers: int = 32
    vision_head_width: int = 80
    vision_mlp_ratio: float = 4.0
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 1024
    text_heads: int = 16
    text_layers: int = 24
    text_mlp_ratio: float = 4.0
    quick_gelu: bool = False
    image_mean: Tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: Tuple[float, float, float] = OPENAI_CLIP_STD

    @classmethod
    def from_open_clip_dict(cls, config: Mapping[str, Any]) -> "OpenCLIPConfig":
        """From open_clip's model-config format: {"embed_dim", "quick_gelu", "vision_cfg":
        {"image_size", "layers", "width", "head_width", "patch_size", "mlp_ratio"}, "text_cfg":
        {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}}."""
        vision, text = dict(config.get("vision_cfg", {})), dict(config.get("text_cfg", {}))
        defaults = cls()
        unsupported = [k for k in ("ls_init_value", "attentional_pool", "global_average_pool", "timm_model_name",
                                   "hf_model_name", "patch_dropout", "output_tokens", "final_ln_after_pool")
                       if vision.get(k) or text.get(k)]
        if unsupported:
            raise ValueError(f"open_clip config options not supported by this implementation: {unsupported}")
        image_size = vision.get("image_size", defaults.image_size)
        if isinstance(image_size, (list, tuple)):
            if len(set(image_size)) != 1:
                raise ValueError(f"only square image_size is supported, got {image_size}")
            image_size = image_size[0]
        return cls(
            embed_dim=int(config.get("embed_dim", defaults.embed_dim)),
            image_size=int(image_size),
            patch_size=int(vision.get("patch_size", defaults.patch_size)),
            vision_width=int(vision.get("width", defaults.vision_width)),
            vision_layers=int(vision.get("layers", defaults.vision_layers)),
            vision_head_width=int(vision.get("head_width", 64)),
            vision_mlp_ratio=float(vision.get("mlp_ratio", 4.0)),
            context_length=int(text.get("context_length", defaults.context_length)),
            vocab_size=int(text.get("vocab_size", defaults.vocab_size)),
            text_width=int(text.get("width", defaults.text_width)),
            text_heads=int(text.get("heads", 8)),
            text_layers=int(text.get("layers", defaults.text_layers)),
            text_mlp_ratio=float(text.get("mlp_ratio", 4.0)),
            quick_gelu=bool(config.get("quick_gelu", False)),
            image_mean=tuple(vision.get("image_mean", OPENAI_CLIP_MEAN)),
            image_std=tuple(vision.get("image_std", OPENAI_CLIP_STD)),
        )

    def to_open_clip_dict(self) -> Dict[str, Any]:
        return {
            "embed_dim": self.embed_dim,
            "quick_gelu": self.quick_gelu,
            "vision_cfg": {"image_size": self.image_size, "layers": self.vision_layers, "width": self.vision_width,
                           "head_width": self.vision_head_width, "patch_size": self.patch_size,
                           "mlp_ratio": self.vision_mlp_ratio},
            "text_cfg": {"context_length": self.context_length, "vocab_size": self.vocab_size,
                         "width": self.text_width, "heads": self.text_heads, "layers": self.text_layers,
                         "mlp_ratio": self.text_mlp_ratio},
        }


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """open_clip's pre-norm block; nn.MultiheadAttention gives the same `attn.in_proj_weight`,
    `attn.in_proj_bias`, `attn.out_proj.{weight,bias}` keys open_clip stores."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, quick_gelu: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(width, hidden),
            gelu=QuickGELU() if quick_gelu else nn.GELU(),
            c_proj=nn.Linear(hidden, width),
        ))

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        normed = self.ln_1(x)
        x = x + self.attn(normed, normed, normed, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, quick_gelu: bool):
        super().__init__()
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, mlp_ratio, quick_gelu) for _ in range(layers)]
        )

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


class VisionTransformer(nn.Module):
    """open_clip's VisionTransformer with class-token pooling (`visual.*` keys)."""

    def __init__(self, config: OpenCLIPConfig):
        super().__init__()
        width = config.vision_width
        if width % config.vision_head_width:
            raise ValueError(f"vision width {width} is not a multiple of head_width {config.vision_head_width}")
        if config.image_size % config.patch_size:
            raise ValueError(f"image_size {config.image_size} is not a multiple of patch_size {config.patch_size}")
        grid = config.image_size // config.patch_size
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=config.patch_size, stride=config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, config.vision_layers, width // config.vision_head_width,
                                       config.vision_mlp_ratio, config.quick_gelu)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, config.embed_dim))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (b, 3, S, S) normalised -> (b, embed_dim) unnormalised."""
        x = self.conv1(pixels).flatten(2).transpose(1, 2)  # (b, grid*grid, width)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


class OpenCLIPModel(nn.Module):
    """open_clip's `CLIP` (built-in text tower): `visual.*`, `token_embedding`,
    `positional_embedding`, `transformer.*`, `ln_final`, `text_projection`, `logit_scale`."""

    def __init__(self, config: OpenCLIPConfig = OpenCLIPConfig()):
        super().__init__()
        self.config = config
        if config.text_width % config.text_heads:
            raise ValueError(f"text width {config.text_width} is not a multiple of heads {config.text_heads}")
        self.visual = VisionTransformer(config)
        self.token_embedding = nn.Embedding(config.vocab_size, config.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.text_width))
        self.transformer = Transformer(config.text_width, config.text_layers, config.text_heads,
                                       config.text_mlp_ratio, config.quick_gelu)
        self.ln_final = nn.LayerNorm(config.text_width)
        self.text_projection = nn.Parameter(torch.empty(config.text_width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * torch.log(torch.tensor(1 / 0.07)))
        self.register_buffer("attn_mask", self.build_attention_mask(), persistent=False)
        if self.positional_embedding.device.type != "meta":
            nn.init.normal_(self.token_embedding.weight, std=0.02)
            nn.init.normal_(self.positional_embedding, std=0.01)
            nn.init.normal_(self.text_projection, std=config.text_width ** -0.5)

    def build_attention_mask(self) -> torch.Tensor:
        length = self.config.context_length
        return torch.full((length, length), float("-inf")).triu_(1)

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(pixels)
        return features / features.norm(dim=-1, keepdim=True) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """tokens (n, context_length) int64, end-of-text being the largest id (CLIP's BPE)."""
        x = self.token_embedding(tokens) + self.positional_embedding.to(self.token_embedding.weight.dtype)
        x = self.transformer(x, self.attn_mask.to(x.dtype))
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)] @ self.text_projection
        return x / x.norm(dim=-1, keepdim=True) if normalize else x


# Keys some open_clip versions stored that carry no weights.
_IGNORED_KEYS = ("attn_mask", "visual.attn_mask")


def load_open_clip_state_dict(checkpoint_path: str, what: str = "HPS") -> Dict[str, torch.Tensor]:
    """Read an open_clip checkpoint: a state dict, or {"state_dict": ...} (HPS's layout), with any
    DistributedDataParallel `module.` prefix removed."""
    state = read_state_dict(checkpoint_path, what)
    return {key: value for key, value in state.items() if key not in _IGNORED_KEYS}


def open_clip_import_error() -> Optional[str]:
    """None when open_clip imports (torchvision included), else why not."""
    try:
        import open_clip  # noqa: F401
    except Exception as error:  # ImportError, or torchvision's operator errors beside another torch build
        return f"{type(error).__name__}: {error}"
    return None


def select_hps_backend(requested: str, import_error: Optional[str]) -> str:
    """The model HPS runs on: "open_clip" or "builtin". requested: auto | open_clip | builtin;
    import_error: why open_clip does not import (None: it does)."""
    if requested not in HPS_BACKENDS:
        raise ValueError(f"hps backend must be one of {HPS_BACKENDS}, got {requested!r}")
    if requested == "builtin":
        return "builtin"
    if import_error is None:
        return "open_clip"
    if requested == "open_clip":
        raise ValueError(f"hps backend 'open_clip' asked for, but open_clip does not import here ({import_error}); "
                         f"install open_clip_torch with a torchvision matching torch, or use backend 'auto' or 'builtin'")
    return "builtin"


def build_open_clip_library_model(state: Mapping[str, torch.Tensor], config: OpenCLIPConfig, dtype: torch.dtype,
                                  source: str, what: str = "HPS"):
    """open_clip's own CLIP of `config`'s architecture with `state` loaded (checked first against
    the built-in architecture, which has the same keys, for the same clear errors)."""
    import open_clip

    check_open_clip_state_dict(state, config, source, what)
    spec = config.to_open_clip_dict()
    model = open_clip.model.CLIP(embed_dim=spec["embed_dim"], vision_cfg=spec["vision_cfg"], text_cfg=spec["text_cfg"],
                                 quick_gelu=spec["quick_gelu"])
    result = model.load_state_dict(dict(state), strict=False)
    missing = [key for key in result.missing_keys if key not in _IGNORED_KEYS]
    if missing or result.unexpected_keys:
        raise ValueError(f"{what} checkpoint {source} does not load into open_clip's CLIP: missing keys {missing[:6]}, "
                         f"unexpected keys {list(result.unexpected_keys)[:6]}")
    return model.to(dtype).eval().requires_grad_(False)


def check_open_clip_state_dict(state: Mapping[str, torch.Tensor], config: OpenCLIPConfig, source: str,
                               what: str = "HPS") -> OpenCLIPModel:
    """A meta-device model of `config` after checking that `state` has exactly its keys and
    shapes (an error listing missing, unexpected and mis-shaped keys otherwise)."""
    with torch.device("meta"):
        model = OpenCLIPModel(config)
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{key}: checkpoint {tuple(state[key].shape)} vs model {expected[key]}"
                  for key in sorted(set(expected) & set(state)) if tuple(state[key].shape) != expected[key]]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{what} checkpoint {source} does not match the open_clip architecture {asdict(config)}: "
            f"{len(missing)} missing keys {missing[:6]}, {len(unexpected)} unexpected keys {unexpected[:6]}, "
            f"{len(mismatched)} shape mismatches {mismatched[:4]}"
        )
    return model


def build_open_clip_model(state: Mapping[str, torch.Tensor], config: OpenCLIPConfig, dtype: torch.dtype,
                          source: str, what: str = "HPS") -> OpenCLIPModel:
    """Build `config`'s architecture without allocating random weights and load `state` strictly,
    with a clear error listing missing, unexpected and mis-shaped keys."""
    model = check_open_clip_state_dict(state, config, source, what)
    model.load_state_dict({key: value.to(dtype) for key, value in state.items()}, strict=True, assign=True)
    model.register_buffer("attn_mask", model.build_attention_mask(), persistent=False)
    return model.eval().requires_grad_(False)


def _read_config(model_config: Union[None, str, Mapping[str, Any], OpenCLIPConfig]) -> OpenCLIPConfig:
    if model_config is None:
        return OpenCLIPConfig()
    if isinstance(model_config, OpenCLIPConfig):
        return model_config
    if isinstance(model_config, (str, os.PathLike)):
        path = os.fspath(model_config)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"open_clip model config not found: {path}")
        with open(path) as handle:
            model_config = json.load(handle)
    if isinstance(model_config, Mapping):
        if "vision_cfg" in model_config or "text_cfg" in model_config:
            return OpenCLIPConfig.from_open_clip_dict(model_config)
        return OpenCLIPConfig(**model_config)
    raise TypeError(f"model_config must be None, a path, a dict or an OpenCLIPConfig, got {type(model_config).__name__}")


class _OpenCLIPTokenizer:
    """open_clip's own tokenizer, used when no tokenizer folder is given and open_clip imports."""

    def __init__(self, context_length: int):
        import open_clip  # noqa: F401  (raises ImportError when unavailable)

        self._tokenize = open_clip.get_tokenizer("ViT-H-14")
        self.context_length = context_length

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        return self._tokenize(list(prompts), context_length=self.context_length)


@register_reward("hps")
class HPSv2Reward(ImageTextSimilarityReward):
    """HPS-v2.1: cos(image_i, prompt_i) of the HPS open_clip ViT-H-14.

    checkpoint_path: HPS_v2.1_compressed.pt (or HPS_v2_compressed.pt for v2.0);
    tokenizer_path: a CLIP tokenizer folder, e.g. the laion/CLIP-ViT-H-14-laion2B-s32B-b79K
    download (optional when open_clip imports); model_config: None for ViT-H-14, or an open_clip
    model config (path to a JSON such as open_clip's ViT-H-14.json, a dict, or OpenCLIPConfig);
    backend: auto (open_clip's model when open_clip imports, else the built-in one), open_clip
    or builtin (module docstring); `self.backend` says which one runs.
    """

    name = "hps"

    def __init__(self, checkpoint_path: str, tokenizer_path: Optional[str] = None,
                 model_config: Union[None, str, Mapping[str, Any], OpenCLIPConfig] = None,
                 device="cpu", dtype="float32", batch_size: Optional[int] = None, backend: str = "auto"):
        super().__init__(device=device, batch_size=batch_size)
        import_error = None if backend == "builtin" else open_clip_import_error()
        self.backend = select_hps_backend(backend, import_error)
        self.config = _read_config(model_config)
        self.dtype = resolve_dtype(dtype)
        self.checkpoint_path = os.fspath(checkpoint_path)
        state = load_open_clip_state_dict(self.checkpoint_path, "HPS")
        if tokenizer_path is not None:
            self.tokenizer = load_clip_tokenizer(tokenizer_path, "HPS")
            if len(self.tokenizer) > self.config.vocab_size:
                raise ValueError(
                    f"HPS tokenizer in {tokenizer_path} has {len(self.tokenizer)} tokens, more than the model's "
                    f"vocab_size {self.config.vocab_size}"
                )
        else:
            try:
                self.tokenizer = _OpenCLIPTokenizer(self.config.context_length)
            except Exception as error:  # ImportError, or torchvision failing inside open_clip
                raise ValueError(
                    "HPS needs a CLIP tokenizer: pass tokenizer_path=<folder with tokenizer.json or vocab.json + "
                    "merges.txt>, e.g. a download of laion/CLIP-ViT-H-14-laion2B-s32B-b79K (open_clip, whose "
                    f"bundled tokenizer would otherwise be used, does not import here: {error})"
                ) from error
        self.tokenizer_path = None if tokenizer_path is None else os.fspath(tokenizer_path)
        if self.backend == "open_clip":
            self.model = build_open_clip_library_model(state, self.config, self.dtype, self.checkpoint_path)
        else:
            self.model = build_open_clip_model(state, self.config, self.dtype, self.checkpoint_path)
        self.model = self.model.to(self.device)
        why = "" if self.backend == "open_clip" or import_error is None else f" (open_clip does not import: {import_error})"
        logger.info("HPS %s runs on the %s model%s", self.checkpoint_path,
                    "open_clip" if self.backend == "open_clip" else "built-in ViT", why)
        self.preprocess = ImagePreprocess(
            size=self.config.image_size, crop_size=(self.config.image_size,) * 2,
            mean=self.config.image_mean, std=self.config.image_std, mode="pad",
        )
        self.scale = 1.0

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """n strings -> (n, context_length) int64 token ids, zero/end padded, truncated with end-of-text."""
        if isinstance(self.tokenizer, _OpenCLIPTokenizer):
            return self.tokenizer(prompts)
        return self.tokenizer(list(prompts), padding="max_length", truncation=True,
                              max_length=self.config.context_length, return_tensors="pt")["input_ids"]

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.preprocess(images, dtype=self.dtype)
        return _normalize(self.model.encode_image(pixels).float())

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenize(prompts).to(self.device)
        return _normalize(self.model.encode_text(tokens).float())

    def describe(self) -> Dict[str, Any]:
        return {**super().describe(), "checkpoint_path": self.checkpoint_path,
                "tokenizer_path": self.tokenizer_path, "dtype": str(self.dtype), "backend": self.backend}


def _normalize(features: torch.Tensor) -> torch.Tensor:
    return features / features.norm(dim=-1, keepdim=True)
