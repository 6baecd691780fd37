"""The DDPO baseline (advantage ddpo): its per-prompt statistics tracker against a hand-written
reference of DDPO's rule (buffer overflow, the min_count fallback to the batch's statistics), a
reference check that fails on a wrong sign or scale, several rewards and ranks, the configuration
(DDPO's defaults for the settings not given), and an exact resume of a ddpo run."""
from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers.fixtures import _single_thread, flux_folder  # noqa: E402,F401  (fixtures)
from helpers.tiny_models import flux_train_config  # noqa: E402

from dancegrpo_fast.config import DDPO_DEFAULTS, TrainConfig, apply_preset, parse_config  # noqa: E402
from dancegrpo_fast.ddpo import DDPOAdvantages, PerPromptStatTracker  # noqa: E402
from dancegrpo_fast.train import Trainer  # noqa: E402


# ----------------------------------------------------------------------------------------------
# The reference: DDPO's rule written out with plain Python lists and the statistics module
# ----------------------------------------------------------------------------------------------


def reference_ddpo(batches, buffer_size, min_count, eps=1e-6):
    """batches: [(prompts, rewards)] in iteration order. Each prompt's buffer keeps its newest
    buffer_size rewards (this batch's included); with fewer than min_count the batch's mean and
    population std are used instead."""
    buffers, out = {}, []
    for prompts, rewards in batches:
        batch_mean, batch_std = statistics.fmean(rewards), statistics.pstdev(rewards)
        advantages = [None] * len(rewards)
        for prompt in dict.fromkeys(prompts):
            index = [i for i, p in enumerate(prompts) if p == prompt]
            buffers[prompt] = (buffers.get(prompt, []) + [rewards[i] for i in index])[-buffer_size:]
            if len(buffers[prompt]) < min_count:
                mean, std = batch_mean, batch_std
            else:
                mean, std = statistics.fmean(buffers[prompt]), statistics.pstdev(buffers[prompt])
            for i in index:
                advantages[i] = (rewards[i] - mean) / (std + eps)
        out.append(advantages)
    return out


def random_batches(seed, iterations=6, prompts=("a", "b", "c"), per_batch=(("a", 3), ("b", 2), ("c", 4))):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for it in range(iterations):
        # Not every prompt in every batch, samples of one prompt not all contiguous.
        chosen = [(p, n) for k, (p, n) in enumerate(per_batch) if (it + k) % 3 != 2]
        keys = [p for p, n in chosen for _ in range(n)]
        keys = keys[1::2] + keys[0::2]
        rewards = (torch.rand(len(keys), generator=generator, dtype=torch.float64) * 3 - 1).tolist()
        batches.append((keys, rewards))
    return batches


def matches_reference(update, batches, buffer_size, min_count) -> bool:
    """Whether `update(tracker, prompts, rewards) -> advantages` gives the reference's values."""
    tracker = PerPromptStatTracker(buffer_size, min_count)
    expected = reference_ddpo(batches, buffer_size, min_count)
    for (keys, rewards), want in zip(batches, expected):
        got = update(tracker, keys, torch.tensor(rewards, dtype=torch.float64))
        if not torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=1e-12, rtol=1e-12):
            return False
    return True


def tracker_update(tracker, keys, rewards):
    return tracker.update(keys, rewards)[0]


@pytest.mark.parametrize("buffer_size,min_count", [(4, 4), (5, 3), (16, 16), (3, 1)])
def test_tracker_matches_the_reference(buffer_size, min_count):
    # buffer 4 with 3-4 samples of a prompt a batch: the buffers overflow from the second batch.
    for seed in range(3):
        assert matches_reference(tracker_update, random_batches(seed), buffer_size, min_count)


def test_tracker_by_hand():
    """Numbers worked out by hand: buffer 3, min_count 3."""
    tracker = PerPromptStatTracker(buffer_size=3, min_count=3)
    # Batch 1: a has 2 rewards (< 3): the batch's statistics, mean 2, pstd sqrt(2/3) over 1, 2, 3.
    adv, own = tracker.update(["a", "a", "b"], torch.tensor([1.0, 3.0, 2.0]))
    std = math.sqrt(2 / 3) + 1e-6
    assert torch.allclose(adv, torch.tensor([-1 / std, 1 / std, 0.0], dtype=torch.float64))
    assert own.tolist() == [False, False, False]
    # Batch 2: a's buffer [1, 3, 5] (3 >= min_count): mean 3, pstd sqrt(8/3); b's [2, 4] falls back
    # to the batch [5, 4]: mean 4.5, pstd 0.5.
    adv, own = tracker.update(["a", "b"], torch.tensor([5.0, 4.0]))
    assert torch.allclose(adv, torch.tensor([2 / (math.sqrt(8 / 3) + 1e-6), -0.5 / (0.5 + 1e-6)], dtype=torch.float64))
    assert own.tolist() == [True, False]
    # Batch 3: a's buffer overflows: [3, 5, 11] (the 1 drops out), mean 19/3.
    adv, _ = tracker.update(["a"], torch.tensor([11.0]))
    values = [3.0, 5.0, 11.0]
    assert tracker.buffers["a"] == values
    want = (11 - statistics.fmean(values)) / (statistics.pstdev(values) + 1e-6)
    assert adv.item() == pytest.approx(want, rel=1e-12)


