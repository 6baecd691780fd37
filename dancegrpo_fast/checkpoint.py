"""Checkpoints: trainable weights (full or LoRA), optimizer, LR scheduler, EMA, RNG states,
iteration and prompt position; the lineage of runs that wrote them.

Layout of output_dir/checkpoints/iter_000010/:

    meta.json                  written last; a folder without it is not a checkpoint (reported)
    training_state.pt          optimizer, scheduler, EMA, RNG, iteration, prompt position, config:
                               plain data and tensors only, loaded with torch.load(weights_only=True)
    model/<component>/         full fine-tune: a diffusers model folder (config.json +
                               diffusion_pytorch_model.safetensors), loadable with
                               <ModelClass>.from_pretrained(model/<component>)
    model/pytorch_lora_weights.safetensors   LoRA: loadable with pipeline.load_lora_weights(model/)
    model_ema/pytorch_lora_weights.safetensors   LoRA with an EMA: the EMA adapter, in the same format
    trainable.safetensors      LoRA: the adapter weights under the training-time names (resume)

Under FSDP2 with several processes the layout is "sharded" (meta.json `layout`, format 3):
nothing is gathered on one rank; every rank writes its shards of the trainable weights, the
AdamW state and the EMA with torch.distributed.checkpoint (sharded_checkpoint.py):

    shards/                    .metadata + one __<rank>_0.distcp per rank
    model_config/<component>/config.json   the model's diffusers config (for the export)
    training_state.pt          scheduler, RNG, iteration, prompt position, config, AdamW's
                               param_groups (no tensors of the model size)
    model/, model_ema/         LoRA only: the (small) adapter gathered, as above

`python -m dancegrpo_fast.export` turns either layout into diffusers folders (export.py).

A checkpoint is written into a temporary sibling folder, every file fsynced, and renamed into
place (then the folder holding it is fsynced), so a run killed while writing leaves the previous
checkpoint intact. A save that fails (a full disk) removes its temporary folder and raises a
one-line CheckpointError saying what failed. Full layout: every rank takes part in gathering the
full (unsharded) state; rank 0 writes. Sharded layout: every rank writes its shards into the
temporary folder rank 0 created; rank 0 writes the rest and renames.

Lineage: every run (Trainer) has a run id; meta.json records it, the runs it continues
(`lineage`: [run id, last iteration taken from that run] for each earlier run) and a sequence
number `seq` that grows with every checkpoint written into the folder. `--resume latest` takes
the checkpoint written last (highest seq), not the highest iteration number: after an explicit
resume from an older checkpoint, the newer checkpoints of the abandoned branch are reported and
left alone. Pruning keeps the checkpoint a run resumed from and the newest `keep` checkpoints of
its own lineage.

Loading never runs code: training_state.pt is read with torch.load(weights_only=True); the only
non-tensor globals allowed are numpy's array reconstruction (RNG state in checkpoints written
before format 2). A file that references anything else is refused. The shards' index (a pickle
DCP writes) is read through an allow-list of DCP's metadata classes (sharded_checkpoint.py).
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import random
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple

import numpy as np
import torch
from torch import nn

from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from .distributed import DistributedState, broadcast_object
from .logging_utils import warn
from .sharded_checkpoint import (SHARDS_DIR, ShardedCheckpointError, gather_failures, load_shards, save_shards,
                                 shard_state, uses_shards)

# 2: lineage in meta.json, numpy RNG state as a tensor (weights_only loads without an allow-list).
# 3: the sharded layout (FSDP2). Full-layout checkpoints are still written as format 2, so that
# earlier versions keep reading them; a sharded one is refused by them with "upgrade".
FORMAT_VERSION = 3
FULL_FORMAT = 2
FULL, SHARDED = "full", "sharded"
# Run id recorded for checkpoints written before lineages existed (format 1).
LEGACY_RUN = "legacy"
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt, unsafe, cannot be written, or does not
    match the run; also an output folder that another run is using."""


