"""Export a checkpoint as diffusers folders (the trained weights, and the EMA as its own folder).

    python -m dancegrpo_fast.export outputs/flux                    # newest checkpoint -> outputs/flux/export
    python -m dancegrpo_fast.export outputs/flux --ema              # ... and the EMA -> outputs/flux/export/ema
    python -m dancegrpo_fast.export outputs/flux --checkpoint iter_000120 --out /models/flux_grpo

What it writes into OUT (default RUN_DIR/export):

    full fine-tune   OUT/<transformer|unet>/{config.json, diffusion_pytorch_model.safetensors}
                     (<ModelClass>.from_pretrained(OUT/<component>))
                     OUT/ema/<component>/                   with --ema: the EMA weights, same format
    LoRA             OUT/pytorch_lora_weights.safetensors    (pipeline.load_lora_weights(OUT))
                     OUT/ema/pytorch_lora_weights.safetensors
    both             OUT/export.json                         which checkpoint and iteration

A checkpoint of either layout exports. A sharded one (FSDP2) is consolidated here, in this one
process on the CPU, from every rank's shards (sharded_checkpoint.read_full): only the weights
(or the EMA) are read, never the optimizer state, and no process group is needed; the memory it
takes is one copy of the trainable weights. OUT is written into a temporary sibling and renamed
into place, so an interrupted export never leaves a half-written folder under OUT's name.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

from torch import Tensor

from .checkpoint import (SHARDED, CheckpointError, checkpoint_root, find_latest, load_training_state, read_meta)
from .sharded_checkpoint import SHARDS_DIR, ShardedCheckpointError, read_full

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
LORA_NAME = "pytorch_lora_weights.safetensors"
EMA_DIR = "ema"
MARKER = "export.json"


def resolve_checkpoint(run_dir, checkpoint: str = "latest") -> Path:
    """'latest' -> the checkpoint RUN_DIR wrote last; a folder name under RUN_DIR/checkpoints
    (iter_000120) or a path -> that checkpoint."""
    if checkpoint == "latest":
        found = find_latest(run_dir)
        if found is None:
            raise CheckpointError(f"{str(run_dir)!r} has no complete checkpoint under checkpoints/ to export")
        return found
    path = Path(checkpoint)
    if not path.is_dir() and (checkpoint_root(run_dir) / checkpoint).is_dir():
        path = checkpoint_root(run_dir) / checkpoint
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {checkpoint!r} does not exist (neither a folder nor a name under "
                              f"{checkpoint_root(run_dir)})")
    return path


def _component(path: Path, meta: Dict) -> str:
    """The trained model's pipeline component (transformer / unet); older checkpoints do not
    record it, their model/ folder names it."""
    if meta.get("model_component"):
        return str(meta["model_component"])
    folders = [p.name for p in (path / "model").iterdir() if p.is_dir()] if (path / "model").is_dir() else []
    if len(folders) != 1:
        raise CheckpointError(f"checkpoint {str(path)!r} does not say which model it trained (no model_component "
                              f"in meta.json, model/ holds {folders})")
    return folders[0]


def _full_weights(path: Path, meta: Dict, component: str) -> Dict[str, Tensor]:
    from safetensors.torch import load_file

    if meta.get("layout") == SHARDED:
        return read_full(path / SHARDS_DIR, "model")
    return load_file(str(path / "model" / component / WEIGHTS_NAME))


def _ema_weights(path: Path, meta: Dict) -> Dict[str, Tensor]:
    if meta.get("layout") == SHARDED:
        try:
            return read_full(path / SHARDS_DIR, "ema")
        except ShardedCheckpointError:
            ema = None
    else:
        ema = load_training_state(path).get("ema")
    if not ema:
        raise CheckpointError(f"checkpoint {str(path)!r} holds no EMA weights (the run had ema_decay 0): "
                              f"export without --ema")
    return ema


def _write_model(folder: Path, config_dir: Path, weights: Dict[str, Tensor]) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    shutil.copyfile(config_dir / "config.json", folder / "config.json")
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / WEIGHTS_NAME))


def export_checkpoint(checkpoint, out, ema: bool = False) -> Path:
    """Write the diffusers export of checkpoint folder `checkpoint` into `out` (module
    docstring); with ema also out/ema. Returns out. Raises CheckpointError."""
    path, out = Path(checkpoint), Path(out)
    meta = read_meta(path)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise CheckpointError(f"--out {str(out)!r} exists and is not an earlier export (no {MARKER}): choose "
                              f"another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.parent / f".tmp_{out.name}_{os.getpid()}_{time.time_ns()}"
    temp.mkdir()
    try:
        if meta.get("use_lora"):
            _export_lora(path, temp, ema)
        else:
            _export_full(path, meta, temp, ema)
        (temp / MARKER).write_text(json.dumps({
            "checkpoint": str(path.resolve()), "iteration": meta["iteration"], "model_family": meta.get("model_family"),
            "use_lora": bool(meta.get("use_lora")), "ema": ema, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
            indent=1))
        aside = None
        if out.exists():
            aside = out.parent / f".tmp_replaced_{out.name}_{time.time_ns()}"
            os.replace(out, aside)
        os.replace(temp, out)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return out


def _export_lora(path: Path, temp: Path, ema: bool) -> None:
    source = path / "model" / LORA_NAME
    if not source.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} has no model/{LORA_NAME}")
    shutil.copyfile(source, temp / LORA_NAME)
    if ema:
        source = path / "model_ema" / LORA_NAME
        if not source.is_file():
            raise CheckpointError(f"checkpoint {str(path)!r} holds no EMA adapter (model_ema/{LORA_NAME}; the run "
                                  f"had ema_decay 0, or was written before EMA adapters were saved): export "
                                  f"without --ema")
        (temp / EMA_DIR).mkdir()
        shutil.copyfile(source, temp / EMA_DIR / LORA_NAME)


def _export_full(path: Path, meta: Dict, temp: Path, ema: bool) -> None:
    component = _component(path, meta)
    config_dir = path / ("model_config" if meta.get("layout") == SHARDED else "model") / component
    if not (config_dir / "config.json").is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: {config_dir.relative_to(path)}/config.json "
                              f"is missing")
    try:
        weights = _full_weights(path, meta, component)
        _write_model(temp / component, config_dir, weights)
        if ema:
            averaged = _ema_weights(path, meta)
            unknown = sorted(set(averaged) - set(weights))
            if unknown:
                raise CheckpointError(f"checkpoint {str(path)!r}: EMA entries {unknown[:3]} are not weights of "
                                      f"the model")
            # A full fine-tune trains every parameter, so the EMA covers them all; anything it
            # does not cover keeps the trained value.
            _write_model(temp / EMA_DIR / component, config_dir, {**weights, **averaged})
    except ShardedCheckpointError as error:
        raise CheckpointError(f"checkpoint {str(path)!r}: {error}") from None


def export_run(run_dir, checkpoint: str = "latest", out=None, ema: bool = False) -> Path:
    """export_checkpoint of RUN_DIR's checkpoint (resolve_checkpoint) into out (default
    RUN_DIR/export)."""
    path = resolve_checkpoint(run_dir, checkpoint)
    return export_checkpoint(path, Path(out) if out is not None else Path(run_dir) / "export", ema)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dancegrpo_fast.export",
                                     description="Export a training checkpoint as diffusers folders.")
    parser.add_argument("run_dir", help="the run's output_dir")
    parser.add_argument("--checkpoint", default="latest",
                        help="latest (default), a name under RUN_DIR/checkpoints (iter_000120) or a checkpoint folder")
    parser.add_argument("--out", default=None, help="output folder (default RUN_DIR/export)")
    parser.add_argument("--ema", action="store_true", help="also export the EMA weights into OUT/ema")
    args = parser.parse_args(argv)
    try:
        out = export_run(args.run_dir, args.checkpoint, args.out, args.ema)
    except (CheckpointError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"exported {json.loads((out / MARKER).read_text())['checkpoint']} -> {out}"
          + (f" (EMA in {out / EMA_DIR})" if args.ema else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
