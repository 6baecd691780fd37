"""A verifiable, rule-based GenEval-like reward for the tiny task: does the image show what the
prompt says? Scored by code, no learned model.

Vision, in plain torch (no SciPy):
1. every pixel goes to the nearest palette color (task.COLORS plus the background) when it lies
   within `color_tolerance` (RGB distance) of it, else to nothing;
2. connected components (4-connectivity) of equal-color pixels, by max-label propagation with
   pointer jumping; components smaller than `min_area` pixels are ignored;
3. each component's shape from its bounding box: fill ratio and which box corners it covers
   (square: fill ~1, all corners; circle: fill ~0.78, no corner; up-pointing triangle: fill
   ~0.55, the two bottom corners); components much longer than wide are "other";
4. positions from component centroids.

Criteria, each in [0, 1] per sample, averaged over the prompt's groups:
- color: the group's color is present (at least one component of it);
- count: 1 - |found - asked| / max(found, asked), 1 exactly when the count is right;
- shape: fraction of the group's components that have the asked shape (0 when none);
- position (two-group prompts only): the mean centroid of the first group lies on the asked
  side of the second's by >= `position_margin` pixels (linear from 0 px to the margin; 0 when a
  group is missing). NaN for one-group prompts;
- clean: the fraction of the detected objects whose color the prompt asks for (0 when nothing
  is detected). Without it, "color" and "count" are hackable: a policy that sprays blobs of every
  color finds each asked color somewhere, and RL on the first version of this reward learned
  exactly that.
The score is the mean of the criteria that apply. The renderer's own images score 1.

Registered as "tiny_geneval"; "tiny_geneval_binary" is 1 when the score exceeds a threshold
(the paper's binary reward, via rewards.rule_based.BinaryReward).
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..rewards.base import Reward, register_reward, validate_inputs
from ..rewards.rule_based import BinaryReward
from .task import BACKGROUND, COLORS, SHAPES, Scene, parse_prompt

CRITERIA = ("color", "count", "shape", "position", "clean")
PALETTE_NAMES = tuple(COLORS)
_PALETTE = torch.tensor([COLORS[name] for name in PALETTE_NAMES] + [BACKGROUND], dtype=torch.float32)
# (fill ratio, top corners covered, bottom corners covered) of each shape.
_PROTOTYPES = {"square": (1.0, 1.0, 1.0), "circle": (0.78, 0.0, 0.0), "triangle": (0.55, 0.0, 1.0)}


def palette_labels(images: torch.Tensor, color_tolerance: float) -> torch.Tensor:
    """images (B, 3, H, W) in [0, 1] -> (B, H, W) int64: the index in PALETTE_NAMES of each
    pixel's nearest palette entry (colors + background) when it lies within color_tolerance,
    else -1 (also -1 for background pixels)."""
    palette = _PALETTE.to(images.device)
    pixels = images.float().permute(0, 2, 3, 1).unsqueeze(3)  # (B, H, W, 1, 3)
    squared = (pixels - palette.view(1, 1, 1, -1, 3)).square().sum(dim=-1)  # (B, H, W, K+1)
    nearest_squared, nearest = squared.min(dim=-1)
    on_color = (nearest_squared <= color_tolerance ** 2) & (nearest < len(PALETTE_NAMES))
    return torch.where(on_color, nearest, torch.full_like(nearest, -1))


def connected_components(colors: torch.Tensor, max_iterations: int = 2048) -> torch.Tensor:
    """colors (N, H, W) int (-1 = no color) -> (N, H, W) int64 labels of the 4-connected
    components of equal color: 0 off color, otherwise 1 + the flat index of the component's
    last pixel (unique within an image). Max-label propagation with pointer jumping."""
    n, height, width = colors.shape
    on = colors >= 0
    padded_colors = F.pad(colors, (1, 1, 1, 1), value=-1)
    neighbour_colors = (padded_colors[:, :-2, 1:-1], padded_colors[:, 2:, 1:-1], padded_colors[:, 1:-1, :-2],
                        padded_colors[:, 1:-1, 2:])
    linked = [(c == colors) & on for c in neighbour_colors]
    index = torch.arange(1, height * width + 1, device=colors.device).view(1, height, width)
    labels = torch.where(on, index, torch.zeros_like(index))
    zero = torch.zeros(n, 1, dtype=labels.dtype, device=colors.device)
    for _ in range(max_iterations):
        padded = F.pad(labels, (1, 1, 1, 1))
        hooked = labels
        for link, value in zip(linked, (padded[:, :-2, 1:-1], padded[:, 2:, 1:-1], padded[:, 1:-1, :-2],
                                        padded[:, 1:-1, 2:])):
            hooked = torch.maximum(hooked, torch.where(link, value, torch.zeros_like(value)))
        # Pointer jumping: a label names a pixel of the same component whose label is >= it.
        flat = torch.cat([zero, hooked.view(n, -1)], dim=1)
        jumped = torch.gather(flat, 1, hooked.view(n, -1)).view(n, height, width)
        if torch.equal(jumped, labels):
            break
        labels = jumped
    return labels


@contextlib.contextmanager
def _one_thread():
    """The reward's tensors are tiny: intra-op threads only add overhead (tens of times slower
    on a busy CPU), so run on one thread and restore the setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class ComponentStats:
    """Per-component statistics of component labels (N, H, W): image index, label, area,
    bounding box, centroid, corner coverage; only components with area >= min_area. Each
    attribute is a (C,) tensor over the kept components."""

    def __init__(self, labels: torch.Tensor, min_area: int):
        n, height, width = labels.shape
        hw = height * width
        on = labels.view(-1) > 0
        pixel = torch.arange(n * hw, device=labels.device)[on]
        image = pixel // hw
        key = image * (hw + 1) + labels.view(-1)[on]
        unique, inverse = torch.unique(key, return_inverse=True)
        count = unique.shape[0]
        ys = ((pixel % hw) // width).float()
        xs = (pixel % width).float()
        area = torch.bincount(inverse, minlength=count).float()

        def reduce(values, how):
            out = torch.zeros(count, device=labels.device)
            return out.scatter_reduce(0, inverse, values, reduce=how, include_self=False)
        y0, y1, x0, x1 = reduce(ys, "amin"), reduce(ys, "amax"), reduce(xs, "amin"), reduce(xs, "amax")
        cy, cx = reduce(ys, "sum") / area, reduce(xs, "sum") / area
        keep = area >= min_area
        self.image = (unique // (hw + 1))[keep]
        self.label = (unique % (hw + 1))[keep]
        self.area, self.y0, self.y1, self.x0, self.x1 = area[keep], y0[keep], y1[keep], x0[keep], x1[keep]
        self.cy, self.cx = cy[keep], cx[keep]
        flat = labels.view(n, hw)

        def covered(y, x):
            return (flat[self.image, (y.long() * width + x.long())] == self.label).float()

        self.top = (covered(self.y0, self.x0) + covered(self.y0, self.x1)) / 2
        self.bottom = (covered(self.y1, self.x0) + covered(self.y1, self.x1)) / 2

    def shapes(self, max_aspect: float = 1.6) -> List[str]:
        """The shape name of every component ("other" for elongated ones)."""
        h = self.y1 - self.y0 + 1
        w = self.x1 - self.x0 + 1
        fill = self.area / (h * w)
        features = torch.stack([fill, self.top, self.bottom], dim=1)
        prototypes = torch.tensor([_PROTOTYPES[s] for s in SHAPES], device=features.device)
        best = torch.cdist(features, prototypes).argmin(dim=1)
        aspect = torch.maximum(h / w, w / h)
        return ["other" if a > max_aspect else SHAPES[int(b)] for a, b in zip(aspect.tolist(), best.tolist())]


class TinyGenEvalReward(Reward):
    """Rule-based reward of the tiny task: images (B, 3, H, W) in [0, 1] + grammar prompts ->
    (B,) score in [0, 1] (see the module docstring). `criteria(images, prompts)` gives the
    per-criterion scores, {name: (B,) float32}, position NaN for one-group prompts."""

    name = "tiny_geneval"
    modality = "image"

    def __init__(self, color_tolerance: float = 0.35, min_area: int = 5, position_margin: float = 2.0,
                 device="cpu", batch_size: Optional[int] = None, single_thread: bool = True):
        """single_thread: score with torch on one intra-op thread (restored afterwards), which is
        much faster for these tiny tensors on a busy CPU; torch's thread count is process-wide,
        so pass False when scoring in a background thread (rewards.pool.AsyncRewardPool)."""
        super().__init__(device=device, batch_size=batch_size)
        self.single_thread = bool(single_thread)
        if not 0 < color_tolerance:
            raise ValueError(f"color_tolerance must be > 0, got {color_tolerance!r}")
        if not (isinstance(min_area, int) and min_area >= 1):
            raise ValueError(f"min_area must be an integer >= 1, got {min_area!r}")
        if not position_margin > 0:
            raise ValueError(f"position_margin must be > 0, got {position_margin!r}")
        self.color_tolerance = float(color_tolerance)
        self.min_area = min_area
        self.position_margin = float(position_margin)
        # Parsed prompts, least recently used first. Bounded: behind the reward server every
        # client's prompts land here.
        self._scenes: "OrderedDict[str, Scene]" = OrderedDict()

    SCENE_CACHE_SIZE = 4096

    def _scene(self, prompt: str) -> Scene:
        scene = self._scenes.get(prompt)
        if scene is not None:
            self._scenes.move_to_end(prompt)
            return scene
        scene = self._scenes[prompt] = parse_prompt(prompt)  # PromptParseError names the prompt
        while len(self._scenes) > self.SCENE_CACHE_SIZE:
            self._scenes.popitem(last=False)
        return scene

    def _criteria(self, images: torch.Tensor, prompts: Sequence[str]) -> Dict[str, torch.Tensor]:
        scenes = [self._scene(p) for p in prompts]
        colors = palette_labels(images, self.color_tolerance)  # (B, H, W)
        stats = ComponentStats(connected_components(colors), self.min_area)
        batch = images.shape[0]
        shapes = stats.shapes()
        by_owner: Dict[tuple, List[int]] = {}
        component_colors = colors.view(batch, -1)[stats.image, stats.label - 1]
        for index, key in enumerate(zip(stats.image.tolist(), component_colors.tolist())):
            by_owner.setdefault(key, []).append(index)
        cx, cy = stats.cx.tolist(), stats.cy.tolist()
        result = {name: torch.zeros(batch) for name in CRITERIA}
        detected = torch.bincount(stats.image, minlength=batch).tolist()
        for b, scene in enumerate(scenes):
            centers = []
            asked = sum(len(by_owner.get((b, PALETTE_NAMES.index(g.color)), [])) for g in scene.groups)
            result["clean"][b] = asked / detected[b] if detected[b] else 0.0
            color = count = shape = 0.0
            for group in scene.groups:
                components = by_owner.get((b, PALETTE_NAMES.index(group.color)), [])
                found = len(components)
                color += float(found > 0)
                count += 1.0 - abs(found - group.count) / max(found, group.count)
                shape += sum(shapes[i] == group.shape for i in components) / found if found else 0.0
                centers.append((sum(cx[i] for i in components) / found, sum(cy[i] for i in components) / found)
                               if found else None)
            groups = len(scene.groups)
            result["color"][b], result["count"][b], result["shape"][b] = color / groups, count / groups, shape / groups
            if scene.relation is None:
                result["position"][b] = float("nan")
            elif centers[0] is None or centers[1] is None:
                result["position"][b] = 0.0
            else:
                (x1, y1), (x2, y2) = centers
                gap = {"left of": x2 - x1, "right of": x1 - x2, "above": y2 - y1, "below": y1 - y2}[scene.relation]
                result["position"][b] = min(max(gap / self.position_margin, 0.0), 1.0)
        return result

    @staticmethod
    def combine(criteria: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean of the applicable (non-NaN) criteria per sample."""
        stacked = torch.stack([criteria[name] for name in CRITERIA], dim=1)
        return torch.nanmean(stacked, dim=1)

    def _score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        with self._threads():
            return self.combine(self._criteria(images, prompts))

    def _threads(self):
        return _one_thread() if self.single_thread else contextlib.nullcontext()

    def criteria(self, images: torch.Tensor, prompts: Sequence[str]) -> Dict[str, torch.Tensor]:
        """Per-criterion scores {color, count, shape, position, clean, score}: (B,) float32 on the CPU;
        position is NaN for one-group prompts (use torch.nanmean to average it)."""
        validate_inputs(images, list(prompts), self.modality)
        with torch.no_grad(), self._threads():
            out = self._criteria(images.clamp(0, 1).to(self.device), list(prompts))
        out = {name: value.float().cpu() for name, value in out.items()}
        out["score"] = self.combine(out)
        return out

    def describe(self):
        return {**super().describe(), "color_tolerance": self.color_tolerance, "min_area": self.min_area,
                "position_margin": self.position_margin, "single_thread": self.single_thread}


@register_reward("tiny_geneval_binary")
def tiny_geneval_binary(threshold: float = 0.99, **kwargs) -> BinaryReward:
    """1.0 where the tiny_geneval score exceeds `threshold` (default 0.99: every criterion met),
    else 0.0; kwargs go to TinyGenEvalReward."""
    return BinaryReward(TinyGenEvalReward(**kwargs), threshold)


register_reward("tiny_geneval")(TinyGenEvalReward)


def summarize(criteria: Dict[str, torch.Tensor], prefix: str = "") -> Dict[str, float]:
    """Batch means of per-criterion scores, ignoring NaN (position of one-group prompts)."""
    return {f"{prefix}{name}": float(torch.nanmean(value.float())) for name, value in criteria.items()}


__all__ = ["TinyGenEvalReward", "tiny_geneval_binary", "CRITERIA", "palette_labels", "connected_components",
           "ComponentStats", "summarize"]