def test_the_reference_check_fails_on_a_wrong_sign_scale_or_rule():
    batches = random_batches(0)
    wrong = {
        "sign": lambda t, k, r: -t.update(k, r)[0],
        "scale": lambda t, k, r: 2 * t.update(k, r)[0],
        "no fallback (own buffer even below min_count)": lambda t, k, r: _own_stats_always(t, k, r),
        "unbiased std": lambda t, k, r: _unbiased(t, k, r),
    }
    for name, update in wrong.items():
        assert not matches_reference(update, batches, 4, 4), name


def _own_stats_always(tracker, keys, rewards):
    tracker.min_count = 1
    return tracker.update(keys, rewards)[0]


def _unbiased(tracker, keys, rewards):
    adv = torch.zeros_like(rewards)
    for key in dict.fromkeys(keys):
        index = torch.tensor([i for i, k in enumerate(keys) if k == key])
        tracker.buffers[key] = (tracker.buffers.get(key, []) + rewards[index].tolist())[-tracker.buffer_size:]
        pool = torch.tensor(tracker.buffers[key]) if len(tracker.buffers[key]) >= tracker.min_count else rewards
        adv[index] = (rewards[index] - pool.mean()) / (pool.std(unbiased=True) + 1e-6)
    return adv


def test_tracker_state_round_trip_continues_exactly():
    batches = random_batches(4, iterations=6)
    straight = PerPromptStatTracker(4, 3)
    for keys, rewards in batches[:3]:
        straight.update(keys, torch.tensor(rewards))
    restored = PerPromptStatTracker(4, 3)
    restored.load_state_dict(straight.state_dict())
    assert restored.state_dict() == straight.state_dict()
    for keys, rewards in batches[3:]:
        a, b = straight.update(keys, torch.tensor(rewards)), restored.update(keys, torch.tensor(rewards))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_bad_tracker_settings():
    with pytest.raises(ValueError, match="ddpo_buffer_size"):
        PerPromptStatTracker(0, 1)
    with pytest.raises(ValueError, match="ddpo_min_count"):
        PerPromptStatTracker(4, 5)
    with pytest.raises(ValueError, match="one prompt per reward"):
        PerPromptStatTracker(4, 4).update(["a"], torch.tensor([1.0, 2.0]))


# ----------------------------------------------------------------------------------------------
# An iteration's advantages: several rewards, NaN groups, ranks
# ----------------------------------------------------------------------------------------------


def test_iteration_advantages_several_rewards_and_nan_groups():
    ddpo = DDPOAdvantages(buffer_size=4, min_count=2)
    keys = ["p", "p", "q", "q", "r", "r"]
    scores = {"x": torch.tensor([1.0, 2.0, 0.5, 1.5, float("nan"), 3.0]),
              "y": torch.tensor([0.0, 1.0, 2.0, 4.0, 1.0, 1.0])}
    adv, valid, own = ddpo.advantages(scores, {"x": 1.0, "y": -0.5}, 2, keys)
    assert valid.tolist() == [True, True, True, True, False, False]
    # The NaN group is out of the statistics: the reference sees only p and q's samples.
    ref_x = reference_ddpo([(keys[:4], scores["x"][:4].tolist())], 4, 2)[0]
    ref_y = reference_ddpo([(keys[:4], scores["y"][:4].tolist())], 4, 2)[0]
    want = [1.0 * a - 0.5 * b for a, b in zip(ref_x, ref_y)] + [0.0, 0.0]
    assert torch.allclose(adv, torch.tensor(want, dtype=torch.float32), atol=1e-6)
    assert own == 1.0  # 2 samples per prompt reach min_count 2
    assert "r" not in ddpo.trackers["x"].buffers


