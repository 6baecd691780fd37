"""The procedural text-to-image task of the built-in tiny model.

Prompts come from a small grammar of colored shapes:

    prompt   := group | group relation group
    group    := count color shape          ("a red circle", "two blue squares", "three white triangles")
    count    := a | two | three            (one is accepted as a synonym of a)
    relation := left of | right of | above | below

The two groups of a prompt have different colors (the reward tells groups apart by color).
"two red circles left of a blue square" means: two red circles, one blue square, and the red
circles lie to the left of the blue square.

Split: a few color-shape pairs (HELDOUT_PAIRS) never occur in any training prompt, neither in
pretraining nor in RL. A prompt is held out when one of its groups uses a held-out pair, and
train otherwise, so held-out prompts are compositions the model has never seen.

The renderer draws a scene at 32x32 RGB on a black background, objects with random size and
position, hard edges, at least GAP background pixels between objects; two-group scenes put each
group on its side of a random split line, so the relation holds.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

COLORS = {
    "red": (0.90, 0.12, 0.12),
    "green": (0.15, 0.75, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.62, 0.15, 0.82),
    "white": (0.95, 0.95, 0.95),
}
BACKGROUND = (0.0, 0.0, 0.0)
SHAPES = ("circle", "square", "triangle")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
RELATIONS = ("left of", "right of", "above", "below")
# Color-shape pairs that occur only in held-out prompts: every color and every shape still
# occurs in training with other partners.
HELDOUT_PAIRS = frozenset({("red", "triangle"), ("blue", "circle"), ("yellow", "square"), ("purple", "circle")})

IMAGE_SIZE = 32
MIN_SIZE, MAX_SIZE = 6, 9
GAP = 2

VOCABULARY = tuple(["a", "one", "two", "three"] + list(COLORS) + list(SHAPES) + list(PLURALS.values())
                   + ["left", "right", "of", "above", "below"])


class PromptParseError(ValueError):
    """A prompt that is not a sentence of the tiny grammar."""


@dataclass(frozen=True)
class Group:
    count: int
    color: str
    shape: str

    def text(self) -> str:
        noun = self.shape if self.count == 1 else PLURALS[self.shape]
        return f"{COUNT_WORDS[self.count]} {self.color} {noun}"


@dataclass(frozen=True)
class Scene:
    """One or two groups; `relation` (one of RELATIONS) places groups[0] relative to groups[1]."""

    groups: Tuple[Group, ...]
    relation: Optional[str] = None

    def __post_init__(self):
        if len(self.groups) not in (1, 2):
            raise ValueError(f"a scene has one or two groups, got {len(self.groups)}")
        if (len(self.groups) == 2) != (self.relation is not None):
            raise ValueError("a relation is needed exactly when there are two groups")
        if self.relation is not None and self.relation not in RELATIONS:
            raise ValueError(f"relation must be one of {RELATIONS}, got {self.relation!r}")
        if len(self.groups) == 2 and self.groups[0].color == self.groups[1].color:
            raise ValueError("the two groups of a scene must have different colors")

    def prompt(self) -> str:
        if self.relation is None:
            return self.groups[0].text()
        return f"{self.groups[0].text()} {self.relation} {self.groups[1].text()}"

    @property
    def is_heldout(self) -> bool:
        return any((g.color, g.shape) in HELDOUT_PAIRS for g in self.groups)

    @property
    def num_objects(self) -> int:
        return sum(g.count for g in self.groups)


# ----------------------------------------------------------------------------------------------
# Parsing


_COUNT_OF = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}
_SHAPE_OF = {**{s: s for s in SHAPES}, **{p: s for s, p in PLURALS.items()}}


def _parse_group(words: Sequence[str], prompt: str) -> Group:
    if len(words) != 3:
        raise PromptParseError(f"expected 'count color shape', got {' '.join(words)!r} in {prompt!r}")
    count_word, color, noun = words
    if count_word not in _COUNT_OF:
        raise PromptParseError(f"unknown count {count_word!r} in {prompt!r}; use one of a, two, three")
    if color not in COLORS:
        raise PromptParseError(f"unknown color {color!r} in {prompt!r}; colors: {sorted(COLORS)}")
    if noun not in _SHAPE_OF:
        raise PromptParseError(f"unknown shape {noun!r} in {prompt!r}; shapes: {list(SHAPES)}")
    return Group(_COUNT_OF[count_word], color, _SHAPE_OF[noun])


def normalize(prompt: str) -> List[str]:
    """Lower-cased words, punctuation dropped."""
    cleaned = "".join(ch if ch.isalnum() or ch.isspace() else " " for ch in prompt.lower())
    return cleaned.split()


def parse_prompt(prompt: str) -> Scene:
    """Prompt string -> Scene; PromptParseError for anything outside the grammar."""
    words = normalize(prompt)
    for i, word in enumerate(words):
        relation = None
        if word in ("left", "right") and i + 1 < len(words) and words[i + 1] == "of":
            relation, rest = f"{word} of", i + 2
        elif word in ("above", "below"):
            relation, rest = word, i + 1
        if relation is not None:
            try:
                return Scene((_parse_group(words[:i], prompt), _parse_group(words[rest:], prompt)), relation)
            except ValueError as error:
                if isinstance(error, PromptParseError):
                    raise
                raise PromptParseError(f"{error} in {prompt!r}") from None
    return Scene((_parse_group(words, prompt),))


# ----------------------------------------------------------------------------------------------
# Enumeration and the split


def all_scenes() -> Iterator[Scene]:
    """Every scene of the grammar (each prompt once), in a fixed order."""
    groups = [Group(n, c, s) for n in COUNT_WORDS for c in COLORS for s in SHAPES]
    for g in groups:
        yield Scene((g,))
    for relation in RELATIONS:
        for g1, g2 in itertools.product(groups, groups):
            if g1.color != g2.color:
                yield Scene((g1, g2), relation)


def split_scenes(split: str) -> List[Scene]:
    """'train' or 'heldout': all scenes of that split, fixed order."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    want = split == "heldout"
    return [scene for scene in all_scenes() if scene.is_heldout == want]


