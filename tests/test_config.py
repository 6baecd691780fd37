"""The configuration: sections, flat aliases, presets, YAML, the CLI, --help's values, and the
configuration a resumed run gets back."""
from __future__ import annotations

import pytest
import yaml

from dancegrpo_fast.config import (SECTIONS, TrainConfig, apply_preset, available_presets, build_parser,
                                   config_to_yaml, parse_config, resumed_config)
from dancegrpo_fast.tiny import WEIGHTS_DIR


def test_sections_and_flat_names_set_the_same_fields(tmp_path):
    flat = TrainConfig.from_dict({"lr": 3e-5, "group_size": 4, "sampler": "flow_grpo", "eval_every": 5,
                                  "model_family": "sd3", "train_batch_size": 2, "rollout_batch_size": 8})
    nested = TrainConfig.from_dict({"optim": {"lr": 3e-5, "batch_size": 2}, "grpo": {"group_size": 4},
                                    "sampler": {"name": "flow_grpo"}, "eval": {"every": 5},
                                    "model": {"family": "sd3"}, "rollout": {"batch_size": 8}})
    dotted = TrainConfig.from_dict({"optim.lr": 3e-5, "grpo.group_size": 4, "sampler.name": "flow_grpo",
                                    "eval.every": 5, "model.family": "sd3", "optim.batch_size": 2,
                                    "rollout.batch_size": 8})
    assert flat == nested == dotted
    assert (flat.optim.lr, flat.grpo.group_size, flat.sampler.name, flat.eval.every) == (3e-5, 4, "flow_grpo", 5)
    # The written config.yaml is sectioned and loads back to the same config.
    text = config_to_yaml(flat)
    assert set(yaml.safe_load(text)) == set(SECTIONS)
    assert TrainConfig.from_dict(yaml.safe_load(text)) == flat


def test_a_config_yaml_written_before_sections_still_loads():
    old = {"model_family": "flux", "model_path": "/ckpt/flux", "model_dtype": "bfloat16", "sampler": "dance",
           "num_steps": 16, "eta": 0.3, "group_size": 12, "rollout_batch_size": 4, "train_batch_size": 1,
           "gradient_accumulation_steps": 12, "lr": 1e-5, "use_lora": True, "lora_target_modules": ["to_q", "to_k"],
           "rewards": [{"name": "hps", "weight": 1.0, "kwargs": {"checkpoint_path": "/m/hps.pt"}}],
           "eval_prompt_file": "", "eval_every": 0, "eval_seed": 0, "output_dir": "outputs/flux", "resume": "",
           "overwrite": False, "threads": 0, "num_iterations": 300, "seed": 42, "parallel": "fsdp"}
    config = TrainConfig.from_dict(old).validate()
    assert (config.model.family, config.model.path, config.model.dtype) == ("flux", "/ckpt/flux", "bfloat16")
    assert config.optim.use_lora and config.optim.lora_target_modules == ["to_q", "to_k"]
    assert config.rollout.rewards[0].kwargs == {"checkpoint_path": "/m/hps.pt"}
    assert config.runtime.parallel == "fsdp" and config.optim.gradient_accumulation_steps == 12


