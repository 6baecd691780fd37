"""The sharded part of a checkpoint under FSDP2: torch.distributed.checkpoint (DCP) files.

Under FSDP2 every rank holds 1/W of each trainable parameter, of its AdamW moments and of its
EMA. Gathering them on one rank for a checkpoint costs the full state in one host's memory (a
full fine-tune of FLUX: ~48 GB float32 weights + ~95 GB AdamW); instead each rank writes its own
shards with `dcp.save` and reads them back with `dcp.load` (nothing is gathered):

    shards/.metadata           the index: which file holds which slice of which tensor (rank 0)
    shards/__<rank>_0.distcp   the shards one rank wrote

Keys (DCP flattens the nested dict with dots): `model.<parameter name>` (the trainable
parameters only; a LoRA run's frozen base stays out), `optimizer.<parameter name>.<state>`
(AdamW's step, exp_avg, exp_avg_sq) and `ema.<parameter name>`. Only tensors go in: AdamW's
param_groups (plain numbers) go to training_state.pt, because DCP reads non-tensor entries with
torch.load(weights_only=False). The index itself is a pickle, read here with an allow-list of
DCP's own metadata classes, so loading a checkpoint still never runs code.

DCP can reshard on load: a checkpoint written by W ranks resumes on any number of ranks, or in
one process, and `read_full` consolidates one key group (the weights, the EMA) on the CPU without
a process group (what the export does), leaving the optimizer state unread.
"""
from __future__ import annotations

import contextlib
import pickle
import warnings
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from .distributed import DistributedState

SHARDS_DIR = "shards"
_SHARDED = StateDictOptions(full_state_dict=False, strict=False)


class ShardedCheckpointError(RuntimeError):
    """Shards that are unsafe to read, corrupt or do not match the model."""


def uses_shards(parallel: str, state: DistributedState) -> bool:
    """Whether a run writes sharded checkpoints: FSDP2 with more than one process."""
    return state.enabled and parallel == "fsdp"


def shard_state(model: nn.Module, optimizer: torch.optim.Optimizer, ema: Optional[Dict[str, Tensor]],
                names: Iterable[str]) -> Tuple[Dict[str, Dict[str, Tensor]], List[Dict]]:
    """({"model", "optimizer", ["ema"]: {key: this rank's (sharded) tensor}}, param_groups).

    The tensors are the parameters' and optimizer's own local shards (DTensors under FSDP2),
    nothing is copied or gathered. With an optimizer that has no state yet (a run about to
    resume), get_optimizer_state_dict first creates it with a zero-learning-rate step, so the
    result is also the template dcp.load fills in place."""
    names = set(names)
    model_state = {k: v for k, v in get_model_state_dict(model, options=_SHARDED).items() if k in names}
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=_SHARDED)
    tensors: Dict[str, Dict[str, Tensor]] = {"model": model_state, "optimizer": optimizer_state["state"]}
    for name, values in optimizer_state["state"].items():
        for key, value in values.items():
            if not isinstance(value, Tensor):  # would be pickled (and unpickled with code) by DCP
                raise ShardedCheckpointError(f"optimizer state {name}.{key} is a {type(value).__name__}, not a "
                                             f"tensor: it cannot go into a sharded checkpoint")
    if ema:
        tensors["ema"] = dict(ema)
    return tensors, optimizer_state["param_groups"]


def save_shards(folder: Path, tensors: Dict[str, Dict[str, Tensor]], state: DistributedState) -> None:
    """Collective: every rank writes its shards of `tensors` into folder (files fsynced)."""
    with _one_process_is_intended():
        dcp.save(tensors, storage_writer=FileSystemWriter(folder, sync_files=True), no_dist=not state.enabled)