def _options(state: DistributedState, for_load: bool = False):
    # Without a process group, full_state_dict loading needs a broadcast; plain loading is the same.
    if for_load:
        return StateDictOptions(full_state_dict=state.enabled, strict=False)
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def trainable_names(model: nn.Module):
    return [name for name, param in model.named_parameters() if param.requires_grad]


def checkpoint_root(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


def rng_state() -> Dict:
    """RNG states as plain data and tensors (numpy's key array as an int64 tensor), so the file
    loads with weights_only=True and no allow-list."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    if isinstance(keys, torch.Tensor):
        keys = keys.numpy().astype(np.uint32)
    np.random.set_state((name, keys, *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _full_tensor(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


# ----------------------------------------------------------------------------------------------
# Lineage
# ----------------------------------------------------------------------------------------------


@dataclass
class CheckpointInfo:
    """What meta.json says about a complete checkpoint folder."""

    path: Path
    iteration: int
    run_id: str
    lineage: List[Tuple[str, int]]
    seq: int
    meta: Dict[str, Any]

    def descends_from(self, other: "CheckpointInfo") -> bool:
        """True when `other` is this checkpoint or one of its ancestors."""
        if other.run_id == self.run_id and other.iteration <= self.iteration:
            return True
        return any(other.run_id == run and other.iteration <= last for run, last in self.lineage)


def read_meta(path) -> Dict[str, Any]:
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete or corrupt: meta.json is missing "
                              f"(was the run killed while writing it?)")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: meta.json is not valid JSON ({error})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("iteration"), int):
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: meta.json has no integer 'iteration'")
    return meta


def _info(path: Path, meta: Dict[str, Any]) -> CheckpointInfo:
    lineage = [(str(run), int(last)) for run, last in meta.get("lineage", [])]
    return CheckpointInfo(path, int(meta["iteration"]), str(meta.get("run_id", LEGACY_RUN)), lineage,
                          int(meta.get("seq", 0)), meta)


def scan_checkpoints(root) -> Tuple[List[CheckpointInfo], List[Path]]:
    """(complete checkpoints, iter_* folders that are not: no or unreadable meta.json)."""
    complete, incomplete = [], []
    root = Path(root)
    if not root.is_dir():
        return complete, incomplete
    for path in sorted(p for p in root.glob("iter_*") if p.is_dir()):
        try:
            complete.append(_info(path, read_meta(path)))
        except CheckpointError:
            incomplete.append(path)
    return complete, incomplete


def _report_incomplete(paths, seen: Optional[Set[str]] = None) -> None:
    for path in paths:
        if seen is not None:
            if str(path) in seen:
                continue
            seen.add(str(path))
        warn(f"checkpoints/{path.name} has no meta.json (or an unreadable one): not a complete checkpoint "
             f"(a copy cut short, or a damaged folder); ignored: delete it or restore its meta.json")


def _report_abandoned(infos, head: CheckpointInfo, seen: Optional[Set[str]] = None) -> None:
    for info in infos:
        if info.path == head.path or head.descends_from(info):
            continue
        if seen is not None:
            if str(info.path) in seen:
                continue
            seen.add(str(info.path))
        warn(f"checkpoints/{info.path.name} is on an abandoned branch (iteration {info.iteration} of run "
             f"{info.run_id[:8]}, not an ancestor of {head.path.name}, which this run's lineage wrote last): "
             f"--resume latest and pruning leave it alone; resume it with --resume {info.path} or delete it")


@dataclass
class Lineage:
    """The lineage of one run: its id, the runs it continues, the checkpoint it resumed from."""

    run_id: str
    history: List[Tuple[str, int]] = field(default_factory=list)
    resumed_from: Optional[Path] = None
    reported: Set[str] = field(default_factory=set)  # folders already warned about

    @classmethod
    def start(cls, resume_path: Optional[Path]) -> "Lineage":
        """A new run, fresh (resume_path None) or continuing the checkpoint at resume_path."""
        run_id = uuid.uuid4().hex
        if resume_path is None:
            return cls(run_id)
        try:
            info = _info(Path(resume_path), read_meta(resume_path))
        except CheckpointError:
            return cls(run_id, [], Path(resume_path))  # load_checkpoint reports the problem
        return cls(run_id, info.lineage + [(info.run_id, info.iteration)], Path(resume_path))

    def meta(self) -> Dict[str, Any]:
        return {"run_id": self.run_id, "lineage": [list(item) for item in self.history],
                "resumed_from": self.resumed_from.name if self.resumed_from is not None else None}


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file, then every folder bottom-up, so the data is on disk before the rename
    that makes the checkpoint visible."""
    for folder, subfolders, files in os.walk(root, topdown=False):
        for name in files:
            _fsync(Path(folder) / name)
        _fsync(Path(folder), directory=True)


def _is_disk_full(error: BaseException) -> bool:
    seen = set()
    current: Optional[BaseException] = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _DISK_FULL_ERRNOS:
            return True
        if any(text in str(current) for text in _DISK_FULL_TEXT):
            return True
        current = current.__cause__ or current.__context__
    return False


def _free_bytes(path: Path) -> Optional[int]:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _failure_message(error: BaseException, final: Path, free: Optional[int]) -> str:
    # torch.save to a path reports a full disk as "unexpected pos"; when the file system is
    # (nearly) full at that moment, that is what happened.
    disk_full = _is_disk_full(error) or (free is not None and free < (1 << 20))
    if disk_full:
        shown = f"{free / 1e6:.1f} MB free" if free is not None else "free space unknown"
        what = (f"the disk is full ({shown} on the file system of {final.parent} when the save failed); the partial "
                f"checkpoint was removed and the earlier ones are intact: free some space (or lower "
                f"keep_checkpoints) and resume with --resume latest")
    else:
        detail = " ".join(str(error).split())[:300]
        what = f"{type(error).__name__}: {detail}; the partial checkpoint was removed"
    return f"could not write checkpoint {final}: {what}"


def _remove_leftovers(root: Path) -> None:
    # Temporary folders of a killed or failed save. Only the run holding the output-folder lock
    # writes here, so none of them belongs to a save in progress; removing them before writing
    # keeps a full disk from filling further with every retry.
    for temp in root.glob(".tmp_iter_*"):
        shutil.rmtree(temp, ignore_errors=True)


def save_checkpoint(output_dir, iteration: int, policy, optimizer, lr_scheduler, config, extra: Dict,
                    state: DistributedState, ema: Optional[Dict[str, torch.Tensor]] = None,
                    keep: int = 2, lineage: Optional[Lineage] = None) -> Path:
    """Write checkpoint `iter_{iteration:06d}` atomically; collective (call on every rank).

    lineage: the run's Lineage (recorded in meta.json, used for pruning); None = a lineage of its
    own for this call. Raises CheckpointError on every rank when rank 0 could not write."""
    lineage = lineage if lineage is not None else Lineage.start(None)
    model = policy.model
    names = trainable_names(model)
    sharded = uses_shards(config.runtime.parallel, state)
    if sharded:
        # Local shards only (views of the parameters and the optimizer state); a LoRA adapter is
        # small, so its diffusers-format copy is gathered as in the full layout.
        shards, param_groups = shard_state(model, optimizer, ema, names)
        optimizer_state = {"param_groups": param_groups}
        model_state = ({k: _full_tensor(p.detach()).cpu() for k, p in model.named_parameters() if k in set(names)}
                       if config.optim.use_lora else None)
    else:
        model_state = get_model_state_dict(model, options=_options(state))
        optimizer_state = get_optimizer_state_dict(model, optimizer, options=_options(state))
    ema_state = {k: _full_tensor(v).detach().cpu() for k, v in ema.items()} if ema and (
        not sharded or config.optim.use_lora) else None
    root = checkpoint_root(output_dir)
    final = root / f"iter_{iteration:06d}"
    failure, temp = None, None
    if state.is_main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            _remove_leftovers(root)
            temp = root / f".tmp_iter_{iteration:06d}_{os.getpid()}_{time.time_ns()}"
            temp.mkdir()
        except OSError as error:
            failure = _failure_message(error, final, _free_bytes(root.parent))
    if sharded:
        failure, temp = broadcast_object((failure, temp), state)  # every rank writes into rank 0's folder
        if failure is None:
            try:
                save_shards(temp / SHARDS_DIR, shards, state)
            except Exception as error:
                failure = _failure_message(error, final, _free_bytes(root))
            failure = gather_failures(failure, state)
    if state.is_main:
        if failure is None:
            try:
                _write(temp, final, iteration, policy, model_state, optimizer_state, lr_scheduler, config, extra,
                       ema_state, lineage, SHARDED if sharded else FULL, bool(ema))
            except Exception as error:
                failure = _failure_message(error, final, _free_bytes(root))
        if failure is not None and temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
        if failure is None:
            try:
                _prune(root, keep, final, lineage)
            except OSError as error:  # the checkpoint is written; a failed clean-up only warns
                warn(f"could not prune old checkpoints in {root}: {error}")
    failure = broadcast_object(failure, state)  # every rank stops with rank 0's reason
    if failure is not None:
        raise CheckpointError(failure)
    return final


def _write(temp: Path, final: Path, iteration: int, policy, model_state, optimizer_state, lr_scheduler, config,
           extra: Dict, ema_state, lineage: Lineage, layout: str = FULL, has_ema: bool = False) -> None:
    from safetensors.torch import save_file

    model = policy.model
    root = final.parent
    names = trainable_names(model)
    if config.optim.use_lora:
        from peft import get_peft_model_state_dict

        if layout == FULL:  # the sharded layout resumes from its shards
            trainable = {k: model_state[k].contiguous() for k in names}
            save_file(trainable, str(temp / "trainable.safetensors"))
        (temp / "model").mkdir()
        policy.save_lora(temp / "model", get_peft_model_state_dict(model, state_dict=model_state))
        if ema_state:
            # The EMA adapter in the pipeline's LoRA format too (small), for the export.
            (temp / "model_ema").mkdir()
            policy.save_lora(temp / "model_ema", get_peft_model_state_dict(model, state_dict=ema_state))
    elif layout == SHARDED:
        folder = temp / "model_config" / policy.model_component
        folder.mkdir(parents=True)
        model.save_config(str(folder))
    else:
        folder = temp / "model" / policy.model_component
        folder.mkdir(parents=True)
        model.save_config(str(folder))
        save_file({k: v.contiguous() for k, v in model_state.items()},
                  str(folder / "diffusion_pytorch_model.safetensors"))
    # The JSON round trip keeps the config plain data (what weights_only loading accepts).
    config_data = json.loads(json.dumps(config.to_dict(), default=str))
    format_version = FORMAT_VERSION if layout == SHARDED else FULL_FORMAT
    training = {"format_version": format_version, "layout": layout, "iteration": iteration,
                "optimizer": optimizer_state, "lr_scheduler": lr_scheduler.state_dict(),
                "ema": ema_state if layout == FULL else None, "rng": rng_state(), "trainable_names": names,
                "config": config_data, **extra}
    # Through a Python file object: a full disk then surfaces as OSError(ENOSPC) (torch's own
    # file writer reports it only as "unexpected pos").
    with open(temp / "training_state.pt", "wb") as handle:
        torch.save(training, handle)
    complete, _ = scan_checkpoints(root)
    seq = 1 + max((info.seq for info in complete), default=0)
    meta = {"iteration": iteration, "format_version": format_version, "layout": layout,
            "model_family": config.model.family, "model_component": policy.model_component,
            "use_lora": config.optim.use_lora, "has_ema": has_ema,
            "seq": seq, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            # Also here (small) so that a resume reads the run's settings without loading the
            # optimizer state.
            "config": config_data, **lineage.meta()}
    (temp / "meta.json").write_text(json.dumps(meta))
    _fsync_tree(temp)
    aside = None
    if final.exists():
        # Same iteration number: a checkpoint of an abandoned branch (or one written again).
        try:
            previous = _info(final, read_meta(final))
            if previous.run_id != lineage.run_id and not any(previous.run_id == run and previous.iteration <= last
                                                             for run, last in lineage.history):
                warn(f"replacing checkpoints/{final.name} of an abandoned branch (run {previous.run_id[:8]}) with "
                     f"this run's iteration {iteration}")
        except CheckpointError:
            pass
        aside = root / f".tmp_iter_replaced_{final.name}_{time.time_ns()}"
        os.replace(final, aside)
    try:
        os.replace(temp, final)
    except OSError:
        if aside is not None:
            os.replace(aside, final)
        raise
    _fsync(root, directory=True)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _prune(root: Path, keep: int, final: Path, lineage: Lineage) -> None:
    """Keep the newest `keep` checkpoints of the lineage of `final` and the checkpoint this run
    resumed from; report (never delete) other branches and incomplete folders."""
    complete, incomplete = scan_checkpoints(root)
    _report_incomplete(incomplete, lineage.reported)
    head = next((info for info in complete if info.path == final), None)
    if head is None:
        return
    _report_abandoned(complete, head, lineage.reported)
    if keep <= 0:
        return
    mine = sorted((info for info in complete if head.descends_from(info)), key=lambda info: info.iteration)
    protected = {info.path for info in mine[-keep:]}
    if lineage.resumed_from is not None:
        protected.add(lineage.resumed_from)
    resumed = lineage.resumed_from.resolve() if lineage.resumed_from is not None else None
    for info in mine:
        if info.path in protected or info.path.resolve() == resumed:
            continue
        shutil.rmtree(info.path, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Finding and loading
# ----------------------------------------------------------------------------------------------


def find_latest(output_dir) -> Optional[Path]:
    """The checkpoint written last into output_dir (highest seq; among checkpoints of the
    previous format, the highest iteration), or None. Folders without meta.json and checkpoints
    of abandoned branches are reported (RuntimeWarning)."""
    complete, incomplete = scan_checkpoints(checkpoint_root(output_dir))
    _report_incomplete(incomplete)
    if not complete:
        return None
    head = max(complete, key=lambda info: (info.seq, info.iteration))
    _report_abandoned(complete, head)
    return head.path


def resolve_resume(resume: str, output_dir) -> Optional[Path]:
    """'' -> None; 'latest' -> the newest checkpoint of output_dir's lineage (None when there is
    none); a path -> that checkpoint (an error if it does not exist)."""
    if not resume:
        return None
    if resume == "latest":
        return find_latest(output_dir)
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"resume checkpoint {str(path)!r} does not exist")
    return path


def saved_config(path) -> Tuple[Dict[str, Any], int]:
    """(the configuration a checkpoint was written with, as plain data; its iteration). Older
    checkpoints keep it only in training_state.pt."""
    meta = read_meta(path)
    config = meta.get("config")
    if not isinstance(config, dict):
        config = load_training_state(path).get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} does not record its configuration")
    return config, int(meta["iteration"])


