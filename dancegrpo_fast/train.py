"""The DanceGRPO trainer: prompts -> rollout -> rewards -> advantages -> update, with checkpoints.

    python -m dancegrpo_fast.train                       # the built-in tiny task, on a CPU
    python -m dancegrpo_fast.train --preset flux --model_path /ckpt/FLUX.1-dev \\
        --prompt_file prompts.txt --rewards hps:1.0 --output_dir outputs/flux
    torchrun --nproc_per_node 8 -m dancegrpo_fast.train --config my_run.yaml --parallel fsdp

`Trainer.train_iteration` is the algorithm; every other concern lives in a module named for it:
prompts (the prompt stream), rollout (sampling), rewards.reward_set (scoring), grpo (advantages
and the loss), update (the GRPO update), model_setup (LoRA, optimizer, EMA), evaluator
(held-out evaluation and its pictures), checkpoint, run_report (what the user reads).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import ops
from .checkpoint import CheckpointError, Lineage, load_checkpoint, resolve_resume, saved_config, save_checkpoint
from .config import TrainConfig, config_to_yaml, parse_config, resumed_config
from .ddpo import DDPOAdvantages
from .distributed import DistributedState, all_gather, all_reduce_sum, cleanup, init_distributed
from .evaluator import Evaluator
from .export import export_checkpoint
from .grpo import best_of_n, compute_advantages, too_many_unusable
from .logging_utils import MetricsLogger, save_sample_grid, warn
from .wandb_logging import WandbLogger
from .multistep import sampling_plan
from .model_setup import TrainingSetup
from .noise import mix_seed, prompt_seeds, sample_seeds
from .output_lock import claim_output_dir, lock_output_dir
from .policies import ModelLoadError, Policy, build_policy
from .prompts import PromptStream, load_prompts
from .reports import read_metrics
from .rewards import AsyncRewardPool, RewardError, RewardSet, available_rewards, import_reward_modules
from .rollout import decode_trajectory, rollout
from .run_report import StopOnSignal, progress_bar, progress_fields, start_block, summary_block
from .trajectory import Trajectory
from .update import GRPOUpdate, UpdateStats, trained_steps


class Trainer:
    """Owns the run. `rewards` overrides the config's rewards with callables you already have
    (a RewardSet, or what RewardSet.of takes); `policy` overrides the model loading."""

    def __init__(self, config: TrainConfig, rewards=None, policy: Optional[Policy] = None,
                 state: Optional[DistributedState] = None):
        self.config = c = config.validate()
        if c.runtime.threads > 0:
            torch.set_num_threads(c.runtime.threads)
        self.state = state or init_distributed()
        self.device = self.state.device
        output_dir = c.runtime.output_dir
        # One run per output folder, settled before anything loads: the lock keeps a second
        # process out (released at the end of train(), or when the process ends), and a new run
        # never writes into an earlier run's files.
        self._output_lock = lock_output_dir(output_dir, self.state)
        resume_path = resolve_resume(c.runtime.resume, output_dir)
        if resume_path is None:
            claim_output_dir(output_dir, c.runtime.overwrite, bool(c.runtime.resume), self.state)
        # Rank-independent: every rank must create the same LoRA initialisation (FSDP2 shards each
        # rank's own copy, it does not broadcast).
        torch.manual_seed(mix_seed(c.runtime.seed, 11))
        self.prompts = PromptStream(load_prompts(c.rollout.prompt_file), c.runtime.seed)
        self.policy = policy if policy is not None else build_policy(c.model, c.sampler, self.device)
        self.schedule = self.policy.schedule()
        self._window: List[int] = c.sampler.sde_steps(0)
        self.plan = sampling_plan(self.schedule, c.sampler.ode_order, c.sampler.ode_steps_fraction)
        # The held-out evaluation samples with one sampler for the whole run, the first-order one.
        eval_schedule = (self.policy.schedule(list(range(c.sampler.num_steps))) if c.eval.sde_steps == "all"
                         else self.schedule)
        self.rewards = (RewardSet.of(rewards) if rewards is not None else
                        RewardSet.from_specs(c.rollout.rewards, c.rollout.reward_modules, self.device))
        self.setup = TrainingSetup(self.policy, c, self.state)
        self.updater = GRPOUpdate(self.policy, self.schedule, c.grpo, c.optim, c.model.mixed_precision,
                                  self.setup.optimizer_step, self.setup.reference)
        self.evaluator = Evaluator(c.eval, self.policy, eval_schedule, self.rewards, c.rollout.batch_size,
                                   c.model.mixed_precision, output_dir, self.state)
        self.iteration = 0
        self.skipped_groups_total = 0
        wandb_run = (WandbLogger(output_dir, c.runtime.wandb_project, c.runtime.wandb_run_name, c.to_dict(),
                                 resume=resume_path is not None)
                     if c.runtime.wandb and self.state.is_main else None)
        self.logger = MetricsLogger(output_dir, enabled=self.state.is_main, tensorboard=c.runtime.tensorboard,
                                    wandb=wandb_run)
        # advantage ddpo: DDPO's per-prompt reward statistics, state carried across iterations
        # (checkpointed) and identical on every rank.
        self.ddpo = (DDPOAdvantages(c.grpo.ddpo_buffer_size, c.grpo.ddpo_min_count)
                     if c.grpo.advantage == "ddpo" else None)
        self.nfe_total = 0  # model evaluations so far (rollout forwards, training forwards and backwards)
        self._reward_pool: Optional[AsyncRewardPool] = None
        self.stop = StopOnSignal()  # SIGTERM/SIGINT: stop after the current iteration, with a checkpoint
        self.deferred_export: Optional[Path] = None  # set by _export under torchrun; main() runs it after cleanup
        self.lineage = Lineage.start(resume_path)  # recorded in every checkpoint this run writes
        if resume_path is not None:
            self._resume(resume_path)
        if self.state.is_main:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "config.yaml").write_text(config_to_yaml(c))

    # --- one iteration -------------------------------------------------------------------------
    def train_iteration(self) -> Dict:
        """One iteration: rollout, rewards, advantages, update; returns the logged row."""
        c, s = self.config, self.state
        trajectory, samples, scores, seconds = self.collect_and_score()
        # Only the rewards' own scores feed the advantages; "<name>/<criterion>" keys are logged.
        reward_scores = {name: scores[name] for name in self.rewards.names}
        advantages, valid, extra = self.advantages(trajectory, reward_scores)
        skipped = self._skip_unusable_groups(valid, reward_scores)
        start = time.perf_counter()
        stats = self.update(trajectory, advantages)
        seconds["update"] = time.perf_counter() - start
        self.iteration += 1
        row = self._row(scores, stats, skipped, seconds)
        row.update(extra)
        row.update(self._window_and_nfe(stats))
        if self.evaluator.due(self.iteration, c.runtime.num_iterations):
            row.update(self._evaluate())  # after the update, in this iteration's row
        self.logger.log(row)
        if "seconds_eval" in row:
            self._evaluation_pictures()
        if c.runtime.sample_every and self.iteration % c.runtime.sample_every == 0 and s.is_main:
            path = save_sample_grid(samples, Path(c.runtime.output_dir) / "samples" / f"iter_{self.iteration:06d}.png")
            self.logger.log_image("samples", path, self.iteration)
        return row

    def advantages(self, trajectory: Trajectory, reward_scores: Dict[str, Tensor]) -> Tuple[Tensor, Tensor, Dict]:
        """(advantages, valid groups, extra metrics): GRPO's group or global normalisation, or
        with advantage ddpo DDPO's per-prompt running statistics (identical on every rank)."""
        c, s = self.config, self.state
        if self.ddpo is None:
            advantages, valid = compute_advantages(reward_scores, self.rewards.weights, c.grpo.group_size,
                                                   c.grpo.advantage, gather=lambda t: all_gather(t, s), rank=s.rank)
            return advantages, valid, {}
        # Every rank's prompts (by their stream positions), so every rank updates the same
        # statistics with the same batch.
        positions = all_gather(trajectory.prompt_ids.to(self.device), s).cpu().tolist()
        advantages, valid, own = self.ddpo.advantages(
            reward_scores, self.rewards.weights, c.grpo.group_size, self.prompts.prompts_at(positions),
            gather=lambda t: all_gather(t.to(self.device), s), rank=s.rank)
        return advantages, valid, {"ddpo/per_prompt_fraction": own}

    def _evaluation_pictures(self) -> None:
        """Redraw the reward curve; hand it and this evaluation's grid to TensorBoard/wandb."""
        curve = self.evaluator.write_reward_curve(self.logger.path)
        grid = Path(self.config.runtime.output_dir) / "samples" / f"eval_iter_{self.iteration:06d}.png"
        self.logger.log_image("eval/samples", grid, self.iteration)
        if curve is not None:
            self.logger.log_image("eval/reward_curve", curve, self.iteration)

    def _place_window(self) -> None:
        """The SDE window of this iteration (it slides with sde_window_schedule): the schedule the
        rollout and the update step with, and the rollout's plan (fewer / second-order ODE steps
        outside the window: multistep.sampling_plan)."""
        c = self.config
        window = c.sampler.sde_steps(self.iteration)
        if window != self._window:
            self._window = window
            self.schedule = self.policy.schedule(window)
            self.updater.schedule = self.schedule
            self.plan = sampling_plan(self.schedule, c.sampler.ode_order, c.sampler.ode_steps_fraction)

    def _window_and_nfe(self, stats: UpdateStats) -> Dict:
        """The window's position and this iteration's model evaluations (all ranks), per sample and
        network call (classifier-free guidance counts two): rollout forwards, training forwards
        (with the old log-prob and KL reference passes) and backwards, and the run's total."""
        c, s = self.config, self.state
        per_call = 2 if getattr(self.policy, "uses_cfg", False) else 1
        rollout_nfe = c.samples_per_rank * s.world_size * self.plan.num_evaluations * per_call
        train = all_reduce_sum(torch.tensor([stats.forward_passes, stats.backward_passes], dtype=torch.int64), s)
        forward, backward = int(train[0]), int(train[1])
        self.nfe_total += rollout_nfe + forward + backward
        return {"sde_window_start": self._window[0], "sde_window_size": len(self._window),
                "nfe_rollout": rollout_nfe, "nfe_train_forward": forward, "nfe_train_backward": backward,
                "nfe_total": self.nfe_total}

    def collect(self, on_batch=None) -> Trajectory:
        """Rollout of this rank's prompts for the current iteration (on_batch: see rollout)."""
        c, s = self.config, self.state
        self._place_window()
        per_rank = c.rollout.prompts_per_rank
        prompts, positions = self.prompts.take(per_rank * s.world_size)
        mine = slice(s.rank * per_rank, (s.rank + 1) * per_rank)
        prompts, positions = prompts[mine], positions[mine]
        first_prompt = int(positions[0])
        seeds_p = prompt_seeds(c.runtime.seed, self.iteration, first_prompt, per_rank)
        seeds_s = sample_seeds(c.runtime.seed, self.iteration, first_prompt * c.grpo.group_size, c.samples_per_rank)
        return rollout(self.policy, self.schedule, prompts, c.grpo.group_size, positions, seeds_p, seeds_s,
                       c.rollout.batch_size, c.sampler.shared_noise, c.model.mixed_precision, on_batch=on_batch,
                       plan=self.plan)

    def collect_and_score(self) -> Tuple[Trajectory, Tensor, Dict[str, Tensor], Dict[str, float]]:
        """Rollout, decoding and rewards. With reward_overlap, each rollout batch is decoded and
        scored in a background thread while the next batch samples (the policy is the same for
        the whole iteration, so this stays exactly on-policy); only the last batch's rewards are
        waited for. Returns trajectory, samples, scores ({reward name: (B,)} plus
        "<name>/<criterion>" for rewards with criteria), and the seconds of rollout and of the
        wait for rewards."""
        c = self.config
        start = time.perf_counter()
        if not c.rollout.reward_overlap:
            trajectory = self.collect()
            samples = decode_trajectory(self.policy, trajectory, c.rollout.batch_size)
            rollout_seconds = time.perf_counter() - start
            start = time.perf_counter()
            scores = self.rewards(samples, trajectory.sample_prompts(), criteria=True)
            return trajectory, samples, scores, {"rollout": rollout_seconds, "reward": time.perf_counter() - start}
        if self._reward_pool is None:
            self._reward_pool = AsyncRewardPool(lambda images, prompts: self.rewards(images, prompts, criteria=True))
        pending = []

        def on_batch(final_latents: Tensor, prompts: List[str]) -> None:
            images = self.policy.decode(final_latents)
            pending.append((images, self._reward_pool.submit(images, prompts)))

        trajectory = self.collect(on_batch)
        rollout_seconds = time.perf_counter() - start
        start = time.perf_counter()
        results = [future.result() for _, future in pending]
        reward_seconds = time.perf_counter() - start
        samples = torch.cat([images for images, _ in pending])
        scores = {name: torch.cat([r[name] for r in results]) for name in results[0]}
        return trajectory, samples, scores, {"rollout": rollout_seconds, "reward": reward_seconds}

    def _skip_unusable_groups(self, valid: Tensor, scores: Dict[str, Tensor]) -> int:
        """Count the groups with NaN/inf rewards over all ranks (compute_advantages gave them no
        advantage); stop with a RewardError when max_skipped_group_fraction of them are."""
        c, s = self.config, self.state
        skipped = int(all_reduce_sum(torch.tensor([(~valid).sum().item() // c.grpo.group_size]), s).item())
        total_groups = c.rollout.prompts_per_rank * s.world_size
        limit = c.grpo.max_skipped_group_fraction
        if too_many_unusable(skipped, total_groups, limit):
            unusable = [name for name, value in scores.items() if not bool(torch.isfinite(value).all())]
            which = (f"reward{'s' if len(unusable) > 1 else ''} {', '.join(map(repr, unusable))}" if unusable
                     else "on other ranks")
            raise RewardError(f"iteration {self.iteration + 1}: {skipped} of {total_groups} groups have NaN/inf rewards "
                              f"({which}), at least max_skipped_group_fraction={limit:g} of the iteration's groups: "
                              f"stopping (no checkpoint of this iteration is written)")
        if skipped:
            self.skipped_groups_total += skipped
            if s.is_main:
                warn(f"iteration {self.iteration + 1}: skipped {skipped} group(s) with NaN/inf rewards "
                     f"({self.skipped_groups_total} so far); the run goes on")
        return skipped

    def update(self, trajectory: Trajectory, advantages: Tensor, training_order: Optional[Tensor] = None) -> UpdateStats:
        """The GRPO update on one trajectory (update.GRPOUpdate), with this iteration's per-sample
        timestep subsets and micro-batch order. The order lists the samples trained: every
        sample, or with bestofn only the kept ones (grpo.best_of_n on the full groups'
        advantages), shuffled."""
        c = self.config
        steps = self.trained_steps(trajectory)
        if training_order is None:
            rows = (best_of_n(advantages, c.grpo.group_size, c.grpo.bestofn) if c.grpo.bestofn
                    else torch.arange(trajectory.batch_size))
            generator = torch.Generator().manual_seed(mix_seed(c.runtime.seed, self.iteration, 3, self.state.rank))
            training_order = rows[torch.randperm(rows.numel(), generator=generator)]
        return self.updater(trajectory, advantages, steps, training_order)

    def trained_steps(self, trajectory: Trajectory) -> Tensor:
        """(B, T) the steps each sample trains this iteration (update.trained_steps)."""
        c = self.config
        # The trajectory's own SDE steps: the window it was sampled with.
        trainable = [i for i in trajectory.sde.nonzero().flatten().tolist() if i < c.sampler.num_steps - 1]
        return trained_steps(trajectory.sample_seeds, trainable, c.trained_timesteps())

    def _row(self, scores: Dict[str, Tensor], stats: UpdateStats, skipped: int, seconds: Dict[str, float]) -> Dict:
        """The iteration's metrics row: reward means and stds (finite values over all ranks),
        per-criterion means, the update's statistics, timings."""
        c, s = self.config, self.state
        row = {"iteration": self.iteration, "prompt_position": self.prompts.position}
        for name in self.rewards.names:
            finite = self._gathered_finite(scores[name])
            row[f"reward/{name}/mean"] = float(finite.mean()) if finite.numel() else float("nan")
            row[f"reward/{name}/std"] = float(finite.std()) if finite.numel() > 1 else 0.0
        for name in self.rewards.names:
            for key, value in scores.items():
                # Per-criterion means (NaN-aware); "score" is the reward's own, already logged.
                if key.startswith(f"{name}/") and key != f"{name}/score":
                    finite = self._gathered_finite(value)
                    row[f"reward/{key}"] = float(finite.mean()) if finite.numel() else float("nan")
        total = sum(seconds.values())
        row.update(stats.metrics())
        row.update({"lr": self.setup.lr, "skipped_groups": skipped, "skipped_groups_total": self.skipped_groups_total,
                    **{f"seconds_{name}": value for name, value in seconds.items()},
                    "samples_per_second": c.samples_per_rank * s.world_size / max(total, 1e-9)})
        return row

    def _gathered_finite(self, value: Tensor) -> Tensor:
        """The finite values of a per-sample tensor over all ranks, on the CPU (for logging)."""
        gathered = all_gather(value.to(self.device), self.state).cpu()
        return gathered[torch.isfinite(gathered)]

    # --- checkpoints ---------------------------------------------------------------------------
    def _resume(self, path: Path) -> None:
        ema = self.setup.ema.shadow if self.setup.ema is not None else None
        training = load_checkpoint(path, self.policy, self.setup.optimizer, self.setup.lr_scheduler, self.config,
                                   self.state, ema=ema)
        self.iteration = int(training["iteration"])
        self.prompts.position = int(training["prompt_position"])
        self.skipped_groups_total = int(training.get("skipped_groups_total", 0))
        if self.ddpo is not None and training.get("ddpo_tracker"):
            self.ddpo.load_state_dict(training["ddpo_tracker"])
        self.nfe_total = int(training.get("nfe_total", 0))
        if self.setup.ema is not None and training.get("ema"):
            self.setup.ema.load(training["ema"])
        self.logger.truncate_after(self.iteration)

    def save(self) -> Path:
        extra = {"prompt_position": self.prompts.position, "skipped_groups_total": self.skipped_groups_total,
                 "nfe_total": self.nfe_total}
        if self.ddpo is not None:
            extra["ddpo_tracker"] = self.ddpo.state_dict()
        ema = self.setup.ema.shadow if self.setup.ema is not None else None
        return save_checkpoint(self.config.runtime.output_dir, self.iteration, self.policy, self.setup.optimizer,
                               self.setup.lr_scheduler, self.config, extra, self.state, ema=ema,
                               keep=self.config.runtime.keep_checkpoints, lineage=self.lineage)

    # --- the run -------------------------------------------------------------------------------
    def train(self) -> List[Dict]:
        """Run until num_iterations; checkpoint every checkpoint_every iterations and at exit
        (also on SIGTERM/SIGINT, after the current iteration). With held-out evaluation:
        before the first iteration (fresh runs), every eval_every iterations and after the last.
        Returns the logged rows."""
        c, rt = self.config, self.config.runtime
        rows: List[Dict] = []
        started = time.perf_counter()
        if self.state.is_main:
            print(start_block(c, self.device, self.state.world_size, self.iteration, self.rewards.describe(),
                              ops.resolve_backend(self.device), str(getattr(self.policy, "attention", ""))), flush=True)
        bar = progress_bar(rt.num_iterations, self.iteration) if rt.progress_bar and self.state.is_main else None
        last_saved = first_iteration = self.iteration
        last_checkpoint = None
        stop = self.stop
        try:
            with stop:
                if self.evaluator.enabled and self.iteration == 0 and rt.num_iterations > 0:
                    rows.append(self._log_evaluation())  # the "before" point of a fresh run
                while self.iteration < rt.num_iterations and not stop.requested:
                    rows.append(self.train_iteration())
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(progress_fields(rows[-1], c.grpo.kl_beta > 0))
                    if self.iteration % rt.checkpoint_every == 0:
                        last_checkpoint, last_saved = self.save(), self.iteration
                if self.iteration != last_saved:
                    last_checkpoint = self.save()
                if self.iteration > first_iteration and self.evaluator.enabled:
                    if self.evaluator.last_iteration != self.iteration:
                        rows.append(self._log_evaluation())  # stopped early: the last iteration was not evaluated
                    before_after = self.evaluator.write_before_after()
                    if before_after is not None:
                        self.logger.log_image("eval/before_after", before_after, self.iteration)
                    self.evaluator.write_reward_curve(self.logger.path)
                if self.iteration >= rt.num_iterations and self.iteration > first_iteration:
                    self._export(last_checkpoint)
        finally:
            if bar is not None:
                bar.close()
            if self._reward_pool is not None:
                self._reward_pool.close()
                self._reward_pool = None
            self.logger.close()
            if self._output_lock is not None:
                self._output_lock.release()
        if self.state.is_main:
            print(summary_block(c, read_metrics(self.logger.path), time.perf_counter() - started, last_checkpoint,
                                stop.requested), flush=True)
        return rows

    def _evaluate(self) -> Dict:
        """Held-out metrics of the current weights, or with eval.use_ema of the EMA weights
        (swapped in, the trained weights restored afterwards)."""
        if self.config.eval.use_ema and self.setup.ema is not None:
            with self.setup.ema.swapped_in(self.policy.model):
                return self.evaluator.evaluate(self.iteration)
        return self.evaluator.evaluate(self.iteration)

    def _export(self, checkpoint: Optional[Path], after_cleanup: bool = False) -> Optional[Path]:
        """Rank 0, at the end of a completed run: the diffusers export of the last checkpoint
        (export.py), consolidated from the checkpoint's files, so nothing is gathered across the
        ranks. A failure only warns: the checkpoint is written."""
        if not (self.config.runtime.export and self.state.is_main and checkpoint is not None):
            return None
        if self.state.world_size > 1 and not after_cleanup:
            # A 12B export takes minutes on rank 0 while the other ranks wait at the closing
            # barrier, long enough to hit the process group's timeout: main() runs it after the
            # group is gone.
            self.deferred_export = checkpoint
            return None
        try:
            return export_checkpoint(checkpoint, Path(self.config.runtime.output_dir) / "export",
                                     ema=self.setup.ema is not None)
        except Exception as error:
            warn(f"could not export {checkpoint} to diffusers folders: {type(error).__name__}: {error} (run "
                 f"python -m dancegrpo_fast.export {self.config.runtime.output_dir} to retry)")
            return None

    def export_deferred(self) -> Optional[Path]:
        """The end-of-run export that _export left for after the process group's cleanup (torchrun
        runs); call it after distributed.cleanup. Nothing when there is none."""
        checkpoint, self.deferred_export = self.deferred_export, None
        return None if checkpoint is None else self._export(checkpoint, after_cleanup=True)

    def _log_evaluation(self) -> Dict:
        row = {"iteration": self.iteration, **self._evaluate()}
        self.logger.log(row)
        self._evaluation_pictures()
        return row


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def check_before_loading(config: TrainConfig) -> None:
    """Configuration errors a run would otherwise meet only after minutes of loading: reward
    names the registry does not know, a model folder or prompt file that does not exist."""
    import_reward_modules(config.rollout.reward_modules)
    known = available_rewards()
    unknown = [spec.type or spec.name for spec in config.rollout.rewards if (spec.type or spec.name) not in known]
    if unknown:
        raise ValueError(f"rewards: unknown reward name(s) {unknown}; known: {known} (a reward of your own "
                         f"is registered with dancegrpo_fast.rewards.register_reward in a module named in "
                         f"reward_modules)")
    if config.model.path and not Path(config.model.path).is_dir():
        raise ValueError(f"model_path {config.model.path!r} does not exist or is not a folder (expected a local "
                         f"{config.model.family} checkpoint in the diffusers layout)")
    if not config.rollout.rewards:
        raise ValueError("rewards: no reward configured: pass --rewards name:weight[,name:weight] (or a rewards "
                         "list in YAML)")
    load_prompts(config.rollout.prompt_file)


def resume_settings(config: TrainConfig, argv: Sequence[str]) -> Tuple[TrainConfig, Optional[str]]:
    """With --resume and a checkpoint to resume: the run's own saved configuration with only the
    settings given on this command line (flags, and the keys of a --config file) applied, and a
    line saying so. Otherwise the config as parsed and None."""
    path = resolve_resume(config.runtime.resume, config.runtime.output_dir)
    if path is None:
        return config, None
    return resumed_config(saved_config(path), config, argv, path)


# Errors that are the user's to fix: one line and exit code 2, no traceback (DEBUG_ENV=1 shows it).
USER_ERRORS = (CheckpointError, RewardError, ModelLoadError, ValueError, FileNotFoundError)
DEBUG_ENV = "DANCEGRPO_DEBUG"


def _user_error(error: BaseException) -> int:
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        raise error
    print(f"error: {error} (set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
    return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        config, resumed = resume_settings(parse_config(argv), argv)
        check_before_loading(config)
    except USER_ERRORS as error:
        return _user_error(error)
    if resumed is not None:
        print(resumed, flush=True)
        if resumed.startswith("nothing to do"):
            return 0
    state = init_distributed()
    trainer = None
    try:
        trainer = Trainer(config, state=state)
        trainer.train()
    except USER_ERRORS as error:
        return _user_error(error)
    finally:
        cleanup(state)
    if trainer is not None:
        trainer.export_deferred()
    return 0


if __name__ == "__main__":
    sys.exit(main())