def test_precedence_defaults_preset_yaml_flags(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(yaml.safe_dump({"grpo": {"group_size": 4}, "gradient_accumulation_steps": 4, "lr": 3e-5,
                                         "rewards": [{"name": "hps", "weight": 0.5}]}))
    config = parse_config(["--preset", "flux", "--config", str(yaml_file), "--lr", "2e-5", "--optim.use_lora", "true",
                           "--rewards", "hps:1.0,clip:0.5"])
    assert config.model.family == "flux" and config.sampler.eta == 0.3 and config.sampler.shift == 3.0  # preset
    assert config.grpo.group_size == 4 and config.optim.gradient_accumulation_steps == 4  # YAML
    assert config.optim.lr == 2e-5 and config.optim.use_lora is True  # flags
    assert [(r.name, r.weight) for r in config.rollout.rewards] == [("hps", 1.0), ("clip", 0.5)]


def test_presets():
    assert set(available_presets()) >= {"flux", "sd14", "hunyuan_video", "wan", "tiny"}
    for preset in available_presets():
        apply_preset(preset).validate()
    sd = parse_config(["--preset", "sd14"])
    assert (sd.sampler.name, sd.sampler.num_steps, sd.sampler.eta, sd.sampler.cfg_scale, sd.grpo.group_size,
            sd.grpo.timestep_fraction) == ("ddim", 50, 1.0, 5.0, 16, 1.0)
    hy = parse_config(["--preset", "hunyuan_video"])
    assert (hy.sampler.eta, hy.sampler.shift, hy.grpo.group_size, hy.model.num_frames) == (0.25, 5.0, 24, 53)
    # The tiny task is data: its preset names its prompt lists (inside the package) and the module
    # that registers its reward.
    tiny = apply_preset("tiny")
    assert tiny.rollout.prompt_file.endswith("tiny/prompts/train.txt")
    assert tiny.eval.prompt_file.endswith("tiny/prompts/heldout.txt")
    assert tiny.rollout.reward_modules == ["dancegrpo_fast.tiny.reward"]


def test_no_arguments_or_a_tiny_weights_folder_mean_the_tiny_task(tmp_path):
    assert parse_config([]).model.family == "tiny"
    own = parse_config(["--model_path", str(WEIGHTS_DIR), "--lr", "1e-4"])
    assert (own.model.family, own.model.path, own.optim.lr, own.sampler.num_steps) == ("tiny", str(WEIGHTS_DIR), 1e-4, 16)
    other = tmp_path / "flux"  # any other folder keeps the plain defaults (FLUX)
    other.mkdir()
    (other / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    assert parse_config(["--model_path", str(other)]).model.family == "flux"
    assert parse_config(["--model_path", str(tmp_path / "missing")]).model.family == "flux"


def test_help_lists_both_flag_forms_and_the_values_that_apply(capsys):
    text = build_parser().format_help()
    for flag in ("--lr", "--optim.lr", "--group_size", "--grpo.group_size", "--eval_every", "--eval.every",
                 "--sampler", "--sampler.name", "--resume", "--runtime.resume"):
        assert flag in text
    assert "(value: 1e-05)" in text  # the default lr
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    tiny_help = capsys.readouterr().out
    assert "preset tiny" in tiny_help and "(value: 5e-05)" in tiny_help  # no arguments: the tiny task
    with pytest.raises(SystemExit):
        parse_config(["--preset", "hunyuan_video", "--help"])
    hunyuan_help = " ".join(capsys.readouterr().out.split())
    assert "preset hunyuan_video" in hunyuan_help and "(value: 53)" in hunyuan_help


def test_errors_name_the_setting():
    with pytest.raises(ValueError, match="unknown config key 'learning_rate'"):
        TrainConfig.from_dict({"learning_rate": 1.0})
    with pytest.raises(ValueError, match="unknown config key 'lrr'; did you mean 'lr'"):
        TrainConfig.from_dict({"lrr": 1.0})
    with pytest.raises(ValueError, match="config section 'optim' must be a mapping of field: value, got 5"):
        TrainConfig.from_dict({"optim": 5})
    with pytest.raises(ValueError, match="rewards: the weight of 'hps' must be a number, got 'lots'"):
        TrainConfig.from_dict({"rewards": [{"name": "hps", "weight": "lots"}]})
    with pytest.raises(ValueError, match="rewards: the kwargs of 'hps' must be a mapping"):
        TrainConfig.from_dict({"rewards": [{"name": "hps", "kwargs": ["a"]}]})
    with pytest.raises(ValueError, match="rewards: each entry needs a name"):
        TrainConfig.from_dict({"rewards": [{"weight": 1.0}]})
    with pytest.raises(ValueError, match="unknown config key 'optim.nope'"):
        TrainConfig.from_dict({"optim": {"nope": 1}})
    with pytest.raises(ValueError, match="config field 'group_size' expects int"):
        parse_config(["--group_size", "two"])
    with pytest.raises(ValueError, match="unknown preset"):
        parse_config(["--preset", "nope"])
    with pytest.raises(ValueError, match=r"rewards: each name may appear once, \['hps'\]"):
        parse_config(["--preset", "flux", "--rewards", "hps:1.0,clip:0.5,hps:0.5"])
    with pytest.raises(ValueError, match="rewards: the weight of 'hps' must be a number"):
        parse_config(["--rewards", "hps:lots"])
    with pytest.raises(ValueError, match="eval_every must be an integer >= 0"):
        parse_config(["--eval.every", "-1"])
    with pytest.raises(SystemExit):  # an abbreviated flag is not guessed
        parse_config(["--learning", "1"])


def test_trained_timesteps_follow_spec():
    config = TrainConfig.from_dict(dict(num_steps=16, timestep_fraction=0.6))
    assert config.sampler.trainable_steps() == list(range(15)) and config.trained_timesteps() == 9
    window = TrainConfig.from_dict(dict(num_steps=16, sde_window_start=4, sde_window_size=4, timestep_fraction=1.0))
    assert window.sampler.trainable_steps() == [4, 5, 6, 7]
    last = TrainConfig.from_dict(dict(num_steps=4, sde_window_start=2, sde_window_size=2, timestep_fraction=1.0))
    assert last.sampler.trainable_steps() == [2]


def test_a_resumed_run_gets_its_saved_settings_and_only_the_given_flags(tmp_path):
    saved_config = apply_preset("tiny")
    saved_config.runtime.num_iterations = 50
    saved_config.optim.lr = 1e-4
    saved_config.runtime.output_dir = str(tmp_path / "run")
    saved = (saved_config.to_dict(), 20)
    argv = ["--output_dir", str(tmp_path / "run"), "--resume", "latest", "--lr", "2e-4"]
    config, message = resumed_config(saved, parse_config(argv), argv, "ckpt")
    assert config.runtime.num_iterations == 50  # the run's own, not the preset's 400
    assert config.optim.lr == 2e-4 and config.runtime.resume == "latest"
    assert message.startswith("resuming ckpt at iteration 20 of 50") and "lr 0.0001 -> 0.0002" in message
    # A finished run: nothing to do, and how to extend it.
    argv = ["--output_dir", str(tmp_path / "run"), "--resume", "latest"]
    _, message = resumed_config((saved_config.to_dict(), 50), parse_config(argv), argv, "ckpt")
    assert message.startswith("nothing to do") and "--num_iterations 75" in message
    argv += ["--num_iterations", "80"]
    config, message = resumed_config((saved_config.to_dict(), 50), parse_config(argv), argv, "ckpt")
    assert config.runtime.num_iterations == 80 and "num_iterations 50 -> 80" in message
    # Keys of a --config file count as given.
    extra = tmp_path / "more.yaml"
    extra.write_text("optim: {lr: 3.0e-4}\n")
    argv = ["--output_dir", str(tmp_path / "run"), "--resume", "latest", "--config", str(extra)]
    config, _ = resumed_config(saved, parse_config(argv), argv, "ckpt")
    assert config.optim.lr == 3e-4 and config.runtime.num_iterations == 50


def test_the_configuration_reference_lists_every_field():
    from dataclasses import fields
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    reference = text[text.index("## Configuration reference"):]
    missing = [f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in fields(cls)
               if f"`{section}.{f.name}`" not in reference]
    assert not missing, f"docs/training.md's configuration reference lacks {missing}"
