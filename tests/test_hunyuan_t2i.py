"""The hunyuan_video_t2i preset: HunyuanVideo on single frames (the paper's HunyuanVideo-T2I). The
preset loads and validates with its own settings; with a tiny random HunyuanVideo checkpoint and
the preset's sampler settings, a num_frames 1 rollout decodes images that an image reward scores,
the training-time log-prob equals the rollout's (ratio 1) and one update lowers the surrogate."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers.fixtures import _single_thread  # noqa: E402,F401  (fixtures)
from helpers.tiny_models import make_hunyuan_video, write_prompts  # noqa: E402

from dancegrpo_fast import ops  # noqa: E402
from dancegrpo_fast.config import TrainConfig, apply_preset, available_presets, parse_config  # noqa: E402
from dancegrpo_fast.train import Trainer  # noqa: E402


def test_preset_loads_with_its_own_defaults():
    assert "hunyuan_video_t2i" in available_presets()
    config = parse_config(["--preset", "hunyuan_video_t2i"])
    assert (config.model.family, config.model.num_frames, config.model.height, config.model.width) == \
        ("hunyuan_video", 1, 720, 720)
    assert (config.sampler.name, config.sampler.num_steps, config.sampler.eta, config.sampler.shift,
            config.sampler.guidance_scale, config.sampler.cfg_scale) == ("dance", 16, 0.25, 5.0, 6.0, 1.0)
    assert (config.grpo.group_size, config.grpo.timestep_fraction, config.optim.lr) == (12, 0.6, 1e-5)
    assert [(r.name, r.weight) for r in config.rollout.rewards] == [("hps", 1.0)]  # an image reward
    assert config.trained_timesteps() == 9  # int(15 trainable steps * 0.6)
    video = apply_preset("hunyuan_video")
    assert (video.model.num_frames, video.grpo.group_size) == (53, 24)  # the T2V preset is unchanged


def brightness(images, prompts):
    """Rule-based image reward: mean pixel value, per image (B, 3, H, W) only."""
    assert images.dim() == 4 and images.shape[1] == 3, tuple(images.shape)
    return images.float().mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def hunyuan_folder(tmp_path_factory):
    return make_hunyuan_video(tmp_path_factory.mktemp("hunyuan_t2i") / "model")


def tiny_t2i_config(folder, tmp_path) -> TrainConfig:
    """The preset with a tiny model's sizes: its sampler, shift, guidance and num_frames 1 kept."""
    values = dict(model_path=str(folder), prompt_file=str(write_prompts(tmp_path / "p.txt")),
                  output_dir=str(tmp_path / "out"), height=16, width=16, num_steps=4, group_size=2,
                  prompts_per_rank=2, rollout_batch_size=4, train_batch_size=2, gradient_accumulation_steps=2,
                  timestep_fraction=1.0, max_sequence_length=16, lr=1e-4, clip_range=10.0, num_iterations=1,
                  progress_bar=False, tensorboard=False, mixed_precision="no", model_dtype="float32",
                  gradient_checkpointing=False, offload_text_encoders=False, seed=3)
    return TrainConfig.from_dict(values, apply_preset("hunyuan_video_t2i")).validate()


def test_single_frame_rollout_ratio_and_update(hunyuan_folder, tmp_path):
    config = tiny_t2i_config(hunyuan_folder, tmp_path)
    assert config.model.num_frames == 1 and config.sampler.shift == 5.0 and config.sampler.guidance_scale == 6.0
    trainer = Trainer(config, rewards={"brightness": (brightness, 1.0)})
    policy = trainer.policy
    assert policy.modality == "image"
    channels, frames, height, width = policy.latent_shape()
    spatial = policy.pipe.vae_scale_factor_spatial
    assert frames == 1 and (height, width) == (16 // spatial, 16 // spatial)

    trajectory = trainer.collect()
    assert trajectory.latents.shape == (4, 5, channels, 1, height, width)
    assert torch.isfinite(trajectory.log_probs).all()
    images = policy.decode(trajectory.final_latents)
    assert images.shape == (4, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    # The whole iteration (rollout, image reward, advantages, update) runs.
    row = trainer.train_iteration()
    assert row["first_step_ratio_max_dev"] == 0.0 and "reward/brightness/mean" in row

    # Training-time log-prob == rollout log-prob at the same parameters (ratio 1 within 1e-6), and
    # one update on a fixed batch lowers the surrogate loss.
    trajectory = trainer.collect()
    cond = policy.encode(trajectory.prompts)

    def log_probs(steps):
        out = torch.empty(steps.shape)
        with torch.no_grad():
            for rows in torch.arange(4).split(2):
                for j in range(steps.shape[1]):
                    step = steps[rows, j]
                    v, x, x_next, _ = trainer.updater._forward(trajectory, cond, rows, step)
                    out[rows, j] = ops.step_log_prob(v, x, x_next, trainer.schedule.coefficients(step, trainer.device))
        return out

    recomputed = log_probs(torch.arange(4).repeat(4, 1))
    assert ((recomputed - trajectory.log_probs).exp() - 1).abs().max() < 1e-6
    advantages = torch.tensor([1.0, -1.0, -1.0, 1.0])
    steps = trainer.trained_steps(trajectory)
    before = log_probs(steps)
    stats = trainer.update(trajectory, advantages)
    assert stats.first_step_ratio_max_dev == 0.0
    ratio = torch.exp(log_probs(steps) - before)
    assert -(advantages[:, None] * ratio).mean() < -(advantages[:, None] * torch.ones_like(ratio)).mean()
