"""The tiny text-to-image rectified flow: a small FluxTransformer2DModel (the class FLUX.1 uses)
on 32x32 RGB pixels, conditioned by a word-level text encoder over the grammar's vocabulary.

Latent space = pixel space, no VAE: an image in [0, 1] becomes x0 = 2 * image - 1, packed like
FLUX packs its VAE latents, but with `patch` x `patch` pixel patches (default 4): (B, 3, 32, 32)
-> (B, 64 tokens, 48 channels). The transformer predicts the flow velocity v = noise - x0 on
x_t = (1 - t) x0 + t noise (FLUX's convention, so x0_hat = x_t - t v), receiving t in [0, 1] (it
scales by 1000 itself) and no guidance embedding.

Weights folder (diffusers layout, so the policy's folder checks apply unchanged):

    model_index.json                      {"_class_name": "TinyFlowPipeline", transformer, text_encoder}
    transformer/config.json + diffusion_pytorch_model.safetensors   (FluxTransformer2DModel)
    text_encoder/config.json + diffusion_pytorch_model.safetensors  (TinyTextEncoder)
    pretrain_record.json                  how the weights were made (dancegrpo_fast.pretrain_tiny)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from diffusers import FluxTransformer2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from .task import IMAGE_SIZE, VOCABULARY, normalize

PIPELINE_CLASS = "TinyFlowPipeline"
SPECIAL_TOKENS = ("<pad>", "<s>", "<unk>")
PAD, BOS, UNK = 0, 1, 2

DEFAULT_TRANSFORMER = dict(patch_size=1, in_channels=48, out_channels=None, num_layers=2, num_single_layers=2,
                           attention_head_dim=32, num_attention_heads=3, joint_attention_dim=64,
                           pooled_projection_dim=64, guidance_embeds=False, axes_dims_rope=(8, 12, 12))


class TinyTokenizer:
    """Whitespace tokenizer over a fixed word list: "<s>" then the words (lower-cased, punctuation
    dropped, unknown words -> "<unk>"), padded with "<pad>" or cut to max_length."""

    def __init__(self, vocabulary: Sequence[str], max_length: int):
        self.tokens = list(SPECIAL_TOKENS) + list(vocabulary)
        self.ids = {token: i for i, token in enumerate(self.tokens)}
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.tokens)

    def __call__(self, prompts: Sequence[str]) -> Tuple[Tensor, Tensor]:
        """-> input_ids (B, max_length) int64, attention_mask (B, max_length) bool (True = token)."""
        ids = torch.full((len(prompts), self.max_length), PAD, dtype=torch.int64)
        for row, prompt in enumerate(prompts):
            tokens = [BOS] + [self.ids.get(word, UNK) for word in normalize(prompt)]
            tokens = tokens[:self.max_length]
            ids[row, :len(tokens)] = torch.tensor(tokens)
        return ids, ids != PAD


class TinyTextEncoder(ModelMixin, ConfigMixin):
    """Token + position embeddings and a pre-norm transformer encoder. Output: sequence
    embeddings (B, max_length, hidden) with pad positions zeroed (the FLUX transformer attends to
    every text token, so pads must look the same in training and inference) and a pooled vector
    (B, hidden), the mean over real tokens."""

    @register_to_config
    def __init__(self, vocabulary: Sequence[str] = VOCABULARY, max_length: int = 12, hidden_size: int = 64,
                 num_layers: int = 2, num_heads: int = 4, ff_size: int = 128):
        super().__init__()
        self.tokenizer = TinyTokenizer(vocabulary, max_length)
        self.token_embedding = nn.Embedding(len(self.tokenizer), hidden_size)
        self.position_embedding = nn.Parameter(torch.zeros(max_length, hidden_size))
        layer = nn.TransformerEncoderLayer(hidden_size, num_heads, ff_size, dropout=0.0, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden_size)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.02)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tuple[Tensor, Tensor]:
        hidden = self.token_embedding(input_ids) + self.position_embedding[:input_ids.shape[1]]
        hidden = self.encoder(hidden, src_key_padding_mask=~attention_mask)
        keep = attention_mask.unsqueeze(-1).to(hidden.dtype)
        hidden = self.norm(hidden) * keep
        pooled = hidden.sum(dim=1) / keep.sum(dim=1).clamp(min=1)
        return hidden, pooled

    def encode(self, prompts: Sequence[str]) -> Tuple[Tensor, Tensor]:
        """prompts -> (prompt_embeds (B, L, hidden), pooled (B, hidden)) on the module's device."""
        ids, mask = self.tokenizer(list(prompts))
        return self(ids.to(self.device), mask.to(self.device))


# ----------------------------------------------------------------------------------------------
# Pixel "latents"


