"""Rule-based rewards, wrappers, the registry, input validation, WeightedRewards and the pool."""

import threading
import time

import pytest
import torch

from dancegrpo_fast.rewards import (
    AsyncRewardPool,
    BinaryReward,
    FrameMeanReward,
    JpegCompressibilityReward,
    JpegIncompressibilityReward,
    Reward,
    RewardInputError,
    WeightedRewards,
    available_rewards,
    build_reward,
    combine_advantages,
    jpeg_size_kb,
    register_reward,
)
from dancegrpo_fast.rewards.rule_based import evenly_spaced_frames


def _smooth_and_noise(size=64):
    ramp = torch.linspace(0, 1, size)
    smooth = torch.stack([ramp.view(1, -1).expand(size, size), ramp.view(-1, 1).expand(size, size),
                          torch.full((size, size), 0.5)])
    noise = torch.rand(3, size, size, generator=torch.Generator().manual_seed(0))
    return torch.stack([smooth, noise])


class MeanPixelReward(Reward):
    """Deterministic test reward: mean pixel value plus the prompt length / 100."""

    name = "mean_pixel"

    def __init__(self, batch_size=None, delay_s=0.0):
        super().__init__(device="cpu", batch_size=batch_size)
        self.delay_s = delay_s
        self.calls = []

    def _score(self, images, prompts):
        self.calls.append(images.shape[0])
        if self.delay_s:
            time.sleep(self.delay_s)
        return images.mean(dim=(1, 2, 3)) + torch.tensor([len(p) / 100 for p in prompts])


# ---------------------------------------------------------------------------------------------
# JPEG


def test_jpeg_smooth_image_compresses_better_than_noise():
    images = _smooth_and_noise()
    sizes = jpeg_size_kb(images)
    assert sizes.dtype == torch.float32 and sizes[0] < sizes[1] / 3
    incompressibility = JpegIncompressibilityReward()(images, ["a", "b"])
    compressibility = JpegCompressibilityReward()(images, ["a", "b"])
    torch.testing.assert_close(incompressibility, sizes)
    torch.testing.assert_close(compressibility, -sizes)
    assert compressibility[0] > compressibility[1]
    assert build_reward("jpeg_compressibility").name == "jpeg_compressibility"


