"""Held-out evaluation: fixed prompts, fixed noise, the training rewards; and the pictures of it.

`evaluate_policy` splits the (prompt, sample) entries over the ranks, samples them with
`rollout.sample_fixed`, scores them with every reward (and per criterion when a reward has
`criteria(images, prompts)`, like the tiny task's tiny_geneval), and reduces the means over the
ranks, so every rank gets the same metrics:

    eval/<reward>/mean            mean score (finite scores only)
    eval/<reward>/<criterion>     per-criterion means, NaN-aware (rewards with `criteria` only)
    eval/<reward>/fully_correct   fraction of samples whose criteria score is > 0.99 (idem; for a
                                  binary wrapper its "inner_score", the wrapped reward's score)

`Evaluator` is what the trainer holds: when to evaluate, the per-evaluation sample grid, the
before/after sheet (iteration 0 against the latest evaluation) and the reward curve.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from .config import EvalConfig
from .distributed import DistributedState, all_reduce_sum
from .logging_utils import save_sample_grid, warn
from .policies.base import Policy
from .prompts import load_prompts
from .reports import plot_reward_curve, save_before_after, to_uint8
from .rewards.reward_set import RewardSet
from .rollout import sample_fixed
from .schedules import StepSchedule

FULLY_CORRECT_THRESHOLD = 0.99
BEFORE_AFTER_PROMPTS = 8  # prompts on the before/after sheet


def eval_entries(prompts: Sequence[str], samples_per_prompt: int) -> List[str]:
    """The evaluated (prompt, sample) list: each prompt repeated samples_per_prompt times, in
    order; entry k = prompt k // samples_per_prompt."""
    return [p for p in prompts for _ in range(samples_per_prompt)]


def rank_entries(total: int, state: DistributedState) -> List[int]:
    """Global entry numbers of this rank: rank r takes r, r + W, r + 2W, ..."""
    return list(range(state.rank, total, state.world_size))


@torch.no_grad()
def evaluate_policy(policy: Policy, schedule: StepSchedule, prompts: Sequence[str], rewards,
                    samples_per_prompt: int = 1, seed: int = 0, batch_size: int = 16, mixed_precision: str = "no",
                    state: Optional[DistributedState] = None, return_details: bool = False):
    """Sample `samples_per_prompt` fixed-noise samples of every prompt and score them.

    rewards: a RewardSet (or what RewardSet.of takes). Rank r samples the entries r::world_size;
    every rank runs the same number of model calls (a short share is padded with a repeat whose
    result is dropped: DDP/FSDP forwards are collectives). Returns (metrics, images): metrics
    identical on every rank (module docstring), images this rank's samples in entry order on the
    CPU. With return_details, a third value {"indices": (n,) global entry numbers, "prompts":
    their prompts, "scores": {name or name/criterion: (n,)}} for this rank's entries.
    """
    state = state or DistributedState()
    rewards = RewardSet.of(rewards)
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt!r}")
    all_prompts = eval_entries(prompts, samples_per_prompt)
    if not all_prompts:
        raise ValueError("evaluate_policy needs at least one prompt")
    mine = rank_entries(len(all_prompts), state)
    per_rank = math.ceil(len(all_prompts) / state.world_size)
    padded = mine + [mine[0] if mine else 0] * (per_rank - len(mine))
    images, scores = [], []
    for start in range(0, per_rank, batch_size):
        ids = padded[start:start + batch_size]
        chunk_prompts = [all_prompts[k] for k in ids]
        chunk = sample_fixed(policy, schedule, chunk_prompts, seed, batch_size, mixed_precision, indices=ids)
        scores.append(rewards(chunk, chunk_prompts, criteria=True))
        images.append(chunk.detach().cpu())
    real = len(mine)
    images = torch.cat(images)[:real]
    scores = {key: torch.cat([s[key] for s in scores])[:real] for key in scores[0]}
    metrics = _reduce_means(_metric_values(rewards.names, scores), state)
    if not return_details:
        return metrics, images
    details = {"indices": torch.tensor(mine, dtype=torch.int64), "prompts": [all_prompts[k] for k in mine],
               "scores": scores}
    return metrics, images, details


