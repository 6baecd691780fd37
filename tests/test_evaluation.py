"""Held-out evaluation in the trainer (dancegrpo_fast.evaluator, rollout.sample_fixed, reports): fixed
prompts and noise, the tiny task's sampling, per-criterion logging, grids, curve, before/after,
resume, config validation."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers.fixtures import _single_thread, torch_backend  # noqa: E402,F401  (fixtures)
from helpers.tiny_models import write_prompts  # noqa: E402

import dancegrpo_fast.tiny.reward  # noqa: E402,F401  (registers tiny_geneval)
from dancegrpo_fast import reports  # noqa: E402
from dancegrpo_fast.config import RewardSpec, TrainConfig, apply_preset  # noqa: E402
from dancegrpo_fast.distributed import DistributedState  # noqa: E402
from dancegrpo_fast.evaluator import evaluate_policy  # noqa: E402
from dancegrpo_fast.noise import eval_seeds, grouped_noise, seed_for_step  # noqa: E402
from dancegrpo_fast.rewards import build_reward  # noqa: E402
from dancegrpo_fast.rollout import rollout, sample_fixed  # noqa: E402
from dancegrpo_fast.sde import dance_step, flow_sigmas  # noqa: E402
from dancegrpo_fast.tiny.evaluate import evaluate as tiny_evaluate  # noqa: E402
from dancegrpo_fast.tiny.evaluate import load_policy, load_split_prompts  # noqa: E402
from dancegrpo_fast.train import Trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CRITERIA_KEYS = ("color", "count", "shape", "position", "clean", "fully_correct")


def tiny_config(tmp_path, **overrides) -> TrainConfig:
    """The tiny preset (its prompt lists, reward and reward module), made small."""
    values = dict(output_dir=str(Path(tmp_path) / "out"), height=32, width=32, num_steps=3, sde_window_size=0,
                  eta=0.5, shift=3.0, group_size=2, prompts_per_rank=2, rollout_batch_size=4, train_batch_size=2,
                  gradient_accumulation_steps=2, timestep_fraction=1.0, lr=1e-3, num_iterations=2,
                  mixed_precision="no", progress_bar=False, tensorboard=False, seed=3, threads=1,
                  rewards=[RewardSpec("tiny_geneval")], eval_every=1, eval_num_prompts=6, eval_samples_per_prompt=1,
                  checkpoint_every=1)
    values.update(overrides)
    return TrainConfig.from_dict(values, apply_preset("tiny"))


def _rows(trainer_or_dir):
    output = trainer_or_dir.config.runtime.output_dir if isinstance(trainer_or_dir, Trainer) else trainer_or_dir
    return [json.loads(line) for line in (Path(output) / "metrics.jsonl").read_text().splitlines()]


def _is_png(path) -> bool:
    from PIL import Image

    with Image.open(path) as image:
        image.verify()
        return image.format == "PNG"


def _without_time(metrics):
    return {k: v for k, v in metrics.items() if not k.startswith("seconds")}


@pytest.fixture(scope="module", autouse=True)
def _torch_ops(torch_backend):
    """This file tests the trainer's loop, not the kernels."""


@pytest.fixture(scope="module")
def policy():
    return load_policy(num_steps=4, eta=0.5, shift=3.0)


# ----------------------------------------------------------------------------------------------
# sample_fixed / evaluate_policy
# ----------------------------------------------------------------------------------------------


