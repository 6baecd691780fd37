"""Build tiny random checkpoints of the real diffusers/transformers classes, saved in the diffusers
folder layout, so the policies' real from-path loading code runs in the tests.

Nothing is downloaded: tokenizers are built from small vocabularies written here.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ("a photo of cat dog red blue green sky tree house car bird small big on the in with "
         "and at night day sun moon river boat flower field mountain city street light dark").split()


# ----------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------


def _bytes_to_unicode():
    """CLIP's 256 byte-level characters, in CLIP's order (the map lives with the reward tests'
    tokenizer writer)."""
    from dancegrpo_fast.rewards.testing import _bytes_to_unicode as byte_map

    return list(byte_map().values())


def clip_tokenizer(folder: Path, model_max_length: int = 16):
    """A CLIPTokenizer over single byte-level characters plus a few merges."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab = {}
    for ch in chars:
        vocab[ch] = len(vocab)
    for ch in chars:
        vocab[ch + "</w>"] = len(vocab)
    merges = ["c a", "ca t</w>", "d o", "do g</w>"]
    for merge in merges:
        vocab["".join(merge.split())] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                        model_max_length=model_max_length, pad_token="<|endoftext|>")
    return tok


def _pieces():
    pieces = []
    for word in WORDS:
        pieces.append("\u2581" + word)
    pieces.append("\u2581")
    pieces.extend("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'|<>_-{}()/")
    return pieces


def t5_tokenizer(model_max_length: int = 16):
    """A T5 (Unigram) tokenizer over a few words and single characters."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(piece, -1.0 if len(piece) > 2 else -5.0) for piece in _pieces()]
    if _transformers_major() < 5:  # 4.x: T5Tokenizer needs a sentencepiece file; the fast class takes a backend
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
        from transformers import T5TokenizerFast

        backend = Tokenizer(models.Unigram(vocab, unk_id=2))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
        backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
        backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                               special_tokens=[("</s>", 1)])
        return T5TokenizerFast(tokenizer_object=backend, extra_ids=0, model_max_length=model_max_length), len(vocab)
    tok = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)
    return tok, len(vocab)


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def llama_tokenizer(model_max_length: int = 256):
    """A Llama (BPE, Metaspace) tokenizer over single characters, with a pad token."""
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for piece in _pieces():
        if len(piece) <= 2:
            vocab.setdefault(piece, len(vocab))
    if _transformers_major() < 5:  # 4.x: LlamaTokenizer needs a sentencepiece file; the fast class takes a backend
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        from transformers import LlamaTokenizerFast

        backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
        return LlamaTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", model_max_length=model_max_length), len(vocab)
    tok = LlamaTokenizer(vocab=vocab, merges=[], pad_token="<pad>", model_max_length=model_max_length)
    return tok, len(vocab)


# ----------------------------------------------------------------------------------------------
# Text encoders
# ----------------------------------------------------------------------------------------------


def clip_text_model(vocab_size: int, hidden: int = 32, projection: int = 32, with_projection: bool = False,
                    max_positions: int = 16):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=max_positions,
                            projection_dim=projection, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                            pad_token_id=vocab_size - 1)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def t5_model(vocab_size: int, d_model: int = 32, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    kwargs = dict(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1,
                  num_heads=2, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                  decoder_start_token_id=0)
    if umt5:
        return UMT5EncoderModel(UMT5Config(**kwargs)).eval()
    return T5EncoderModel(T5Config(**kwargs)).eval()


def _vae_2d(latent_channels: int, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                         layers_per_block=1, latent_channels=latent_channels, norm_num_groups=4,
                         sample_size=16, **extra).eval()


# ----------------------------------------------------------------------------------------------
# Model folders
# ----------------------------------------------------------------------------------------------


def make_flux(folder, seed: int = 0) -> Path:
    """Tiny FLUX.1-dev: FluxTransformer2DModel with guidance embedding; 16x16 images, 8x8 latents
    of 4 channels (packed to 16 tokens of 16 features)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    folder = Path(folder)
    torch.manual_seed(seed)
    clip_tok = clip_tokenizer(folder / "_tok_clip")
    t5_tok, t5_vocab = t5_tokenizer()
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                        vae=_vae_2d(4, scaling_factor=0.3611, shift_factor=0.1159),
                        text_encoder=clip_text_model(len(clip_tok)), tokenizer=clip_tok,
                        text_encoder_2=t5_model(t5_vocab), tokenizer_2=t5_tok, transformer=transformer)
    pipe.save_pretrained(folder)
    _cleanup(folder)
    return folder


def make_sd3(folder, seed: int = 0) -> Path:
    """Tiny SD3: SD3Transformer2DModel, two CLIP-with-projection encoders and a T5; 8x8 latents."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    folder = Path(folder)
    torch.manual_seed(seed)
    clip_tok = clip_tokenizer(folder / "_tok_clip")
    t5_tok, t5_vocab = t5_tokenizer()
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1,
                                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=32, pooled_projection_dim=64, out_channels=4,
                                        pos_embed_max_size=16)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae_2d(4, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=clip_text_model(len(clip_tok), hidden=32, projection=32, with_projection=True),
        tokenizer=clip_tok,
        text_encoder_2=clip_text_model(len(clip_tok), hidden=32, projection=32, with_projection=True),
        tokenizer_2=clip_tok, text_encoder_3=t5_model(t5_vocab, d_model=32), tokenizer_3=t5_tok)
    pipe.save_pretrained(folder)
    _cleanup(folder)
    return folder


def make_sd(folder, seed: int = 0) -> Path:
    """Tiny SD 1.x: UNet2DConditionModel, CLIP text encoder, DDIMScheduler (steps_offset=1)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    folder = Path(folder)
    torch.manual_seed(seed)
    clip_tok = clip_tokenizer(folder / "_tok_clip")
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), norm_num_groups=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=32, attention_head_dim=8)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=_vae_2d(4, scaling_factor=0.18215), text_encoder=clip_text_model(len(clip_tok)),
                                   tokenizer=clip_tok, unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    _cleanup(folder)
    return folder


