"""Run one or more training iterations on a tiny model under torchrun (or alone) and save the
trainable parameters; used by tests/test_distributed.py.

    python -m torch.distributed.run --nproc_per_node 2 tests/helpers/dist_runner.py CONFIG.json OUT.pt
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dancegrpo_fast.config import TrainConfig  # noqa: E402
from dancegrpo_fast.distributed import cleanup, init_distributed  # noqa: E402
from dancegrpo_fast.train import Trainer  # noqa: E402


def brightness(images, prompts):
    return images.float().mean(dim=tuple(range(1, images.dim())))


def main(config_file: str, output_file: str) -> None:
    values = json.loads(Path(config_file).read_text())
    config = TrainConfig.from_dict(values)
    state = init_distributed("cpu")
    trainer = Trainer(config, rewards={"brightness": (brightness, 1.0)}, state=state)
    trainer.train()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(trainer.policy.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    names = {n for n, p in trainer.policy.model.named_parameters() if p.requires_grad}
    if state.is_main:
        torch.save({"params": {k: v for k, v in full.items() if k in names}, "iteration": trainer.iteration},
                   output_file)
    cleanup(state)
    trainer.export_deferred()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
