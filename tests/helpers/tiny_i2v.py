"""A tiny random SkyReels-V1 I2V checkpoint (HunyuanSkyreelsImageToVideoPipeline) saved in the
diffusers folder layout, input images, and image prompt files, for the image-to-video tests."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence, Tuple

import torch

from .tiny_models import make_hunyuan_video


def make_skyreels_i2v(folder, seed: int = 0) -> Path:
    """Tiny SkyReels I2V: the tiny HunyuanVideo of tiny_models.make_hunyuan_video with a
    transformer that takes the noisy latents and the image latents (in_channels 2 x 4 = 8,
    out_channels 4), in HunyuanSkyreelsImageToVideoPipeline's layout; 5 frames of 16x16 -> 2
    latent frames of 4x4. The guidance embedding is on, as the pipeline always passes it."""
    from diffusers import HunyuanSkyreelsImageToVideoPipeline

    return make_hunyuan_video(folder, seed, pipeline_class=HunyuanSkyreelsImageToVideoPipeline, in_channels=8,
                              guidance_embeds=True, shift=7.0)


def write_images(folder, count: int = 4, size: Tuple[int, int] = (24, 20)) -> list:
    """`count` distinct PNG images (width x height `size`, not the model's 16x16: the policy
    resizes and crops), solid colours with a bright square at a different place in each."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(count):
        image = Image.new("RGB", size, color=(40 * k % 256, 200 - 30 * k, 90 + 20 * k))
        for x in range(4 * k % (size[0] - 6), 4 * k % (size[0] - 6) + 6):
            for y in range(2, 8):
                image.putpixel((x, y), (255, 255, 255))
        path = folder / f"frame{k}.png"
        image.save(path)
        paths.append(path)
    return paths


def write_image_prompts(path, entries: Sequence[Tuple[str, str]]) -> Path:
    """A JSONL prompt file of (prompt, image path relative to the file's folder) entries."""
    path = Path(path)
    path.write_text("".join(json.dumps({"prompt": text, "image": image}) + "\n" for text, image in entries))
    return path


def make_wan_i2v(folder, seed: int = 0) -> Path:
    """Tiny Wan 2.1 I2V: the tiny Wan of tiny_models.make_wan with a transformer that takes the
    noisy latents, the 4-channel mask and the condition latents (in_channels 4 + 4 + 4 = 12),
    an image embedder fed by a tiny CLIP vision encoder (32x32 input, 17 tokens of 32) and its
    CLIPImageProcessor; WanImageToVideoPipeline's layout. 5 frames of 16x16 -> 2 latent frames."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from .tiny_models import t5_model, t5_tokenizer

    folder = Path(folder)
    torch.manual_seed(seed)
    t5_tok, t5_vocab = t5_tokenizer(model_max_length=32)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                        in_channels=12, out_channels=4, text_dim=32, freq_dim=16, ffn_dim=32,
                                        num_layers=1, rope_max_seq_len=32, image_dim=32, added_kv_proj_dim=16)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1], num_res_blocks=1, temperal_downsample=[True, True],
                           latents_mean=[0.1, -0.1, 0.0, 0.2], latents_std=[1.5, 0.5, 1.0, 2.0],
                           scale_factor_temporal=4, scale_factor_spatial=4).eval()
    image_encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                     num_attention_heads=2, image_size=32, patch_size=8)).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pipe = WanImageToVideoPipeline(tokenizer=t5_tok, text_encoder=t5_model(t5_vocab, d_model=32, umt5=True), vae=vae,
                                   scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), image_processor=image_processor,
                                   image_encoder=image_encoder, transformer=transformer)
    pipe.save_pretrained(folder)
    return folder