def test_jpeg_size_is_bytes_over_1000_at_quality_95():
    import io

    from PIL import Image

    image = _smooth_and_noise()[1:]
    array = (image[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    assert jpeg_size_kb(image).item() == pytest.approx(len(buffer.getvalue()) / 1000)
    assert jpeg_size_kb(image, quality=10).item() < jpeg_size_kb(image).item()


# ---------------------------------------------------------------------------------------------
# Wrappers


def test_binary_reward_thresholds():
    images = torch.stack([torch.full((3, 8, 8), v) for v in (0.1, 0.5, 0.9)])
    inner = MeanPixelReward()
    binary = BinaryReward(inner, threshold=0.5)
    assert binary.name == "binary_mean_pixel"
    scores = binary(images, ["", "", ""])  # inner: 0.1, 0.5, 0.9; strictly greater than 0.5
    assert scores.tolist() == [0.0, 0.0, 1.0] and scores.dtype == torch.float32
    built = build_reward("binary", reward="jpeg_incompressibility", threshold=3.0)  # 1.4 kB vs 5.4 kB
    assert built(_smooth_and_noise(), ["a", "b"]).tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="reward_kwargs only apply"):
        BinaryReward(inner, 0.5, reward_kwargs={"x": 1})


def test_frame_mean_reward_averages_evenly_spaced_frames():
    videos = torch.rand(2, 9, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    inner = MeanPixelReward()
    reward = FrameMeanReward(inner, num_frames=3)
    assert reward.modality == "video" and reward.name == "mean_pixel_frame_mean"
    scores = reward(videos, ["ab", "abcd"])
    indices = [0, 4, 8]
    expected = videos[:, indices].mean(dim=(1, 2, 3, 4)) + torch.tensor([0.02, 0.04])
    torch.testing.assert_close(scores, expected)
    assert inner.calls == [6]  # all frames of the batch in one call
    all_frames = FrameMeanReward(MeanPixelReward(), num_frames=None)(videos, ["", ""])
    torch.testing.assert_close(all_frames, videos.mean(dim=(1, 2, 3, 4)))
    assert evenly_spaced_frames(53, 4).tolist() == [0, 17, 35, 52]
    assert evenly_spaced_frames(5, 8).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(RewardInputError, match=r"videos must have shape \(B, T, 3, H, W\)"):
        reward(videos[:, 0], ["", ""])
    with pytest.raises(RewardInputError, match="wrap the image reward in FrameMeanReward"):
        inner(videos, ["", ""])


# ---------------------------------------------------------------------------------------------
# Registry and validation


def test_registry_unknown_name_lists_available():
    with pytest.raises(KeyError) as info:
        build_reward("no_such_reward")
    message = str(info.value)
    assert "unknown reward 'no_such_reward'" in message
    for name in ("clip", "hps", "pickscore", "aesthetic", "jpeg_compressibility", "remote", "binary"):
        assert name in message and name in available_rewards()


def test_register_custom_reward():
    @register_reward("test_mean_pixel")
    class Registered(MeanPixelReward):
        pass

    assert "test_mean_pixel" in available_rewards()
    assert isinstance(build_reward("test_mean_pixel", batch_size=2), Registered)
    with pytest.raises(ValueError, match="already registered"):
        register_reward("test_mean_pixel")(MeanPixelReward)


@pytest.mark.parametrize("images, prompts, error, match", [
    (torch.rand(2, 8, 8), ["a", "b"], RewardInputError, r"images must have shape \(B, 3, H, W\)"),
    (torch.rand(2, 4, 8, 8), ["a", "b"], RewardInputError, r"images must have shape \(B, 3, H, W\)"),
    (torch.rand(2, 3, 8, 8), ["a"], RewardInputError, r"len\(prompts\) must equal the batch size B"),
    (torch.rand(2, 3, 8, 8), "ab", TypeError, "prompts must be a list of strings"),
    (torch.rand(2, 3, 8, 8), ["a", 3], TypeError, r"prompts\[1\] must be a str"),
    (torch.rand(2, 3, 8, 8) * 2 - 1, ["a", "b"], RewardInputError, r"values in \[0, 1\]"),
    (torch.full((2, 3, 8, 8), float("nan")), ["a", "b"], RewardInputError, "NaN"),
    (torch.randint(0, 255, (2, 3, 8, 8)), ["a", "b"], TypeError, "floating-point"),
    (torch.rand(2, 3, 8, 8).numpy(), ["a", "b"], TypeError, "images must be a torch.Tensor"),
])
def test_validation_errors_name_the_argument(images, prompts, error, match):
    with pytest.raises(error, match=match):
        MeanPixelReward()(images, prompts)


def test_small_overshoot_is_clamped_and_chunks_are_used():
    reward = MeanPixelReward(batch_size=2)
    images = torch.ones(5, 3, 4, 4) + 5e-4
    scores = reward(images, [""] * 5)
    torch.testing.assert_close(scores, torch.ones(5))
    assert reward.calls == [2, 2, 1]
    assert reward(torch.zeros(0, 3, 4, 4), []).shape == (0,)


# ---------------------------------------------------------------------------------------------
# WeightedRewards


def test_weighted_rewards_scores_weights_and_advantages():
    images = _smooth_and_noise()
    rewards = WeightedRewards(
        {"jpeg_incompressibility": 0.7, "pixel": {"weight": 1.4}, "sharp": {"type": "binary", "weight": 0.0,
                                                                             "reward": "jpeg_incompressibility",
                                                                             "threshold": 3.0}},
        rewards={"pixel": MeanPixelReward()},
    )
    scores = rewards(images, ["a", "bb"])
    assert set(scores) == {"jpeg_incompressibility", "pixel", "sharp"}
    assert all(s.shape == (2,) and s.dtype == torch.float32 for s in scores.values())
    assert rewards.weights == {"jpeg_incompressibility": 0.7, "pixel": 1.4, "sharp": 0.0}
    advantages = {name: s - s.mean() for name, s in scores.items()}
    combined = combine_advantages(advantages, rewards.weights)
    expected = 0.7 * advantages["jpeg_incompressibility"] + 1.4 * advantages["pixel"]
    torch.testing.assert_close(combined, expected)


def test_weighted_rewards_config_errors():
    with pytest.raises(ValueError, match="must have a 'weight'"):
        WeightedRewards({"jpeg_compressibility": {"quality": 90}})
    with pytest.raises(ValueError, match="finite number"):
        WeightedRewards({"jpeg_compressibility": float("nan")})
    with pytest.raises(KeyError, match="available rewards"):
        WeightedRewards({"nope": 1.0})
    with pytest.raises(ValueError, match="absent from config"):
        WeightedRewards({"jpeg_compressibility": 1.0}, reward_kwargs={"clip": {}})
    built = WeightedRewards({"jpeg_compressibility": 1.0}, reward_kwargs={"jpeg_compressibility": {"quality": 50}})
    assert built.rewards["jpeg_compressibility"].quality == 50


# ---------------------------------------------------------------------------------------------
# AsyncRewardPool


def test_pool_returns_the_same_scores_and_overlaps():
    reward = MeanPixelReward(delay_s=0.3)
    images = torch.rand(3, 3, 8, 8)
    with AsyncRewardPool(reward) as pool:
        start = time.perf_counter()
        future = pool.submit(images, ["a", "b", "c"])
        submitted = time.perf_counter() - start
        time.sleep(0.3)  # the "rollout" of the next chunk runs meanwhile
        scores = future.result(timeout=5)
        elapsed = time.perf_counter() - start
    assert submitted < 0.1 and elapsed < 0.55  # sequential would take >= 0.6 s
    torch.testing.assert_close(scores, MeanPixelReward()(images, ["a", "b", "c"]))


def test_pool_propagates_errors_and_runs_weighted_rewards():
    with AsyncRewardPool(WeightedRewards({"pixel": 1.0}, rewards={"pixel": MeanPixelReward()}), num_workers=2) as pool:
        ok = pool.submit(torch.rand(2, 3, 4, 4), ["a", "b"])
        bad = pool.submit(torch.rand(2, 3, 4, 4), ["a"])
        assert set(ok.result(timeout=5)) == {"pixel"}
        with pytest.raises(RewardInputError, match="len\\(prompts\\)"):
            bad.result(timeout=5)
    with pytest.raises(RuntimeError, match="closed"):
        pool.submit(torch.rand(1, 3, 4, 4), ["a"])


def test_pool_clone_inputs_protects_against_buffer_reuse():
    gate = threading.Event()

    def slow_reward(images, prompts):
        gate.wait(5)
        return images.mean(dim=(1, 2, 3))

    images = torch.zeros(2, 3, 4, 4)
    with AsyncRewardPool(slow_reward, clone_inputs=True) as pool:
        future = pool.submit(images, ["a", "b"])
        images.fill_(1.0)  # the caller reuses its buffer for the next rollout chunk
        gate.set()
        assert future.result(timeout=5).tolist() == [0.0, 0.0]