def sample_prompts(split: str, count: int, seed: int = 0, single_fraction: float = 0.25) -> List[str]:
    """`count` distinct prompts of a split, about `single_fraction` of them one-group prompts,
    deterministic in `seed`."""
    scenes = split_scenes(split)
    singles = [s for s in scenes if s.relation is None]
    pairs = [s for s in scenes if s.relation is not None]
    rng = random.Random(seed)
    n_single = min(len(singles), int(round(count * single_fraction)))
    chosen = rng.sample(singles, n_single) + rng.sample(pairs, min(len(pairs), count - n_single))
    rng.shuffle(chosen)
    return [s.prompt() for s in chosen]


def random_scene(rng: random.Random, split: str = "train", single_fraction: float = 0.3) -> Scene:
    """One random scene of a split (rejection sampling on the grammar)."""
    colors, counts = list(COLORS), list(COUNT_WORDS)
    while True:
        n_groups = 1 if rng.random() < single_fraction else 2
        picked = rng.sample(colors, n_groups)
        groups = tuple(Group(rng.choice(counts), color, rng.choice(SHAPES)) for color in picked)
        scene = Scene(groups, rng.choice(RELATIONS) if n_groups == 2 else None)
        if scene.is_heldout == (split == "heldout"):
            return scene


def noisy_caption(scene: Scene, rng: random.Random, probability: float) -> Scene:
    """The scene a noisy caption describes, like web alt-text that gets counts, colors and
    spatial relations wrong: each group's count and color and the relation are, independently
    with `probability`, redrawn uniformly (possibly to the same value). The result is still a
    train-split scene (a redraw that would name a held-out color-shape pair, or give both groups
    one color, is drawn again), so held-out pairs never appear in a caption either. With
    probability 0 no random numbers are drawn: the data stream is that of clean captions."""
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"caption noise probability must be in [0, 1], got {probability!r}")
    if probability == 0.0:
        return scene
    while True:
        groups = []
        for group in scene.groups:
            count = rng.choice(list(COUNT_WORDS)) if rng.random() < probability else group.count
            color = rng.choice(list(COLORS)) if rng.random() < probability else group.color
            groups.append(Group(count, color, group.shape))
        relation = scene.relation
        if relation is not None and rng.random() < probability:
            relation = rng.choice(RELATIONS)
        if len(groups) == 2 and groups[0].color == groups[1].color:
            continue
        noisy = Scene(tuple(groups), relation)
        if not noisy.is_heldout:
            return noisy


