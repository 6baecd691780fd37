"""Where the SDE window sits at each iteration: MixGRPO's sliding window (arXiv 2507.21802).

Outside the window the sampler takes deterministic (ODE) steps that are never trained; inside it
takes stochastic steps, and only those are trained. MixGRPO starts the window at the high-noise
end (step `start`) and moves it `stride` steps toward low noise every `every` iterations:

    fixed        the window stays at `start` (what sde_window_start / sde_window_size always did)
    progressive  moves every `every` iterations
    decay        moves after an interval that shrinks linearly with the window's progress, from
                 `every` iterations at the first position to `every_min` at the last one:
                 interval = max(every_min, int(every * (1 - p) + every_min * p)), p = position / last
                 (MixGRPO's "decay" strategy; it spends the most iterations on the high-noise steps,
                 where the reward is decided)
    exp_decay    interval = ceil(every * exp(-0.1 * max(0, position - 13))): constant until step 13,
                 then exponentially shorter (MixGRPO's "exp_decay", its constants)

When the window would pass the last trainable step (num_steps - 2: the last transition is never
trained) it goes back to `start` (roll_back, MixGRPO's default) or stays at the end. Unlike
MixGRPO, whose window is cut short at the low-noise end, the window here always holds `size` steps,
so every iteration trains the same number of steps.

The position is a pure function of the iteration number (the state machine is replayed from
iteration 0), so a resumed run finds the window where the interrupted one left it without
storing anything in the checkpoint.
"""
from __future__ import annotations

import math
from typing import List

SCHEDULES = ("fixed", "progressive", "decay", "exp_decay")
EXP_DECAY_THRESHOLD, EXP_DECAY_K = 13, 0.1  # MixGRPO's exp_decay constants


def window_fits(num_steps: int, start: int, size: int) -> bool:
    """A window of `size` steps from `start` lies in the sampler's steps (size 0: every step is
    SDE and the start is unused)."""
    return start >= 0 and size >= 0 and (size == 0 or start + size <= num_steps)


def last_start(num_steps: int, size: int) -> int:
    """The last window start of a sliding window: its steps stay among the trainable steps
    0..num_steps - 2."""
    return num_steps - 1 - size


def interval(schedule: str, position: int, start: int, last: int, every: int, every_min: int) -> int:
    """Iterations the window stays at `position` before it moves."""
    if schedule == "progressive":
        return every
    if schedule == "decay":
        span = last - start
        progress = (position - start) / span if span > 0 else 1.0
        return max(every_min, int(every * (1 - progress) + every_min * progress))
    if schedule == "exp_decay":
        return int(math.ceil(every * math.exp(-EXP_DECAY_K * max(0, position - EXP_DECAY_THRESHOLD))))
    raise ValueError(f"sde_window_schedule must be one of {SCHEDULES}, got {schedule!r}")


def window_start(iteration: int, num_steps: int, start: int, size: int, stride: int = 1, every: int = 1,
                 every_min: int = 1, schedule: str = "fixed", roll_back: bool = True) -> int:
    """The first SDE step of the window at `iteration` (0 = the first iteration of the run)."""
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration!r}")
    if schedule == "fixed" or size == 0:
        return start
    last = last_start(num_steps, size)
    position, stayed = start, 0
    for _ in range(iteration):
        stayed += 1
        if stayed >= interval(schedule, position, start, last, every, every_min):
            stayed = 0
            position += stride
            if position > last:
                position = start if roll_back else last
    return position


def window_steps(iteration: int, num_steps: int, start: int, size: int, **schedule) -> List[int]:
    """The SDE steps at `iteration`: every step when size == 0, else `size` steps from the window
    start."""
    if size == 0:
        return list(range(num_steps))
    first = window_start(iteration, num_steps, start, size, **schedule)
    return list(range(first, first + size))
