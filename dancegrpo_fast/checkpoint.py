"""Checkpoints: trainable weights (full or LoRA), optimizer, LR scheduler, EMA, RNG states,
iteration and prompt position.

Layout of output_dir/checkpoints/iter_000010/:

    meta.json                  written last; a folder without it is not a checkpoint
    training_state.pt          optimizer, scheduler, EMA, RNG, iteration, prompt position, config
    model/<component>/         full fine-tune: a diffusers model folder (config.json +
                               diffusion_pytorch_model.safetensors), loadable with
                               <ModelClass>.from_pretrained(model/<component>)
    model/pytorch_lora_weights.safetensors   LoRA: loadable with pipeline.load_lora_weights(model/)
    trainable.safetensors      LoRA: the adapter weights under the training-time names (resume)

A checkpoint is written into a temporary sibling folder and renamed into place, so a run killed
while writing leaves the previous checkpoint intact. Every rank takes part in gathering the full
(unsharded) state; rank 0 writes.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
from torch import nn

from .distributed import DistributedState, barrier

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt or does not match the run."""


def _options(state: DistributedState, for_load: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Without a process group, full_state_dict loading needs a broadcast; plain loading is the same.
    if for_load:
        return StateDictOptions(full_state_dict=state.enabled, strict=False)
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def trainable_names(model: nn.Module):
    return [name for name, param in model.named_parameters() if param.requires_grad]


def checkpoint_root(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


def rng_state() -> Dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _full_tensor(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def save_checkpoint(output_dir, iteration: int, policy, optimizer, lr_scheduler, config, extra: Dict,
                    state: DistributedState, ema: Optional[Dict[str, torch.Tensor]] = None,
                    keep: int = 2) -> Path:
    """Write checkpoint `iter_{iteration:06d}` atomically; collective (call on every rank)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model = policy.model
    model_state = get_model_state_dict(model, options=_options(state))
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=_options(state))
    ema_state = {k: _full_tensor(v).detach().cpu() for k, v in ema.items()} if ema else None
    root = checkpoint_root(output_dir)
    final = root / f"iter_{iteration:06d}"
    if state.is_main:
        from safetensors.torch import save_file

        root.mkdir(parents=True, exist_ok=True)
        temp = root / f".tmp_iter_{iteration:06d}_{os.getpid()}_{time.time_ns()}"
        temp.mkdir()
        names = trainable_names(model)
        if config.use_lora:
            from peft import get_peft_model_state_dict

            trainable = {k: model_state[k].contiguous() for k in names}
            save_file(trainable, str(temp / "trainable.safetensors"))
            (temp / "model").mkdir()
            policy.save_lora(temp / "model", get_peft_model_state_dict(model, state_dict=model_state))
        else:
            folder = temp / "model" / policy.model_component
            folder.mkdir(parents=True)
            model.save_config(str(folder))
            save_file({k: v.contiguous() for k, v in model_state.items()},
                      str(folder / "diffusion_pytorch_model.safetensors"))
        torch.save({"format_version": FORMAT_VERSION, "iteration": iteration, "optimizer": optimizer_state,
                    "lr_scheduler": lr_scheduler.state_dict(), "ema": ema_state, "rng": rng_state(),
                    "trainable_names": names, "config": config.to_dict(), **extra},
                   temp / "training_state.pt")
        (temp / "meta.json").write_text(json.dumps({"iteration": iteration, "format_version": FORMAT_VERSION,
                                                    "model_family": config.model_family,
                                                    "use_lora": config.use_lora}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(temp, final)
        _prune(root, keep)
    barrier(state)
    return final


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("iter_*") if (p / "meta.json").is_file())
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for temp in root.glob(".tmp_iter_*"):  # left by a run killed while writing
        shutil.rmtree(temp, ignore_errors=True)


def find_latest(output_dir) -> Optional[Path]:
    """The newest complete checkpoint in output_dir, or None."""
    root = checkpoint_root(output_dir)
    done = sorted(p for p in root.glob("iter_*") if (p / "meta.json").is_file())
    return done[-1] if done else None


def resolve_resume(resume: str, output_dir) -> Optional[Path]:
    """'' -> None; 'latest' -> the newest checkpoint in output_dir (None when there is none);
    a path -> that checkpoint (an error if it does not exist)."""
    if not resume:
        return None
    if resume == "latest":
        return find_latest(output_dir)
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"resume checkpoint {str(path)!r} does not exist")
    return path


def load_checkpoint(path, policy, optimizer, lr_scheduler, config, state: DistributedState) -> Dict:
    """Restore model, optimizer, scheduler and RNG from `path`; returns the training state dict
    (iteration, prompt position, EMA, ...). Raises CheckpointError with the reason."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a folder")
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete or corrupt: meta.json is missing "
                              f"(was the run killed while writing it?)")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: meta.json is not valid JSON ({error})") from None
    for key in ("model_family", "use_lora"):
        if meta.get(key) != getattr(config, key):
            raise CheckpointError(f"checkpoint {str(path)!r} was written with {key}={meta.get(key)!r} but this run "
                                  f"has {key}={getattr(config, key)!r}")
    try:
        training = torch.load(path / "training_state.pt", map_location="cpu", weights_only=False)
    except Exception as error:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: training_state.pt cannot be read "
                              f"({type(error).__name__}: {error})") from None
    from safetensors.torch import load_file

    weights_file = (path / "trainable.safetensors" if config.use_lora
                    else path / "model" / policy.model_component / "diffusion_pytorch_model.safetensors")
    try:
        weights = load_file(str(weights_file))
    except Exception as error:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: {weights_file.name} cannot be read "
                              f"({type(error).__name__}: {error})") from None
    missing = sorted(set(training["trainable_names"]) - set(weights))
    expected = set(trainable_names(policy.model))
    if missing or set(training["trainable_names"]) != expected:
        raise CheckpointError(f"checkpoint {str(path)!r} does not match the model: trainable parameters differ "
                              f"(missing in file: {missing[:5]}, model has {len(expected)}, checkpoint "
                              f"{len(training['trainable_names'])})")
    # CPU tensors: set_model_state_dict copies them into the (possibly sharded) parameters one
    # tensor at a time, so a full model never has to fit on one device at once.
    set_model_state_dict(policy.model, weights, options=_options(state, for_load=True))
    set_optimizer_state_dict(policy.model, optimizer, training["optimizer"], options=_options(state, for_load=True))
    lr_scheduler.load_state_dict(training["lr_scheduler"])
    set_rng_state(training["rng"])
    return training
