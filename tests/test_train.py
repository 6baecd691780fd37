"""The trainer end to end on a tiny FLUX checkpoint (real diffusers classes, loaded by path):
config/CLI, ratio exactly 1 on-policy, checkpoints and resume (also after a kill), logging,
clear errors."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from helpers.fixtures import _single_thread, flux_folder  # noqa: E402,F401  (fixtures)
from helpers.tiny_models import flux_train_config, write_prompts  # noqa: E402

from dancegrpo_fast.checkpoint import CheckpointError, find_latest  # noqa: E402
from dancegrpo_fast.config import TrainConfig  # noqa: E402
from dancegrpo_fast.policies import ModelLoadError  # noqa: E402
from dancegrpo_fast.prompts import load_prompts  # noqa: E402
from dancegrpo_fast.rewards import RewardError  # noqa: E402
from dancegrpo_fast.train import Trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def brightness(images, prompts):
    """Rule-based test reward: mean pixel value."""
    return images.float().mean(dim=tuple(range(1, images.dim())))


REWARDS = {"brightness": (brightness, 1.0)}


def flux_config(folder, tmp_path, **overrides) -> TrainConfig:
    return flux_train_config(folder, tmp_path, **overrides)


def _trainable_state(trainer):
    return {n: p.detach().clone() for n, p in trainer.policy.model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------------------------
# Ratio exactly 1 on-policy, at any rollout / training batch size
# ----------------------------------------------------------------------------------------------


def test_ratio_exactly_one_before_first_optimizer_step(flux_folder, tmp_path):
    config = flux_config(flux_folder, tmp_path, rollout_batch_size=4, train_batch_size=1,
                         gradient_accumulation_steps=2)  # 4 optimizer steps per iteration
    trainer = Trainer(config, rewards=REWARDS)
    trajectory = trainer.collect()
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    stats = trainer.update(trajectory, advantages)
    assert stats.optimizer_steps == 2
    assert stats.first_step_ratio_max_dev == 0.0  # exactly 1, not approximately
    assert stats.ratio_max_dev > 0  # later optimizer steps see the updated policy

    # The old log-probs of later optimizer steps were computed before the first step: with a
    # learning rate of 0 (parameters unchanged) every ratio of the iteration is exactly 1.
    frozen = Trainer(flux_config(flux_folder, tmp_path / "b", rollout_batch_size=2, train_batch_size=1,
                                 gradient_accumulation_steps=1), rewards=REWARDS)
    frozen.setup.lr_scheduler.base_lrs = [0.0]
    for group in frozen.setup.optimizer.param_groups:
        group["lr"] = 0.0
    before = _trainable_state(frozen)
    stats = frozen.update(frozen.collect(), advantages)
    assert all(torch.equal(before[k], v) for k, v in _trainable_state(frozen).items())
    assert stats.optimizer_steps == 4 and stats.ratio_max_dev == 0.0
    assert stats.log_prob_gap < 1e-5  # rollout vs training-time log-prob: float noise only


def test_same_samples_at_any_rollout_batch_size(flux_folder, tmp_path):
    a = Trainer(flux_config(flux_folder, tmp_path / "a", rollout_batch_size=4), rewards=REWARDS).collect()
    b = Trainer(flux_config(flux_folder, tmp_path / "b", rollout_batch_size=1), rewards=REWARDS).collect()
    assert (a.latents - b.latents).abs().max() < 1e-5
    unshared = Trainer(flux_config(flux_folder, tmp_path / "c", shared_noise=False), rewards=REWARDS).collect()
    assert not torch.equal(unshared.latents[0, 0], unshared.latents[1, 0])


# ----------------------------------------------------------------------------------------------
# Checkpoints, resume, logging, loading the result
# ----------------------------------------------------------------------------------------------


def test_resume_continues_exactly_and_logs(flux_folder, tmp_path):
    straight = Trainer(flux_config(flux_folder, tmp_path / "a", num_iterations=2, ema_decay=0.9, sample_every=1),
                       rewards=REWARDS)
    straight.train()
    first = Trainer(flux_config(flux_folder, tmp_path / "b", num_iterations=1, ema_decay=0.9), rewards=REWARDS)
    first.train()
    resumed = Trainer(flux_config(flux_folder, tmp_path / "b", num_iterations=2, ema_decay=0.9, resume="latest"),
                      rewards=REWARDS)
    assert resumed.iteration == 1 and resumed.prompts.position == 2
    resumed.train()
    a, b = _trainable_state(straight), _trainable_state(resumed)
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    assert all(torch.allclose(straight.setup.ema.shadow[k], resumed.setup.ema.shadow[k], atol=1e-6, rtol=0) for k in a)

    rows = [json.loads(line) for line in (tmp_path / "a" / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    for key in ("reward/brightness/mean", "reward/brightness/std", "loss", "ratio_mean", "clip_fraction", "kl",
                "grad_norm", "lr", "seconds_rollout", "seconds_reward", "seconds_update", "samples_per_second"):
        assert key in rows[0]
    assert (tmp_path / "a" / "out" / "samples" / "iter_000002.png").is_file()
    resumed_rows = [json.loads(x) for x in (tmp_path / "b" / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in resumed_rows] == [1, 2]


def test_full_checkpoint_loads_into_diffusers(flux_folder, tmp_path):
    from diffusers import FluxTransformer2DModel

    trainer = Trainer(flux_config(flux_folder, tmp_path, num_iterations=1), rewards=REWARDS)
    trainer.train()
    loaded = FluxTransformer2DModel.from_pretrained(find_latest(trainer.config.runtime.output_dir) / "model" / "transformer")
    trained = trainer.policy.model.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in loaded.state_dict().items())


def test_lora_checkpoint_loads_into_pipeline(flux_folder, tmp_path):
    from diffusers import FluxPipeline

    config = flux_config(flux_folder, tmp_path, num_iterations=1, use_lora=True, lora_rank=4, lora_alpha=4.0,
                         lora_target_modules=["to_q", "to_k", "to_v"])
    trainer = Trainer(config, rewards=REWARDS)
    trainer.train()
    pipe = FluxPipeline.from_pretrained(str(flux_folder))
    pipe.load_lora_weights(str(find_latest(config.runtime.output_dir) / "model"))
    trained = {k: v for k, v in trainer.policy.model.state_dict().items() if "lora" in k}
    loaded = {k: v for k, v in pipe.transformer.state_dict().items() if "lora" in k}
    assert len(trained) == len(loaded) > 0
    assert sorted(torch.cat([v.flatten() for v in trained.values()]).tolist()) == \
        sorted(torch.cat([v.flatten() for v in loaded.values()]).tolist())
    # Resume of a LoRA run
    resumed = Trainer(flux_config(flux_folder, tmp_path, num_iterations=2, use_lora=True, lora_rank=4, lora_alpha=4.0,
                                  lora_target_modules=["to_q", "to_k", "to_v"], resume="latest"), rewards=REWARDS)
    assert resumed.iteration == 1
    a, b = _trainable_state(trainer), _trainable_state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_corrupt_or_missing_checkpoint_errors(flux_folder, tmp_path):
    trainer = Trainer(flux_config(flux_folder, tmp_path, num_iterations=1), rewards=REWARDS)
    trainer.train()
    checkpoint = find_latest(trainer.config.runtime.output_dir)
    with pytest.raises(CheckpointError, match="does not exist"):
        Trainer(flux_config(flux_folder, tmp_path, resume=str(tmp_path / "nowhere")), rewards=REWARDS)
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    (broken / "training_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt: training_state.pt"):
        Trainer(flux_config(flux_folder, tmp_path, resume=str(broken)), rewards=REWARDS)
    (broken / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="meta.json is missing"):
        Trainer(flux_config(flux_folder, tmp_path, resume=str(broken)), rewards=REWARDS)
    with pytest.raises(CheckpointError, match="use_lora"):
        Trainer(flux_config(flux_folder, tmp_path, resume=str(checkpoint), use_lora=True), rewards=REWARDS)


@pytest.mark.slow
def test_kill_mid_iteration_and_resume(flux_folder, tmp_path):
    """A CLI run killed (SIGKILL) mid-iteration resumes from its last checkpoint and ends at the
    same iteration count with a valid checkpoint."""
    output = tmp_path / "out"
    config = {"model_family": "flux", "model_path": str(flux_folder), "prompt_file": str(write_prompts(tmp_path / "p.txt")),
              "output_dir": str(output), "height": 16, "width": 16, "num_steps": 4, "group_size": 2,
              "prompts_per_rank": 2, "rollout_batch_size": 4, "train_batch_size": 2, "gradient_accumulation_steps": 2,
              "timestep_fraction": 1.0, "max_sequence_length": 16, "num_iterations": 6, "checkpoint_every": 1,
              "mixed_precision": "no", "progress_bar": False, "tensorboard": False,
              "rewards": [{"name": "jpeg_compressibility", "weight": 1.0}]}
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "dancegrpo_fast.train", "--config", str(config_file)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = output / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert process.poll() is None, process.stderr.read().decode()[-2000:]
    time.sleep(0.3)  # inside iteration 3
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = find_latest(output)
    assert killed_at is not None and int(killed_at.name.split("_")[1]) >= 2
    result = subprocess.run(command + ["--resume", "latest"], cwd=REPO, env=env, capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    latest = find_latest(output)
    assert latest.name == "iter_000006" and (latest / "meta.json").is_file()
    assert json.loads((latest / "meta.json").read_text())["iteration"] == 6
    torch.load(latest / "training_state.pt", weights_only=False)
    rows = [json.loads(line)["iteration"] for line in metrics.read_text().splitlines()]
    assert rows == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_sigterm_stops_after_the_iteration_with_a_checkpoint(flux_folder, tmp_path):
    output = tmp_path / "out"
    command = [sys.executable, "-m", "dancegrpo_fast.train", "--model_path", str(flux_folder),
               "--prompt_file", str(write_prompts(tmp_path / "p.txt")), "--output_dir", str(output),
               "--height", "16", "--width", "16", "--num_steps", "4", "--group_size", "2", "--prompts_per_rank", "2",
               "--rollout_batch_size", "4", "--train_batch_size", "2", "--gradient_accumulation_steps", "2",
               "--max_sequence_length", "16", "--num_iterations", "100", "--checkpoint_every", "50",
               "--mixed_precision", "no", "--progress_bar", "false", "--rewards", "jpeg_compressibility:1.0"]
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = output / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None and not metrics.is_file():
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0, process.stderr.read().decode()[-2000:]
    rows = [json.loads(line)["iteration"] for line in metrics.read_text().splitlines()]
    latest = find_latest(output)
    assert latest is not None and latest.name == f"iter_{rows[-1]:06d}" and rows[-1] < 100


def test_gradient_checkpointing_gives_the_same_update(flux_folder, tmp_path):
    results = []
    for checkpointing in (False, True):
        trainer = Trainer(flux_config(flux_folder, tmp_path / str(checkpointing), gradient_checkpointing=checkpointing),
                          rewards=REWARDS)
        trainer.update(trainer.collect(), torch.tensor([1.0, -1.0, 0.5, -0.5]))
        results.append(_trainable_state(trainer))
    assert all(torch.allclose(results[0][k], results[1][k], atol=1e-6, rtol=0) for k in results[0])


# ----------------------------------------------------------------------------------------------
# Clear errors
# ----------------------------------------------------------------------------------------------


def test_bad_model_paths(flux_folder, tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        Trainer(flux_config(tmp_path / "missing", tmp_path), rewards=REWARDS)
    partial = tmp_path / "partial"
    shutil.copytree(flux_folder, partial)
    shutil.rmtree(partial / "vae")
    with pytest.raises(ModelLoadError, match=r"lacks the component folder\(s\) \['vae'\]"):
        Trainer(flux_config(partial, tmp_path), rewards=REWARDS)
    with pytest.raises(ModelLoadError, match="expects one of"):
        Trainer(flux_config(flux_folder, tmp_path, model_family="sd3"), rewards=REWARDS)
    (partial / "model_index.json").unlink()
    with pytest.raises(ModelLoadError, match="model_index.json is missing"):
        Trainer(flux_config(partial, tmp_path), rewards=REWARDS)


def test_bad_settings(flux_folder, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no prompts"):
        load_prompts(empty)
    with pytest.raises(ValueError, match="holds no prompts"):
        Trainer(flux_config(flux_folder, tmp_path, prompt_file=str(empty)), rewards=REWARDS)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompts(tmp_path / "none.txt")
    with pytest.raises(ValueError, match="group_size must be an integer >= 2"):
        flux_config(flux_folder, tmp_path, group_size=1).validate()
    with pytest.raises(ValueError, match="rollout_batch_size=3 must divide"):
        flux_config(flux_folder, tmp_path, rollout_batch_size=3).validate()
    with pytest.raises(ValueError, match="train_batch_size=3 must divide"):
        flux_config(flux_folder, tmp_path, train_batch_size=3).validate()
    with pytest.raises(ValueError, match="gradient_accumulation_steps=3 must divide"):
        flux_config(flux_folder, tmp_path, gradient_accumulation_steps=3).validate()
    with pytest.raises(ValueError, match="no timestep would be trained"):
        flux_config(flux_folder, tmp_path, num_steps=2, timestep_fraction=0.5).validate()
    with pytest.raises(ValueError, match="needs sampler 'ddim'"):
        flux_config(flux_folder, tmp_path, model_family="sd").validate()
    with pytest.raises(RuntimeError, match="attention_backend 'flash' is not usable"):
        Trainer(flux_config(flux_folder, tmp_path, attention_backend="flash"), rewards=REWARDS)


def test_nan_rewards_skip_the_group_and_go_on(flux_folder, tmp_path):
    calls = []

    def flaky(images, prompts):
        calls.append(1)
        scores = brightness(images, prompts)
        if len(calls) == 1:
            scores[1] = float("nan")  # poisons the first group of iteration 1
        return scores

    trainer = Trainer(flux_config(flux_folder, tmp_path, num_iterations=2), rewards={"flaky": (flaky, 1.0)})
    with pytest.warns(RuntimeWarning, match=r"skipped 1 group\(s\) with NaN/inf rewards \(1 so far\)"):
        rows = trainer.train()
    assert [r["skipped_groups"] for r in rows] == [1, 0]
    assert trainer.iteration == 2 and trainer.skipped_groups_total == 1


def test_reward_that_raises_names_the_reward(flux_folder, tmp_path):
    def broken(images, prompts):
        raise OSError("reward server unreachable")

    trainer = Trainer(flux_config(flux_folder, tmp_path), rewards={"remote_hps": (broken, 1.0), "b": (brightness, 1.0)})
    with pytest.raises(RewardError, match="reward 'remote_hps' failed on a batch of 4 samples: OSError: reward server"):
        trainer.train()
    assert find_latest(trainer.config.runtime.output_dir) is None


def test_several_rewards_and_kl(flux_folder, tmp_path):
    def darkness(images, prompts):
        return 1 - brightness(images, prompts)

    config = flux_config(flux_folder, tmp_path, kl_beta=0.1, advantage="global", use_lora=True, lora_rank=4,
                         lora_target_modules=["to_q", "to_v"])
    trainer = Trainer(config, rewards={"bright": (brightness, 1.0), "dark": (darkness, 0.5)})
    row = trainer.train_iteration()
    assert row["kl"] == 0.0  # the LoRA starts at the base model... only before the first step
    assert "reward/bright/mean" in row and "reward/dark/mean" in row
    full = Trainer(flux_config(flux_folder, tmp_path / "full", kl_beta=0.1), rewards=REWARDS)
    full.train_iteration()
    row = full.train_iteration()
    assert row["kl"] > 0


def test_tiny_preset_trains_from_the_cli(tmp_path, capsys):
    """`--preset tiny`: the shipped tiny model and its registered rule-based reward, end to end;
    the run says what it does at the start and what it did at the end."""
    from dancegrpo_fast.train import main

    prompts = REPO / "dancegrpo_fast" / "tiny" / "prompts" / "train.txt"
    code = main(["--preset", "tiny", "--prompt_file", str(prompts), "--output_dir", str(tmp_path / "out"),
                 "--num_iterations", "1", "--group_size", "4", "--prompts_per_rank", "2", "--rollout_batch_size", "8",
                 "--train_batch_size", "4", "--gradient_accumulation_steps", "2", "--num_steps", "4", "--sde_window_size", "0",
                 "--progress_bar", "false", "--tensorboard", "false", "--eval_num_prompts", "4",
                 "--eval_samples_per_prompt", "1"])
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    # The preset evaluates on the held-out prompts before training and after the last iteration.
    assert [r["iteration"] for r in rows] == [0, 1] and "eval/tiny_geneval/clean" in rows[0]
    row = rows[1]
    assert row["first_step_ratio_max_dev"] == 0.0 and "reward/tiny_geneval/mean" in row
    assert "eval/tiny_geneval/mean" in row and "reward/tiny_geneval/clean" in row
    assert (find_latest(tmp_path / "out") / "model" / "transformer" / "config.json").is_file()
    # the end of the run exports the last checkpoint as a diffusers folder
    assert (tmp_path / "out" / "export" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    for name in ("reward_curve.png", "before_after.png"):
        assert (tmp_path / "out" / name).is_file(), name
    printed = capsys.readouterr().out
    assert "DanceGRPO: tiny model from its shipped weights" in printed
    assert f"output      {tmp_path / 'out'}" in printed
    assert "  attention   native (" in printed and "layers) (attention_backend=auto)" in printed
    before, after = rows[0]["eval/tiny_geneval/mean"], row["eval/tiny_geneval/mean"]
    assert f"held-out tiny_geneval    {before:.3f} -> {after:.3f}" in printed, printed
    assert "    clean " in printed and "fully_correct" in printed
    assert f"last checkpoint   {find_latest(tmp_path / 'out')}" in printed
    assert f"diffusers export  {tmp_path / 'out' / 'export'} (from_pretrained" in printed
    assert f"--output_dir {tmp_path / 'out'} --resume latest --num_iterations 2" in printed


def test_tensorboard_gets_the_scalars_when_installed(tmp_path, monkeypatch):
    """TensorBoard is optional; when `torch.utils.tensorboard` imports, every numeric column of
    the JSONL row goes to it (a recording SummaryWriter stands in for the real one here)."""
    import types

    from dancegrpo_fast.logging_utils import MetricsLogger

    recorded = []

    class RecordingWriter:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            recorded.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=RecordingWriter))
    logger = MetricsLogger(tmp_path, tensorboard=True)
    logger.log({"iteration": 3, "loss": 0.5, "reward/hps/mean": 0.25, "note": "text"})
    logger.close()
    assert sorted(recorded) == [("loss", 0.5, 3), ("reward/hps/mean", 0.25, 3)]
    assert logger.writer.log_dir == str(tmp_path / "tensorboard")
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["note"] == "text"


def test_offloaded_text_encoders_move_only_to_encode_new_prompts(flux_folder, tmp_path):
    trainer = Trainer(flux_config(flux_folder, tmp_path, offload_text_encoders=True), rewards=REWARDS)
    policy = trainer.policy
    assert policy.text_encoder_names == ["text_encoder", "text_encoder_2"]
    moves = []
    original = policy._text_encoders_to
    policy._text_encoders_to = lambda device: (moves.append(str(device)), original(device))
    first = policy.encode(["a red cat", "a blue dog"])
    again = policy.encode(["a blue dog", "a red cat"])  # cached: no move
    assert moves == [str(policy.device), "cpu"]
    assert torch.equal(first["prompt_embeds"][0], again["prompt_embeds"][1])
    assert all(p.device.type == "cpu" for name in policy.text_encoder_names
               for p in policy.pipe.components[name].parameters())
    trainer.train_iteration()


def test_reward_overlap_gives_the_same_scores(flux_folder, tmp_path):
    """Scoring each rollout batch in the background while the next samples changes nothing but
    the timing: same samples, same scores, in the same order, and the prompts stay paired."""
    seen = []

    def prompt_length(images, prompts):
        seen.append(list(prompts))
        return torch.tensor([float(len(p)) for p in prompts]) + brightness(images, prompts)

    results = {}
    for overlap in (False, True):
        trainer = Trainer(flux_config(flux_folder, tmp_path / str(overlap), reward_overlap=overlap, rollout_batch_size=2),
                          rewards={"len": (prompt_length, 1.0)})
        trajectory, samples, scores, _ = trainer.collect_and_score()
        results[overlap] = (trajectory, samples, scores)
        expected = torch.tensor([float(len(p)) for p in trajectory.sample_prompts()]) + brightness(samples, None)
        assert torch.allclose(scores["len"], expected)
    (t0, s0, r0), (t1, s1, r1) = results[False], results[True]
    assert torch.equal(t0.latents, t1.latents) and torch.allclose(s0, s1) and torch.allclose(r0["len"], r1["len"])
    assert len(seen[-1]) == 2  # with overlap the reward saw rollout batches of 2, not the whole batch