def pack(images: Tensor, patch: int) -> Tensor:
    """(B, C, H, W) -> (B, (H/p)(W/p), C p p), FLUX's packing order with p x p patches."""
    b, c, h, w = images.shape
    x = images.view(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpack(tokens: Tensor, patch: int, height: int, width: int) -> Tensor:
    """Inverse of pack: (B, (H/p)(W/p), C p p) -> (B, C, H, W)."""
    b, _, d = tokens.shape
    c = d // (patch * patch)
    x = tokens.view(b, height // patch, width // patch, c, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def image_ids(height: int, width: int, patch: int, device=None) -> Tensor:
    """(tokens, 3) FLUX position ids: (0, row, column) of each patch."""
    rows, cols = height // patch, width // patch
    ids = torch.zeros(rows * cols, 3, device=device)
    ids[:, 1] = torch.arange(rows, device=device).repeat_interleave(cols)
    ids[:, 2] = torch.arange(cols, device=device).repeat(rows)
    return ids


class TinyFlowPipeline:
    """The tiny model's components: `transformer` (FluxTransformer2DModel), `text_encoder`
    (TinyTextEncoder, which owns the tokenizer); image size and patch in `image_size`, `patch`.
    Not a diffusers DiffusionPipeline: just enough for the policy, pretraining and evaluation."""

    def __init__(self, transformer: FluxTransformer2DModel, text_encoder: TinyTextEncoder,
                 image_size: int = IMAGE_SIZE):
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.image_size = image_size
        channels = transformer.config.in_channels
        self.patch = int(round((channels / 3) ** 0.5))
        if 3 * self.patch ** 2 != channels or image_size % self.patch:
            raise ValueError(f"transformer in_channels={channels} is not 3 * patch^2 for a patch that divides "
                             f"the image size {image_size}")
        self.image_ids = image_ids(image_size, image_size, self.patch)

    @classmethod
    def from_config(cls, transformer: Optional[Dict] = None, text_encoder: Optional[Dict] = None) -> "TinyFlowPipeline":
        """A randomly initialised pipeline (the default architecture unless configs are given)."""
        return cls(FluxTransformer2DModel(**{**DEFAULT_TRANSFORMER, **(transformer or {})}),
                   TinyTextEncoder(**(text_encoder or {})))

    @property
    def components(self) -> Dict[str, nn.Module]:
        return {"transformer": self.transformer, "text_encoder": self.text_encoder}

    @property
    def latent_shape(self) -> Tuple[int, int]:
        return ((self.image_size // self.patch) ** 2, 3 * self.patch ** 2)

    # --- io ------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder, torch_dtype: torch.dtype = torch.float32) -> "TinyFlowPipeline":
        folder = Path(folder)
        index = json.loads((folder / "model_index.json").read_text())
        transformer = FluxTransformer2DModel.from_pretrained(str(folder / "transformer"), torch_dtype=torch_dtype)
        text_encoder = TinyTextEncoder.from_pretrained(str(folder / "text_encoder"), torch_dtype=torch_dtype)
        return cls(transformer, text_encoder, int(index.get("image_size", IMAGE_SIZE)))

    def save_pretrained(self, folder, dtype: Optional[torch.dtype] = None) -> None:
        """Write the weights folder; `dtype` (e.g. torch.float16) casts copies for storage."""
        import diffusers

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, module in self.components.items():
            to_save = module if dtype is None else _cast_copy(module, dtype)
            to_save.save_pretrained(str(folder / name))
        index = {"_class_name": PIPELINE_CLASS, "_diffusers_version": diffusers.__version__,
                 "image_size": self.image_size,
                 "transformer": ["diffusers", "FluxTransformer2DModel"],
                 "text_encoder": ["dancegrpo_fast.tiny.model", "TinyTextEncoder"]}
        (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")

    # --- model calls ---------------------------------------------------------------------------
    def encode_prompt(self, prompts: Sequence[str]) -> Dict[str, Tensor]:
        embeds, pooled = self.text_encoder.encode(prompts)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def velocity(self, module: nn.Module, latents: Tensor, sigmas: Tensor, cond: Dict[str, Tensor]) -> Tensor:
        """Model output v: latents (B, tokens, channels), sigmas (B,) in [0, 1]."""
        dtype = self.transformer.dtype
        device = latents.device
        txt_ids = torch.zeros(cond["prompt_embeds"].shape[1], 3, device=device, dtype=dtype)
        return module(hidden_states=latents.to(dtype), timestep=sigmas.to(dtype),
                      pooled_projections=cond["pooled_prompt_embeds"].to(dtype),
                      encoder_hidden_states=cond["prompt_embeds"].to(dtype), txt_ids=txt_ids,
                      img_ids=self.image_ids.to(device=device, dtype=dtype), return_dict=False)[0]

    def images_to_latents(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> packed latents in [-1, 1]."""
        return pack(images * 2 - 1, self.patch)

    def latents_to_images(self, latents: Tensor) -> Tensor:
        """Packed latents -> (B, 3, H, W) float32 in [0, 1]."""
        images = unpack(latents.float(), self.patch, self.image_size, self.image_size)
        return (images / 2 + 0.5).clamp(0, 1)


def _cast_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    import copy

    return copy.deepcopy(module).to(dtype)


__all__ = ["TinyTokenizer", "TinyTextEncoder", "TinyFlowPipeline", "pack", "unpack", "image_ids",
           "DEFAULT_TRANSFORMER", "PIPELINE_CLASS"]