def test_sample_fixed_is_the_training_rollout_with_fixed_seeds(policy):
    """Evaluation samples exactly what the training rollout samples from the same seeds (one
    sample per prompt: initial noise from the entry's noise seed, steps from its step seed), and
    each step of that rollout is the reference DanceGRPO SDE step (sde.dance_step, float64
    noise from noise.seed_for_step) of the model output."""
    prompts = load_split_prompts("heldout")[:5]
    schedule = policy.schedule()
    images = sample_fixed(policy, schedule, prompts, 7, 2)
    assert images.shape == (5, 3, 32, 32) and 0 <= float(images.min()) and float(images.max()) <= 1
    noise_seeds, step_seeds = eval_seeds(7, range(5))
    trajectory = rollout(policy, schedule, prompts, 1, torch.arange(5), noise_seeds, step_seeds, 5,
                         shared_noise=True, mixed_precision="no")
    torch.testing.assert_close(images, policy.decode(trajectory.final_latents), rtol=0, atol=1e-5)
    shape = tuple(policy.latent_shape())
    torch.testing.assert_close(trajectory.latents[:, 0], grouped_noise(noise_seeds, 1, shape), rtol=0, atol=0)
    sigmas = flow_sigmas(schedule.num_steps, 3.0, dtype=torch.float64)
    cond = policy.encode(prompts)
    with torch.no_grad():
        for i in range(schedule.num_steps):
            x, x_next = trajectory.latents[:, i], trajectory.latents[:, i + 1]
            v = policy.predict(x, torch.full((5,), i), cond, schedule)
            reference = dance_step(v, x, float(sigmas[i]), float(sigmas[i + 1]), 0.5, prev_sample=x_next)
            noise = grouped_noise(seed_for_step(step_seeds, i), 1, shape)
            expected = reference.mean + reference.std.view(-1, 1, 1) * noise
            torch.testing.assert_close(x_next, expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(trajectory.log_probs[:, i], reference.log_prob, rtol=1e-5, atol=1e-5)
    # Per-entry noise: any batch size and any split of the entries give the same samples.
    torch.testing.assert_close(sample_fixed(policy, schedule, prompts, 7, 5), images, rtol=0, atol=1e-5)
    odd = sample_fixed(policy, schedule, prompts[1::2], 7, 2, indices=[1, 3])
    torch.testing.assert_close(odd, images[1::2], rtol=0, atol=1e-5)
    assert not torch.allclose(sample_fixed(policy, schedule, prompts, 8, 2), images)
    assert policy.model.training is False  # load_policy's eval mode is kept


def test_evaluate_policy_metrics_and_ranks(policy, monkeypatch):
    prompts = load_split_prompts("heldout")[:5]
    rewards = {"tiny_geneval": build_reward("tiny_geneval"),
               "brightness": lambda images, p: images.mean(dim=(1, 2, 3))}
    metrics, images, details = evaluate_policy(policy, policy.schedule(), prompts, rewards, samples_per_prompt=2,
                                               seed=1, batch_size=4, return_details=True)
    expected = {"eval/tiny_geneval/mean", "eval/brightness/mean"} | {f"eval/tiny_geneval/{k}" for k in CRITERIA_KEYS}
    assert set(metrics) == expected and all(math.isfinite(v) for v in metrics.values())
    assert images.shape == (10, 3, 32, 32) and details["indices"].tolist() == list(range(10))
    assert details["prompts"] == [p for p in prompts for _ in range(2)]
    # The tiny evaluate CLI's numbers are the trainer's eval numbers (same sampling, same reward).
    cli = tiny_evaluate(policy, prompts, samples_per_prompt=2, seed=1)
    for key in CRITERIA_KEYS:
        assert metrics[f"eval/tiny_geneval/{key}"] == pytest.approx(cli[key], abs=1e-6)
    assert metrics["eval/tiny_geneval/mean"] == pytest.approx(cli["score"], abs=1e-6)
    again, _ = evaluate_policy(policy, policy.schedule(), prompts, rewards, 2, 1, 3)
    assert again == pytest.approx(metrics, abs=1e-6)

    # Two ranks (the collective replaced by a sum over the ranks' contributions): rank r samples
    # entries r::2, the short rank pads to the same number of model calls, means match 1 rank.
    totals, calls = [], []
    monkeypatch.setattr("dancegrpo_fast.evaluator.all_reduce_sum", lambda t, s: (totals.append(t), t)[1])
    original = policy.predict
    monkeypatch.setattr(policy, "predict", lambda *a, **k: (calls.append(1), original(*a, **k))[1])
    shares, calls_per_rank = [], []
    for rank in (0, 1):
        state = DistributedState(rank=rank, world_size=2)
        shares.append(evaluate_policy(policy, policy.schedule(), prompts[:3], rewards, 3, 1, 2, state=state,
                                      return_details=True))
        calls_per_rank.append(len(calls) - sum(calls_per_rank))
    assert calls_per_rank == [3 * 4, 3 * 4]  # 9 entries: 5 and 4 (+1 padding) -> 3 batches of 2, 4 steps each
    combined = totals[0] + totals[1]
    single, single_images = evaluate_policy(policy, policy.schedule(), prompts[:3], rewards, 3, 1, 4)
    for j, key in enumerate(single):
        assert float(combined[0, j] / combined[1, j]) == pytest.approx(single[key], abs=1e-5)
    assert [s[2]["indices"].tolist() for s in shares] == [[0, 2, 4, 6, 8], [1, 3, 5, 7]]
    torch.testing.assert_close(shares[0][1], single_images[0::2], rtol=0, atol=1e-5)
    torch.testing.assert_close(shares[1][1], single_images[1::2], rtol=0, atol=1e-5)


def test_binary_reward_passes_criteria_through(policy):
    from dancegrpo_fast.tiny import task

    prompts = task.sample_prompts("heldout", 8, seed=1)
    images = task.render_batch(prompts, seed=2)
    images[::2] = torch.rand_like(images[::2])
    binary = build_reward("tiny_geneval_binary", threshold=0.9)
    parts = binary.criteria(images, prompts)
    assert set(parts) == {"color", "count", "shape", "position", "clean", "score", "inner_score"}
    assert torch.equal(parts["score"], binary(images, prompts))
    assert torch.equal(parts["inner_score"], build_reward("tiny_geneval")(images, prompts))
    assert build_reward("binary", reward="jpeg_compressibility", threshold=0.0).criteria is None
    # In the eval: the wrapped reward's criteria, its score, and "fully correct" judged on it.
    prompts = load_split_prompts("heldout")[:3]
    metrics, _, details = evaluate_policy(policy, policy.schedule(), prompts, {"bin": binary}, 1, 0, 4,
                                          return_details=True)
    assert set(metrics) == {f"eval/bin/{k}" for k in ("mean", "inner_score", *CRITERIA_KEYS)}
    inner = details["scores"]["bin/inner_score"]
    assert metrics["eval/bin/fully_correct"] == pytest.approx(float((inner > 0.99).float().mean()))
    assert metrics["eval/bin/mean"] == pytest.approx(float((inner > 0.9).float().mean()))


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------


def test_evaluate_cli_with_an_sde_window_prints_the_trainers_iteration_0_numbers(tmp_path, capsys):
    """The tiny preset samples with an SDE window (ODE steps outside it); `tiny.evaluate` with the
    same window flags prints exactly the trainer's held-out numbers at iteration 0, and a window
    that differs (every step SDE) gives other numbers, so the flags are not ignored."""
    from dancegrpo_fast.tiny.evaluate import main as evaluate_main

    window = dict(num_steps=4, sde_window_start=1, sde_window_size=2)
    trainer = Trainer(tiny_config(tmp_path, eval_num_prompts=4, eval_samples_per_prompt=2, eval_seed=5, **window))
    assert trainer.evaluator.schedule.sde.tolist() == [False, True, True, False]
    metrics = trainer.evaluator.evaluate(0)
    flags = ["--num_prompts", "4", "--samples_per_prompt", "2", "--seed", "5", "--num_steps", "4", "--eta", "0.5",
             "--shift", "3.0", "--threads", "0"]

    def cli(*extra):
        assert evaluate_main(flags + list(extra)) == 0
        out = capsys.readouterr().out
        return json.loads(out[out.index("{"):])

    same = cli("--sde_window_start", "1", "--sde_window_size", "2")
    for key in CRITERIA_KEYS:
        assert same[key] == pytest.approx(metrics[f"eval/tiny_geneval/{key}"], abs=1e-6), key
    assert same["score"] == pytest.approx(metrics["eval/tiny_geneval/mean"], abs=1e-6)
    every_step = cli("--sde_window_size", "0")
    assert every_step["score"] != pytest.approx(same["score"], abs=1e-6)
    with pytest.raises(SystemExit):
        evaluate_main(flags + ["--sde_window_start", "3", "--sde_window_size", "2"])
    assert "--sde_window_start 3 --sde_window_size 2" in capsys.readouterr().err


def test_trainer_evaluates_before_every_k_and_at_the_end(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, num_iterations=3, eval_every=2))
    assert len(trainer.evaluator.prompts) == 6 and torch.get_num_threads() == 1
    rows = trainer.train()
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3] == [r["iteration"] for r in _rows(trainer)]
    eval_keys = {"eval/tiny_geneval/mean", "seconds_eval"} | {f"eval/tiny_geneval/{k}" for k in CRITERIA_KEYS}
    for row in rows:
        evaluated = row["iteration"] in (0, 2, 3)
        assert (set(row) >= eval_keys) == evaluated and (set(row) & eval_keys == set()) == (not evaluated)
        if evaluated:
            assert all(math.isfinite(row[k]) for k in eval_keys), row
        if row["iteration"] > 0:  # training rows: per-criterion means of the training reward
            for key in ("mean", "std", "color", "count", "shape", "position"):
                assert f"reward/tiny_geneval/{key}" in row
            assert "reward/tiny_geneval/score" not in row
            assert row["samples_per_second"] == pytest.approx(
                4 / (row["seconds_rollout"] + row["seconds_reward"] + row["seconds_update"]))
    out = Path(trainer.config.runtime.output_dir)
    for name in ("eval_iter_000000.png", "eval_iter_000002.png", "eval_iter_000003.png"):
        assert _is_png(out / "samples" / name)
    from PIL import Image

    # 6 samples, enlarged 4x, 4 per row, each with its prompt and score in a caption band below.
    grid = Image.open(out / "samples" / "eval_iter_000000.png").convert("L")
    width, height = grid.size
    band = height // 2 - 128
    assert width == 4 * 128 and band >= 11
    caption = torch.tensor(list(grid.crop((0, 128, 128, 128 + band)).getdata()), dtype=torch.float32)
    assert (caption == 255).float().mean() > 0.5 and (caption < 128).any()  # white band with dark text
    assert not (out / "samples" / "eval_iter_000001.png").exists()
    assert _is_png(out / "reward_curve.png") and _is_png(out / "before_after.png")
    before = torch.load(out / "samples" / "eval_before.pt", weights_only=True)
    assert before["indices"] == list(range(6)) and before["images"].dtype == torch.uint8
    # Same model, same eval: identical metrics; and the iteration-0 eval was of the initial model.
    first = trainer.evaluator.evaluate(trainer.iteration)
    assert _without_time(first) == _without_time(trainer.evaluator.evaluate(trainer.iteration))
    assert _without_time(first) == pytest.approx(_without_time({k: v for k, v in rows[-1].items()
                                                                if k.startswith("eval/")}), abs=1e-6)


