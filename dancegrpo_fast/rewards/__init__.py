"""Rewards (layer 5): batched callables `reward(images, prompts) -> scores (B,) float32 CPU`.

See docs/rewards.md. Importing this package registers the built-in rewards:
clip, pickscore, hps, aesthetic, jpeg_compressibility, jpeg_incompressibility, binary,
frame_mean, remote. Model rewards import transformers only when built.
"""

from .base import (
    Reward,
    RewardInputError,
    WeightedRewards,
    available_rewards,
    build_reward,
    combine_advantages,
    register_reward,
    validate_inputs,
    validate_layout,
)
from .clip_models import AestheticHead, AestheticReward, CLIPScoreReward, ImageTextSimilarityReward, PickScoreReward
from .hps import HPSv2Reward, OpenCLIPConfig, OpenCLIPModel
from .pool import AsyncRewardPool
from .preprocess import ImagePreprocess
from .remote import RemoteReward, RemoteRewardError
from .rule_based import (
    BinaryReward,
    FrameMeanReward,
    JpegCompressibilityReward,
    JpegIncompressibilityReward,
    jpeg_size_kb,
)

__all__ = [
    "Reward", "RewardInputError", "WeightedRewards", "available_rewards", "build_reward", "combine_advantages",
    "register_reward", "validate_inputs", "validate_layout", "ImageTextSimilarityReward", "CLIPScoreReward",
    "PickScoreReward",
    "AestheticReward", "AestheticHead", "HPSv2Reward", "OpenCLIPConfig", "OpenCLIPModel", "AsyncRewardPool",
    "ImagePreprocess", "RemoteReward", "RemoteRewardError", "BinaryReward", "FrameMeanReward",
    "JpegCompressibilityReward", "JpegIncompressibilityReward", "jpeg_size_kb",
]

# The built-in tiny task's reward registers itself (tiny_geneval, tiny_geneval_binary); imported
# last because it builds on this package.
from ..tiny import reward as _tiny_reward  # noqa: E402,F401
