"""The image-to-video policies (skyreels_i2v: HunyuanSkyreelsImageToVideoPipeline; wan_i2v:
WanImageToVideoPipeline) on tiny random checkpoints of the real diffusers classes, loaded from
folders, trained from a JSONL prompt file with input images: the transformer's input is the one
the diffusers pipeline builds; each group shares its prompt's image; rollout shapes; rollout
log-prob == training-time log-prob (ratio exactly 1); one update lowers the surrogate loss; the
saved weights (full and LoRA) load back into the diffusers pipeline."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers.fixtures import _single_thread  # noqa: E402,F401  (fixtures)
from helpers.policy_checks import check_on_policy_and_one_update  # noqa: E402
from helpers.tiny_i2v import make_skyreels_i2v, make_wan_i2v, write_image_prompts, write_images  # noqa: E402
from helpers.tiny_models import write_prompts  # noqa: E402

from dancegrpo_fast.config import TrainConfig  # noqa: E402
from dancegrpo_fast.prompts import ImagePrompt, load_prompts  # noqa: E402
from dancegrpo_fast.train import Trainer  # noqa: E402

CAPTIONS = ["a red cat", "a blue dog", "a green tree", "a small house"]


# Per family: the sampler settings of the tests (the published ones' shape: SkyReels CFG 6 with the
# guidance embedding at 1, shift 7; Wan CFG 5), the rollout's model timesteps (DanceGRPO's
# int(sigma * 1000) / 1000 of the shifted sigmas shift s / (1 + (shift - 1) s), times 1000), the
# diffusers classes, the transformer's input channels, and the image conditioning's shapes per prompt.
FAMILIES = {
    "skyreels_i2v": dict(settings=dict(shift=7.0, guidance_scale=1.0, cfg_scale=6.0),
                         timesteps=[1000.0, 954.0, 875.0, 700.0], pipeline="HunyuanSkyreelsImageToVideoPipeline",
                         transformer="HunyuanVideoTransformer3DModel", in_channels=8,
                         image_shapes={"image_latents": (4, 1, 4, 4)}),
    "wan_i2v": dict(settings=dict(shift=3.0, cfg_scale=5.0), timesteps=[1000.0, 900.0, 750.0, 500.0],
                    pipeline="WanImageToVideoPipeline", transformer="WanTransformer3DModel", in_channels=12,
                    image_shapes={"image_condition": (8, 2, 4, 4), "image_embeds": (17, 32)}),
}
BUILDERS = {"skyreels_i2v": make_skyreels_i2v, "wan_i2v": make_wan_i2v}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    made = {}

    def get(family):
        if family not in made:
            made[family] = BUILDERS[family](tmp_path_factory.mktemp(family) / "model")
        return made[family]

    return get


@pytest.fixture(scope="module")
def folder(folders):
    return folders("skyreels_i2v")


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    """Four captions with four images, and one caption repeated with another image (a caption
    shared by several images is common in I2V data: the image must tell them apart)."""
    root = tmp_path_factory.mktemp("i2v_prompts")
    images = write_images(root / "images", count=5)
    entries = [(text, f"images/{p.name}") for text, p in zip(CAPTIONS, images)]
    entries.append((CAPTIONS[0], f"images/{images[4].name}"))
    return write_image_prompts(root / "prompts.jsonl", entries)


def brightness(videos, prompts):
    """Rule-based test reward: mean pixel value of the video."""
    return videos.float().mean(dim=tuple(range(1, videos.dim())))


def make_config(folder, prompt_file, tmp_path, family="skyreels_i2v", **overrides) -> TrainConfig:
    values = dict(model_family=family, model_path=str(folder), prompt_file=str(prompt_file),
                  output_dir=str(tmp_path / "out"), height=16, width=16, num_frames=5, num_steps=4, group_size=2,
                  prompts_per_rank=2, rollout_batch_size=4, train_batch_size=2, gradient_accumulation_steps=2,
                  timestep_fraction=1.0, max_sequence_length=16, lr=1e-4, clip_range=10.0, num_iterations=1,
                  progress_bar=False, tensorboard=False, mixed_precision="no", seed=3, sampler="dance", eta=0.3,
                  negative_prompt="dark blur")
    values.update(FAMILIES[family]["settings"])
    values.update(overrides)
    return TrainConfig.from_dict(values)


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_i2v_rollout_ratio_update_and_saved_weights(folders, prompt_file, tmp_path, family, use_lora):
    import diffusers

    expected = FAMILIES[family]
    folder = folders(family)
    config = make_config(folder, prompt_file, tmp_path, family, use_lora=use_lora, lora_rank=4, lora_alpha=4.0,
                         lora_target_modules=["to_q", "to_k", "to_v"])
    scored = []

    def recording_brightness(videos, prompts):
        scored.append(tuple(videos.shape))
        return brightness(videos, prompts)

    trainer = Trainer(config, rewards={"brightness": (recording_brightness, 1.0)})
    policy = trainer.policy
    assert policy.latent_shape() == (4, 2, 4, 4)  # the VAE's 4 channels, not the transformer's 8 inputs

    trajectory, samples, scores, _ = trainer.collect_and_score()
    assert all(isinstance(p, ImagePrompt) for p in trajectory.prompts)
    assert trajectory.latents.shape == (4, 5, 4, 2, 4, 4)
    assert trajectory.log_probs.shape == (4, 4)
    assert torch.isfinite(trajectory.log_probs).all()
    assert torch.allclose(trajectory.timesteps, torch.tensor(expected["timesteps"], dtype=torch.float64))
    # Rewards saw videos (B, T, 3, H, W) in [0, 1], as from the T2V families.
    assert scored and all(shape[1:] == (5, 3, 16, 16) for shape in scored)
    assert sum(shape[0] for shape in scored) == 4
    assert samples.shape == (4, 5, 3, 16, 16) and samples.min() >= 0 and samples.max() <= 1
    assert torch.equal(samples, policy.decode(trajectory.final_latents))
    assert torch.allclose(scores["brightness"], brightness(samples, None))
    # The G = 2 samples of a prompt share its initial noise and its image latents; prompts differ.
    assert torch.equal(trajectory.latents[0, 0], trajectory.latents[1, 0])
    cond = policy.encode(trajectory.prompts)
    assert set(policy.image_keys) == set(expected["image_shapes"])
    for key, shape in expected["image_shapes"].items():
        image = cond[key][trajectory.prompt_rows]
        assert image.shape == (4,) + shape
        assert torch.equal(image[0], image[1]) and torch.equal(image[2], image[3])
        assert not torch.equal(image[0], image[2])

    # Rollout log-prob == the training pass's; one update changes only trainable weights and lowers the loss.
    check_on_policy_and_one_update(trainer, trajectory, 4, use_lora)

    # The checkpoint loads back into the diffusers pipeline.
    pipeline_class = getattr(diffusers, expected["pipeline"])
    transformer_class = getattr(diffusers, expected["transformer"])
    checkpoint = trainer.save()
    if use_lora:
        pipe = pipeline_class.from_pretrained(str(folder))
        pipe.load_lora_weights(str(checkpoint / "model"))
        loaded, trained = _lora_weights(pipe.transformer), _lora_weights(policy.model)
        assert trained and set(trained) <= set(loaded) and all(torch.equal(loaded[k], v) for k, v in trained.items())
        # diffusers' Wan loader gives a LoRA without the image cross-attention's add_k/add_v
        # projections zero adapters there (no effect); nothing else is added.
        extra = set(loaded) - set(trained)
        assert all(("add_k_proj" in k or "add_v_proj" in k) and not loaded[k].any() for k in extra)
    else:
        loaded = transformer_class.from_pretrained(str(checkpoint / "model" / "transformer"))
        trained = policy.model.state_dict()
        assert all(torch.equal(v, trained[k]) for k, v in loaded.state_dict().items())
        pipe = pipeline_class.from_pretrained(str(folder), transformer=loaded)
        assert pipe.transformer.config.in_channels == expected["in_channels"]


def _lora_weights(model):
    """{parameter name without the adapter's name: value} of the LoRA parameters."""
    import re

    return {re.sub(r"\.(lora_[AB])\.[^.]+\.", r".\1.", k): v for k, v in model.state_dict().items() if "lora" in k}


def _capture_transformer_inputs(transformer):
    seen = []

    def hook(module, args, kwargs):
        seen.append({k: kwargs[k].detach().clone() for k in ("hidden_states", "encoder_hidden_states", "guidance")})

    return seen, transformer.register_forward_pre_hook(hook, with_kwargs=True)


def test_model_input_is_the_pipelines(folder, tmp_path, monkeypatch):
    """The transformer's input in the policy's model call equals the one diffusers'
    HunyuanSkyreelsImageToVideoPipeline builds for the same image, prompt and x_T (its posterior
    sampled at the mean, as the policy encodes): [noisy latents, first-frame image latents then
    zeros] on the channels; the text and guidance embedding as the pipeline's; CFG's
    unconditional half keeps the image."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from PIL import Image

    from dancegrpo_fast.policies import build_policy

    rng = torch.Generator().manual_seed(0)
    image = Image.fromarray((torch.rand(16, 16, 3, generator=rng) * 255).to(torch.uint8).numpy())
    image.save(tmp_path / "im.png")
    prompt = ImagePrompt("a red cat", str(tmp_path / "im.png"))
    config = make_config(folder, write_prompts(tmp_path / "p.txt"), tmp_path, negative_prompt="dark blur")
    policy = build_policy(config.model, config.sampler)
    x = torch.randn((1,) + policy.latent_shape(), generator=rng)

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())
    seen, handle = _capture_transformer_inputs(policy.model)
    try:
        policy.pipe(image=image, prompt="a red cat", negative_prompt="dark blur", height=16, width=16, num_frames=5,
                    num_inference_steps=1, true_cfg_scale=6.0, guidance_scale=1.0, latents=x.clone(),
                    max_sequence_length=16, output_type="latent")
        schedule = policy.schedule()
        policy.predict(x, torch.zeros(1, dtype=torch.int64), policy.encode([prompt]), schedule)
    finally:
        handle.remove()
    # The pipeline calls the transformer with the prompt, then the negative prompt; predict calls
    # it once with [negative, prompt].
    pipe_text, pipe_negative, ours = seen
    assert ours["hidden_states"].shape == (2, 8, 2, 4, 4)
    for half, reference in ((1, pipe_text), (0, pipe_negative)):
        assert torch.allclose(ours["hidden_states"][half], reference["hidden_states"][0], atol=1e-6)
        assert torch.allclose(ours["encoder_hidden_states"][half], reference["encoder_hidden_states"][0], atol=1e-6)
        assert torch.equal(ours["guidance"][half], reference["guidance"][0])
    hidden = ours["hidden_states"][1]
    assert torch.equal(hidden[:4], x[0])
    assert hidden[4:, 0].abs().sum() > 0 and torch.equal(hidden[4:, 1:], torch.zeros_like(hidden[4:, 1:]))



def test_wan_model_input_is_the_pipelines(folders, tmp_path):
    """wan_i2v: the transformer's input equals WanImageToVideoPipeline's for the same image, prompt
    and x_T: [noisy latents, the 4-channel mask, the normalised condition latents of the image
    followed by black frames] on the channels, the CLIP image tokens, the text; CFG's unconditional
    half keeps the image."""
    from PIL import Image

    from dancegrpo_fast.policies import build_policy

    rng = torch.Generator().manual_seed(0)
    image = Image.fromarray((torch.rand(16, 16, 3, generator=rng) * 255).to(torch.uint8).numpy())
    image.save(tmp_path / "im.png")
    prompt = ImagePrompt("a red cat", str(tmp_path / "im.png"))
    config = make_config(folders("wan_i2v"), write_prompts(tmp_path / "p.txt"), tmp_path, "wan_i2v")
    policy = build_policy(config.model, config.sampler)
    x = torch.randn((1,) + policy.latent_shape(), generator=rng)

    seen = []
    keys = ("hidden_states", "encoder_hidden_states", "encoder_hidden_states_image")
    handle = policy.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append({k: kwargs[k].detach().clone() for k in keys}), with_kwargs=True)
    try:
        policy.pipe(image=image, prompt="a red cat", negative_prompt="dark blur", height=16, width=16, num_frames=5,
                    num_inference_steps=1, guidance_scale=5.0, latents=x.clone(), max_sequence_length=16,
                    output_type="latent")
        policy.predict(x, torch.zeros(1, dtype=torch.int64), policy.encode([prompt]), policy.schedule())
    finally:
        handle.remove()
    pipe_text, pipe_negative, ours = seen
    assert ours["hidden_states"].shape == (2, 12, 2, 4, 4) and ours["encoder_hidden_states_image"].shape == (2, 17, 32)
    for half, reference in ((1, pipe_text), (0, pipe_negative)):
        for key in keys:
            assert torch.allclose(ours[key][half], reference[key][0], atol=1e-6), key
    hidden = ours["hidden_states"][1]
    assert torch.equal(hidden[:4], x[0])
    assert torch.equal(hidden[4:8, 0], torch.ones_like(hidden[4:8, 0])) and not hidden[4:8, 1:].any()  # the mask


def test_images_are_cropped_to_the_aspect_not_squashed(folder, tmp_path):
    """A 32x16 (wide) image for a 16x16 video: its centre 16x16 square is encoded, as SkyReels'
    own resize-crop does, not the whole image squeezed."""
    from PIL import Image

    from dancegrpo_fast.policies import build_policy

    rng = torch.Generator().manual_seed(1)
    pixels = (torch.rand(16, 32, 3, generator=rng) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    Image.fromarray(pixels[:, 8:24]).save(tmp_path / "centre.png")
    Image.fromarray(pixels).resize((16, 16)).save(tmp_path / "squashed.png")
    config = make_config(folder, write_prompts(tmp_path / "p.txt"), tmp_path)
    policy = build_policy(config.model, config.sampler)
    latents = policy.encode_images([str(tmp_path / n) for n in ("wide.png", "centre.png", "squashed.png")])
    wide, centre, squashed = latents["image_latents"]
    assert torch.allclose(wide, centre, atol=1e-6)
    assert not torch.allclose(wide, squashed, atol=1e-3)


def test_the_cache_tells_apart_images_of_one_caption(folder, prompt_file, tmp_path):
    from dancegrpo_fast.policies import build_policy

    prompts = load_prompts(prompt_file)
    same_caption = [p for p in prompts if str(p) == CAPTIONS[0]]
    assert len(same_caption) == 2
    config = make_config(folder, prompt_file, tmp_path)
    policy = build_policy(config.model, config.sampler)
    cond = policy.encode(same_caption)
    assert len(policy._embedding_cache) == 2
    assert torch.equal(cond["prompt_embeds"][0], cond["prompt_embeds"][1])
    assert not torch.equal(cond["image_latents"][0], cond["image_latents"][1])
    # Encoded again (from the cache or not), a prompt's conditioning is the same: the posterior mean.
    policy._embedding_cache.clear()
    again = policy.encode(same_caption)
    assert all(torch.equal(cond[k], again[k]) for k in cond)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prompts_without_images_stop_with_a_clear_error(folders, tmp_path, family):
    config = make_config(folders(family), write_prompts(tmp_path / "p.txt"), tmp_path, family)
    with pytest.raises(ValueError, match=rf"model_family '{family}' generates a video from an input image.*\.jsonl"):
        Trainer(config, rewards={"brightness": (brightness, 1.0)}).collect()



def test_the_published_architecture_builds_on_the_meta_device():
    """dancegrpo_fast/architectures/skyreels_v1_hunyuan_i2v (what `python -m dancegrpo_fast.plan
    --preset skyreels_i2v` plans) builds through the policy's loading code on the meta device:
    HunyuanVideo T2V's 12,821,012,544 transformer parameters plus the wider conv-in (16 more input
    channels x 3072 x the 1x2x2 patch); at the preset's settings the latents are (16, 25, 68,
    120), a text prompt encodes as if it had an image of the configured size (the plan's dry
    run), and the CFG model call runs on meta tensors."""
    from dancegrpo_fast.config import apply_preset
    from dancegrpo_fast.plan import ARCHITECTURES_DIR, DEFAULT_ARCHITECTURE
    from dancegrpo_fast.policies import build_policy

    config = apply_preset("skyreels_i2v")
    folder = ARCHITECTURES_DIR / DEFAULT_ARCHITECTURE["skyreels_i2v"]
    config = TrainConfig.from_dict({"model": {"path": str(folder)}}, config)
    policy = build_policy(config.model, config.sampler, "meta")
    assert sum(p.numel() for p in policy.model.parameters()) == 12_821_012_544 + 16 * 3072 * 4
    assert policy.latent_shape() == (16, 25, 68, 120)
    cond = policy.encode(["a dancer spins"])
    assert cond["image_latents"].shape == (1, 16, 1, 68, 120)
    x = torch.empty((1, 16, 25, 68, 120), device="meta")
    assert policy.uses_cfg
    v = policy.predict(x, torch.zeros(1, dtype=torch.int64), cond, policy.schedule())
    assert v.shape == x.shape


def test_a_run_with_held_out_image_prompts_evaluates_and_resumes(folder, prompt_file, tmp_path):
    """The trainer end to end on image prompts: training iterations, a held-out JSONL evaluation
    before and after (its eval_before.pt, holding the image prompts, reads back with
    weights_only=True: the before/after sheet is drawn), and a resume that continues the prompt
    stream."""
    config = make_config(folder, prompt_file, tmp_path, num_iterations=1, eval_every=1,
                         eval_prompt_file=str(prompt_file), eval_num_prompts=2, cfg_scale=1.0)
    trainer = Trainer(config, rewards={"brightness": (brightness, 1.0)})
    rows = trainer.train()
    assert [r["iteration"] for r in rows] == [0, 1]
    assert all("eval/brightness/mean" in r for r in rows)
    out = Path(config.runtime.output_dir)
    before = torch.load(out / "samples" / "eval_before.pt", weights_only=True)
    assert before["prompts"] and all(isinstance(p, ImagePrompt) for p in before["prompts"])
    assert (out / "before_after.png").is_file()
    resumed = Trainer(make_config(folder, prompt_file, tmp_path, num_iterations=2, resume="latest", cfg_scale=1.0),
                      rewards={"brightness": (brightness, 1.0)})
    assert resumed.iteration == 1 and resumed.prompts.position == 2
    assert [r["iteration"] for r in resumed.train()] == [2]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_text_prompt_encodes_on_the_meta_device(folders, tmp_path, family):
    """On the meta device (the plan's dry run, which has no image) a text prompt encodes as if it
    came with an image of the configured size, with the shapes a real image gives, and the CFG
    model call runs."""
    from dancegrpo_fast.policies import build_policy

    config = make_config(folders(family), write_prompts(tmp_path / "p.txt"), tmp_path, family)
    policy = build_policy(config.model, config.sampler, "meta")
    cond = policy.encode(["a red cat"])
    for key, shape in FAMILIES[family]["image_shapes"].items():
        assert cond[key].shape == (1,) + shape and cond[key].device.type == "meta"
    x = torch.empty((1,) + policy.latent_shape(), device="meta")
    assert policy.predict(x, torch.zeros(1, dtype=torch.int64), cond, policy.schedule()).shape == x.shape
