"""A dry run of one rollout step and one training step of a policy on the meta device: what the
trainer's GPU loop would compute and hold, counted, without a GPU or weights.

The policy is built by the policy's own loading code (`build_policy(config.model,
config.sampler, "meta")`: every component from its config on the meta device,
policies/meta_pipeline.py) and prepared as the trainer prepares it (`prepare_trainable`, as
model_setup.TrainingSetup: a LoRA adapter, or float32 master weights; gradient checkpointing).
Then the calls the trainer makes run once each:

- rollout step: `rollout.sampling_loop` itself (the loop of `rollout.rollout`) on one batch of
  `rollout.batch_size` samples through a one-step schedule, the first SDE step: `policy.predict`
  (classifier-free guidance doubling included) under bf16 autocast, then `ops.sde_step`, without
  grad;
- decode: `policy.decode` of one rollout batch of final latents;
- encode: `policy.encode` of one new prompt (the text encoders);
- training step: the inner step of `update.GRPOUpdate`: `policy.predict` on `optim.batch_size`
  samples under bf16 autocast, `ops.fused_step_loss` (on-policy), backward of
  loss / (accumulation x trained timesteps).

Each is measured by meta_measure.StepMeter: FLOPs (torch.utils.flop_counter's formulas) and bytes
(the tensors the step creates, their peak, what the forward keeps for the backward), with meta
tensors computed as on a CUDA GPU (meta_measure.gpu_like_meta: autocast casts, fused attention).
Parameter gradients are dropped as soon as they are accumulated (a post-accumulate-grad hook), so
the training peak holds activations and working buffers only: how gradients add up depends on
the parallelism (DDP or FSDP2), which plan.py works out.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from . import ops
from .config import TrainConfig
from .distributed import sharded_blocks
from .meta_measure import StepMeter, gpu_like_checkpoint, gpu_like_meta
from .model_setup import add_lora
from .policies import Policy, build_policy
from .policies.meta_pipeline import cast
from .rollout import sampling_loop
from .schedules import StepSchedule

META = torch.device("meta")
PLAN_PROMPT = "a photograph of a red fox standing in fresh snow at golden hour"


@dataclass
class StepCost:
    """One measured step. flops_forward / flops_backward: FLOPs of the forward (model call and
    sampler step or loss) and of the backward (recomputation under gradient checkpointing
    included); peak_bytes: most bytes of the tensors the step created alive at once;
    kept_bytes: bytes the forward left alive for the backward (the activations); batch: samples."""

    batch: int
    flops_forward: int
    flops_backward: int = 0
    peak_bytes: int = 0
    kept_bytes: int = 0

    @property
    def flops(self) -> int:
        return self.flops_forward + self.flops_backward


@dataclass
class ModuleSize:
    """parameters, trainable: counts; bytes: parameters and buffers in their dtypes, of which
    buffer_bytes are buffers (FSDP2 shards parameters only)."""

    parameters: int
    trainable: int
    bytes: int
    buffer_bytes: int = 0

    @classmethod
    def of(cls, module: nn.Module) -> "ModuleSize":
        buffers = sum(b.numel() * b.element_size() for b in module.buffers())
        return cls(sum(p.numel() for p in module.parameters()),
                   sum(p.numel() for p in module.parameters() if p.requires_grad),
                   sum(p.numel() * p.element_size() for p in module.parameters()) + buffers, buffers)


@dataclass
class TrainableRun:
    """The trainable model as prepared for one setting (full or LoRA) and its measured steps.
    model: sizes as stored (float32 master weights, or the base dtype plus float32 LoRA);
    train_steps: keyed by gradient checkpointing on / off."""

    model: ModuleSize
    rollout_step: StepCost
    train_steps: Dict[bool, StepCost]


def prepare_trainable(policy: Policy, config: TrainConfig) -> List[nn.Parameter]:
    """The trainable module as the trainer prepares it (model_setup.TrainingSetup): a LoRA adapter
    whose weights train in float32 over the frozen base, or the whole model in float32 (master
    weights). Returns the trainable parameters. A meta model may be prepared again for another
    setting (its tensors hold no data): an adapter of another rank or other targets replaces the
    earlier one, and a full fine-tune removes it."""
    model = policy.model
    o = config.optim
    if o.use_lora:
        adapter = (getattr(model, "peft_config", None) or {}).get("default")
        if adapter is not None and (adapter.r, set(adapter.target_modules)) != (o.lora_rank,
                                                                               set(o.lora_target_modules)):
            model.delete_adapters(["default"])  # measured with another rank or other targets before
            adapter = None
        if adapter is None:
            model.requires_grad_(False)
            cast(model, policy.dtype)
            add_lora(model, o)
    else:
        if getattr(model, "peft_config", None):  # measured with LoRA before: back to the plain model
            model.delete_adapters(list(model.peft_config))
        cast(model, torch.float32)
        model.requires_grad_(True)
    model.train()
    return [p for p in model.parameters() if p.requires_grad]


def _autocast_dtype(config: TrainConfig) -> Optional[torch.dtype]:
    """The trainer autocasts the model call to bf16 on CUDA when mixed_precision is bf16
    (rollout.autocast_context)."""
    return torch.bfloat16 if config.model.mixed_precision == "bf16" else None


def set_gradient_checkpointing(model: nn.Module, enabled: bool, config: TrainConfig) -> None:
    """Gradient checkpointing as the trainer enables it (diffusers' default checkpoint function),
    its recomputation computed as on the GPU (meta_measure.gpu_like_checkpoint)."""
    if enabled:
        model.enable_gradient_checkpointing(gpu_like_checkpoint(_autocast_dtype(config)))
    elif getattr(model, "is_gradient_checkpointing", False):
        model.disable_gradient_checkpointing()


@contextlib.contextmanager
def _gradients_dropped(parameters: List[nn.Parameter]):
    """Parameter gradients are freed as soon as they are accumulated (see the module docstring)."""
    def drop(param):
        param.grad = None

    handles = [p.register_post_accumulate_grad_hook(drop) for p in parameters]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _cond(policy: Policy, batch: int):
    cond = policy.encode([PLAN_PROMPT])
    return {k: v.expand(batch, *v.shape[1:]) for k, v in cond.items()}


def one_step(schedule: StepSchedule, index: int) -> StepSchedule:
    """The schedule of step `index` alone (its timestep and coefficients as step 0)."""
    part = slice(index, index + 1)
    return StepSchedule(timesteps=schedule.timesteps[part], a=schedule.a[part], b=schedule.b[part],
                        s=schedule.s[part], sde=schedule.sde[part],
                        dsigma=None if schedule.dsigma is None else schedule.dsigma[part])


def measure_rollout_step(policy: Policy, config: TrainConfig, schedule: StepSchedule) -> StepCost:
    """One step of `rollout.sampling_loop` (the rollout's loop, run as it is) on one batch of
    rollout.batch_size samples of one prompt, at the first SDE step. What the loop allocates is
    counted as on the GPU, the gather of each row's conditioning included."""
    batch = config.rollout.batch_size
    cond = policy.encode([PLAN_PROMPT])
    initial = torch.empty((batch,) + tuple(policy.latent_shape()), dtype=torch.float32, device=META)
    rows = torch.zeros(batch, dtype=torch.int64)
    seeds = torch.arange(batch, dtype=torch.int64)
    step = one_step(schedule, config.sampler.sde_steps()[0])
    meter = StepMeter()
    # The loop's autocast_context is a null context on meta: gpu_like_meta's region stands for it,
    # over the whole step (the sampler step computes in float32, which the emulation leaves as it is).
    with meter, gpu_like_meta(_autocast_dtype(config)) as mode, mode.forward_region():
        sampling_loop(policy, step, cond, rows, initial, seeds, batch, config.model.mixed_precision)
    return StepCost(batch=batch, flops_forward=meter.flops, peak_bytes=meter.peak)


def measure_decode(policy: Policy, batch: int) -> StepCost:
    """`rollout.decode_trajectory`'s call: one batch of rollout.batch_size final latents (no autocast)."""
    latents = torch.empty((batch,) + tuple(policy.latent_shape()), dtype=torch.float32, device=META)
    meter = StepMeter()
    with torch.no_grad(), meter, gpu_like_meta(None):
        images = policy.decode(latents)
        del images
    return StepCost(batch=batch, flops_forward=meter.flops, peak_bytes=meter.peak)


def measure_encode(policy: Policy) -> StepCost:
    """`policy.encode` of one prompt not yet in its cache (the text encoders' forward)."""
    meter = StepMeter()
    prompt = f"{PLAN_PROMPT}, measured"
    with torch.no_grad(), meter, gpu_like_meta(None):
        policy.encode([prompt])
    policy._embedding_cache.pop(prompt, None)
    return StepCost(batch=1, flops_forward=meter.flops, peak_bytes=meter.peak)


def measure_train_step(policy: Policy, config: TrainConfig, schedule: StepSchedule,
                       trainable: List[nn.Parameter]) -> StepCost:
    """`update.GRPOUpdate`'s inner step on one micro-batch of optim.batch_size samples at the first
    trainable step: forward under autocast, the fused loss (on-policy), backward."""
    batch = config.optim.batch_size
    cond = _cond(policy, batch)
    step = torch.full((batch,), config.sampler.trainable_steps()[0], dtype=torch.int64)
    latents = torch.empty((batch,) + tuple(policy.latent_shape()), dtype=torch.float32, device=META)
    next_latents = torch.empty_like(latents)
    advantages = torch.empty(batch, dtype=torch.float32, device=META)
    scale = 1.0 / (config.optim.gradient_accumulation_steps * config.trained_timesteps())
    meter = StepMeter()
    with _gradients_dropped(trainable), meter, gpu_like_meta(_autocast_dtype(config)) as mode:
        with mode.forward_region():
            model_output = policy.predict(latents, step, cond, schedule)
        out = ops.fused_step_loss(model_output, latents, next_latents, schedule.coefficients(step, META), None,
                                  advantages, clip_range=config.grpo.clip_range,
                                  adv_clip_max=config.grpo.adv_clip_max)
        flops_forward, kept = meter.flops, meter.live
        (out.loss * scale).backward()
        del model_output, out
    return StepCost(batch=batch, flops_forward=flops_forward, flops_backward=meter.flops - flops_forward,
                    peak_bytes=meter.peak, kept_bytes=kept)


class DryRun:
    """config's policy built on the meta device, and its steps measured on demand (cached).

    frozen: sizes of the components that do not train (text encoders, VAE), as loaded;
    text_encoders: their names; blocks: parameters of each FSDP2 sharding unit of the trainable
    model; encode / decode: measured once; trainable(...): a TrainableRun per setting.
    """

    def __init__(self, config: TrainConfig):
        self.config = config
        self.policy = build_policy(config.model, config.sampler, META)
        self.schedule = self.policy.schedule()
        self.latent_shape = tuple(self.policy.latent_shape())
        self.frozen = {name: ModuleSize.of(module) for name, module in self.policy.pipe.components.items()
                       if isinstance(module, nn.Module) and module is not self.policy.model}
        self.text_encoders = list(self.policy.text_encoder_names)
        self._runs: Dict[Tuple, TrainableRun] = {}
        self._encode: Optional[StepCost] = None
        self._decode: Dict[int, StepCost] = {}

    @property
    def encode(self) -> StepCost:
        if self._encode is None:
            self._encode = measure_encode(self.policy)
        return self._encode

    def decode(self, rollout_batch_size: int) -> StepCost:
        if rollout_batch_size not in self._decode:
            self._decode[rollout_batch_size] = measure_decode(self.policy, rollout_batch_size)
        return self._decode[rollout_batch_size]

    def block_parameters(self) -> List[int]:
        """Parameters of each unit distributed.wrap_model shards with FSDP2."""
        return [sum(p.numel() for p in block.parameters()) for block in sharded_blocks(self.policy.model)]

    def trainable(self, config: TrainConfig, param_dtype: Optional[torch.dtype] = None,
                  checkpointing=(True, False)) -> TrainableRun:
        """The trainable model prepared for `config` (use_lora, LoRA settings, batch sizes) and its
        rollout and training steps measured, the training step once per gradient-checkpointing
        setting in `checkpointing`. param_dtype: the dtype every parameter of the trainable model
        has during its forward when that differs from how it is stored (FSDP2's
        MixedPrecisionPolicy all-gathers bf16 copies of the float32 shards); None: as stored."""
        o = config.optim
        key = (o.use_lora, o.lora_rank, tuple(o.lora_target_modules), config.rollout.batch_size, o.batch_size,
               param_dtype)
        run = self._runs.get(key)
        missing = [enabled for enabled in checkpointing if run is None or enabled not in run.train_steps]
        if run is not None and not missing:
            return run
        trainable = prepare_trainable(self.policy, config)
        model = self.policy.model
        size = ModuleSize.of(model)
        if param_dtype is not None:
            cast(model, param_dtype)
        if run is None:
            run = self._runs[key] = TrainableRun(size, measure_rollout_step(self.policy, config, self.schedule), {})
        for enabled in missing:
            set_gradient_checkpointing(model, enabled, config)
            run.train_steps[enabled] = measure_train_step(self.policy, config, self.schedule, trainable)
        return run


__all__ = ["DryRun", "StepCost", "ModuleSize", "TrainableRun", "prepare_trainable", "measure_train_step",
           "measure_rollout_step", "measure_decode", "measure_encode", "META"]
