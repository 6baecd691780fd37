"""The tiny task's grammar, split and renderer (dancegrpo_fast.tiny.task)."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from dancegrpo_fast.tiny import task
from dancegrpo_fast.tiny.evaluate import load_split_prompts


def test_every_prompt_parses_back_to_its_scene():
    scenes = list(task.all_scenes())
    assert len(scenes) == len({s.prompt() for s in scenes})
    for scene in scenes:
        assert task.parse_prompt(scene.prompt()) == scene
    assert task.parse_prompt("Two RED circles, left of a blue square.") == task.Scene(
        (task.Group(2, "red", "circle"), task.Group(1, "blue", "square")), "left of")
    assert task.parse_prompt("one green triangle") == task.Scene((task.Group(1, "green", "triangle"),))


@pytest.mark.parametrize("prompt", ["", "a red", "four red circles", "a pink circle", "a red hexagon",
                                    "a red circle near a blue square", "a red circle left of a red square",
                                    "a red circle left of"])
def test_parse_rejects_prompts_outside_the_grammar(prompt):
    with pytest.raises(task.PromptParseError):
        task.parse_prompt(prompt)


def test_split_is_disjoint_and_holds_out_color_shape_pairs():
    train, heldout = task.split_scenes("train"), task.split_scenes("heldout")
    assert len(train) + len(heldout) == len(list(task.all_scenes()))
    assert {s.prompt() for s in train}.isdisjoint(s.prompt() for s in heldout)
    train_pairs = {(g.color, g.shape) for s in train for g in s.groups}
    assert train_pairs.isdisjoint(task.HELDOUT_PAIRS)
    assert all(any((g.color, g.shape) in task.HELDOUT_PAIRS for g in s.groups) for s in heldout)
    # Every color and every shape is still seen in training.
    assert {c for c, _ in train_pairs} == set(task.COLORS) and {s for _, s in train_pairs} == set(task.SHAPES)
    rng = random.Random(0)
    assert not any(task.random_scene(rng, "train").is_heldout for _ in range(500))
    assert all(task.random_scene(rng, "heldout").is_heldout for _ in range(100))


def test_shipped_prompt_lists_respect_the_split():
    train, heldout = load_split_prompts("train"), load_split_prompts("heldout")
    assert len(train) >= 256 and len(heldout) >= 64
    assert not any(task.parse_prompt(p).is_heldout for p in train)
    assert all(task.parse_prompt(p).is_heldout for p in heldout)
    assert task.sample_prompts("heldout", 32, seed=5) == task.sample_prompts("heldout", 32, seed=5)


def test_renderer_draws_the_scene():
    scene = task.parse_prompt("two red circles left of three blue squares")
    rng = random.Random(1)
    for _ in range(50):
        placed = task.layout(scene, rng)
        assert len(placed) == 5
        reds = [x + size / 2 for g, x, _, size in placed if g.color == "red"]
        blues = [x + size / 2 for g, x, _, size in placed if g.color == "blue"]
        assert max(reds) < min(blues)
        for i, (_, x, y, s) in enumerate(placed):
            assert 0 <= x and x + s <= task.IMAGE_SIZE and 0 <= y and y + s <= task.IMAGE_SIZE
            for _, x2, y2, s2 in placed[i + 1:]:  # GAP pixels apart
                assert x + s + task.GAP <= x2 or x2 + s2 + task.GAP <= x or y + s + task.GAP <= y2 or y2 + s2 + task.GAP <= y
    images = task.render_batch(["a white triangle", scene], seed=3)
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
    assert float(images.min()) >= 0 and float(images.max()) <= 1
    assert np.array_equal(images.numpy(), task.render_batch(["a white triangle", scene], seed=3).numpy())
    red = np.isclose(images[1].numpy(), np.array(task.COLORS["red"], dtype=np.float32)[:, None, None]).all(axis=0)
    assert red.sum() > 0


def test_shape_masks():
    for size in range(task.MIN_SIZE, task.MAX_SIZE + 1):
        square, circle, triangle = (task.shape_mask(s, size) for s in ("square", "circle", "triangle"))
        assert square.all()
        assert not circle[0, 0] and circle[size // 2, 0] and 0.6 < circle.mean() < 0.9
        assert triangle[-1, 0] and triangle[-1, -1] and not triangle[0, 0] and 0.4 < triangle.mean() < 0.7


def test_noisy_caption_redraws_attributes_and_stays_in_the_train_split():
    rng = random.Random(0)
    scenes = [task.random_scene(rng, "train") for _ in range(400)]
    # Probability 0: the same scene, and no random numbers drawn (the clean data stream).
    state = rng.getstate()
    assert all(task.noisy_caption(s, rng, 0.0) is s for s in scenes)
    assert rng.getstate() == state
    noisy = [task.noisy_caption(s, rng, 0.5) for s in scenes]
    assert not any(n.is_heldout for n in noisy)
    assert all(len(n.groups) < 2 or n.groups[0].color != n.groups[1].color for n in noisy)
    # Shapes and the number of groups are kept; counts, colors and relations change at about
    # probability * (1 - 1/choices).
    assert all([g.shape for g in n.groups] == [g.shape for g in s.groups] for n, s in zip(noisy, scenes))
    counts = [(a.count != b.count) for n, s in zip(noisy, scenes) for a, b in zip(n.groups, s.groups)]
    colors = [(a.color != b.color) for n, s in zip(noisy, scenes) for a, b in zip(n.groups, s.groups)]
    relations = [n.relation != s.relation for n, s in zip(noisy, scenes) if s.relation]
    assert 0.25 < sum(counts) / len(counts) < 0.42  # 0.5 * 2/3
    assert 0.30 < sum(colors) / len(colors) < 0.55  # 0.5 * 5/6, plus re-draws
    assert 0.25 < sum(relations) / len(relations) < 0.50  # 0.5 * 3/4
    with pytest.raises(ValueError, match="probability"):
        task.noisy_caption(scenes[0], rng, 1.5)
