"""Registered test rewards that cannot score some samples, deterministic in the prompt, so the
same reward behaves the same in-process, through the registry and behind a reward server
process (which imports this module before `dancegrpo_fast.rewards.serve.main`).

    test_unusable_for_marked_prompts: the mean pixel value, NaN where the prompt contains
        "broken" and +inf where it contains "infinite".
    test_always_raises: raises RuntimeError("reward model crashed") on every call (a reward
        failure, not an input error).
"""
from __future__ import annotations

from dancegrpo_fast.rewards import Reward, register_reward


@register_reward("test_unusable_for_marked_prompts")
class UnusableForMarkedPrompts(Reward):
    name = "test_unusable_for_marked_prompts"

    def _score(self, images, prompts):
        scores = images.float().mean(dim=(1, 2, 3))
        for index, prompt in enumerate(prompts):
            if "broken" in prompt:
                scores[index] = float("nan")
            elif "infinite" in prompt:
                scores[index] = float("inf")
        return scores


@register_reward("test_always_raises")
class AlwaysRaises(Reward):
    name = "test_always_raises"

    def _score(self, images, prompts):
        raise RuntimeError("reward model crashed")
