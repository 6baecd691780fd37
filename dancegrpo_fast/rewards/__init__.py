"""Rewards (layer 5): batched callables `reward(images, prompts) -> scores (B,) float32 CPU`.

See docs/rewards.md. Importing this package registers the built-in rewards:
clip, pickscore, hps, aesthetic, jpeg_compressibility, jpeg_incompressibility, binary,
frame_mean, remote, videoalign. Model rewards import transformers only when built. A task's own rewards
(the tiny task's tiny_geneval, yours) register when the module that defines them is imported:
the config names it in `reward_modules`.
"""

from .base import (
    Reward,
    RewardInputError,
    available_rewards,
    build_reward,
    import_reward_modules,
    register_reward,
    reward_factory,
    validate_inputs,
    validate_layout,
)
from .clip_models import AestheticHead, AestheticReward, CLIPScoreReward, ImageTextSimilarityReward, PickScoreReward
from .hps import HPSv2Reward, OpenCLIPConfig, OpenCLIPModel
from .pool import AsyncRewardPool
from .preprocess import ImagePreprocess
from .remote import RemoteReward, RemoteRewardError
from .reward_set import RewardEntry, RewardError, RewardSet
from .rule_based import (
    BinaryReward,
    FrameMeanReward,
    JpegCompressibilityReward,
    JpegIncompressibilityReward,
    jpeg_size_kb,
)
from .videoalign import VideoAlignReward

__all__ = [
    "Reward", "RewardInputError", "available_rewards", "build_reward", "import_reward_modules", "register_reward",
    "reward_factory", "validate_inputs", "validate_layout", "RewardSet", "RewardEntry", "RewardError",
    "ImageTextSimilarityReward", "CLIPScoreReward", "PickScoreReward",
    "AestheticReward", "AestheticHead", "HPSv2Reward", "OpenCLIPConfig", "OpenCLIPModel", "AsyncRewardPool",
    "ImagePreprocess", "RemoteReward", "RemoteRewardError", "BinaryReward", "FrameMeanReward",
    "JpegCompressibilityReward", "JpegIncompressibilityReward", "jpeg_size_kb", "VideoAlignReward",
]
