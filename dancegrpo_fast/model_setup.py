"""Getting a policy's model ready to train: LoRA or full fine-tune, float32 master weights,
gradient checkpointing, the frozen KL reference, the DDP/FSDP2 wrapper, torch.compile, the EMA,
AdamW and its learning-rate schedule, and the optimizer step (clip, step, schedule, EMA)."""
from __future__ import annotations

import contextlib
import copy
from typing import Dict, List, Optional

import torch
from diffusers.optimization import get_scheduler
from torch import Tensor, nn
from torch.distributed.tensor import distribute_tensor

from .config import OptimConfig, TrainConfig
from .distributed import DistributedState, sharded_blocks, wrap_model
from .policies.base import Policy


def add_lora(model: nn.Module, optim: OptimConfig) -> None:
    """A LoRA adapter (peft) of optim's rank, alpha and target modules, its weights in float32."""
    from peft import LoraConfig  # only LoRA runs need peft (and its import time)

    model.add_adapter(LoraConfig(r=optim.lora_rank, lora_alpha=optim.lora_alpha, init_lora_weights="gaussian",
                                 target_modules=list(optim.lora_target_modules)))
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # LoRA weights train in float32


def compile_model(model: nn.Module, mode: str = "default", scope: str = "blocks",
                  backend: str = "inductor") -> List[nn.Module]:
    """torch.compile the model's forward in place (nn.Module.compile): the module keeps its
    identity, parameter names and state-dict keys, so LoRA, the EMA, checkpoints and the DDP/FSDP2
    wrappers see the same model. Returns the modules compiled.

    scope "blocks" compiles each repeated block (distributed.sharded_blocks: transformer blocks,
    UNet down/up blocks) -- regional compilation: identical blocks share one compiled graph, so
    compile time does not grow with depth, and under FSDP2 the sharding units are the compiled
    units (dynamo runs FSDP2's hooks eagerly: torch._dynamo.config.skip_fsdp_hooks, on by
    default); the embedders and the output head run eagerly. A model without such
    blocks is compiled whole. scope "model" compiles the whole forward.

    Each kind of call compiles on its first use: rollout (eval mode, no grad), training (train
    mode, with grad), the old-log-prob and LoRA-reference passes (no grad, adapters off), and a
    second batch size (then once more with dynamic shapes)."""
    from torch import _dynamo

    # Those kinds x block types can pass dynamo's default of 8 compiled versions of a frame, after
    # which it would silently run the rest eagerly.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(_dynamo.config, name):
            setattr(_dynamo.config, name, max(getattr(_dynamo.config, name), 64))
            break
    kwargs = {"backend": backend}
    if backend == "inductor" and mode != "default":
        kwargs["mode"] = mode  # modes are inductor's
    targets = list(sharded_blocks(model)) if scope == "blocks" else []
    if not targets:
        targets = [model]
    for module in targets:
        module.compile(**kwargs)
    return targets


class EMA:
    """Exponential moving average of the trainable weights, in float32 (sharded like the
    parameters under FSDP2)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow: Dict[str, Tensor] = {name: p.detach().clone().float()
                                          for name, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, param in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(param.detach().float(), 1.0 - self.decay)

    def load(self, values: Dict[str, Tensor]) -> None:
        """Restore from full (unsharded) tensors, as checkpoints store them."""
        for name, value in values.items():
            target = self.shadow[name]
            if hasattr(target, "device_mesh"):  # FSDP2: shard the full tensor like the parameter
                value = distribute_tensor(value.to(target.device), target.device_mesh, target.placements)
            target.copy_(value)

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module):
        """Context: the model's trainable parameters hold the EMA weights; afterwards the live
        weights are copied back bit for bit (a copy of them, sharded like the parameters, is kept
        meanwhile). Not for training: the optimizer is not told."""
        params = {name: p for name, p in model.named_parameters() if name in self.shadow}
        live = {name: p.detach().clone() for name, p in params.items()}
        try:
            with torch.no_grad():
                for name, param in params.items():
                    param.copy_(self.shadow[name].to(param.dtype))
            yield
        finally:
            with torch.no_grad():
                for name, param in params.items():
                    param.copy_(live[name])


class TrainingSetup:
    """What the update needs besides the policy: the trainable parameters, the KL reference (a
    full fine-tune's frozen copy of the base model; None under LoRA, whose base model is the
    model with adapters disabled, or without KL), the EMA, the optimizer and its schedule."""

    def __init__(self, policy: Policy, config: TrainConfig, state: DistributedState):
        o = config.optim
        self.policy = policy
        self.max_grad_norm = o.max_grad_norm
        model = policy.model
        if o.use_lora:
            add_lora(model, o)
        else:
            if any(p.dtype != torch.float32 for p in model.parameters()):
                model.to(torch.float32)  # float32 master weights; autocast gives bf16 compute on GPU
            model.requires_grad_(True)
        if config.model.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        self.reference: Optional[nn.Module] = None
        if config.grpo.kl_beta > 0 and not o.use_lora:
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        policy.forward_model = wrap_model(model, config.runtime.parallel, state, config.model.mixed_precision)
        if config.model.compile:  # after wrapping: FSDP2's hooks are in place and stay eager
            m = config.model
            compile_model(model, m.compile_mode, m.compile_scope, m.compile_backend)
            if self.reference is not None:
                compile_model(self.reference, m.compile_mode, m.compile_scope, m.compile_backend)
        self.parameters: List[nn.Parameter] = [p for p in model.parameters() if p.requires_grad]
        if not self.parameters:
            raise ValueError("the model has no trainable parameters (check lora_target_modules)")
        self.ema = EMA(model, o.ema_decay) if o.ema_decay > 0 else None
        self.optimizer = torch.optim.AdamW(self.parameters, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2),
                                           eps=o.adam_eps, weight_decay=o.weight_decay)
        self.lr_scheduler = get_scheduler(
            o.lr_scheduler, self.optimizer, num_warmup_steps=o.lr_warmup_steps,
            num_training_steps=config.runtime.num_iterations * config.optimizer_steps_per_iteration)

    def optimizer_step(self) -> float:
        """Clip the gradient norm (max_grad_norm 0: no clipping, the norm is still measured), step
        AdamW and the schedule, clear the gradients, update the EMA. Returns the norm before
        clipping."""
        bound = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.parameters, bound)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.policy.model)
        return norm

    @property
    def lr(self) -> float:
        return self.lr_scheduler.get_last_lr()[0]
