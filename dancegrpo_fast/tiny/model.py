"""The tiny text-to-image rectified flow, built like FLUX.1 at toy scale: a small
FluxTransformer2DModel over the latents of a small AutoencoderKL, conditioned by a word-level text
encoder over the grammar's vocabulary.

Latent space: the VAE maps a 32x32 RGB image (x = 2 * image - 1) to an 8x8x4 latent z (its
posterior mean); the model works on (z - shift_factor) * scaling_factor, packed in 2x2 patches as
FLUX packs its latents: (B, 4, 8, 8) -> (B, 16 tokens, 16 channels), 256 numbers per image.
Why a VAE at this scale: the policy's Gaussian lives in model space, and GRPO's gradient noise grows
with its dimension; 256 latent numbers, each of which matters to the picture, give a far better
signal per sample than 3,072 pixels, most of whose noise the reward never sees.

Without a VAE (a pipeline built with vae=None, as some tests do) the latents are the pixels
themselves, packed in `patch` x `patch` pixel patches.

The transformer predicts the flow velocity v = noise - x0 on x_t = (1 - t) x0 + t noise (FLUX's
convention, so x0_hat = x_t - t v), receiving t in [0, 1] (it scales by 1000 itself) and no
guidance embedding.

Weights folder (diffusers layout, so the policy's folder checks apply unchanged):

    model_index.json                      {"_class_name": "TinyFlowPipeline", transformer, text_encoder, vae}
    transformer/config.json + diffusion_pytorch_model.safetensors   (FluxTransformer2DModel)
    text_encoder/config.json + diffusion_pytorch_model.safetensors  (TinyTextEncoder)
    vae/config.json + diffusion_pytorch_model.safetensors           (AutoencoderKL; scaling/shift factors in its config)
    pretrain_record.json                  how the weights were made (dancegrpo_fast.pretrain_tiny)
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from diffusers import AutoencoderKL, FluxTransformer2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from .task import IMAGE_SIZE, VOCABULARY, normalize

PIPELINE_CLASS = "TinyFlowPipeline"
SPECIAL_TOKENS = ("<pad>", "<s>", "<unk>")
PAD, BOS, UNK = 0, 1, 2

DEFAULT_TRANSFORMER = dict(patch_size=1, in_channels=16, out_channels=None, num_layers=2, num_single_layers=2,
                           attention_head_dim=32, num_attention_heads=3, joint_attention_dim=64,
                           pooled_projection_dim=64, guidance_embeds=False, axes_dims_rope=(8, 12, 12))
# 32x32x3 -> 8x8x4: three encoder blocks (two downsamplings), no attention in the mid block.
DEFAULT_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                   up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64), layers_per_block=1,
                   latent_channels=4, norm_num_groups=16, sample_size=IMAGE_SIZE, mid_block_add_attention=False)
LATENT_PATCH = 2


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
    (TinyTextEncoder, which owns the tokenizer) and `vae` (AutoencoderKL, or None for pixel
    space); image size in `image_size`, model-space packing in `patch` (latent or pixel patch).
    Not a diffusers DiffusionPipeline: just enough for the policy, pretraining and evaluation."""

    def __init__(self, transformer: FluxTransformer2DModel, text_encoder: TinyTextEncoder,
                 image_size: int = IMAGE_SIZE, vae: Optional[AutoencoderKL] = None):
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.vae = vae
        self.image_size = image_size
        channels = transformer.config.in_channels
        if vae is None:
            self.space_channels, self.space_size = 3, image_size
        else:
            self.space_channels = vae.config.latent_channels
            self.space_size = image_size // 2 ** (len(vae.config.block_out_channels) - 1)
        self.patch = int(round((channels / self.space_channels) ** 0.5))
        if self.space_channels * self.patch ** 2 != channels or self.space_size % self.patch:
            raise ValueError(f"transformer in_channels={channels} is not {self.space_channels} * patch^2 for a patch "
                             f"that divides the {'latent' if vae is not None else 'image'} size {self.space_size}")
        self.image_ids = image_ids(self.space_size, self.space_size, self.patch)

    @classmethod
    def from_config(cls, transformer: Optional[Dict] = None, text_encoder: Optional[Dict] = None,
                    vae: Optional[Dict] = None, pixel_space: bool = False) -> "TinyFlowPipeline":
        """A randomly initialised pipeline (the default architecture unless configs are given);
        pixel_space=True: no VAE (give a transformer config with in_channels = 3 * patch^2)."""
        if pixel_space:
            return cls(FluxTransformer2DModel(**{**DEFAULT_TRANSFORMER, "in_channels": 48, **(transformer or {})}),
                       TinyTextEncoder(**(text_encoder or {})))
        return cls(FluxTransformer2DModel(**{**DEFAULT_TRANSFORMER, **(transformer or {})}),
                   TinyTextEncoder(**(text_encoder or {})), vae=AutoencoderKL(**{**DEFAULT_VAE, **(vae or {})}))

    @property
    def components(self) -> Dict[str, nn.Module]:
        parts = {"transformer": self.transformer, "text_encoder": self.text_encoder}
        if self.vae is not None:
            parts["vae"] = self.vae
        return parts

    @property
    def latent_shape(self) -> Tuple[int, int]:
        return ((self.space_size // self.patch) ** 2, self.space_channels * self.patch ** 2)

    # --- io ------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder, torch_dtype: torch.dtype = torch.float32) -> "TinyFlowPipeline":
        folder = Path(folder)
        index = json.loads((folder / "model_index.json").read_text())
        transformer = FluxTransformer2DModel.from_pretrained(str(folder / "transformer"), torch_dtype=torch_dtype)
        text_encoder = TinyTextEncoder.from_pretrained(str(folder / "text_encoder"), torch_dtype=torch_dtype)
        vae = None
        if "vae" in index:
            # The VAE stays float32: it is tiny, and its decode feeds the reward.
            vae = AutoencoderKL.from_pretrained(str(folder / "vae")).eval().requires_grad_(False)
        return cls(transformer, text_encoder, int(index.get("image_size", IMAGE_SIZE)), vae)

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
        if self.vae is not None:
            index["vae"] = ["diffusers", "AutoencoderKL"]
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
        """(B, 3, H, W) in [0, 1] -> packed model-space latents (x0 of the flow)."""
        x = images * 2 - 1
        if self.vae is None:
            return pack(x, self.patch)
        z = self.vae.encode(x.to(self.vae.dtype)).latent_dist.mode()
        shift, scale = self._latent_factors()
        return pack((z - shift) * scale, self.patch)

    def _latent_factors(self) -> Tuple[float, float]:
        """(shift_factor, scaling_factor) of the VAE config (an untrained VAE has no shift: 0)."""
        config = self.vae.config
        return float(config.shift_factor or 0.0), float(config.scaling_factor)

    def latents_to_images(self, latents: Tensor) -> Tensor:
        """Packed latents -> (B, 3, H, W) float32 in [0, 1]."""
        if self.vae is None:
            images = unpack(latents.float(), self.patch, self.image_size, self.image_size)
        else:
            shift, scale = self._latent_factors()
            z = unpack(latents.float(), self.patch, self.space_size, self.space_size) / scale + shift
            with torch.no_grad():
                images = self.vae.decode(z.to(self.vae.dtype)).sample.float()
        return (images / 2 + 0.5).clamp(0, 1)


def _cast_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    return copy.deepcopy(module).to(dtype)


__all__ = ["TinyTokenizer", "TinyTextEncoder", "TinyFlowPipeline", "pack", "unpack", "image_ids",
           "DEFAULT_TRANSFORMER", "DEFAULT_VAE", "PIPELINE_CLASS"]