def test_ranks_see_the_same_statistics():
    """Two ranks: each gets the advantages of its own slice of the gathered batch, and both
    trackers hold the same buffers as one process with the whole batch."""
    keys = ["a", "a", "b", "b", "a", "a", "c", "c"]
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 0.0, 4.0, 2.0, 2.5])
    whole = DDPOAdvantages(8, 3)
    want, _, _ = whole.advantages({"r": rewards}, {"r": 1.0}, 2, keys)
    ranks = [DDPOAdvantages(8, 3) for _ in range(2)]
    gather = lambda t: rewards if t.dtype.is_floating_point else torch.ones(8, dtype=torch.uint8)  # noqa: E731
    for rank, ddpo in enumerate(ranks):
        got, _, _ = ddpo.advantages({"r": rewards[rank * 4:(rank + 1) * 4]}, {"r": 1.0}, 2, keys, gather=gather,
                                    rank=rank)
        assert torch.equal(got, want[rank * 4:(rank + 1) * 4])
        assert ddpo.state_dict() == whole.state_dict()


# ----------------------------------------------------------------------------------------------
# Configuration: one setting, DDPO's defaults for what the user does not give
# ----------------------------------------------------------------------------------------------


def test_advantage_ddpo_applies_ddpo_defaults_below_the_users_settings(tmp_path):
    config = parse_config(["--preset", "tiny", "--advantage", "ddpo"])
    assert config.grpo.advantage == "ddpo"
    assert config.sampler.shared_noise is False and config.grpo.timestep_fraction == 1.0  # over the preset's noise
    assert config.grpo.clip_range == 1e-4 and config.grpo.adv_clip_max == 5.0
    assert config.optim.lr == apply_preset("tiny").optim.lr  # not DDPO's (see config.DDPO_DEFAULTS)
    assert (config.grpo.ddpo_buffer_size, config.grpo.ddpo_min_count) == (16, 16)
    given = parse_config(["--preset", "tiny", "--advantage", "ddpo", "--timestep_fraction", "0.5",
                          "--shared_noise", "true"])
    assert given.grpo.timestep_fraction == 0.5 and given.sampler.shared_noise is True
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("grpo: {advantage: ddpo, adv_clip_max: 2.0}\n")
    from_yaml = parse_config(["--preset", "tiny", "--config", str(yaml_file)])
    assert from_yaml.grpo.adv_clip_max == 2.0 and from_yaml.sampler.shared_noise is False
    group = parse_config(["--preset", "tiny"])
    # The preset's own (shared noise; timestep_fraction 1.0 happens to equal DDPO's, so
    # shared_noise is the setting that shows DDPO's value replacing the preset's).
    assert group.sampler.shared_noise is True and group.grpo.timestep_fraction == 1.0
    assert set(DDPO_DEFAULTS) == {"sampler.shared_noise", "grpo.timestep_fraction", "grpo.clip_range",
                                  "grpo.adv_clip_max"}


def test_bad_ddpo_settings():
    for values, match in (({"advantage": "dpo"}, "advantage must be one of"),
                          ({"ddpo_buffer_size": 0}, "ddpo_buffer_size must be"),
                          ({"ddpo_buffer_size": 4, "ddpo_min_count": 8}, "ddpo_min_count must be")):
        with pytest.raises(ValueError, match=match):
            TrainConfig.from_dict(values, apply_preset("tiny")).validate()


# ----------------------------------------------------------------------------------------------
# The trainer: the tracker's state is checkpointed, a resume continues exactly
# ----------------------------------------------------------------------------------------------


def brightness(images, prompts):
    return images.float().mean(dim=tuple(range(1, images.dim())))


def test_ddpo_run_resumes_exactly(flux_folder, tmp_path):
    # 2 prompts, both in every iteration, 2 samples each: min_count 4 is reached in iteration 2,
    # from the buffer that iteration 1 filled (restored from the checkpoint after a resume).
    settings = dict(prompts=("a red cat", "a blue dog"), advantage="ddpo", ddpo_buffer_size=4, ddpo_min_count=4,
                    shared_noise=False)
    rewards = {"brightness": (brightness, 1.0)}
    straight = Trainer(flux_train_config(flux_folder, tmp_path / "a", num_iterations=2, **settings), rewards=rewards)
    rows = straight.train()
    assert [r["ddpo/per_prompt_fraction"] for r in rows] == [0.0, 1.0]
    first = Trainer(flux_train_config(flux_folder, tmp_path / "b", num_iterations=1, **settings), rewards=rewards)
    first.train()
    resumed = Trainer(flux_train_config(flux_folder, tmp_path / "b", num_iterations=2, resume="latest", **settings),
                      rewards=rewards)
    assert resumed.ddpo.state_dict() == first.ddpo.state_dict() != {}
    resumed_rows = resumed.train()
    assert resumed_rows[-1]["ddpo/per_prompt_fraction"] == 1.0
    assert resumed.ddpo.state_dict() == straight.ddpo.state_dict()
    a = {n: p for n, p in straight.policy.model.named_parameters() if p.requires_grad}
    b = {n: p for n, p in resumed.policy.model.named_parameters() if p.requires_grad}
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
