"""--compile (model_setup.compile_model): the compiled model gives the same rollout (latents and
log-probs) and the same update (loss, KL, every gradient of every optimizer step) as the eager
model, on the shipped tiny model, through the trainer's own rollout and GRPOUpdate.

The suite compiles with the aot_eager backend: TorchDynamo's graph capture and AOTAutograd's
forward/backward graphs -- where a compiled model can silently differ (LoRA adapters switched off
for the reference, gradient checkpointing, train/eval mode, a second batch size) -- without
Inductor's C++ code generation, which takes minutes on a small CPU. Inductor's numbers against
eager are checked by benchmarks/bench_compile.py (CPU) and benchmarks/gpu_check.sh (CUDA)."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers.fixtures import _single_thread, torch_backend  # noqa: E402,F401  (fixtures)

from dancegrpo_fast.config import TrainConfig  # noqa: E402
from dancegrpo_fast.distributed import DistributedState  # noqa: E402
from dancegrpo_fast.model_setup import TrainingSetup, compile_model  # noqa: E402
from dancegrpo_fast.policies import build_policy  # noqa: E402
from dancegrpo_fast.rollout import rollout  # noqa: E402
from dancegrpo_fast.update import GRPOUpdate, trained_steps  # noqa: E402

PROMPTS = ["a red circle", "two blue squares above a green triangle"]


def tiny_config(compiled: bool, **overrides) -> TrainConfig:
    values = dict(model_family="tiny", height=32, width=32, mixed_precision="no", sampler="dance", num_steps=4,
                  eta=0.5, shift=3.0, group_size=2, prompts_per_rank=2, rollout_batch_size=2, train_batch_size=2,
                  gradient_accumulation_steps=1, timestep_fraction=1.0, lr=1e-4, clip_range=1e-4, kl_beta=0.1,
                  compile=compiled, compile_backend="aot_eager", progress_bar=False, tensorboard=False)
    values.update(overrides)
    return TrainConfig.from_dict(values).validate()


def run_once(config: TrainConfig, policy):
    """Rollout of PROMPTS, then one GRPOUpdate (two optimizer steps: the second uses the no-grad
    old-log-prob pass) whose optimizer step records the gradients instead of stepping."""
    setup = TrainingSetup(policy, config, DistributedState())
    # Move the trainable weights off the reference (LoRA's B starts at zero; a full fine-tune's
    # reference is a copy), so that the KL term and its gradient are not zero.
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in setup.parameters:
            p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    schedule = policy.schedule()
    g = config.grpo.group_size
    trajectory = rollout(policy, schedule, PROMPTS, g, torch.arange(2), torch.tensor([11, 12]),
                         torch.arange(100, 100 + 2 * g), config.rollout.batch_size, shared_noise=True,
                         mixed_precision="no")
    gradients = []

    def record_gradients() -> float:
        gradients.append({name: p.grad.detach().clone() for name, p in policy.model.named_parameters()
                          if p.grad is not None})
        setup.optimizer.zero_grad(set_to_none=True)
        return 0.0

    updater = GRPOUpdate(policy, schedule, config.grpo, config.optim, "no", record_gradients, setup.reference)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    steps = trained_steps(torch.arange(100, 104), config.sampler.trainable_steps(), config.trained_timesteps())
    stats = updater(trajectory, advantages, steps, torch.tensor([0, 3, 1, 2]))
    return trajectory, stats, gradients, setup


@pytest.mark.slow
@pytest.mark.parametrize("variant", [
    dict(use_lora=True, lora_rank=4, lora_alpha=4.0, compile_scope="blocks"),
    dict(use_lora=False, gradient_checkpointing=True, compile_scope="model"),
], ids=["lora-blocks", "full-checkpointing-model"])
def test_compiled_rollout_and_update_equal_eager(torch_backend, variant):
    from torch._dynamo.utils import counters

    runs = {}
    base = build_policy(tiny_config(False).model, tiny_config(False).sampler)
    for compiled in (False, True):
        config = tiny_config(compiled, train_batch_size=2, gradient_accumulation_steps=1, **variant)
        policy = copy.copy(base)  # same weights, own model: LoRA / compile change the model in place
        policy.pipe = copy.copy(base.pipe)
        policy.model = policy.forward_model = policy.pipe.transformer = copy.deepcopy(base.model)
        graphs_before = counters["stats"]["unique_graphs"]
        torch.manual_seed(5)  # the same LoRA initialisation
        runs[compiled] = run_once(config, policy)
        if compiled:
            assert counters["stats"]["unique_graphs"] > graphs_before, "nothing was compiled"
            assert getattr(policy.model if variant["compile_scope"] == "model"
                           else policy.model.transformer_blocks[0], "_compiled_call_impl", None) is not None
    (eager_traj, eager_stats, eager_grads, _), (traj, stats, grads, _) = runs[False], runs[True]
    # Rollout: every latent and log-prob of every step.
    assert torch.isfinite(eager_traj.log_probs).all()
    torch.testing.assert_close(traj.latents, eager_traj.latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(traj.log_probs, eager_traj.log_probs, rtol=1e-5, atol=1e-4)
    # Update: loss, KL (the reference pass: adapters off, or the frozen copy), ratios, gradients.
    assert stats.optimizer_steps == eager_stats.optimizer_steps == 2
    assert eager_stats.kl > 0 and abs(eager_stats.loss) > 0
    for name in ("loss", "kl", "ratio_mean", "log_prob_gap"):
        assert getattr(stats, name) == pytest.approx(getattr(eager_stats, name), rel=1e-4, abs=1e-6), name
    assert len(grads) == len(eager_grads) == 2
    for step, (ours, reference) in enumerate(zip(grads, eager_grads)):
        assert ours.keys() == reference.keys() and len(ours) > 0
        total = torch.sqrt(sum(g.double().square().sum() for g in reference.values()))
        assert total > 0
        for name in reference:
            torch.testing.assert_close(ours[name], reference[name], rtol=1e-4, atol=1e-6 * float(total),
                                       msg=lambda m: f"optimizer step {step}, {name}: {m}")


def test_compile_model_keeps_names_and_scope():
    """In-place compile: same parameter names and state-dict keys (checkpoints, LoRA, EMA); the
    blocks scope compiles the repeated blocks only, and a model without blocks whole."""
    policy = build_policy(tiny_config(False).model, tiny_config(False).sampler)
    model = policy.model
    keys = list(model.state_dict())
    compiled = compile_model(model, scope="blocks", backend="eager")
    assert compiled == list(model.transformer_blocks) + list(model.single_transformer_blocks)
    assert list(model.state_dict()) == keys and getattr(model, "_compiled_call_impl", None) is None
    plain = torch.nn.Linear(3, 2)
    assert compile_model(plain, scope="blocks", backend="eager") == [plain]


@pytest.mark.parametrize("setting,value,expected", [("compile_mode", "fast", "compile_mode must be one of"),
                                                    ("compile_scope", "layers", "compile_scope must be 'blocks' or 'model'"),
                                                    ("compile_backend", "tvm", "compile_backend must be one of")])
def test_bad_compile_settings(setting, value, expected):
    with pytest.raises(ValueError, match=expected):
        tiny_config(True, **{setting: value})
    with pytest.raises(ValueError, match="compile_mode 'max-autotune' is an Inductor mode"):
        tiny_config(True, compile_mode="max-autotune", compile_backend="aot_eager")