def test_eval_leaves_training_unchanged_and_resume_does_not_repeat_iteration_0(tmp_path):
    plain = Trainer(tiny_config(tmp_path / "plain", eval_every=0))
    plain.train()
    first = Trainer(tiny_config(tmp_path / "eval", num_iterations=1))
    first.train()
    resumed = Trainer(tiny_config(tmp_path / "eval", num_iterations=2, resume="latest"))
    assert resumed.iteration == 1
    resumed.train()
    trained = {n: p for n, p in plain.policy.model.named_parameters()}
    for name, param in resumed.policy.model.named_parameters():
        torch.testing.assert_close(param, trained[name], rtol=0, atol=1e-6)
    rows = _rows(resumed)
    assert [r["iteration"] for r in rows] == [0, 1, 2] and "eval/tiny_geneval/mean" in rows[0]
    assert all("eval/tiny_geneval/mean" in r for r in rows)
    # The before/after sheet of the resumed run pairs the iteration-0 samples saved by the first.
    assert _is_png(Path(resumed.config.runtime.output_dir) / "before_after.png")
    plain_rows = _rows(plain)
    assert [r["iteration"] for r in plain_rows] == [1, 2] and not any(k.startswith("eval/") for k in plain_rows[0])
    assert not (Path(plain.config.runtime.output_dir) / "reward_curve.png").exists()


