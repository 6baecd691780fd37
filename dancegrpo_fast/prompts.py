"""Prompts: a prompt file read once, and the endless, seeded, resumable stream the rollout takes
its prompts from.

Two file formats: plain text (one prompt per line) and JSON Lines (a file named *.jsonl: one
object per line, {"prompt": text, "image": path}, the image optional) for image-to-video models.
A prompt with an image is an `ImagePrompt`: a str (its text) that also carries the image's path,
so everything that handles prompts as text (the stream, the rollout, the rewards, the logs) keeps
working, and the policy that needs the image finds it on the prompt."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .noise import mix_seed

JSONL_KEYS = ("prompt", "image")


class ImagePrompt(str):
    """A prompt's text (the str itself) and its input image (`image`: an absolute path).

    Two image prompts are equal only when text and image are, and a plain str never equals one:
    the embedding cache keys on the prompt, and one caption is often shared by many images."""

    def __new__(cls, text: str, image: str):
        prompt = super().__new__(cls, text)
        prompt.image = str(image)
        return prompt

    @property
    def text(self) -> str:
        return str.__str__(self)

    def __eq__(self, other):
        return isinstance(other, ImagePrompt) and str.__eq__(self, other) and self.image == other.image

    def __ne__(self, other):
        return not self.__eq__(other)

    def __hash__(self):
        return hash((str.__str__(self), self.image))

    def __repr__(self):
        return f"ImagePrompt({str.__repr__(self)}, image={self.image!r})"

    def __reduce__(self):  # pickles (and torch.save's) as the class with its two strings
        return (ImagePrompt, (self.text, self.image))


# The evaluation's eval_before.pt holds its prompts and is read back with weights_only=True.
torch.serialization.add_safe_globals([ImagePrompt])


def load_prompts(path, what: str = "prompt_file") -> List[str]:
    """The prompts of a prompt file: plain text, one prompt per line, or JSON Lines (*.jsonl,
    `_jsonl_prompts`); blank lines ignored. Errors on a missing or empty file, and on a bad JSONL
    line (naming the config field `what`, the file and the line)."""
    if not path:
        raise ValueError(f"{what} is empty: give a text file with one prompt per line (or a .jsonl file)")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{what} {str(file)!r} does not exist")
    lines = file.read_text(encoding="utf-8").splitlines()
    if file.suffix.lower() == ".jsonl":
        prompts = _jsonl_prompts(lines, file, what)
    else:
        prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"{what} {str(file)!r} holds no prompts (it is empty or only blank lines)")
    return prompts


def _jsonl_prompts(lines: Sequence[str], file: Path, what: str) -> List[str]:
    """One JSON object per non-blank line: "prompt" (text, required) and "image" (optional: a path,
    relative to the file's folder or absolute, of an existing file). A line with an image gives an
    ImagePrompt, one without a plain str."""
    prompts: List[str] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{what} {str(file)!r} line {number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error.msg} at column {error.colno}); expected "
                             f'{{"prompt": "...", "image": "path"}}') from None
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a JSON object {{\"prompt\": ..., \"image\": ...}}, "
                             f"got {type(entry).__name__}")
        unknown = sorted(set(entry) - set(JSONL_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; the keys are {list(JSONL_KEYS)}")
        text = entry.get("prompt")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: \"prompt\" must be a non-empty string, got {text!r}")
        image = entry.get("image")
        if image is None:
            prompts.append(text.strip())
            continue
        if not isinstance(image, str) or not image:
            raise ValueError(f"{where}: \"image\" must be a path (a non-empty string), got {image!r}")
        image_path = (file.parent / image).resolve()
        if not image_path.is_file():
            raise ValueError(f"{where}: image {image!r} does not exist (looked for {str(image_path)!r})")
        prompts.append(ImagePrompt(text.strip(), str(image_path)))
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
