"""Prompts: a prompt file read once, and the endless, seeded, resumable stream the rollout takes
its prompts from."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .noise import mix_seed


def load_prompts(path, what: str = "prompt_file") -> List[str]:
    """One prompt per line, blank lines ignored. Errors on a missing or empty file (naming the
    config field `what`)."""
    if not path:
        raise ValueError(f"{what} is empty: give a text file with one prompt per line")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{what} {str(file)!r} does not exist")
    prompts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{what} {str(file)!r} holds no prompts (it is empty or only blank lines)")
    return prompts


class PromptStream:
    """An endless stream of prompts: each epoch a fresh permutation seeded by (seed, epoch).
    `position` counts the prompts taken so far (checkpointed, so a resume continues exactly)."""

    def __init__(self, prompts: Sequence[str], seed: int, position: int = 0):
        self.prompts = list(prompts)
        self.seed = seed
        self.position = position
        self._epoch = -1
        self._order: Optional[List[int]] = None

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.prompts))
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 7))
            self._order = torch.randperm(len(self.prompts), generator=generator).tolist()
            self._epoch = epoch
        return self._order[offset]

    def prompts_at(self, positions: Sequence[int]) -> List[str]:
        """The prompts at global stream positions (taken or not; the stream does not move)."""
        return [self.prompts[self._index(int(p))] for p in positions]

    def take(self, count: int) -> Tuple[List[str], Tensor]:
        """The next `count` prompts and their global positions (int64)."""
        positions = list(range(self.position, self.position + count))
        self.position += count
        return [self.prompts[self._index(p)] for p in positions], torch.tensor(positions, dtype=torch.int64)
