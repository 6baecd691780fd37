"""In-process model rewards through their real loading code, on tiny random models saved in the
published layouts (see dancegrpo_fast.rewards.testing)."""

import json

import pytest
import torch

from dancegrpo_fast.rewards import (
    AestheticReward,
    CLIPScoreReward,
    HPSv2Reward,
    OpenCLIPConfig,
    OpenCLIPModel,
    PickScoreReward,
    build_reward,
)
from dancegrpo_fast.rewards.clip_models import load_aesthetic_head
from dancegrpo_fast.rewards.preprocess import ImagePreprocess
from dancegrpo_fast.rewards.testing import (
    hf_clip_to_open_clip_state_dict,
    write_tiny_aesthetic_head,
    write_tiny_clip_folder,
    write_tiny_clip_tokenizer,
    write_tiny_hps_checkpoint,
    write_tiny_preprocessor_config,
)

PROMPTS = ["the cat", "a red dog on the grass", "an oil painting of the sea", "the cat and the dog",
           "a photo of a car", "winter in the city"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward_models")
    clip_dir = root / "clip-vit-large-patch14"
    hf_model = write_tiny_clip_folder(str(clip_dir), seed=0)
    # PickScore as published: the model folder alone, the processor in the laion CLIP-H folder.
    pick_dir, processor_dir = root / "PickScore_v1", root / "CLIP-ViT-H-14-laion2B-s32B-b79K"
    write_tiny_clip_folder(str(pick_dir), seed=1, with_processor=False)
    vocab_size, _, _ = write_tiny_clip_tokenizer(str(processor_dir))
    write_tiny_preprocessor_config(str(processor_dir), 32, legacy_ints=True)
    # HPS: an open_clip state dict converted from the tiny HF CLIP, so HPS's scores can be checked
    # against transformers' implementation of the same network.
    hps_path = root / "HPS_v2.1_compressed.pt"
    hps_config = write_tiny_hps_checkpoint(str(hps_path), vocab_size, state_dict=hf_clip_to_open_clip_state_dict(hf_model))
    (root / "tiny-ViT.json").write_text(json.dumps(hps_config))
    write_tiny_aesthetic_head(str(root / "sac+logos+ava1-l14-linearMSE.pth"), input_dim=16)
    write_tiny_aesthetic_head(str(root / "linear_head.pth"), input_dim=16, linear=True)
    return root


@pytest.fixture(scope="module")
def rewards(model_dir):
    return {
        "clip": CLIPScoreReward(str(model_dir / "clip-vit-large-patch14")),
        "clip_scaled": CLIPScoreReward(str(model_dir / "clip-vit-large-patch14"), use_logit_scale=True, batch_size=2),
        "pickscore": PickScoreReward(str(model_dir / "PickScore_v1"), str(model_dir / "CLIP-ViT-H-14-laion2B-s32B-b79K")),
        "hps": HPSv2Reward(str(model_dir / "HPS_v2.1_compressed.pt"),
                           tokenizer_path=str(model_dir / "CLIP-ViT-H-14-laion2B-s32B-b79K"),
                           model_config=str(model_dir / "tiny-ViT.json")),
        "aesthetic": AestheticReward(str(model_dir / "sac+logos+ava1-l14-linearMSE.pth"),
                                     str(model_dir / "clip-vit-large-patch14")),
        "aesthetic_linear": AestheticReward(str(model_dir / "linear_head.pth"), str(model_dir / "clip-vit-large-patch14")),
    }


def _images(batch, height=40, width=48, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=generator)


@pytest.mark.parametrize("name", ["clip", "clip_scaled", "pickscore", "hps", "aesthetic", "aesthetic_linear"])
def test_shape_dtype_finite_and_batch_invariance(rewards, name):
    reward = rewards[name]
    images = _images(5)
    prompts = PROMPTS[:5]
    scores = reward(images, prompts)
    assert scores.shape == (5,) and scores.dtype == torch.float32 and scores.device.type == "cpu"
    assert torch.isfinite(scores).all()
    one_by_one = torch.cat([reward(images[i : i + 1], prompts[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(scores, one_by_one, atol=1e-5, rtol=0)
    assert scores.std() > 0  # different images get different scores


@pytest.mark.parametrize("name", ["clip", "clip_scaled", "pickscore", "hps"])
def test_each_image_is_scored_against_its_own_prompt(rewards, name):
    reward = rewards[name]
    images = _images(4, seed=1)
    prompts = PROMPTS[:4]
    matrix = reward.similarity_matrix(images, prompts)  # (images, prompts)
    assert matrix.shape == (4, 4)
    torch.testing.assert_close(reward(images, prompts), matrix.diagonal(), atol=1e-5, rtol=0)
    permutation = [2, 0, 3, 1]
    permuted = reward(images, [prompts[j] for j in permutation])
    torch.testing.assert_close(permuted, matrix[torch.arange(4), permutation], atol=1e-5, rtol=0)
    # the pairing matters: not every image scored against the first caption
    assert not torch.allclose(permuted, reward(images, prompts), atol=1e-4)
    first_caption = reward(images, [prompts[0]] * 4)
    torch.testing.assert_close(first_caption, matrix[:, 0], atol=1e-5, rtol=0)


def test_clip_score_matches_transformers_reference(model_dir, rewards):
    """An independent path: transformers' CLIPModel on the same preprocessed pixels and tokens."""
    from transformers import AutoTokenizer, CLIPModel

    folder = str(model_dir / "clip-vit-large-patch14")
    model = CLIPModel.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    images, prompts = _images(3, 64, 64, seed=2), PROMPTS[:3]
    # 64x64 -> shortest side 32 -> crop 32: the HF processor would do the same
    pixels = ImagePreprocess(size=32, crop_size=(32, 32))(images)
    tokens = tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        image_out = model.get_image_features(pixel_values=pixels)
        text_out = model.get_text_features(**tokens)
    image_features = getattr(image_out, "pooler_output", image_out)
    text_features = getattr(text_out, "pooler_output", text_out)
    expected = torch.nn.functional.cosine_similarity(image_features, text_features, dim=-1)
    torch.testing.assert_close(rewards["clip"](images, prompts), expected, atol=1e-5, rtol=0)
    scale = model.logit_scale.exp()
    torch.testing.assert_close(rewards["clip_scaled"](images, prompts), scale * expected, atol=1e-4, rtol=0)


def test_open_clip_layout_model_matches_transformers_clip(model_dir):
    """The plain-PyTorch open_clip architecture computes what transformers' CLIP computes when
    given the same weights in open_clip's key layout, which is how HPS stores them."""
    from transformers import AutoTokenizer, CLIPModel

    folder = str(model_dir / "clip-vit-large-patch14")
    hf_model = CLIPModel.from_pretrained(folder).eval()
    config = OpenCLIPConfig.from_open_clip_dict(json.loads((model_dir / "tiny-ViT.json").read_text()))
    model = OpenCLIPModel(config).eval()
    model.load_state_dict(hf_clip_to_open_clip_state_dict(hf_model), strict=True)
    pixels = torch.randn(3, 3, 32, 32)
    tokens = AutoTokenizer.from_pretrained(folder)(PROMPTS[:3], padding="max_length", max_length=77,
                                                   return_tensors="pt")
    with torch.no_grad():
        image_out = hf_model.get_image_features(pixel_values=pixels)
        text_out = hf_model.get_text_features(**tokens)
        torch.testing.assert_close(model.encode_image(pixels), getattr(image_out, "pooler_output", image_out),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.encode_text(tokens["input_ids"]), getattr(text_out, "pooler_output", text_out),
                                   atol=1e-5, rtol=1e-5)


def test_open_clip_state_dict_keys_are_open_clips():
    keys = set(OpenCLIPModel(OpenCLIPConfig.from_open_clip_dict(
        {"embed_dim": 8, "vision_cfg": {"image_size": 16, "layers": 1, "width": 16, "head_width": 8, "patch_size": 8},
         "text_cfg": {"context_length": 8, "vocab_size": 10, "width": 16, "heads": 2, "layers": 1}})).state_dict())
    expected_subset = {
        "visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding", "visual.proj",
        "visual.ln_pre.weight", "visual.ln_post.bias", "visual.transformer.resblocks.0.attn.in_proj_weight",
        "visual.transformer.resblocks.0.attn.out_proj.bias", "visual.transformer.resblocks.0.mlp.c_fc.weight",
        "visual.transformer.resblocks.0.mlp.c_proj.bias", "visual.transformer.resblocks.0.ln_1.weight",
        "token_embedding.weight", "positional_embedding", "text_projection", "logit_scale", "ln_final.weight",
        "transformer.resblocks.0.attn.in_proj_bias", "transformer.resblocks.0.ln_2.bias",
    }
    assert expected_subset <= keys
    assert "attn_mask" not in keys  # a buffer, not a weight, as in open_clip
    # ViT-H-14 defaults: 16 vision heads of width 80, 16 text heads
    default = OpenCLIPConfig()
    assert (default.vision_width // default.vision_head_width, default.text_heads, default.embed_dim) == (16, 16, 1024)


def test_open_clip_backend_agrees_when_available(model_dir):
    """Where open_clip imports (it needs torchvision), its own model must load the same file and
    give the same features. Skipped where open_clip cannot import (e.g. a CPU torch without a
    matching torchvision)."""
    try:
        import open_clip
    except Exception as error:  # ImportError, or torchvision's operator errors beside a CPU torch
        pytest.skip(f"open_clip does not import here: {error}")
    config = json.loads((model_dir / "tiny-ViT.json").read_text())
    model = open_clip.model.CLIP(embed_dim=config["embed_dim"], vision_cfg=config["vision_cfg"],
                                 text_cfg=config["text_cfg"], quick_gelu=False).eval()
    state = torch.load(model_dir / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"]
    model.load_state_dict(state, strict=False)
    ours = OpenCLIPModel(OpenCLIPConfig.from_open_clip_dict(config)).eval()
    ours.load_state_dict(state)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(pixels), model.encode_image(pixels), atol=1e-5, rtol=1e-5)


def test_hps_equals_transformers_cosine_on_hps_preprocessing(model_dir, rewards):
    """HPS score = cosine of the open_clip features, images padded (longest side) not cropped."""
    from transformers import AutoTokenizer, CLIPModel

    hf_model = CLIPModel.from_pretrained(str(model_dir / "clip-vit-large-patch14")).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir / "CLIP-ViT-H-14-laion2B-s32B-b79K"))
    images, prompts = _images(2, 24, 64, seed=3), PROMPTS[:2]  # wide: padded top and bottom
    pixels = ImagePreprocess(size=32, crop_size=(32, 32), mode="pad")(images)
    assert pixels.shape == (2, 3, 32, 32)
    black = (0.0 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor([0.26862954, 0.26130258, 0.27577711])
    torch.testing.assert_close(pixels[:, :, 0, 0], black.expand(2, 3))  # padding row: black
    tokens = tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        image_out = hf_model.get_image_features(pixel_values=pixels)
        text_out = hf_model.get_text_features(**tokens)
    expected = torch.nn.functional.cosine_similarity(getattr(image_out, "pooler_output", image_out),
                                                     getattr(text_out, "pooler_output", text_out), dim=-1)
    torch.testing.assert_close(rewards["hps"](images, prompts), expected, atol=1e-5, rtol=0)


def test_aesthetic_ignores_prompts_and_uses_the_head(model_dir, rewards):
    reward = rewards["aesthetic"]
    images = _images(3, seed=4)
    torch.testing.assert_close(reward(images, PROMPTS[:3]), reward(images, ["x", "y", "z"]))
    head = load_aesthetic_head(str(model_dir / "sac+logos+ava1-l14-linearMSE.pth"))
    assert [k for k in head.state_dict()] == [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]
    assert head.layers[0].in_features == 16 and head.layers[0].out_features == 1024
    expected = head(reward.encode_images(images))
    torch.testing.assert_close(reward(images, PROMPTS[:3]), expected, atol=1e-5, rtol=0)
    features = reward.encode_images(images)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(3))


def test_build_by_name_and_chunking(model_dir, rewards):
    reward = build_reward("clip", model_path=str(model_dir / "clip-vit-large-patch14"), batch_size=2)
    images = _images(5, seed=5)
    torch.testing.assert_close(reward(images, PROMPTS[:5]), rewards["clip"](images, PROMPTS[:5]), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Missing or malformed checkpoints


def test_missing_hps_checkpoint_names_the_file(tmp_path, model_dir):
    missing = tmp_path / "HPS_v2.1_compressed.pt"
    with pytest.raises(FileNotFoundError, match=f"HPS checkpoint not found: {missing}"):
        HPSv2Reward(str(missing), tokenizer_path=str(model_dir / "CLIP-ViT-H-14-laion2B-s32B-b79K"))


def test_malformed_hps_checkpoints(tmp_path, model_dir):
    tokenizer = str(model_dir / "CLIP-ViT-H-14-laion2B-s32B-b79K")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=f"cannot read the HPS checkpoint {garbage}"):
        HPSv2Reward(str(garbage), tokenizer_path=tokenizer)
    # a valid file with the wrong architecture: the default ViT-H-14 config vs the tiny weights
    with pytest.raises(ValueError, match="does not match the open_clip architecture.*shape mismatches"):
        HPSv2Reward(str(model_dir / "HPS_v2.1_compressed.pt"), tokenizer_path=tokenizer)
    truncated = tmp_path / "truncated.pt"
    state = torch.load(model_dir / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"]
    state.pop("text_projection")
    torch.save({"state_dict": state}, truncated)
    with pytest.raises(ValueError, match=r"1 missing keys \['text_projection'\]"):
        HPSv2Reward(str(truncated), tokenizer_path=tokenizer, model_config=str(model_dir / "tiny-ViT.json"))


def test_hps_without_tokenizer_explains(model_dir):
    try:
        import open_clip  # noqa: F401
    except Exception:
        pass
    else:
        pytest.skip("open_clip imports here, so its tokenizer is used")
    with pytest.raises(ValueError, match="HPS needs a CLIP tokenizer: pass tokenizer_path"):
        HPSv2Reward(str(model_dir / "HPS_v2.1_compressed.pt"), model_config=str(model_dir / "tiny-ViT.json"))


def test_clip_folder_errors_name_the_folder(tmp_path, model_dir):
    with pytest.raises(FileNotFoundError, match=f"CLIP folder not found: {tmp_path / 'nope'}"):
        CLIPScoreReward(str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"CLIP folder {empty} lacks config.json"):
        CLIPScoreReward(str(empty))
    (empty / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=f"CLIP folder {empty} lacks weights"):
        CLIPScoreReward(str(empty))
    # PickScore's model folder has no processor files: they must come from processor_path
    with pytest.raises(FileNotFoundError, match="PickScore processor folder .*PickScore_v1 lacks tokenizer files"):
        PickScoreReward(str(model_dir / "PickScore_v1"), str(model_dir / "PickScore_v1"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (broken / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match=f"cannot load the CLIP model from {broken}"):
        CLIPScoreReward(str(broken), processor_path=str(model_dir / "clip-vit-large-patch14"))


def test_aesthetic_head_errors(tmp_path, model_dir):
    clip = str(model_dir / "clip-vit-large-patch14")
    with pytest.raises(FileNotFoundError, match=f"aesthetic head checkpoint not found: {tmp_path / 'head.pth'}"):
        AestheticReward(str(tmp_path / "head.pth"), clip)
    odd = tmp_path / "odd.pth"
    torch.save({"fc.weight": torch.zeros(1, 16)}, odd)
    with pytest.raises(ValueError, match="expected the LAION MLP layout"):
        AestheticReward(str(odd), clip)
    wide = tmp_path / "wide.pth"
    write_tiny_aesthetic_head(str(wide), input_dim=768)
    with pytest.raises(ValueError, match="expects 768-dim CLIP embeddings but the CLIP model"):
        AestheticReward(str(wide), clip)
