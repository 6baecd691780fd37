"""The sliding SDE window (MixGRPO): where it sits at each iteration, its configuration, and the
trainer with it: only window steps are stochastic and trained, the ratio is exactly 1 on-policy,
the position is logged and a resumed run finds it where the interrupted one left it."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers.fixtures import _single_thread, flux_folder, torch_backend  # noqa: E402,F401  (fixtures)
from helpers.tiny_models import flux_train_config  # noqa: E402

from dancegrpo_fast.config import TrainConfig  # noqa: E402
from dancegrpo_fast.sde_window import interval, window_start, window_steps  # noqa: E402
from dancegrpo_fast.train import Trainer  # noqa: E402


class StatefulWindow:
    """MixGRPO's own form of the schedule: a state updated once after every iteration. The
    trainer's window_start replays it from the iteration number; the two must agree."""

    def __init__(self, num_steps, start, size, stride, every, every_min, schedule, roll_back):
        self.start, self.stride, self.every, self.every_min = start, stride, every, every_min
        self.schedule, self.roll_back = schedule, roll_back
        self.last = num_steps - 1 - size
        self.position, self.count = start, 0

    def interval(self):
        if self.schedule == "progressive":
            return self.every
        if self.schedule == "decay":
            p = (self.position - self.start) / (self.last - self.start)
            return max(self.every_min, int(self.every * (1 - p) + self.every_min * p))
        return math.ceil(self.every * math.exp(-0.1 * max(0, self.position - 13)))

    def update(self):
        self.count += 1
        if self.count >= self.interval():
            self.count = 0
            self.position += self.stride
            if self.position > self.last:
                self.position = self.start if self.roll_back else self.last


def test_progressive_moves_by_stride_every_k_iterations_and_rolls_back():
    kw = dict(num_steps=8, start=1, size=2, stride=2, every=3, schedule="progressive")
    # Trainable steps 0..6; a 2-step window may start at 1, 3 or 5; the next move (7) rolls back.
    got = [window_start(i, roll_back=True, **kw) for i in range(12)]
    assert got == [1, 1, 1, 3, 3, 3, 5, 5, 5, 1, 1, 1]
    stopped = [window_start(i, roll_back=False, **kw) for i in range(12)]
    assert stopped == [1, 1, 1, 3, 3, 3, 5, 5, 5, 5, 5, 5]
    assert window_steps(4, **{k: v for k, v in kw.items()}) == [3, 4]


def test_decay_shrinks_the_interval_linearly_from_every_to_every_min():
    # Positions 0..5 (8 steps, size 2): intervals int(10 (1 - p) + 1 p), p = position / 5.
    assert [interval("decay", pos, 0, 5, 10, 1) for pos in range(6)] == [10, 8, 6, 4, 2, 1]
    moves = [i for i in range(1, 40) if window_start(i, 8, 0, 2, 1, 10, 1, "decay")
             != window_start(i - 1, 8, 0, 2, 1, 10, 1, "decay")]
    assert moves == [10, 18, 24, 28, 30, 31]  # the last move rolls back to 0
    assert window_start(31, 8, 0, 2, 1, 10, 1, "decay") == 0


def test_exp_decay_interval_is_constant_to_step_13_then_shrinks():
    assert [interval("exp_decay", pos, 0, 30, 25, 1) for pos in (0, 13, 14, 20, 30)] == \
        [25, 25, math.ceil(25 * math.exp(-0.1)), math.ceil(25 * math.exp(-0.7)), math.ceil(25 * math.exp(-1.7))]


@pytest.mark.parametrize("schedule", ["progressive", "decay", "exp_decay"])
@pytest.mark.parametrize("roll_back", [True, False])
def test_the_position_is_a_function_of_the_iteration(schedule, roll_back):
    params = dict(num_steps=25, start=2, size=4, stride=1, every=6, every_min=2, schedule=schedule, roll_back=roll_back)
    state = StatefulWindow(**params)
    for iteration in range(200):
        assert window_start(iteration, **params) == state.position, iteration
        state.update()


def test_fixed_and_full_windows_do_not_move():
    assert window_start(1000, 16, 4, 3, schedule="fixed") == 4
    assert window_steps(57, 6, 0, 0, schedule="progressive") == list(range(6))


def test_config_gives_the_window_of_an_iteration():
    c = TrainConfig.from_dict(dict(num_steps=8, sde_window_size=2, sde_window_schedule="progressive",
                                   sde_window_every=5, timestep_fraction=1.0)).validate()
    assert c.sampler.window_slides
    assert c.sampler.sde_steps(0) == [0, 1] and c.sampler.sde_steps(5) == [1, 2] and c.sampler.sde_steps(30) == [0, 1]
    assert c.sampler.trainable_steps(27) == [5, 6] and c.trained_timesteps() == 2
    assert not TrainConfig.from_dict(dict(num_steps=8, sde_window_size=2)).sampler.window_slides