@contextlib.contextmanager
def _one_process_is_intended():
    """DCP warns that it "assumes" a single process when no process group is up; here that is
    the intent (one process, or the export's offline read)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


# ----------------------------------------------------------------------------------------------
# Reading the index without running code
# ----------------------------------------------------------------------------------------------

# What DCP's index pickles: its metadata dataclasses, torch.Size, dtypes, layouts, the paths of
# the shard files. Nothing here can run code when rebuilt.
_ALLOWED = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")),
}


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name}")


class SafeReader(FileSystemReader):
    """DCP's file reader with the index read through the allow-list above."""

    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        name = f"{Path(path).parent.name}/{Path(path).name}"
        try:
            with self.fs.create_stream(path, "rb") as handle:
                metadata = _IndexUnpickler(handle).load()
        except FileNotFoundError:
            raise ShardedCheckpointError(f"{name} is missing") from None
        except pickle.UnpicklingError as error:
            raise ShardedCheckpointError(f"{name} references {str(error).removeprefix('GLOBAL ')}, which is "
                                         f"not part of a checkpoint index; refusing to load it (loading a checkpoint "
                                         f"must never run code)") from None
        except Exception as error:
            raise ShardedCheckpointError(f"{name} cannot be read ({type(error).__name__}: {error})") from None
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise ShardedCheckpointError(f"{name} is not a checkpoint index")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def read_index(folder: Path) -> Dict[str, dcp_metadata.TensorStorageMetadata]:
    """{flattened key: its tensor's size and dtype} of the shards in folder. Refuses an index
    with non-tensor entries (DCP would unpickle them with code)."""
    entries = SafeReader(folder).read_metadata().state_dict_metadata
    other = sorted(k for k, v in entries.items() if not isinstance(v, dcp_metadata.TensorStorageMetadata))
    if other:
        raise ShardedCheckpointError(f"the shards hold non-tensor entries ({other[:3]}), which this version never "
                                     f"writes; refusing to load them (DCP would unpickle them)")
    return entries


def load_shards(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, ema: Optional[Dict[str, Tensor]],
                names: Iterable[str], param_groups: List[Dict], state: DistributedState) -> bool:
    """Collective: fill the (possibly sharded) trainable parameters, the optimizer and the EMA
    from the shards in folder; DCP reads on each rank only the slices it holds, whatever the
    number of ranks that wrote them. Returns whether the EMA was restored (the shards hold one
    and `ema` is not None)."""
    names = list(names)
    index = read_index(folder)
    missing = [n for n in names if f"model.{n}" not in index]
    if missing or sum(k.startswith("model.") for k in index) != len(names):
        raise ShardedCheckpointError(f"the shards do not match the model: trainable parameters differ (missing in "
                                     f"the shards: {missing[:5]}, model has {len(names)}, shards "
                                     f"{sum(k.startswith('model.') for k in index)})")
    has_ema = any(k.startswith("ema.") for k in index)
    tensors, _ = shard_state(model, optimizer, ema if has_ema else None, names)
    with _one_process_is_intended():
        dcp.load(tensors, storage_reader=SafeReader(folder), no_dist=not state.enabled)
    set_model_state_dict(model, tensors["model"], options=_SHARDED)
    set_optimizer_state_dict(model, optimizer, {"state": tensors["optimizer"], "param_groups": param_groups},
                             options=_SHARDED)
    return has_ema and ema is not None


def read_full(folder: Path, group: str) -> Dict[str, Tensor]:
    """{parameter name: full tensor on the CPU} of one key group ("model" or "ema"), assembled
    from every rank's shards in this process alone (no process group; the other groups, e.g.
    the optimizer state, are not read)."""
    prefix = f"{group}."
    template = {key[len(prefix):]: torch.empty(entry.size, dtype=entry.properties.dtype)
                for key, entry in read_index(folder).items() if key.startswith(prefix)}
    if not template:
        raise ShardedCheckpointError(f"the shards hold no {group!r} tensors")
    with _one_process_is_intended():
        dcp.load({group: template}, storage_reader=SafeReader(folder), no_dist=True)
    return template


def gather_failures(failure: Optional[str], state: DistributedState) -> Optional[str]:
    """The first rank's failure (rank order), on every rank: a collective step that failed on
    one rank stops all of them with its reason."""
    if not state.enabled:
        return failure
    failures: List[Optional[str]] = [None] * state.world_size
    dist.all_gather_object(failures, failure)
    return next((f for f in failures if f is not None), None)


def shard_files(folder: Path) -> List[str]:
    """The shard files in folder (one per writing rank), sorted."""
    return sorted(p.name for p in Path(folder).glob("*.distcp"))


__all__ = ["SHARDS_DIR", "ShardedCheckpointError", "uses_shards", "shard_state", "save_shards", "load_shards",
           "read_full", "read_index", "SafeReader", "gather_failures", "shard_files"]
