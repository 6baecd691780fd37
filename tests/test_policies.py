"""Each policy on a tiny random checkpoint of its real diffusers classes, loaded from a folder:
rollout shapes; rollout log-prob == training-time log-prob (ratio 1 within 1e-6); one update
changes only the trainable parameters and lowers the surrogate loss on a fixed batch."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers.fixtures import _single_thread  # noqa: E402,F401  (fixtures)
from helpers.policy_checks import check_on_policy_and_one_update  # noqa: E402
from helpers.tiny_models import BUILDERS, write_prompts  # noqa: E402

from dancegrpo_fast.config import TrainConfig  # noqa: E402
from dancegrpo_fast.train import Trainer  # noqa: E402

FAMILY_SETTINGS = {
    "flux": dict(sampler="dance", eta=0.3, shift=3.0),
    "sd3": dict(sampler="flow_grpo", eta=0.7, shift=3.0),
    "sd": dict(sampler="ddim", eta=1.0, cfg_scale=5.0),
    "hunyuan_video": dict(sampler="dance", eta=0.25, shift=5.0, num_frames=5, guidance_scale=6.0),
    "wan": dict(sampler="dance", eta=0.3, shift=5.0, num_frames=5, cfg_scale=5.0),
}


def brightness(images, prompts):
    """Rule-based test reward: mean pixel value."""
    return images.float().mean(dim=tuple(range(1, images.dim())))


def make_config(family, folder, tmp_path, **overrides) -> TrainConfig:
    values = dict(model_family=family, model_path=str(folder), prompt_file=str(write_prompts(tmp_path / "p.txt")),
                  output_dir=str(tmp_path / "out"), height=16, width=16, num_steps=4, group_size=2,
                  prompts_per_rank=2, rollout_batch_size=4, train_batch_size=2, gradient_accumulation_steps=2,
                  timestep_fraction=1.0, max_sequence_length=16, lr=1e-4, clip_range=10.0, num_iterations=1,
                  progress_bar=False, tensorboard=False, mixed_precision="no", seed=3)
    values.update(FAMILY_SETTINGS[family])
    values.update(overrides)
    return TrainConfig.from_dict(values)




@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family_folder(request, tmp_path_factory):
    family = request.param
    return family, BUILDERS[family](tmp_path_factory.mktemp(family) / "model")


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_policy_rollout_ratio_and_update(family_folder, tmp_path, use_lora):
    family, folder = family_folder
    targets = ["to_q", "to_k", "to_v"]
    config = make_config(family, folder, tmp_path, use_lora=use_lora, lora_rank=4, lora_alpha=4.0,
                         lora_target_modules=targets)
    trainer = Trainer(config, rewards={"brightness": (brightness, 1.0)})
    policy = trainer.policy

    trajectory = trainer.collect()
    shape = tuple(policy.latent_shape())
    assert trajectory.latents.shape == (4, config.sampler.num_steps + 1) + shape
    assert trajectory.log_probs.shape == (4, config.sampler.num_steps)
    assert torch.isfinite(trajectory.log_probs).all()
    # The model's timestep: DanceGRPO's int(sigma * 1000) / 1000 in the model's units, or the
    # DDIM timestep for SD 1.x (steps_offset 1, stride 1000 // S).
    sigmas = {"flux": [1.0, 0.9, 0.75, 0.5], "sd3": [1.0, 0.9, 0.75, 0.5], "hunyuan_video": [1.0, 0.937, 0.833, 0.625],
              "wan": [1.0, 0.937, 0.833, 0.625]}
    if family == "sd":
        assert trajectory.timesteps.tolist() == [751.0, 501.0, 251.0, 1.0]
    else:
        scale = 1.0 if family == "flux" else 1000.0
        assert torch.allclose(trajectory.timesteps, torch.tensor(sigmas[family], dtype=torch.float64) * scale)
    # Shared initial noise within each group of G = 2, different across prompts.
    assert torch.equal(trajectory.latents[0, 0], trajectory.latents[1, 0])
    assert not torch.equal(trajectory.latents[0, 0], trajectory.latents[2, 0])
    samples = policy.decode(trajectory.final_latents)
    if policy.modality == "image":
        assert samples.shape == (4, 3, 16, 16)
    else:
        assert samples.shape == (4, 5, 3, 16, 16)  # videos (B, T, 3, H, W)
    assert samples.min() >= 0 and samples.max() <= 1

    # Rollout log-prob == the training pass's; one update changes only trainable weights and lowers the loss.
    check_on_policy_and_one_update(trainer, trajectory, config.sampler.num_steps, use_lora)

    # The checkpoint loads back into diffusers for inference.
    checkpoint = trainer.save()
    if use_lora:
        pipe = type(policy.pipe).from_pretrained(str(folder))
        pipe.load_lora_weights(str(checkpoint / "model"))
        loaded = getattr(pipe, policy.model_component)
        lora_values = sorted(torch.cat([v.flatten() for k, v in loaded.state_dict().items() if "lora" in k]).tolist())
        trained = sorted(torch.cat([v.flatten() for k, v in policy.model.state_dict().items() if "lora" in k]).tolist())
        assert lora_values == trained
    else:
        loaded = type(policy.model).from_pretrained(str(checkpoint / "model" / policy.model_component))
        trained = policy.model.state_dict()
        assert all(torch.equal(v, trained[k]) for k, v in loaded.state_dict().items())


def test_native_attention_on_cuda_turns_cudnn_sdpa_off():
    """cuDNN's SDPA backward failed on a full-size FLUX step (H200, torch 2.11): a CUDA policy
    with the native backend must leave SDPA to flash / memory-efficient attention; a CPU policy
    leaves the process's flags alone. Needs no GPU: the flags are plain settings (the tiny model
    stays on the CPU; only the policy's device says CUDA)."""
    from types import SimpleNamespace

    from diffusers import FluxTransformer2DModel
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    from dancegrpo_fast.policies.base import Policy

    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=0, attention_head_dim=8,
                                   num_attention_heads=1, joint_attention_dim=8, pooled_projection_dim=8,
                                   axes_dims_rope=(2, 2, 4))
    before = torch.backends.cuda.cudnn_sdp_enabled()
    active = _AttentionBackendRegistry._active_backend
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        cpu = SimpleNamespace(device=torch.device("cpu"), model=model, masked_attention=False, model_component="transformer")
        Policy.set_attention_backend(cpu, "native")
        assert torch.backends.cuda.cudnn_sdp_enabled()
        cuda = SimpleNamespace(device=torch.device("cuda", 0), model=model, masked_attention=False,
                               model_component="transformer")
        Policy.set_attention_backend(cuda, "native")
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
        assert str(cuda.attention) == "native (1/1 layers)"
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
        _AttentionBackendRegistry.set_active_backend(active)
