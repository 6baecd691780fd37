"""dist_runner's training run under torchrun, also recording what each rank hands to
torch.distributed.checkpoint at every save (local vs full element counts of its tensors) and
the final EMA; used by tests/test_sharded_checkpoint.py.

    python -m torch.distributed.run --nproc_per_node 2 tests/helpers/sharded_runner.py CONFIG.json OUT.pt
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dancegrpo_fast import checkpoint as checkpoint_module  # noqa: E402
from dancegrpo_fast.config import TrainConfig  # noqa: E402
from dancegrpo_fast.distributed import all_gather, cleanup, init_distributed  # noqa: E402
from dancegrpo_fast.train import Trainer  # noqa: E402


def brightness(images, prompts):
    return images.float().mean(dim=tuple(range(1, images.dim())))


def _full(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _numel(tree, local: bool) -> int:
    """Elements of the tensors in a nested dict: this rank's local shards, or the full tensors."""
    if isinstance(tree, dict):
        return sum(_numel(v, local) for v in tree.values())
    return (tree.to_local() if local and hasattr(tree, "to_local") else tree).numel()


def main(config_file: str, output_file: str) -> None:
    config = TrainConfig.from_dict(json.loads(Path(config_file).read_text()))
    state = init_distributed("cpu")
    saves = []
    real_save_shards = checkpoint_module.save_shards

    def recording_save_shards(folder, tensors, dist_state):
        # What this rank holds while saving: the local part of every tensor, and its full size.
        saves.append({"folder": str(folder), "local": {g: _numel(v, True) for g, v in tensors.items()},
                      "full": {g: _numel(v, False) for g, v in tensors.items()}})
        return real_save_shards(folder, tensors, dist_state)

    checkpoint_module.save_shards = recording_save_shards
    trainer = Trainer(config, rewards={"brightness": (brightness, 1.0)}, state=state)
    trainer.train()
    model = trainer.policy.model
    params = {n: _full(p.detach()).cpu() for n, p in model.named_parameters() if p.requires_grad}
    ema = ({n: _full(v).cpu() for n, v in trainer.setup.ema.shadow.items()} if trainer.setup.ema is not None
           else None)
    # every rank's record, gathered as a tensor: (rank, saves, local "model" elements)
    counts = torch.tensor([[s["local"]["model"] for s in saves]], dtype=torch.int64)
    gathered = all_gather(counts, state)
    if state.is_main:
        torch.save({"params": params, "ema": ema, "iteration": trainer.iteration, "saves": saves,
                    "local_model_counts": gathered}, output_file)
    cleanup(state)
    trainer.export_deferred()  # as train.main does: the end-of-run export after the group is gone


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