def test_a_stopped_run_evaluates_its_last_iteration(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, num_iterations=4, eval_every=3, eval_num_prompts=2))
    original = trainer.train_iteration

    def one_then_stop():
        trainer.stop.requested = True  # as SIGTERM does: stop after this iteration
        return original()

    trainer.train_iteration = one_then_stop
    rows = trainer.train()
    assert [(r["iteration"], "eval/tiny_geneval/mean" in r) for r in rows] == [(0, True), (1, False), (1, True)]
    assert [r["iteration"] for r in _rows(trainer)] == [0, 1, 1]
    out = Path(trainer.config.runtime.output_dir)
    assert _is_png(out / "samples" / "eval_iter_000001.png") and _is_png(out / "before_after.png")
    resumed = Trainer(tiny_config(tmp_path, num_iterations=2, eval_every=3, eval_num_prompts=2, resume="latest"))
    assert resumed.iteration == 1 and [r["iteration"] for r in _rows(resumed)] == [0, 1, 1]


def test_advantage_inputs_unchanged_by_criteria(tmp_path, monkeypatch):
    import dancegrpo_fast.train as train_module

    trainer = Trainer(tiny_config(tmp_path, eval_every=0))
    trajectory, samples, scores, _ = trainer.collect_and_score()
    prompts = trajectory.sample_prompts()
    assert torch.equal(scores["tiny_geneval"], build_reward("tiny_geneval")(samples, prompts))
    assert {"tiny_geneval/color", "tiny_geneval/position", "tiny_geneval/score"} <= set(scores)
    seen = []
    original = train_module.compute_advantages
    monkeypatch.setattr(train_module, "compute_advantages",
                        lambda scores, *a, **k: (seen.append(dict(scores)), original(scores, *a, **k))[1])
    row = trainer.train_iteration()
    assert list(seen[0]) == ["tiny_geneval"]
    assert row["reward/tiny_geneval/mean"] == pytest.approx(float(seen[0]["tiny_geneval"].mean()))