def _metric_values(names: Sequence[str], scores: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """{metric key: this rank's per-sample values} (module docstring)."""
    values = {}
    for name in names:
        values[f"eval/{name}/mean"] = scores[name]
        for key in scores:
            criterion = key[len(name) + 1:]
            if key.startswith(f"{name}/") and criterion != "score":  # "score" is eval/<name>/mean already
                values[f"eval/{name}/{criterion}"] = scores[key]
        if f"{name}/score" in scores:
            # Every criterion met; for a binary wrapper judged on the wrapped reward's score.
            graded = scores.get(f"{name}/inner_score", scores[f"{name}/score"])
            values[f"eval/{name}/fully_correct"] = (graded > FULLY_CORRECT_THRESHOLD).to(torch.float32)
    return values


def _reduce_means(values: Dict[str, Tensor], state: DistributedState) -> Dict[str, float]:
    """Means of the finite values over all ranks (sums and counts in one collective)."""
    keys = list(values)
    totals = torch.zeros(2, len(keys), dtype=torch.float64)
    for j, key in enumerate(keys):
        value = values[key].to(torch.float64)
        finite = torch.isfinite(value)
        totals[0, j] = value[finite].sum()
        totals[1, j] = finite.sum()
    totals = all_reduce_sum(totals.to(state.device), state).cpu()
    return {key: float(totals[0, j] / totals[1, j]) if totals[1, j] > 0 else float("nan")
            for j, key in enumerate(keys)}


class Evaluator:
    """The trainer's held-out evaluation (every rank takes part; rank 0 writes the pictures).

    Writes under output_dir: samples/eval_iter_NNNNNN.png (the first 16 samples of each
    evaluation), samples/eval_before.pt (iteration 0's samples of the before/after sheet, kept on
    disk so a resumed run still has them), before_after.png and reward_curve.png."""

    def __init__(self, options: EvalConfig, policy: Policy, schedule: StepSchedule, rewards: RewardSet,
                 batch_size: int, mixed_precision: str, output_dir, state: DistributedState):
        self.options = options
        self.policy, self.schedule, self.rewards = policy, schedule, rewards
        self.batch_size, self.mixed_precision = batch_size, mixed_precision
        self.output_dir = Path(output_dir)
        self.state = state
        self.prompts = self._load_prompts()
        self.last_iteration: Optional[int] = None
        self._last = None  # rank 0: (images, details) of the latest evaluation

    def _load_prompts(self) -> List[str]:
        """The held-out prompts (the first num_prompts), or [] when evaluation is off."""
        o = self.options
        if o.every <= 0:
            return []
        if not o.prompt_file:
            if self.state.is_main:
                warn(f"eval_every={o.every} but no eval_prompt_file: no held-out evaluation")
            return []
        prompts = load_prompts(o.prompt_file, "eval_prompt_file")
        return prompts[:o.num_prompts] if o.num_prompts else prompts

    @property
    def enabled(self) -> bool:
        return bool(self.prompts)

    def due(self, iteration: int, num_iterations: int) -> bool:
        """Evaluate after this iteration: every `every` iterations and after the last one."""
        return self.enabled and (iteration % self.options.every == 0 or iteration >= num_iterations)

    def evaluate(self, iteration: int) -> Dict[str, float]:
        """Held-out metrics of the current model (eval/<reward>/..., seconds_eval); {} when off."""
        if not self.enabled:
            return {}
        o = self.options
        start = time.perf_counter()
        metrics, images, details = evaluate_policy(self.policy, self.schedule, self.prompts, self.rewards,
                                                   o.samples_per_prompt, o.seed, self.batch_size,
                                                   self.mixed_precision, self.state, return_details=True)
        metrics["seconds_eval"] = time.perf_counter() - start
        self.last_iteration = iteration
        if self.state.is_main:
            samples_dir = self.output_dir / "samples"
            first = self.rewards.names[0]
            labels = [f"{prompt} | {first} {float(score):.2f}"
                      for prompt, score in zip(details["prompts"], details["scores"][first])]
            save_sample_grid(images, samples_dir / f"eval_iter_{iteration:06d}.png", max_samples=16, min_size=128,
                             labels=labels)
            self._last = (images, details)
            if iteration == 0:
                self._save_before(images, details, iteration, samples_dir / "eval_before.pt")
        return metrics

    # --- the before/after sheet ---------------------------------------------------------------
    def _sheet_entries(self, details) -> List[int]:
        """Positions (in this rank's entries) of the first sample of the first prompts."""
        per_prompt = self.options.samples_per_prompt
        return [j for j, k in enumerate(details["indices"].tolist())
                if k % per_prompt == 0 and k // per_prompt < BEFORE_AFTER_PROMPTS]

    def _sample_scores(self, details, position: int) -> Dict[str, float]:
        return {name: float(details["scores"][name][position]) for name in self.rewards.names}

    def _save_before(self, images: Tensor, details, iteration: int, path: Path) -> None:
        chosen = self._sheet_entries(details)
        torch.save({"iteration": iteration, "eval_seed": self.options.seed,
                    "indices": [int(details["indices"][j]) for j in chosen],
                    "prompts": [details["prompts"][j] for j in chosen],
                    "images": to_uint8(images[chosen]) if chosen else torch.zeros(0, dtype=torch.uint8),
                    "scores": [self._sample_scores(details, j) for j in chosen]}, path)

    def write_before_after(self) -> Optional[Path]:
        """Rank 0: before_after.png from samples/eval_before.pt (iteration 0) and the latest
        evaluation, pairing samples of the same eval entry (prompt and noise). Problems only
        warn: the checkpoint is already written."""
        if not self.state.is_main or self._last is None:
            return None
        try:
            return self._write_before_after()
        except Exception as error:  # a picture must never fail a finished run
            warn(f"could not write before_after.png: {type(error).__name__}: {error}")
            return None

    def _write_before_after(self) -> Optional[Path]:
        path = self.output_dir / "samples" / "eval_before.pt"
        if not path.is_file():
            warn(f"no {path} (the run did not evaluate at iteration 0): no before_after.png")
            return None
        before = torch.load(path, weights_only=True)
        images, details = self._last
        position = {int(k): j for j, k in enumerate(details["indices"].tolist())}
        pairs = [(i, position[k]) for i, k in enumerate(before["indices"])
                 if k in position and details["prompts"][position[k]] == before["prompts"][i]]
        if before.get("eval_seed") != self.options.seed or not pairs:
            warn("the iteration-0 eval samples do not match this run's eval prompts/seed: no before_after.png")
            return None
        return save_before_after(
            self.output_dir / "before_after.png",
            before["images"][[i for i, _ in pairs]], images[[j for _, j in pairs]],
            [before["prompts"][i] for i, _ in pairs], [before["scores"][i] for i, _ in pairs],
            [self._sample_scores(details, j) for _, j in pairs],
            before_label=f"before (iteration {before['iteration']})",
            after_label=f"after (iteration {self.last_iteration})")

    def write_reward_curve(self, metrics_path) -> Optional[Path]:
        """Rank 0: reward_curve.png from metrics.jsonl (skipped, with one warning, when
        matplotlib is missing; a plotting error only warns)."""
        if not self.state.is_main:
            return None
        try:
            return plot_reward_curve(metrics_path, self.output_dir / "reward_curve.png")
        except Exception as error:  # a picture must never stop a run
            warn(f"could not write reward_curve.png: {type(error).__name__}: {error}")
            return None


__all__ = ["evaluate_policy", "Evaluator", "eval_entries", "rank_entries", "FULLY_CORRECT_THRESHOLD"]