@pytest.mark.parametrize("values, message", [
    (dict(sde_window_schedule="linear", sde_window_size=2), "sde_window_schedule must be one of"),
    (dict(sde_window_schedule="progressive"), "set sde_window_size >= 1"),
    (dict(sde_window_schedule="progressive", sde_window_size=2, sde_window_start=6),
     r"must lie among the trainable steps \[0, num_steps - 1 = 7\)"),
    (dict(sde_window_stride=0), "sde_window_stride must be an integer >= 1"),
    (dict(sde_window_every=2, sde_window_every_min=3), "sde_window_every_min=3 must be <= sde_window_every=2"),
    (dict(ode_order=3), "ode_order must be 1 or 2"),
    (dict(ode_steps_fraction=0.0), r"ode_steps_fraction must lie in \(0, 1\]"),
    (dict(eval_sde_steps="none"), "eval_sde_steps must be 'rollout' or 'all'"),
])
def test_bad_window_settings_name_the_setting(values, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(dict(num_steps=8, timestep_fraction=1.0, **values)).validate()


# ----------------------------------------------------------------------------------------------
# The trainer with a sliding window (tiny FLUX, PyTorch step ops)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _torch_ops(torch_backend):
    """The trainer's loop, not the kernels."""


def brightness(images, prompts):
    return images.float().mean(dim=tuple(range(1, images.dim())))


SLIDING = dict(num_steps=6, sde_window_size=2, sde_window_schedule="progressive", sde_window_every=1,
               sde_window_stride=1, ode_order=2, ode_steps_fraction=0.5, max_grad_norm=0.0, checkpoint_every=1)


def make_trainer(folder, tmp_path, **overrides) -> Trainer:
    config = flux_train_config(folder, tmp_path, **{**SLIDING, **overrides})
    return Trainer(config, rewards={"brightness": (brightness, 1.0)})


def test_only_window_steps_are_stochastic_and_trained_and_the_ratio_is_one(flux_folder, tmp_path, monkeypatch):
    trainer = make_trainer(flux_folder, tmp_path, num_iterations=4)
    predicted = []
    original = trainer.updater.policy.predict

    def spy(latents, step, *args, **kwargs):
        predicted.append((trainer.iteration, torch.is_grad_enabled(), sorted(set(step.tolist()))))
        return original(latents, step, *args, **kwargs)

    monkeypatch.setattr(trainer.policy, "predict", spy)
    seen = []
    collect = trainer.collect

    def keep(*args, **kwargs):
        trajectory = collect(*args, **kwargs)
        seen.append(trajectory)
        return trajectory

    monkeypatch.setattr(trainer, "collect", keep)
    rows = trainer.train()
    assert [r["sde_window_start"] for r in rows] == [0, 1, 2, 3]  # last start: 6 - 1 - 2 = 3
    assert all(r["sde_window_size"] == 2 for r in rows)
    for it, (row, trajectory) in enumerate(zip(rows, seen)):
        window = [it, it + 1]
        outside = [i for i in range(6) if i not in window]
        assert trajectory.sde.tolist() == [i in window for i in range(6)]
        assert torch.isfinite(trajectory.log_probs[:, window]).all() and torch.isnan(trajectory.log_probs[:, outside]).all()
        # The window's own latents are kept (they are trained); the final sample is there.
        assert torch.isfinite(trajectory.latents[:, window[0]:window[1] + 2]).all()
        assert torch.isfinite(trajectory.final_latents).all()
        # Trained with grad at the window's steps only.
        trained = {s for i, grad, steps in predicted if i == it and grad for s in steps}
        assert trained == set(window)
        # On-policy: ratio exactly 1, and the training-time log-prob is the rollout's.
        assert row["ratio_max_dev"] == 0.0 and row["first_step_ratio_max_dev"] == 0.0
        assert row["log_prob_gap"] < 1e-4
    # Model evaluations: 4 samples; rollout 2 window steps + fewer ODE steps around them; training
    # 4 samples x 2 steps forward and backward.
    plans = [0 + 2 + 2, 1 + 2 + 2, 1 + 2 + 1, 2 + 2 + 1]  # prefix, window, suffix: ceil(n / 2) steps per stretch
    assert [r["nfe_rollout"] for r in rows] == [4 * n for n in plans]
    assert all(r["nfe_train_forward"] == 8 and r["nfe_train_backward"] == 8 for r in rows)
    assert rows[-1]["nfe_total"] == sum(r["nfe_rollout"] + 16 for r in rows)


def test_the_rollout_is_reproducible_bit_for_bit(flux_folder, tmp_path):
    first = make_trainer(flux_folder, tmp_path / "a")
    second = make_trainer(flux_folder, tmp_path / "b")
    for trainer in (first, second):
        trainer.iteration = 2
        trainer._place_window()
    a, b = first.collect(), second.collect()
    torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(a.log_probs, b.log_probs, rtol=0, atol=0, equal_nan=True)
    assert a.sde.tolist() == [False, False, True, True, False, False]


def _rows(folder):
    return [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


def test_a_resumed_run_finds_the_window_where_it_was(flux_folder, tmp_path):
    straight = make_trainer(flux_folder, tmp_path / "straight", num_iterations=5, sde_window_every=2)
    straight.train()
    make_trainer(flux_folder, tmp_path / "cut", num_iterations=2, sde_window_every=2).train()
    resumed = make_trainer(flux_folder, tmp_path / "cut", num_iterations=5, sde_window_every=2,
                           output_dir=str(tmp_path / "cut" / "out"), resume="latest")
    assert resumed.iteration == 2
    resumed.train()
    a, b = _rows(tmp_path / "straight" / "out"), _rows(tmp_path / "cut" / "out")
    keys = ("iteration", "sde_window_start", "nfe_rollout", "nfe_total")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    assert [r["sde_window_start"] for r in a] == [0, 0, 1, 1, 2]
    assert [r["reward/brightness/mean"] for r in a] == pytest.approx([r["reward/brightness/mean"] for r in b], abs=1e-6)
