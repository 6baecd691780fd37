"""torchrun wiring: process group, DDP or FSDP2 wrapping, collectives used by the trainer.

Parallelism is applied to the trainable module from outside (the policy's code does not change):
DDP wraps it (`policy.forward_model` becomes the wrapper); FSDP2 (`fully_shard`) shards each
transformer block and then the root in place. Frozen parts (VAE, text encoders) are replicated.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch import Tensor, nn


@dataclass
class DistributedState:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistributedState:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
    return DistributedState(rank, world_size, local_rank, dev)


def sharded_blocks(model: nn.Module):
    """The repeated blocks of a diffusers transformer / UNet (the FSDP2 sharding units)."""
    for name in ("transformer_blocks", "single_transformer_blocks", "blocks", "down_blocks", "up_blocks",
                 "token_refiner"):
        container = getattr(model, name, None)
        if isinstance(container, nn.ModuleList):
            yield from container
        elif isinstance(container, nn.Module):
            yield container


def wrap_model(model: nn.Module, parallel: str, state: DistributedState, mixed_precision: str = "no") -> nn.Module:
    """The module the forward passes go through: the model itself (1 process), its DDP wrapper,
    or the model sharded in place by FSDP2."""
    if not state.enabled:
        return model
    if parallel == "ddp":
        device_ids = [state.local_rank] if state.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    if parallel == "fsdp":
        mesh = init_device_mesh(state.device.type, (state.world_size,))
        kwargs = {"mesh": mesh}
        dtypes = {p.dtype for p in model.parameters()}
        if mixed_precision == "bf16" and state.device.type == "cuda":
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        elif len(dtypes) > 1:
            # FSDP2 all-gathers one dtype per group: LoRA (float32) over a bfloat16 base computes in
            # the base dtype, gradients reduce in float32.
            lowest = min(dtypes, key=lambda d: torch.finfo(d).bits)
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=lowest, reduce_dtype=torch.float32)
        for block in sharded_blocks(model):
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        return model
    raise ValueError(f"parallel must be 'ddp' or 'fsdp', got {parallel!r}")


def gradient_sync(module: nn.Module, model: nn.Module, enabled: bool):
    """Context: skip the gradient all-reduce / reduce-scatter of a non-final accumulation step."""
    if enabled:
        return contextlib.nullcontext()
    if hasattr(module, "no_sync"):  # DDP
        return module.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        @contextlib.contextmanager
        def no_sync():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        return no_sync()
    return contextlib.nullcontext()


def all_gather(tensor: Tensor, state: DistributedState) -> Tensor:
    """Concatenate equal-shaped tensors of every rank along dim 0 (rank order)."""
    if not state.enabled:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(state.world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def all_reduce_sum(tensor: Tensor, state: DistributedState) -> Tensor:
    if state.enabled:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def broadcast_object(value, state: DistributedState):
    if not state.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(state: DistributedState) -> None:
    if state.enabled:
        dist.barrier()


def cleanup(state: DistributedState) -> None:
    """Leave the process group; the barrier keeps a rank from tearing down gloo while another
    is still inside a collective or writing."""
    if state.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
