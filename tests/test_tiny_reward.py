"""The rule-based tiny_geneval reward (dancegrpo_fast.tiny.reward)."""
from __future__ import annotations

import random
import time

import pytest
import torch

from dancegrpo_fast.rewards import build_reward
from dancegrpo_fast.tiny import task
from dancegrpo_fast.tiny.reward import CRITERIA, TinyGenEvalReward, connected_components, summarize


@pytest.fixture(scope="module")
def reward():
    return TinyGenEvalReward()


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_own_renders_score_near_one(reward, split):
    prompts = task.sample_prompts(split, 128, seed=int(torch.randint(0, 10**6, ())))
    images = task.render_batch(prompts, seed=int(torch.randint(0, 10**6, ())))
    scores = reward(images, prompts)
    assert scores.shape == (128,) and scores.dtype == torch.float32
    assert float(scores.mean()) >= 0.97 and float(scores.min()) >= 0.5


def test_noise_blank_and_mismatched_prompts_score_low(reward):
    prompts = task.sample_prompts("train", 64, seed=3)
    images = task.render_batch(prompts, seed=4)
    assert float(reward(torch.rand(64, 3, 32, 32), prompts).mean()) < 0.25
    assert float(reward(torch.zeros(64, 3, 32, 32), prompts).max()) == 0.0
    assert float(reward(torch.ones(64, 3, 32, 32), prompts).mean()) < 0.3
    shuffled = prompts[1:] + prompts[:1]
    assert float(reward(images, shuffled).mean()) < 0.4


def test_each_criterion_catches_its_error(reward):
    rng = random.Random(0)
    image = task.render_batch(["two red circles left of a blue square"], rng=rng)
    cases = {
        "two red circles left of a blue square": dict(color=1, count=1, shape=1, position=1, clean=1),
        "two red circles right of a blue square": dict(color=1, count=1, shape=1, position=0, clean=1),
        "three red circles left of a blue square": dict(color=1, count=(1 + 2 / 3) / 2, shape=1, position=1, clean=1),
        "two red squares left of a blue circle": dict(color=1, count=1, shape=0, position=1, clean=1),
        # Two red circles nobody asked for: 1 of the 3 detected objects is an asked one.
        "two green circles left of a blue square": dict(color=0.5, count=0.5, shape=0.5, position=0, clean=1 / 3),
    }
    prompts = list(cases)
    criteria = reward.criteria(image.expand(len(prompts), -1, -1, -1), prompts)
    assert set(criteria) == set(CRITERIA) | {"score"}
    for i, prompt in enumerate(prompts):
        for name, expected in cases[prompt].items():
            assert float(criteria[name][i]) == pytest.approx(expected, abs=1e-6), (prompt, name)
        assert float(criteria["score"][i]) == pytest.approx(sum(cases[prompt].values()) / 5, abs=1e-6)
    single = reward.criteria(task.render_batch(["a yellow triangle"], seed=1), ["a yellow triangle"])
    assert torch.isnan(single["position"]).all() and float(single["score"]) == 1.0
    # Extra objects of colors the prompt does not ask for cost "clean" (the spray-every-color hack).
    both = task.render_batch(["a yellow triangle"], seed=1).clone()
    both[:, :, 20:28, 2:10] = torch.tensor(task.COLORS["green"]).view(1, 3, 1, 1)  # an unasked green square
    extra = reward.criteria(both, ["a yellow triangle"])
    assert float(extra["color"]) == 1.0 and float(extra["clean"]) == pytest.approx(0.5)
    means = summarize(criteria)
    assert set(means) == set(criteria) and all(0 <= v <= 1 for v in means.values())


def test_connected_components_labels():
    colors = torch.full((1, 6, 6), -1)
    colors[0, 0, 0:3] = 0        # one component of color 0
    colors[0, 2, 0:2] = 0        # another (not 4-connected to the first)
    colors[0, 3:6, 3:6] = 1      # a block of color 1
    colors[0, 3, 2] = 0          # touches the block, different color: separate
    labels = connected_components(colors)
    assert len(torch.unique(labels[labels > 0])) == 4
    assert (labels[0, 3:6, 3:6] == labels[0, 3, 3]).all()
    snake = torch.zeros(1, 32, 32, dtype=torch.long)  # long paths converge too
    snake[0, 1::4, :] = -1
    snake[0, 3::4, :] = -1
    snake[0, 1::4, -1] = 0
    snake[0, 3::4, 0] = 0
    snake_labels = connected_components(snake)
    assert len(torch.unique(snake_labels[snake >= 0])) == 1


def test_registry_binary_and_speed():
    reward = build_reward("tiny_geneval")
    binary = build_reward("tiny_geneval_binary", threshold=0.99)
    also_binary = build_reward("binary", reward="tiny_geneval", threshold=0.5)
    prompts = task.sample_prompts("heldout", 64, seed=1)
    images = task.render_batch(prompts, seed=2)
    images[::2] = torch.rand_like(images[::2])
    values = binary(images, prompts)
    assert set(values.tolist()) <= {0.0, 1.0} and values[1::2].mean() > 0.9 and values[::2].mean() < 0.1
    assert set(also_binary(images, prompts).tolist()) <= {0.0, 1.0}
    reward(images, prompts)
    start = time.perf_counter()
    reward(images, prompts)
    assert time.perf_counter() - start < 1.0


def test_bad_prompt_names_it():
    with pytest.raises(task.PromptParseError, match="hexagon"):
        TinyGenEvalReward()(torch.zeros(1, 3, 32, 32), ["a red hexagon"])


def test_parsed_prompt_cache_is_bounded():
    """Behind the reward server every client's prompts reach this cache: it must not grow without
    bound, and a prompt used again stays cached."""
    from dancegrpo_fast.tiny.reward import TinyGenEvalReward

    reward = TinyGenEvalReward()
    reward.SCENE_CACHE_SIZE = 3
    prompts = ["a red circle", "a blue square", "a green triangle", "two red circles", "a blue circle"]
    for prompt in prompts[:3]:
        reward._scene(prompt)
    reward._scene(prompts[0])  # used again: now the most recent
    for prompt in prompts[3:]:
        reward._scene(prompt)
    assert list(reward._scenes) == [prompts[0], prompts[3], prompts[4]]