def _legacy_safe_globals() -> list:
    """numpy's array reconstruction: the RNG state of format-1 checkpoints holds a uint32 array.
    It can only rebuild arrays of allowed dtypes; anything else in the file is still refused."""
    core = getattr(np, "_core", None)
    reconstruct = (core.multiarray if core is not None else np.core.multiarray)._reconstruct
    # Under both module names: a file pickled with numpy 1 names numpy.core, numpy 2 numpy._core.
    return [(reconstruct, "numpy.core.multiarray._reconstruct"), (reconstruct, "numpy._core.multiarray._reconstruct"),
            np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_training_state(path) -> Dict[str, Any]:
    """training_state.pt of checkpoint folder `path` (or the file itself), loaded with
    torch.load(weights_only=True): plain data and tensors only, numpy arrays for format-1 RNG
    states. A file that references other code is refused (CheckpointError) without running it."""
    path = Path(path)
    file = path / "training_state.pt" if path.is_dir() else path
    folder = file.parent
    try:
        with torch.serialization.safe_globals(_legacy_safe_globals()):
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch names the refused global ("Unsupported global: GLOBAL x.y", or "unsupported
        # GLOBAL x.y whose module x is blocked" for modules such as os/posix).
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        if found:
            raise CheckpointError(f"checkpoint {str(folder)!r}: training_state.pt references {found.group(1)}, which is "
                                  f"not plain data or a tensor; refusing to load it (loading a checkpoint must never run "
                                  f"code; a checkpoint from an untrusted source may be crafted)") from None
        reason = re.search(r"WeightsUnpickler error: (.+)", str(error))
        detail = reason.group(1).strip() if reason else "not plain data and tensors"
        raise CheckpointError(f"checkpoint {str(folder)!r} is corrupt: training_state.pt cannot be read ({detail})") from None
    except Exception as error:
        detail = " ".join(str(error).split())[:200]
        raise CheckpointError(f"checkpoint {str(folder)!r} is corrupt: training_state.pt cannot be read "
                              f"({type(error).__name__}: {detail})") from None


def load_checkpoint(path, policy, optimizer, lr_scheduler, config, state: DistributedState,
                    ema: Optional[Dict[str, torch.Tensor]] = None) -> Dict:
    """Restore model, optimizer, scheduler and RNG from `path`; returns the training state dict
    (iteration, prompt position, EMA, ...). Raises CheckpointError with the reason.

    Either layout loads into any run (DCP reshards a sharded checkpoint to this run's ranks, or
    to one process). ema: the run's EMA shadow; a sharded checkpoint restores it in place (its
    training state then has "ema": None), a full one returns the EMA under "ema"."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a folder")
    meta = read_meta(path)
    if int(meta.get("format_version", 1)) > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has format {meta.get('format_version')}, newer than this "
                              f"version of dancegrpo_fast reads ({FORMAT_VERSION}): upgrade to resume it")
    for key, value in (("model_family", config.model.family), ("use_lora", config.optim.use_lora)):
        if meta.get(key) != value:
            raise CheckpointError(f"checkpoint {str(path)!r} was written with {key}={meta.get(key)!r} but this run "
                                  f"has {key}={value!r}")
    training = load_training_state(path)
    if not isinstance(training, dict) or not all(k in training for k in ("trainable_names", "optimizer",
                                                                         "lr_scheduler", "rng", "iteration")):
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: training_state.pt lacks the training state")
    if meta.get("layout", FULL) == SHARDED:
        return _load_sharded(path, training, policy, optimizer, lr_scheduler, state, ema)
    from safetensors.torch import load_file

    weights_file = (path / "trainable.safetensors" if config.optim.use_lora
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


def _load_sharded(path: Path, training: Dict, policy, optimizer, lr_scheduler, state: DistributedState,
                  ema: Optional[Dict[str, torch.Tensor]]) -> Dict:
    names = trainable_names(policy.model)
    if set(training["trainable_names"]) != set(names):
        raise CheckpointError(f"checkpoint {str(path)!r} does not match the model: trainable parameters differ "
                              f"(model has {len(names)}, checkpoint {len(training['trainable_names'])})")
    param_groups = training["optimizer"].get("param_groups") if isinstance(training["optimizer"], dict) else None
    if not isinstance(param_groups, list):
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: training_state.pt lacks the optimizer's "
                              f"param_groups")
    try:
        training["ema_restored"] = load_shards(path / SHARDS_DIR, policy.model, optimizer, ema, names, param_groups,
                                               state)
    except ShardedCheckpointError as error:
        raise CheckpointError(f"checkpoint {str(path)!r}: {error}") from None
    except Exception as error:  # DCP's own errors: a missing or truncated shard file
        detail = " ".join(str(error).split())[:300]
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: its shards cannot be read "
                              f"({type(error).__name__}: {detail})") from None
    lr_scheduler.load_state_dict(training["lr_scheduler"])
    set_rng_state(training["rng"])
    return training


# ----------------------------------------------------------------------------------------------
# One run per output folder
# ----------------------------------------------------------------------------------------------

# output folder (resolved) -> [fd, holders]: one process may hold its own lock more than once
# (several Trainer objects in one process, e.g. in tests); other processes are excluded.
