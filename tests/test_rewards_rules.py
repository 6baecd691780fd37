"""Rule-based rewards, wrappers, the registry, input validation, RewardSet and the pool."""

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
    RewardError,
    RewardInputError,
    RewardSet,
    available_rewards,
    build_reward,
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
# RewardSet


def test_reward_set_builds_scores_and_weights():
    images = _smooth_and_noise()
    rewards = RewardSet.from_specs([
        {"name": "jpeg_incompressibility", "weight": 0.7},
        {"name": "sharp", "type": "binary", "weight": 0.0,
         "kwargs": {"reward": "jpeg_incompressibility", "threshold": 3.0}},
    ])
    scores = rewards(images, ["a", "bb"])
    assert list(scores) == ["jpeg_incompressibility", "sharp"]
    assert all(s.shape == (2,) and s.dtype == torch.float32 for s in scores.values())
    assert rewards.weights == {"jpeg_incompressibility": 0.7, "sharp": 0.0}
    size = JpegIncompressibilityReward()(images, ["a", "bb"])
    torch.testing.assert_close(scores["jpeg_incompressibility"], size)
    torch.testing.assert_close(scores["sharp"], (size > 3.0).float())
    assert RewardSet.from_specs("jpeg_compressibility:2,jpeg_incompressibility").weights == {
        "jpeg_compressibility": 2.0, "jpeg_incompressibility": 1.0}


def test_reward_set_of_callables_and_criteria():
    class WithCriteria:
        def __call__(self, images, prompts):
            return images.mean(dim=(1, 2, 3))

        def criteria(self, images, prompts):
            return {"score": self(images, prompts), "bright": (images.mean(dim=(1, 2, 3)) > 0.5).float()}

    images = torch.stack([torch.full((3, 4, 4), 0.25), torch.full((3, 4, 4), 0.75)])
    rewards = RewardSet.of({"pixel": (MeanPixelReward(), 2.0), "crit": WithCriteria()})
    assert rewards.weights == {"pixel": 2.0, "crit": 1.0} and rewards.describe() == ["pixel:2", "crit:1"]
    assert set(rewards(images, ["", ""])) == {"pixel", "crit"}
    scores = rewards(images, ["", ""], criteria=True)
    assert set(scores) == {"pixel", "crit", "crit/score", "crit/bright"}
    assert scores["crit/bright"].tolist() == [0.0, 1.0]
    assert RewardSet.of(rewards) is rewards


def test_reward_set_errors_name_the_reward():
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        RewardSet.from_specs("nope:1")
    with pytest.raises(ValueError, match="no reward configured"):
        RewardSet([])
    with pytest.raises(ValueError, match="finite number"):
        RewardSet.of({"pixel": (MeanPixelReward(), float("nan"))})
    with pytest.raises(ValueError, match="reward_modules: could not import 'no_such_module'"):
        RewardSet.from_specs("mean_pixel:1", modules=["no_such_module"])

    def broken(images, prompts):
        raise RuntimeError("model exploded")

    with pytest.raises(RewardError, match="reward 'bad' failed on a batch of 2 samples: RuntimeError: model exploded"):
        RewardSet.of({"bad": broken})(torch.rand(2, 3, 4, 4), ["a", "b"])
    with pytest.raises(RewardError, match="reward 'short' returned 1 scores for 2 samples"):
        RewardSet.of({"short": lambda images, prompts: torch.zeros(1)})(torch.rand(2, 3, 4, 4), ["a", "b"])
    built = RewardSet.from_specs([{"name": "jpeg_compressibility", "kwargs": {"quality": 50}}])
    assert built.entries[0].function.quality == 50


# ---------------------------------------------------------------------------------------------
# AsyncRewardPool


def test_pool_returns_the_same_scores_and_overlaps():
    """submit returns before the reward has finished, and the reward runs while the caller goes
    on: shown with events (no wall-clock bound), the reward waiting for the caller's "next
    rollout" to have started."""
    caller_working = threading.Event()
    scored_in = []

    def reward(images, prompts):
        assert caller_working.wait(5), "the reward ran only after the caller waited for it"
        scored_in.append(threading.current_thread().name)
        return MeanPixelReward()(images, prompts)

    images = torch.rand(3, 3, 8, 8)
    with AsyncRewardPool(reward) as pool:
        future = pool.submit(images, ["a", "b", "c"])
        assert not future.done()  # submit did not wait for the scores
        caller_working.set()      # the "rollout" of the next chunk runs meanwhile
        scores = future.result(timeout=5)
    assert scored_in and scored_in[0] != threading.current_thread().name
    torch.testing.assert_close(scores, MeanPixelReward()(images, ["a", "b", "c"]))


def test_pool_propagates_errors_and_runs_a_reward_set():
    with AsyncRewardPool(RewardSet.of({"pixel": MeanPixelReward()}), num_workers=2) as pool:
        ok = pool.submit(torch.rand(2, 3, 4, 4), ["a", "b"])
        bad = pool.submit(torch.rand(2, 3, 4, 4), ["a"])
        assert set(ok.result(timeout=5)) == {"pixel"}
        with pytest.raises(RewardError, match="len\\(prompts\\)"):
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