# ----------------------------------------------------------------------------------------------
# Rendering


def shape_mask(shape: str, size: int) -> np.ndarray:
    """(size, size) bool mask of a shape filling its box: pixel-center tests, no anti-aliasing.
    The triangle points up with its base on the bottom row."""
    centers = np.arange(size) + 0.5
    y, x = np.meshgrid(centers, centers, indexing="ij")
    half = size / 2
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    if shape == "circle":
        return (x - half) ** 2 + (y - half) ** 2 <= half ** 2 + 0.25
    if shape == "triangle":
        return np.abs(x - half) <= y / size * half + 0.25
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


_MASKS = {(shape, size): shape_mask(shape, size) for shape in SHAPES for size in range(1, 17)}


def _regions(relation: Optional[str], rng: random.Random) -> List[Tuple[int, int, int, int]]:
    """(x0, y0, x1, y1) half-open regions, one per group."""
    full = (1, 1, IMAGE_SIZE - 1, IMAGE_SIZE - 1)
    if relation is None:
        return [full]
    split = rng.randint(13, 19)
    first, second = (1, split - GAP // 2), (split + (GAP + 1) // 2, IMAGE_SIZE - 1)
    if relation in ("left of", "right of"):
        left = (first[0], 1, first[1], IMAGE_SIZE - 1)
        right = (second[0], 1, second[1], IMAGE_SIZE - 1)
        return [left, right] if relation == "left of" else [right, left]
    top = (1, first[0], IMAGE_SIZE - 1, first[1])
    bottom = (1, second[0], IMAGE_SIZE - 1, second[1])
    return [top, bottom] if relation == "above" else [bottom, top]


def layout(scene: Scene, rng: random.Random) -> List[Tuple[Group, int, int, int]]:
    """Random placement: [(group, x0, y0, size)] per object, boxes GAP pixels apart, inside
    their group's region."""
    for _ in range(200):
        placed: List[Tuple[Group, int, int, int]] = []
        ok = True
        for group, (rx0, ry0, rx1, ry1) in zip(scene.groups, _regions(scene.relation, rng)):
            for _ in range(group.count):
                for _ in range(100):
                    size = rng.randint(MIN_SIZE, min(MAX_SIZE, rx1 - rx0, ry1 - ry0))
                    x0, y0 = rng.randint(rx0, rx1 - size), rng.randint(ry0, ry1 - size)
                    if all(x0 + size + GAP <= px or px + ps + GAP <= x0 or y0 + size + GAP <= py or py + ps + GAP <= y0
                           for _, px, py, ps in placed):
                        placed.append((group, x0, y0, size))
                        break
                else:
                    ok = False
                    break
            if not ok:
                break
        if ok:
            return placed
    raise RuntimeError(f"could not place the objects of {scene.prompt()!r}")


def render(scene: Scene, rng: random.Random) -> np.ndarray:
    """(3, 32, 32) float32 image in [0, 1]."""
    image = np.empty((3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    image[:] = np.asarray(BACKGROUND, dtype=np.float32)[:, None, None]
    for group, x0, y0, size in layout(scene, rng):
        mask = _MASKS[(group.shape, size)]
        color = np.asarray(COLORS[group.color], dtype=np.float32)[:, None]
        window = image[:, y0:y0 + size, x0:x0 + size]
        window[:, mask] = color
    return image


def render_batch(prompts_or_scenes: Sequence, seed: int = 0, rng: Optional[random.Random] = None) -> torch.Tensor:
    """Render prompts (strings or Scenes) -> (B, 3, 32, 32) float32 in [0, 1]."""
    rng = rng if rng is not None else random.Random(seed)
    scenes = [parse_prompt(p) if isinstance(p, str) else p for p in prompts_or_scenes]
    return torch.from_numpy(np.stack([render(scene, rng) for scene in scenes]))


__all__ = ["COLORS", "SHAPES", "RELATIONS", "HELDOUT_PAIRS", "IMAGE_SIZE", "VOCABULARY", "Group", "Scene",
           "PromptParseError", "parse_prompt", "normalize", "all_scenes", "split_scenes", "sample_prompts",
           "random_scene", "render", "render_batch", "layout", "shape_mask"]