def test_eval_config_validation_and_prompt_file(tmp_path):
    for field, value, message in (("eval_every", -1, "eval_every must be an integer >= 0"),
                                  ("eval_num_prompts", -2, "eval_num_prompts must be an integer >= 0"),
                                  ("eval_samples_per_prompt", 0, "eval_samples_per_prompt must be an integer >= 1"),
                                  ("threads", -1, "threads must be an integer >= 0")):
        with pytest.raises(ValueError, match=message):
            tiny_config(tmp_path, **{field: value}).validate()
    with pytest.raises(FileNotFoundError, match="eval_prompt_file .* does not exist"):
        Trainer(tiny_config(tmp_path, eval_prompt_file=str(tmp_path / "missing.txt")))
    custom = Trainer(tiny_config(tmp_path, eval_prompt_file=str(write_prompts(tmp_path / "e.txt", ["a red circle"] * 3)),
                                 eval_num_prompts=0, output_dir=str(tmp_path / "custom")))
    assert custom.evaluator.prompts == ["a red circle"] * 3
    assert Trainer(tiny_config(tmp_path, eval_every=0, output_dir=str(tmp_path / "off"))).evaluator.prompts == []
    from dancegrpo_fast.config import parse_config

    config = parse_config(["--preset", "tiny", "--eval_every", "5", "--eval_seed", "3", "--threads", "1"])
    assert (config.eval.every, config.eval.seed, config.runtime.threads) == (5, 3, 1)


def test_reward_curve_without_matplotlib_warns_once(tmp_path, monkeypatch):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in [
        {"iteration": 0, "eval/r/mean": 0.1}, {"iteration": 1, "reward/r/mean": 0.2}, {"iteration": 9, "x": 1},
        {"iteration": 1, "reward/r/mean": 0.5}]) + "\n{broken")
    rows = reports.read_metrics(metrics)
    assert [r["iteration"] for r in rows] == [1]  # a fresh run appended to an old file: only its rows
    assert reports.moving_average([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    monkeypatch.setattr(reports, "_warned_no_matplotlib", False)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.warns(RuntimeWarning, match="matplotlib is not installed"):
        assert reports.plot_reward_curve(metrics, tmp_path / "curve.png") is None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert reports.plot_reward_curve(metrics, tmp_path / "curve.png") is None
    assert not (tmp_path / "curve.png").exists()


# ----------------------------------------------------------------------------------------------
# Two processes (gloo): the real reduction, FSDP2 with an uneven share of eval prompts
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_ranks_give_the_eval_of_one(tmp_path):
    """FSDP2 on 2 processes, 5 eval prompts (an uneven share: rank 1 pads to rank 0's number of
    model calls, or the sharded forwards would hang): the iteration-0 eval equals one process's."""
    from helpers.tiny_models import make_flux

    folder = make_flux(tmp_path / "flux")
    runner = REPO / "tests" / "helpers" / "dist_runner.py"
    config = {"model_family": "flux", "model_path": str(folder), "prompt_file": str(write_prompts(tmp_path / "p.txt")),
              "eval_prompt_file": str(write_prompts(tmp_path / "e.txt", ["a red cat", "a blue dog", "a green tree",
                                                                         "a small house", "a bird in the sky"])),
              "eval_every": 1, "output_dir": str(tmp_path / "two"), "height": 16, "width": 16, "num_steps": 2,
              "group_size": 2, "prompts_per_rank": 1, "rollout_batch_size": 2, "train_batch_size": 2,
              "gradient_accumulation_steps": 1, "timestep_fraction": 1.0, "max_sequence_length": 16, "lr": 1e-3,
              "num_iterations": 1, "progress_bar": False, "tensorboard": False, "mixed_precision": "no", "seed": 5,
              "parallel": "fsdp"}
    (tmp_path / "two.json").write_text(json.dumps(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "DANCEGRPO_FAST_BACKEND": "torch"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(runner), str(tmp_path / "two.json"), str(tmp_path / "two.pt")], cwd=REPO, env=env,
                            capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr.decode()[-4000:]
    rows = _rows(tmp_path / "two")
    assert [r["iteration"] for r in rows] == [0, 1] and all("eval/brightness/mean" in r for r in rows)
    single = Trainer(TrainConfig.from_dict({**config, "parallel": "ddp", "output_dir": str(tmp_path / "one")}),
                     rewards={"brightness": (lambda images, p: images.mean(dim=(1, 2, 3)), 1.0)})
    assert single.evaluator.evaluate(single.iteration)["eval/brightness/mean"] == pytest.approx(rows[0]["eval/brightness/mean"], abs=1e-5)
    assert _is_png(tmp_path / "two" / "samples" / "eval_iter_000001.png")
