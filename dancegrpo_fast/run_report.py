"""What the trainer tells its user: a short block when a run starts, the progress-bar fields, and a
summary when it ends (held-out reward before -> after, where the outputs are, how to go on).

Plain functions over the config and the logged metric rows, so the loop only calls them; and
the two things that run beside the loop: the progress bar and the stop-on-signal handler.
"""
from __future__ import annotations

import math
import signal
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .config import TrainConfig
from .noise import extension_status


def start_block(config: TrainConfig, device, world_size: int, first_iteration: int, reward_names: Sequence[str],
                backend: str, attention: str = "") -> str:
    """Lines printed once when training starts (rank 0). attention: the attention backend of the
    model's layers, e.g. "native (8/8 layers)" (the policy's `attention`)."""
    m, rt = config.model, config.runtime
    model = m.path or "its shipped weights"
    extension = extension_status()
    prompts = config.rollout.prompts_per_rank * world_size
    samples = prompts * config.grpo.group_size
    start = "a fresh run" if first_iteration == 0 else f"resumed at iteration {first_iteration}"
    lines = [
        f"DanceGRPO: {m.family} model from {model}",
        f"  rewards     {', '.join(reward_names)}",
        f"  device      {device} x {world_size} process(es); fused ops: {backend}; extension: "
        f"{'built' + (' with CUDA' if extension['cuda'] else '') if extension['built'] else 'not built (PyTorch fallback)'}",
    ]
    if attention:
        lines.append(f"  attention   {attention} (attention_backend={m.attention_backend})")
    lines += [
        f"  iterations  {rt.num_iterations} ({start}); {samples} samples each "
        f"({prompts} prompts x {config.grpo.group_size}), {config.sampler.num_steps} steps",
        f"  output      {rt.output_dir}",
    ]
    return "\n".join(lines)


def progress_fields(row: Dict, kl_on: bool) -> Dict[str, str]:
    """The progress bar's postfix for one iteration's row: what a user watches."""
    fields = {"reward": _fmt(_first(row, "reward/", "/mean")), "clip": f"{row.get('clip_fraction', math.nan):.2f}"}
    if kl_on:
        fields["kl"] = _fmt(row.get("kl", math.nan))
    seconds = sum(row.get(k, 0.0) for k in ("seconds_rollout", "seconds_reward", "seconds_update"))
    fields["s/it"] = f"{seconds:.2f}"
    held_out = _first(row, "eval/", "/mean")
    if not math.isnan(held_out):
        fields["held-out"] = _fmt(held_out)
    if row.get("skipped_groups_total"):
        fields["skipped"] = str(row["skipped_groups_total"])
    return fields


def summary_block(config: TrainConfig, rows: Sequence[Dict], wall_seconds: float,
                  last_checkpoint: Optional[Path], stopped_early: bool) -> str:
    """Lines printed when training ends (rank 0). rows: the run's metric rows (read_metrics)."""
    out = Path(config.runtime.output_dir)
    total = config.runtime.num_iterations
    iteration = rows[-1]["iteration"] if rows else 0
    head = (f"DanceGRPO stopped at iteration {iteration} of {total} (signal)" if stopped_early
            else f"DanceGRPO finished: {iteration} of {total} iterations")
    lines = [f"{head} in {_duration(wall_seconds)}"]
    lines += held_out_lines(rows)
    for name in ("reward_curve.png", "before_after.png", "metrics.jsonl"):
        if (out / name).is_file():
            lines.append(f"  {name:17s} {out / name}")
    if last_checkpoint is not None:
        lines.append(f"  last checkpoint   {last_checkpoint}")
    if not stopped_early and (out / "export" / "export.json").is_file():
        lines.append(f"  diffusers export  {out / 'export'} (from_pretrained; python -m dancegrpo_fast.export for another checkpoint)")
    lines.append(f"  go on with        {continue_command(config, extend=not stopped_early)}")
    return "\n".join(lines)


def continue_command(config: TrainConfig, extend: bool) -> str:
    """The command that resumes the run (extend: with half as many iterations again)."""
    total = config.runtime.num_iterations
    more = f" --num_iterations {total + max(total // 2, 1)}" if extend else ""
    return f"python -m dancegrpo_fast.train --output_dir {config.runtime.output_dir} --resume latest{more}"


def held_out_lines(rows: Sequence[Dict]) -> List[str]:
    """'held-out <reward>: before -> after' and, under it, each of its criteria, from the first
    and last evaluation rows."""
    evaluated = [r for r in rows if any(k.startswith("eval/") for k in r)]
    if not evaluated:
        return []
    first, last = evaluated[0], evaluated[-1]
    parts: Dict[str, List[str]] = {}
    for key in first:
        if key.startswith("eval/") and key.count("/") == 2 and not key.endswith("/std"):
            _, reward, part = key.split("/")
            parts.setdefault(reward, []).append(part)
    lines = []
    for reward, names in parts.items():
        for part in sorted(names, key=lambda name: name != "mean"):
            key = f"eval/{reward}/{part}"
            before, after = first.get(key, math.nan), last.get(key, math.nan)
            label = f"held-out {reward}" if part == "mean" else f"  {part}"
            lines.append(f"  {label:24s} {_fmt(before)} -> {_fmt(after)} ({after - before:+.3f})")
    if lines:
        lines.insert(0, f"  held-out evaluation at iterations {first['iteration']} -> {last['iteration']}:")
    return lines


def _first(row: Dict, prefix: str, suffix: str) -> float:
    for key, value in row.items():
        if key.startswith(prefix) and key.endswith(suffix) and key.count("/") == 2 and value is not None:
            return float(value)
    return math.nan


def _fmt(value: float) -> str:
    return "nan" if value is None or math.isnan(value) else f"{value:.3f}"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def progress_bar(total: int, initial: int):
    """The tqdm bar the loop updates (rank 0)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="DanceGRPO", dynamic_ncols=True)


class StopOnSignal:
    """Within the block, SIGTERM and SIGINT only set `requested` (the loop then stops after the
    current iteration and writes a checkpoint); the previous handlers come back on exit. Off the
    main thread, where Python cannot install handlers, it does nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self._previous: Dict = {}

    def _request(self, signum, frame) -> None:
        self.requested = True

    def __enter__(self) -> "StopOnSignal":
        try:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._request)
        except ValueError:  # not the main thread
            self._previous = {}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
