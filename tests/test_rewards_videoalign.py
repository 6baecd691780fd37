"""The videoalign reward (VideoAlign's VideoReward: VQ, MQ, TA) on a tiny random Qwen2-VL saved in
the published KwaiVGI/VideoReward layout: loading, read-out against a peft reference computed by
hand, preprocessing against transformers' Qwen2-VL video processor, layout mismatches, RewardSet
weighting of criteria, and the reward server."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from dancegrpo_fast.rewards import RemoteReward, RewardInputError, RewardSet, available_rewards, build_reward
from dancegrpo_fast.rewards.serve import RewardServer
from dancegrpo_fast.rewards.testing import VIDEOALIGN_LLM_LINEARS, write_tiny_videoalign
from dancegrpo_fast.rewards.videoalign import (REWARD_TOKENS, build_prompt, patchify, read_layout,
                                               sample_frame_indices, smart_resize)

pytest.importorskip("transformers")

# Small frames keep the vision tower tiny (the published minimum area is 128*28*28 pixels).
FAST = {"video_fps": 8.0, "min_pixels": 3136}
PROMPTS = ["a red cat on the street", "a blue dog"]
STATS = {"VQ_mean": 0.5, "VQ_std": 2.0, "MQ_mean": -1.0, "MQ_std": 0.5, "TA_mean": 0.25, "TA_std": 4.0}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("videoalign")
    one = write_tiny_videoalign(str(base / "VideoReward"), str(base / "Qwen2-VL-2B-Instruct"), seed=0, output_dim=1,
                                inference_config=STATS)
    three = write_tiny_videoalign(str(base / "VideoReward3"), str(base / "Qwen2-VL-base3"), seed=1, output_dim=3,
                                  step=7, inference_config=STATS)
    return {"one": one, "three": three}


@pytest.fixture(scope="module")
def reward(folders):
    return build_reward("videoalign", checkpoint_path=folders["one"]["root"], base_model_path=folders["one"]["base"],
                        **FAST)


def videos(batch=2, frames=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, frames, 3, 32, 48, generator=generator)


def test_loads_the_published_layout_and_returns_the_three_criteria(reward, folders):
    assert "videoalign" in available_rewards() and reward.modality == "video"
    assert reward.layout.checkpoint_dir.endswith("checkpoint-12")
    batch = videos()
    parts = reward.criteria(batch, PROMPTS)
    assert list(parts) == ["VQ", "MQ", "TA", "Overall"]
    for value in parts.values():
        assert value.shape == (2,) and value.dtype == torch.float32 and bool(torch.isfinite(value).all())
    assert torch.allclose(parts["Overall"], parts["VQ"] + parts["MQ"] + parts["TA"], atol=1e-6)
    assert torch.equal(reward(batch, PROMPTS), parts["Overall"])
    # the two prompts see different token sequences and videos: different scores
    assert not torch.equal(parts["TA"][0], parts["TA"][1])
    mq = build_reward("videoalign", checkpoint_path=folders["one"]["root"], base_model_path=folders["one"]["base"],
                      criterion="MQ", **FAST)
    assert mq._shared is reward._shared  # one model in memory for both
    assert torch.equal(mq(batch, PROMPTS), parts["MQ"])  # the same batch: the shared pass is reused
    assert torch.equal(mq(batch.clone(), PROMPTS), parts["MQ"])  # a new tensor: scored again, the same


def test_deterministic_and_a_batch_scores_as_its_samples_one_by_one(reward):
    batch = videos(3, seed=1)
    prompts = PROMPTS + ["green trees in the wind at night"]
    first = reward.criteria(batch, prompts)
    second = reward.criteria(batch.clone(), list(prompts))
    for name in first:
        assert torch.equal(first[name], second[name])
    alone = [reward.criteria(batch[i:i + 1], prompts[i:i + 1]) for i in range(3)]
    for name in first:
        assert torch.allclose(first[name], torch.cat([a[name] for a in alone]), atol=1e-4, rtol=1e-4)


def _peft_reference(folder, output_dim):
    """The published model rebuilt the way VideoAlign's inference builds it (Qwen2-VL + rm_head,
    peft LoRA r/alpha from model_config.json, model.pth loaded into the PEFT-wrapped model), in
    float64, without any code of the reward under test."""
    peft = pytest.importorskip("peft")
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    state = torch.load(folder["weights"], map_location="cpu", weights_only=True)
    config = Qwen2VLConfig.from_pretrained(folder["base"])
    config.text_config.vocab_size = state["base_model.model.model.embed_tokens.weight"].shape[0]
    model = Qwen2VLForConditionalGeneration(config)
    lora = json.load(open(os.path.join(folder["root"], "model_config.json")))["peft_lora_config"]
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=lora["lora_r"], lora_alpha=lora["lora_alpha"],
                                                         target_modules=[n.split(".")[-1] for n in VIDEOALIGN_LLM_LINEARS],
                                                         lora_dropout=0.0, bias="none"))
    renamed = {}
    for key, value in state.items():
        if key.startswith("base_model.model.visual."):
            key = "base_model.model.model.visual." + key[len("base_model.model.visual."):]
        elif key.startswith("base_model.model.model."):
            key = "base_model.model.model.language_model." + key[len("base_model.model.model."):]
        renamed[key] = value
    head = renamed.pop("base_model.model.rm_head.weight").double()
    assert head.shape[0] == output_dim
    missing, unexpected = wrapped.load_state_dict(renamed, strict=False)
    assert not unexpected and all("lm_head" in key for key in missing)
    return wrapped.double().eval(), head


@pytest.mark.parametrize("which, output_dim", [("one", 1), ("three", 3)])
def test_known_answer_read_out_against_a_peft_reference(folders, which, output_dim):
    folder = folders[which]
    reward = build_reward("videoalign", checkpoint_path=folder["root"], base_model_path=folder["base"], **FAST)
    batch = videos(2, seed=2)
    got = reward.criteria(batch, PROMPTS)
    plain = build_reward("videoalign", checkpoint_path=folder["root"], base_model_path=folder["base"],
                         normalize=False, **FAST)  # the raw head outputs
    raw = plain.criteria(batch, PROMPTS)
    raw = torch.stack([raw[name] for name in ("VQ", "MQ", "TA")], dim=1)

    model, head = _peft_reference(folder, output_dim)
    inputs = reward.prepare(batch, PROMPTS)
    video = reward._shared.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    with torch.no_grad():
        hidden = model.base_model.model.model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
            pixel_values_videos=inputs["pixel_values_videos"].double(), video_grid_thw=inputs["video_grid_thw"],
            mm_token_type_ids=(inputs["input_ids"] == video).int() * 2, use_cache=False).last_hidden_state
    tokenizer = reward._shared.tokenizer
    expected = {}
    for k, (name, token) in enumerate(zip(("VQ", "MQ", "TA"), REWARD_TOKENS)):
        token_id = tokenizer.convert_tokens_to_ids(token)
        values = []
        for b in range(2):
            position = inputs["input_ids"][b].tolist().index(token_id)
            weight = head[0] if output_dim == 1 else head[k]
            values.append(float(hidden[b, position] @ weight))
        expected[name] = torch.tensor(values, dtype=torch.float64)
        assert torch.allclose(raw[:, k].double(), expected[name], atol=1e-4, rtol=1e-4), name
        normalised = (expected[name] - STATS[f"{name}_mean"]) / STATS[f"{name}_std"]
        assert torch.allclose(got[name].double(), normalised, atol=1e-4, rtol=1e-4), name
    overall = sum((expected[n] - STATS[f"{n}_mean"]) / STATS[f"{n}_std"] for n in ("VQ", "MQ", "TA"))
    assert torch.allclose(got["Overall"].double(), overall, atol=3e-4, rtol=1e-4)


def test_preprocessing_matches_the_published_rules_and_transformers_processor():
    # qwen-vl-utils' frame count: fps 2 of the clip, at least 4, even, at most T; evenly spaced
    assert sample_frame_indices(8, 8.0, fps=2.0) == [0, 2, 5, 7]
    assert sample_frame_indices(49, 24.0, fps=2.0) == [0, 16, 32, 48]
    assert sample_frame_indices(129, 24.0, fps=2.0) == [round(i * 128 / 9) for i in range(10)]
    assert sample_frame_indices(10, 24.0, num_frames=6) == [0, 2, 4, 5, 7, 9]
    assert sample_frame_indices(3, 24.0, fps=2.0) == [0, 2]
    with pytest.raises(ValueError, match="at least 2 frames"):
        sample_frame_indices(1, 24.0, fps=2.0)
    # frame sizes: multiples of 28, area within [min, max]
    assert smart_resize(32, 48, 28, 128 * 28 * 28, 448 * 448) == (280, 392)
    assert smart_resize(720, 1280, 28, 128 * 28 * 28, 448 * 448) == (336, 588)
    assert smart_resize(480, 832, 28, 128 * 28 * 28, 448 * 448) == (336, 588)

    # patches: a hand-written loop over Qwen2-VL's layout (each 2x2 block of patches contiguous,
    # a patch = channels x temporal pair x 14 x 14; an odd frame count repeats the last frame)
    frames = torch.rand(2, 3, 3, 56, 84)
    patches, grid = patchify(frames, 14, 2, 2)
    assert grid == (2, 4, 6) and patches.shape == (2, 2 * 4 * 6, 3 * 2 * 14 * 14)
    padded = torch.cat([frames, frames[:, -1:]], dim=1)
    for b in range(2):
        rows = []
        for t in range(2):
            for bh in range(2):
                for bw in range(3):
                    for mh in range(2):
                        for mw in range(2):
                            y, x = (bh * 2 + mh) * 14, (bw * 2 + mw) * 14
                            patch = padded[b, 2 * t:2 * t + 2, :, y:y + 14, x:x + 14]  # (tp, C, 14, 14)
                            rows.append(patch.permute(1, 0, 2, 3).reshape(-1))
        assert torch.equal(patches[b], torch.stack(rows))
    # and transformers' own (PIL backend) Qwen2-VL image processor on a one-frame video
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image = torch.rand(3, 56, 84)
    processor = Qwen2VLImageProcessorPil(do_resize=False, do_rescale=False, do_normalize=False)
    reference = processor(images=[image.numpy()], return_tensors="pt")
    patches, grid = patchify(image[None, None], 14, 2, 2)
    assert reference["image_grid_thw"].tolist() == [list(grid)]
    assert torch.equal(patches[0], reference["pixel_values"].float())


def test_the_prompt_is_the_published_detailed_special_template():
    text = build_prompt("a cat")
    assert text.count("<|VQ_reward|>") == text.count("<|MQ_reward|>") == text.count("<|TA_reward|>") == 1
    assert text.index("<|VQ_reward|>") < text.index("<|MQ_reward|>") < text.index("a cat") < text.index("<|TA_reward|>")
    assert "**Visual Quality:**  \n" in text and "Textual prompt - a cat\n" in text


def test_a_prompt_spelling_a_reward_token_gets_nan_for_that_criterion_only(reward):
    parts = reward.criteria(videos(), ["a cat <|TA_reward|>", "a dog"])
    assert torch.isnan(parts["TA"][0]) and torch.isnan(parts["Overall"][0])
    assert torch.isfinite(parts["VQ"][0]) and torch.isfinite(parts["MQ"][0]) and torch.isfinite(parts["TA"][1])


def test_bad_inputs_and_settings_name_the_problem(reward, folders):
    with pytest.raises(RewardInputError, match="videos must have shape"):
        reward(torch.rand(2, 3, 32, 32), PROMPTS)
    with pytest.raises(ValueError, match="at least 2 frames"):
        reward(torch.rand(2, 1, 3, 32, 32), PROMPTS)
    with pytest.raises(ValueError, match="criterion must be one of"):
        build_reward("videoalign", checkpoint_path=folders["one"]["root"], criterion="vq")


def _copy(folders, tmp_path):
    root, base = tmp_path / "VideoReward", tmp_path / "base"
    shutil.copytree(folders["one"]["root"], root)
    shutil.copytree(folders["one"]["base"], base)
    return root, base


def _one_line_error(error_type, match, **kwargs):
    with pytest.raises(error_type, match=match) as info:
        build_reward("videoalign", **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_layout_mismatches_are_one_line_errors_naming_what_is_missing(folders, tmp_path):
    root, base = _copy(folders, tmp_path)
    checkpoint = root / "checkpoint-12"
    kwargs = {"checkpoint_path": str(root), "base_model_path": str(base)}
    # no base model folder given, and model_config.json names a hub id: say what is needed
    _one_line_error(ValueError, "needs base_model_path.*Qwen/Qwen2-VL-2B-Instruct", checkpoint_path=str(root))
    (base / "preprocessor_config.json").rename(base / "x.json")
    _one_line_error(FileNotFoundError, "base model folder .* lacks preprocessor_config.json", **kwargs)
    (base / "x.json").rename(base / "preprocessor_config.json")
    shutil.move(str(checkpoint / "tokenizer"), str(tmp_path / "tokenizer"))
    _one_line_error(FileNotFoundError, "lacks tokenizer/tokenizer_config.json", **kwargs)
    shutil.move(str(tmp_path / "tokenizer"), str(checkpoint / "tokenizer"))
    (checkpoint / "model.pth").rename(tmp_path / "model.pth")
    (checkpoint / "adapter_model.safetensors").write_bytes(b"")
    _one_line_error(FileNotFoundError, "lacks model.pth: it holds the LoRA-only layout", **kwargs)
    (checkpoint / "adapter_model.safetensors").unlink()
    _one_line_error(FileNotFoundError, r"lacks model.pth \(the whole model's state dict\)", **kwargs)
    (tmp_path / "model.pth").rename(checkpoint / "model.pth")
    _one_line_error(FileNotFoundError, "has no checkpoint-3", step=3, **kwargs)
    (root / "model_config.json").rename(tmp_path / "model_config.json")
    _one_line_error(FileNotFoundError, "lacks model_config.json", **kwargs)
    (tmp_path / "model_config.json").rename(root / "model_config.json")
    assert read_layout(str(root), str(base)).weights == str(checkpoint / "model.pth")


def test_weight_and_config_mismatches_name_the_keys(folders, tmp_path):
    root, base = _copy(folders, tmp_path)
    kwargs = {"checkpoint_path": str(root), "base_model_path": str(base)}
    weights = root / "checkpoint-12" / "model.pth"
    state = torch.load(weights, weights_only=True)
    dropped = "base_model.model.model.layers.1.mlp.down_proj.base_layer.weight"
    torch.save({k: v for k, v in state.items() if k != dropped}, weights)
    message = _one_line_error(ValueError, "do not match the Qwen2-VL architecture", **kwargs)
    assert "language_model.layers.1.mlp.down_proj.weight" in message and "1 missing" in message
    torch.save({k: v for k, v in state.items() if k != "base_model.model.rm_head.weight"}, weights)
    _one_line_error(ValueError, "has no rm_head.weight", **kwargs)
    torch.save(state, weights)
    config_file = root / "model_config.json"
    config = json.loads(config_file.read_text())
    config["model_config"]["output_dim"] = 3  # the weights hold a 1-output head
    config_file.write_text(json.dumps(config))
    _one_line_error(ValueError, r"rm_head.weight .* has shape \(1, 32\); model_config .* give \(3, 32\)", **kwargs)
    config["model_config"]["output_dim"] = 1
    config["model_config"]["reward_token"] = "last"
    config_file.write_text(json.dumps(config))
    _one_line_error(ValueError, "reward_token 'special'", **kwargs)
    config["model_config"]["reward_token"] = "special"
    del config["inference_config"]["MQ_std"]
    config_file.write_text(json.dumps(config))
    _one_line_error(ValueError, "inference_config must hold numbers", **kwargs)
    # normalize=False does not need the statistics
    build_reward("videoalign", normalize=False, **FAST, **kwargs)


def test_criteria_are_weighted_as_rewards_and_share_one_forward(reward, folders, monkeypatch):
    common = {"checkpoint_path": folders["one"]["root"], "base_model_path": folders["one"]["base"], **FAST}
    rewards = RewardSet.from_specs([
        {"name": "vq", "type": "videoalign", "weight": 1.0, "kwargs": {**common, "criterion": "VQ"}},
        {"name": "mq", "type": "videoalign", "weight": 0.5, "kwargs": {**common, "criterion": "MQ"}},
    ])
    assert rewards.weights == {"vq": 1.0, "mq": 0.5}
    calls = []
    original = type(reward).raw_scores
    monkeypatch.setattr(type(reward), "raw_scores", lambda self, v, p: calls.append(len(p)) or original(self, v, p))
    batch = videos(seed=3)
    scores = rewards(batch, PROMPTS, criteria=True)
    assert calls == [2]  # one pass of the model for both entries and their criteria
    expected = reward.criteria(batch, PROMPTS)
    assert torch.equal(scores["vq"], expected["VQ"]) and torch.equal(scores["mq"], expected["MQ"])
    assert torch.equal(scores["vq/TA"], expected["TA"]) and torch.equal(scores["mq/Overall"], expected["Overall"])


def test_through_the_reward_server(reward):
    from dancegrpo_fast.rewards.serve import _parse_args

    assert _parse_args(["--reward", "videoalign", "--criteria"]).criteria is True
    assert _parse_args(["--reward", "videoalign"]).criteria is False
    batch = videos(seed=4)
    local = reward.criteria(batch, PROMPTS)
    with RewardServer(reward, max_wait_ms=0, criteria=True) as server:
        assert RemoteReward(server.url).health()["limits"]["criteria"] is True
        plain = RemoteReward(server.url, modality="video", dtype="float32", retries=0)
        assert getattr(plain, "criteria", None) is None  # nothing for RewardSet to log unless asked
        remote = RemoteReward(server.url, modality="video", dtype="float32", retries=0, criteria=True)
        assert torch.allclose(remote(batch, PROMPTS), local["Overall"], atol=1e-5)
        parts = remote.criteria(batch, PROMPTS)
        assert list(parts) == ["VQ", "MQ", "TA", "Overall"]
        for name in parts:
            assert torch.allclose(parts[name], local[name], atol=1e-5), name
        vq = RemoteReward(server.url, modality="video", dtype="float32", criterion="VQ", retries=0)
        mq = RemoteReward(server.url, modality="video", dtype="float32", criterion="MQ", retries=0)
        other = videos(seed=5)
        expected = reward.criteria(other, PROMPTS)
        before = server.stats["requests"]
        assert torch.allclose(vq(other, PROMPTS), expected["VQ"], atol=1e-5)
        assert torch.allclose(mq(other, PROMPTS), expected["MQ"], atol=1e-5)
        assert server.stats["requests"] == before + 1  # the MQ entry reused the VQ entry's answer
        missing = RemoteReward(server.url, modality="video", dtype="float32", criterion="XQ", retries=0)
        with pytest.raises(Exception, match="has no criterion 'XQ'"):
            missing(batch, PROMPTS)
    with RewardServer(reward, max_wait_ms=0) as server:  # without --criteria: a clear error
        remote = RemoteReward(server.url, modality="video", dtype="float32", criterion="VQ", retries=0)
        with pytest.raises(Exception, match="start it with --criteria"):
            remote(batch, PROMPTS)


def test_bfloat16_scores_close_to_float32(reward, folders):
    half = build_reward("videoalign", checkpoint_path=folders["one"]["root"], base_model_path=folders["one"]["base"],
                        dtype="bfloat16", **FAST)
    assert half._shared is not reward._shared and half._shared.model.rm_head.weight.dtype == torch.float32
    batch = videos(seed=6)
    full, low = reward.criteria(batch, PROMPTS), half.criteria(batch, PROMPTS)
    for name in full:
        assert torch.allclose(low[name], full[name], atol=0.25, rtol=0.05), name
