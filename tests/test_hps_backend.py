"""HPS-v2.1's model: open_clip's own CLIP where open_clip imports, the built-in ViT elsewhere.

- the choice (auto / open_clip / builtin) for open_clip importing or not, and the errors;
- auto where open_clip does not import here: the built-in model, logged with the reason and
  named in the reward's description;
- the open_clip path's wiring (the architecture handed to open_clip.model.CLIP, the checkpoint
  loaded into it, scores equal to the built-in model's) with a stand-in open_clip module that
  builds the same architecture, so it runs on every machine;
- where open_clip really imports: both paths give the same scores (skipped elsewhere).
(The built-in model's agreement with transformers' CLIP and with open_clip's features is in
test_rewards_models.py.)
"""
from __future__ import annotations

import logging
import sys
import types

import pytest
import torch

from dancegrpo_fast.rewards import HPSv2Reward, OpenCLIPConfig, OpenCLIPModel, RewardSet
from dancegrpo_fast.rewards.hps import open_clip_import_error, select_hps_backend
from dancegrpo_fast.rewards.rule_based import FrameMeanReward
from dancegrpo_fast.rewards.testing import write_tiny_clip_tokenizer, write_tiny_hps_checkpoint

PROMPTS = ["the cat", "a red dog on the grass", "an oil painting of the sea"]
OPEN_CLIP_ERROR = open_clip_import_error()


@pytest.fixture(scope="module")
def hps_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hps")
    vocab_size, _, _ = write_tiny_clip_tokenizer(str(root / "tokenizer"))
    config = write_tiny_hps_checkpoint(str(root / "HPS_v2.1_compressed.pt"), vocab_size, seed=3)
    return {"checkpoint_path": str(root / "HPS_v2.1_compressed.pt"), "tokenizer_path": str(root / "tokenizer"),
            "model_config": config}


def _images(seed=0):
    return torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(seed))


def test_backend_choice():
    assert select_hps_backend("auto", None) == "open_clip"
    assert select_hps_backend("auto", "ImportError: no torchvision") == "builtin"
    assert select_hps_backend("builtin", None) == "builtin"
    assert select_hps_backend("open_clip", None) == "open_clip"
    with pytest.raises(ValueError, match="hps backend 'open_clip' asked for.*no torchvision"):
        select_hps_backend("open_clip", "ImportError: no torchvision")
    with pytest.raises(ValueError, match="hps backend must be one of"):
        select_hps_backend("openclip", None)


@pytest.mark.skipif(OPEN_CLIP_ERROR is None, reason="open_clip imports here")
def test_auto_runs_the_builtin_model_where_open_clip_does_not_import(hps_files, caplog):
    with caplog.at_level(logging.INFO, logger="dancegrpo_fast.rewards.hps"):
        reward = HPSv2Reward(**hps_files)
    assert reward.backend == "builtin" and isinstance(reward.model, OpenCLIPModel)
    assert reward.describe()["backend"] == "builtin"
    # The run's start block, also through a wrapper such as frame_mean.
    assert RewardSet.of({"hps": (reward, 1.0), "video": (FrameMeanReward(reward), 0.5)}).describe() == [
        "hps:1 (builtin)", "video:0.5 (builtin)"]
    assert "runs on the built-in ViT model (open_clip does not import" in caplog.text
    with pytest.raises(ValueError, match="hps backend 'open_clip' asked for"):
        HPSv2Reward(**hps_files, backend="open_clip")


class _StandInCLIP(OpenCLIPModel):
    """What open_clip.model.CLIP(embed_dim, vision_cfg, text_cfg, quick_gelu) builds, for a machine
    without open_clip: the same architecture and keys."""

    built = []

    def __init__(self, embed_dim, vision_cfg, text_cfg, quick_gelu=False):
        self.built.append({"embed_dim": embed_dim, "vision_cfg": vision_cfg, "text_cfg": text_cfg,
                           "quick_gelu": quick_gelu})
        super().__init__(OpenCLIPConfig.from_open_clip_dict(self.built[-1]))


def test_open_clip_path_loads_the_checkpoint_into_open_clips_clip(hps_files, monkeypatch, caplog):
    builtin = HPSv2Reward(**hps_files, backend="builtin")
    stand_in = types.ModuleType("open_clip")
    stand_in.model = types.SimpleNamespace(CLIP=_StandInCLIP)
    monkeypatch.setitem(sys.modules, "open_clip", stand_in)
    _StandInCLIP.built.clear()
    with caplog.at_level(logging.INFO, logger="dancegrpo_fast.rewards.hps"):
        reward = HPSv2Reward(**hps_files)  # auto: open_clip imports
    assert reward.backend == "open_clip" and type(reward.model) is _StandInCLIP
    assert "runs on the open_clip model" in caplog.text
    (built,) = _StandInCLIP.built
    config = hps_files["model_config"]
    assert built["embed_dim"] == config["embed_dim"]
    assert {k: built["vision_cfg"][k] for k in config["vision_cfg"]} == config["vision_cfg"]
    assert {k: built["text_cfg"][k] for k in config["text_cfg"]} == config["text_cfg"]
    assert not reward.model.training and not any(p.requires_grad for p in reward.model.parameters())
    images = _images()
    scores = reward(images, PROMPTS)
    assert scores.std() > 0
    torch.testing.assert_close(scores, builtin(images, PROMPTS), atol=1e-6, rtol=0)


def test_open_clip_path_reports_a_checkpoint_of_another_architecture(hps_files, monkeypatch):
    stand_in = types.ModuleType("open_clip")
    stand_in.model = types.SimpleNamespace(CLIP=_StandInCLIP)
    monkeypatch.setitem(sys.modules, "open_clip", stand_in)
    with pytest.raises(ValueError, match="does not match the open_clip architecture"):
        HPSv2Reward(hps_files["checkpoint_path"], tokenizer_path=hps_files["tokenizer_path"], backend="open_clip")


@pytest.mark.skipif(OPEN_CLIP_ERROR is not None, reason=f"open_clip does not import here: {OPEN_CLIP_ERROR}")
def test_real_open_clip_and_builtin_give_the_same_scores(hps_files):
    images = _images(1)
    ours = HPSv2Reward(**hps_files, backend="builtin")
    theirs = HPSv2Reward(**hps_files)
    assert theirs.backend == "open_clip"
    import open_clip

    assert isinstance(theirs.model, open_clip.model.CLIP)
    torch.testing.assert_close(theirs(images, PROMPTS), ours(images, PROMPTS), atol=1e-5, rtol=0)