def make_hunyuan_video(folder, seed: int = 0, pipeline_class=None, in_channels: int = 4,
                       guidance_embeds: bool = False, shift: float = 5.0) -> Path:
    """Tiny HunyuanVideo T2V: a Llama text encoder and a CLIP; a VAE with 4x spatial and 4x temporal
    compression: 5 frames of 16x16 -> 2 latent frames of 4x4. pipeline_class / in_channels /
    guidance_embeds / shift: the same model in another HunyuanVideo pipeline's layout (SkyReels
    I2V: tiny_i2v.make_skyreels_i2v)."""
    from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline,
                           HunyuanVideoTransformer3DModel)
    from transformers import LlamaConfig, LlamaModel

    folder = Path(folder)
    torch.manual_seed(seed)
    clip_tok = clip_tokenizer(folder / "_tok_clip")
    llama_tok, llama_vocab = llama_tokenizer()
    llama = LlamaModel(LlamaConfig(vocab_size=llama_vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                                   pad_token_id=3, bos_token_id=1, eos_token_id=2)).eval()
    transformer = HunyuanVideoTransformer3DModel(in_channels=in_channels, out_channels=4, num_attention_heads=2,
                                                 attention_head_dim=8, num_layers=1, num_single_layers=1,
                                                 num_refiner_layers=1, patch_size=1, patch_size_t=1,
                                                 text_embed_dim=32, pooled_projection_dim=32, rope_axes_dim=(2, 2, 4),
                                                 guidance_embeds=guidance_embeds)
    vae = AutoencoderKLHunyuanVideo(in_channels=3, out_channels=3, latent_channels=4,
                                    down_block_types=("HunyuanVideoDownBlock3D",) * 3,
                                    up_block_types=("HunyuanVideoUpBlock3D",) * 3, block_out_channels=(8, 8, 8),
                                    layers_per_block=1, norm_num_groups=4, spatial_compression_ratio=4,
                                    temporal_compression_ratio=4, mid_block_add_attention=True).eval()
    pipe = (pipeline_class or HunyuanVideoPipeline)(
        text_encoder=llama, tokenizer=llama_tok, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        text_encoder_2=clip_text_model(len(clip_tok), max_positions=77), tokenizer_2=clip_tok)
    pipe.save_pretrained(folder)
    _cleanup(folder)
    return folder


def make_wan(folder, seed: int = 0) -> Path:
    """Tiny Wan 2.1 T2V: UMT5 text encoder, AutoencoderKLWan (4x spatial, 4x temporal); 5 frames of
    16x16 -> 2 latent frames of 4x4."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    folder = Path(folder)
    torch.manual_seed(seed)
    t5_tok, t5_vocab = t5_tokenizer(model_max_length=32)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                        in_channels=4, out_channels=4, text_dim=32, freq_dim=16, ffn_dim=32,
                                        num_layers=1, rope_max_seq_len=32)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1], num_res_blocks=1, temperal_downsample=[True, True],
                           latents_mean=[0.1, -0.1, 0.0, 0.2], latents_std=[1.5, 0.5, 1.0, 2.0],
                           scale_factor_temporal=4, scale_factor_spatial=4).eval()
    pipe = WanPipeline(tokenizer=t5_tok, text_encoder=t5_model(t5_vocab, d_model=32, umt5=True), vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), transformer=transformer)
    pipe.save_pretrained(folder)
    _cleanup(folder)
    return folder


def _cleanup(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder / "_tok_clip", ignore_errors=True)


BUILDERS = {"flux": make_flux, "sd3": make_sd3, "sd": make_sd, "hunyuan_video": make_hunyuan_video, "wan": make_wan}


def write_prompts(path, prompts=("a red cat", "a blue dog", "a green tree", "a small house",
                                 "a big boat at night", "a bird in the sky", "a car on the street",
                                 "a flower field")) -> Path:
    path = Path(path)
    path.write_text("\n".join(prompts) + "\n")
    return path


def run_single_threaded():
    """Generator body of a module-scoped autouse fixture: tiny models run fastest on one intra-op
    thread, and on a loaded machine several spinning threads per process slow everything down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def flux_train_values(folder, tmp_path, prompts=None, **overrides) -> dict:
    """The flat settings of a tiny FLUX run (from make_flux's folder) small enough for a test:
    2 prompts x 2 samples, 4 steps, every trainable step trained, 2 micro-batches of 2; prompts:
    the prompt file's lines (write_prompts' default list when None)."""
    Path(tmp_path).mkdir(parents=True, exist_ok=True)
    prompt_file = write_prompts(Path(tmp_path) / "p.txt", *([prompts] if prompts is not None else []))
    values = dict(model_family="flux", model_path=str(folder), prompt_file=str(prompt_file),
                  output_dir=str(Path(tmp_path) / "out"), height=16, width=16, num_steps=4, group_size=2,
                  prompts_per_rank=2, rollout_batch_size=4, train_batch_size=2, gradient_accumulation_steps=2,
                  timestep_fraction=1.0, max_sequence_length=16, lr=1e-3, num_iterations=1, progress_bar=False,
                  tensorboard=False, mixed_precision="no", seed=1)
    values.update(overrides)
    return values


def flux_train_config(folder, tmp_path, prompts=None, **overrides):
    """flux_train_values as a TrainConfig."""
    from dancegrpo_fast.config import TrainConfig

    return TrainConfig.from_dict(flux_train_values(folder, tmp_path, prompts, **overrides))
