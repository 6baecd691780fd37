"""The DanceGRPO trainer: rollout -> rewards -> advantages -> update, with checkpoints and logs.

    python -m dancegrpo_fast.train --preset flux --model_path /ckpt/FLUX.1-dev \\
        --prompt_file prompts.txt --rewards hpsv2:1.0 --output_dir outputs/flux
    torchrun --nproc_per_node 8 -m dancegrpo_fast.train --config my_run.yaml --parallel fsdp

Ratio exactly 1 on-policy (SPEC 2). The "old" log-prob of a trained (sample, step) is computed by
the training-time forward pass (same micro-batch, same per-sample timesteps, same autocast) while
the parameters are still the ones that sampled:
- for the training batches of the first optimizer step of an iteration the fused loss is called
  with old_log_prob=None: it uses the detached log-prob of the very forward pass being trained
  (free), so the ratio is exactly 1 on every backend;
- for the training batches of later optimizer steps of the same iteration, a no-grad pass with
  the same inputs runs before the first optimizer step and stores them.
The rollout's own log-probs (batched differently, without grad) are kept for diagnostics: the
logged `log_prob_gap` is their largest difference from the training-time values.
"""
from __future__ import annotations

import copy
import inspect
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import ops
from .checkpoint import CheckpointError, Lineage, load_checkpoint, resolve_resume, save_checkpoint
from .config import TrainConfig, config_to_yaml, parse_config
from .distributed import (DistributedState, all_gather, all_reduce_sum, cleanup, gradient_sync, init_distributed,
                          wrap_model)
from .evaluation import evaluate_policy
from .grpo import too_many_unusable
from .logging_utils import MetricsLogger, save_sample_grid, warn
from .output_lock import claim_output_dir, lock_output_dir
from .policies import ModelLoadError, Policy, build_policy
from .reports import read_metrics
from .rollout import autocast_context, decode_trajectory, mix_seed, prompt_seeds, rollout, sample_seeds
from .run_report import progress_fields, start_block, summary_block
from .trajectory import Trajectory


class RewardError(RuntimeError):
    """A reward model raised; the message names the reward."""


# ----------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------


def load_prompts(path, what: str = "prompt_file") -> List[str]:
    """One prompt per line, blank lines ignored. Errors on a missing or empty file (naming the
    config field `what`)."""
    if not path:
        raise ValueError(f"{what} is empty: give a text file with one prompt per line")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{what} {str(file)!r} does not exist")
    prompts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{what} {str(file)!r} holds no prompts (it is empty or only blank lines)")
    return prompts


def default_prompt_file(config: TrainConfig) -> str:
    """config.prompt_file, or for the tiny task its shipped training prompts."""
    if not config.prompt_file and config.model_family == "tiny":
        from .tiny.evaluate import prompt_file

        return str(prompt_file("train"))
    return config.prompt_file


def default_eval_prompt_file(config: TrainConfig) -> str:
    """config.eval_prompt_file, or for the tiny task its shipped held-out prompts; "" = no eval."""
    if not config.eval_prompt_file and config.model_family == "tiny":
        from .tiny.evaluate import prompt_file

        return str(prompt_file("heldout"))
    return config.eval_prompt_file


class PromptStream:
    """An endless stream of prompts: each epoch a fresh permutation seeded by (seed, epoch).
    `position` counts the prompts taken so far (checkpointed, so a resume continues exactly)."""

    def __init__(self, prompts: Sequence[str], seed: int, position: int = 0):
        self.prompts = list(prompts)
        self.seed = seed
        self.position = position
        self._epoch = -1
        self._order: Optional[List[int]] = None

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.prompts))
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 7))
            self._order = torch.randperm(len(self.prompts), generator=generator).tolist()
            self._epoch = epoch
        return self._order[offset]

    def take(self, count: int) -> Tuple[List[str], Tensor]:
        """The next `count` prompts and their global positions (int64)."""
        positions = list(range(self.position, self.position + count))
        self.position += count
        return [self.prompts[self._index(p)] for p in positions], torch.tensor(positions, dtype=torch.int64)


# ----------------------------------------------------------------------------------------------
# Rewards and advantages
# ----------------------------------------------------------------------------------------------


@dataclass
class RewardEntry:
    name: str
    function: Callable[[Tensor, List[str]], Tensor]
    weight: float


def build_rewards(config: TrainConfig, device) -> List[RewardEntry]:
    """Rewards named in the config, built through the reward registry (dancegrpo_fast.rewards)."""
    if not config.rewards:
        raise ValueError("no reward configured: pass --rewards name:weight[,name:weight] (or a rewards list in YAML)")
    from .rewards import build_reward

    if config.model_family == "tiny":
        from .tiny import reward as _tiny_rewards  # noqa: F401  registers tiny_geneval(_binary)

    entries = []
    for spec in config.rewards:
        kwargs = dict(spec.kwargs)
        factory = _reward_factory(spec.name)
        if factory is not None and "device" in inspect.signature(factory).parameters:
            kwargs.setdefault("device", str(device))
        entries.append(RewardEntry(spec.name, build_reward(spec.name, **kwargs), spec.weight))
    return entries


def _reward_factory(name: str):
    from .rewards import base

    return base._REGISTRY.get(name)


def score_rewards(rewards: Sequence[RewardEntry], samples: Tensor, prompts: List[str],
                  criteria: bool = False) -> Dict[str, Tensor]:
    """{name: (B,) float32 CPU}; a reward that raises becomes a RewardError naming it.

    criteria: also, for every reward whose function has a `criteria(images, prompts)` method
    (e.g. tiny_geneval), its per-criterion scores as extra keys "<name>/<criterion>" (logging
    only: the "<name>" entry is always the reward's own call, what the advantages use)."""
    scores = {}
    for entry in rewards:
        try:
            value = entry.function(samples, prompts)
        except Exception as error:
            raise RewardError(f"reward {entry.name!r} failed on a batch of {samples.shape[0]} samples: "
                              f"{type(error).__name__}: {error}") from error
        value = torch.as_tensor(value).detach().to(torch.float32).cpu().reshape(-1)
        if value.shape[0] != samples.shape[0]:
            raise RewardError(f"reward {entry.name!r} returned {value.shape[0]} scores for {samples.shape[0]} samples")
        scores[entry.name] = value
        method = getattr(entry.function, "criteria", None) if criteria else None
        if callable(method):
            try:
                parts = method(samples, prompts)
            except Exception as error:
                raise RewardError(f"reward {entry.name!r} failed computing its criteria on a batch of "
                                  f"{samples.shape[0]} samples: {type(error).__name__}: {error}") from error
            for criterion, part in parts.items():
                scores[f"{entry.name}/{criterion}"] = torch.as_tensor(part).detach().to(torch.float32).cpu().reshape(-1)
    return scores


def compute_advantages(scores: Dict[str, Tensor], weights: Dict[str, float], group_size: int, mode: str,
                       state: DistributedState, eps: float = 1e-8) -> Tuple[Tensor, Tensor]:
    """Weighted sum of per-reward advantages (SPEC 2) and the (B,) bool mask of valid samples.

    A group with a non-finite reward (NaN/inf) in any reward is skipped: its advantages are 0 (so
    it contributes no gradient) and it is excluded from the statistics. mode "group": per-prompt
    normalisation; "global": mean and std over the valid rewards of every rank.
    """
    from .grpo import combine_advantages, global_advantages, group_advantages

    names = list(scores)
    batch = scores[names[0]].shape[0]
    if batch % group_size:
        raise ValueError(f"group_size={group_size} does not divide the batch of {batch} samples")
    finite = torch.stack([torch.isfinite(scores[n]) for n in names]).all(dim=0)
    valid = finite.view(-1, group_size).all(dim=1).repeat_interleave(group_size)
    per_reward = {}
    for name in names:
        filled = torch.where(valid, scores[name], torch.zeros_like(scores[name]))
        if mode == "group":
            adv = group_advantages(filled, group_size, eps)
        else:
            gathered = all_gather(filled, state)
            gathered_valid = all_gather(valid.to(torch.uint8), state).bool()
            if int(gathered_valid.sum()) < 2:
                adv = torch.zeros(batch)
            else:
                stats = global_advantages(gathered[gathered_valid], eps)
                full = torch.zeros_like(gathered, dtype=torch.float32)
                full[gathered_valid] = stats
                adv = full[state.rank * batch:(state.rank + 1) * batch]
        per_reward[name] = torch.where(valid, adv, torch.zeros_like(adv))
    combined = combine_advantages(per_reward, {n: weights[n] for n in names})
    return combined, valid


# ----------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------


@dataclass
class UpdateStats:
    loss: float
    ratio_mean: float
    ratio_max_dev: float
    clip_fraction: float
    kl: float
    grad_norm: float
    log_prob_gap: float
    optimizer_steps: int
    first_step_ratio_max_dev: float


class Trainer:
    """Owns the loop. `rewards` overrides config.rewards with already built reward callables
    ({name: (callable, weight)} or a list of RewardEntry); `policy` overrides the model loading."""

    def __init__(self, config: TrainConfig, rewards=None, policy: Optional[Policy] = None,
                 state: Optional[DistributedState] = None):
        self.config = config.validate()
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        self.state = state or init_distributed()
        self.device = self.state.device
        # One run per output folder, settled before anything loads: the lock keeps a second
        # process out (released at the end of train(), or when the process ends), and a new run
        # never writes into an earlier run's files.
        self._output_lock = lock_output_dir(config.output_dir, self.state)
        resume_path = resolve_resume(config.resume, config.output_dir)
        if resume_path is None:
            claim_output_dir(config.output_dir, config.overwrite, bool(config.resume), self.state)
        # Rank-independent: every rank must create the same LoRA initialisation (FSDP2 shards each
        # rank's own copy, it does not broadcast).
        torch.manual_seed(mix_seed(config.seed, 11))
        self.prompts = PromptStream(load_prompts(default_prompt_file(config)), config.seed)
        self.eval_prompts = self._load_eval_prompts()
        self._last_eval_iteration: Optional[int] = None
        self._last_eval = None  # rank 0: (images, details) of the latest evaluation
        self.policy = policy if policy is not None else build_policy(config, self.device)
        self.schedule = self.policy.schedule()
        self.rewards = self._as_reward_entries(rewards) if rewards is not None else build_rewards(config, self.device)
        self._prepare_model()
        self.optimizer = torch.optim.AdamW(self.trainable_parameters, lr=config.lr,
                                           betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps,
                                           weight_decay=config.weight_decay)
        from diffusers.optimization import get_scheduler

        steps_per_iteration = self.optimizer_steps_per_iteration
        self.lr_scheduler = get_scheduler(config.lr_scheduler, self.optimizer,
                                          num_warmup_steps=config.lr_warmup_steps,
                                          num_training_steps=config.num_iterations * steps_per_iteration)
        self.iteration = 0
        self.skipped_groups_total = 0
        self.logger = MetricsLogger(config.output_dir, enabled=self.state.is_main, tensorboard=config.tensorboard)
        self._stop_requested = False
        self.lineage = Lineage.start(resume_path)  # recorded in every checkpoint this run writes
        if resume_path is not None:
            self._resume(resume_path)
        if self.state.is_main:
            Path(config.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(config.output_dir) / "config.yaml").write_text(config_to_yaml(config))

    # --- setup ---------------------------------------------------------------------------------
    def _load_eval_prompts(self) -> List[str]:
        """The held-out prompts (the first eval_num_prompts), or [] when evaluation is off."""
        c = self.config
        if c.eval_every <= 0:
            return []
        path = default_eval_prompt_file(c)
        if not path:
            if self.state.is_main:
                warn(f"eval_every={c.eval_every} but no eval_prompt_file (only model_family tiny has a default "
                     f"held-out list): no held-out evaluation")
            return []
        prompts = load_prompts(path, "eval_prompt_file")
        return prompts[:c.eval_num_prompts] if c.eval_num_prompts else prompts

    @staticmethod
    def _as_reward_entries(rewards) -> List[RewardEntry]:
        if isinstance(rewards, dict):
            return [RewardEntry(name, fn, float(weight)) for name, (fn, weight) in rewards.items()]
        return list(rewards)

    def _prepare_model(self) -> None:
        config, model = self.config, self.policy.model
        if config.use_lora:
            from peft import LoraConfig

            model.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, init_lora_weights="gaussian",
                                         target_modules=list(config.lora_target_modules)))
            for name, param in model.named_parameters():
                if param.requires_grad:
                    param.data = param.data.float()  # LoRA weights train in float32
        else:
            if any(p.dtype != torch.float32 for p in model.parameters()):
                model.to(torch.float32)  # float32 master weights; autocast gives bf16 compute on GPU
            model.requires_grad_(True)
        if config.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        self.reference_model = None
        if config.kl_beta > 0 and not config.use_lora:
            # Full fine-tune: the reference policy is a frozen copy of the base model.
            self.reference_model = copy.deepcopy(model).eval().requires_grad_(False)
        self.policy.forward_model = wrap_model(model, config.parallel, self.state, config.mixed_precision)
        self.trainable_parameters = [p for p in model.parameters() if p.requires_grad]
        if not self.trainable_parameters:
            raise ValueError("the model has no trainable parameters (check lora_target_modules)")
        self.ema = None
        if config.ema_decay > 0:
            self.ema = {name: p.detach().clone().float() for name, p in model.named_parameters() if p.requires_grad}

    @property
    def optimizer_steps_per_iteration(self) -> int:
        c = self.config
        return c.samples_per_rank // c.train_batch_size // c.gradient_accumulation_steps

    def _resume(self, path: Path) -> None:
        training = load_checkpoint(path, self.policy, self.optimizer, self.lr_scheduler, self.config, self.state)
        self.iteration = int(training["iteration"])
        self.prompts.position = int(training["prompt_position"])
        self.skipped_groups_total = int(training.get("skipped_groups_total", 0))
        if self.ema is not None and training.get("ema"):
            for name, value in training["ema"].items():
                target = self.ema[name]
                if hasattr(target, "device_mesh"):  # FSDP2: shard the full tensor like the parameter
                    from torch.distributed.tensor import distribute_tensor

                    value = distribute_tensor(value.to(target.device), target.device_mesh, target.placements)
                target.copy_(value)
        self.logger.truncate_after(self.iteration)

    def save(self) -> Path:
        extra = {"prompt_position": self.prompts.position, "skipped_groups_total": self.skipped_groups_total}
        return save_checkpoint(self.config.output_dir, self.iteration, self.policy, self.optimizer, self.lr_scheduler,
                               self.config, extra, self.state, ema=self.ema, keep=self.config.keep_checkpoints,
                               lineage=self.lineage)

    # --- one iteration -------------------------------------------------------------------------
    def collect(self, on_batch=None) -> Trajectory:
        """Rollout of this rank's prompts for the current iteration (on_batch: see rollout)."""
        c, s = self.config, self.state
        prompts, positions = self.prompts.take(c.prompts_per_rank * s.world_size)
        mine = slice(s.rank * c.prompts_per_rank, (s.rank + 1) * c.prompts_per_rank)
        prompts, positions = prompts[mine], positions[mine]
        first_prompt = int(positions[0])
        seeds_p = prompt_seeds(c.seed, self.iteration, first_prompt, c.prompts_per_rank)
        seeds_s = sample_seeds(c.seed, self.iteration, first_prompt * c.group_size, c.samples_per_rank)
        trajectory = rollout(self.policy, self.schedule, prompts, c.group_size, positions, seeds_p, seeds_s,
                             c.rollout_batch_size, c.shared_noise, c.mixed_precision, on_batch=on_batch)
        return trajectory

    def collect_and_score(self) -> Tuple[Trajectory, Tensor, Dict[str, Tensor], float, float]:
        """Rollout, decoding and rewards. With reward_overlap, each rollout batch is decoded and
        scored in a background thread while the next batch samples (the policy is the same for
        the whole iteration, so this stays exactly on-policy); only the last batch's rewards are
        waited for. Returns trajectory, samples, scores, rollout seconds, reward seconds (the
        time spent waiting for rewards after the rollout). scores: {reward name: (B,)} plus, for
        rewards with per-criterion scores, {"<name>/<criterion>": (B,)} (logging only)."""
        c = self.config
        start = time.perf_counter()
        if not c.reward_overlap:
            trajectory = self.collect()
            samples = decode_trajectory(self.policy, trajectory, c.rollout_batch_size)
            rollout_seconds = time.perf_counter() - start
            start = time.perf_counter()
            scores = score_rewards(self.rewards, samples, trajectory.sample_prompts(), criteria=True)
            return trajectory, samples, scores, rollout_seconds, time.perf_counter() - start
        pending = []

        def on_batch(final_latents: Tensor, prompts: List[str]) -> None:
            images = self.policy.decode(final_latents)
            pending.append((images, self.reward_pool.submit(images, prompts)))

        trajectory = self.collect(on_batch)
        rollout_seconds = time.perf_counter() - start
        start = time.perf_counter()
        results = [future.result() for _, future in pending]
        reward_seconds = time.perf_counter() - start
        samples = torch.cat([images for images, _ in pending])
        scores = {name: torch.cat([r[name] for r in results]) for name in results[0]}
        return trajectory, samples, scores, rollout_seconds, reward_seconds

    @property
    def reward_pool(self):
        if getattr(self, "_reward_pool", None) is None:
            from .rewards import AsyncRewardPool

            self._reward_pool = AsyncRewardPool(
                lambda images, prompts: score_rewards(self.rewards, images, prompts, criteria=True))
        return self._reward_pool

    def trained_steps(self, trajectory: Trajectory) -> Tensor:
        """(B, T) int64 step indices: per sample, its own permutation of the trainable steps
        (SDE steps without the last transition), first T = int(len * timestep_fraction) kept."""
        trainable = torch.tensor(self.config.trainable_steps(), dtype=torch.int64)
        count = self.config.trained_timesteps()
        rows = []
        for seed in trajectory.sample_seeds.tolist():
            generator = torch.Generator().manual_seed(mix_seed(seed, 5))
            rows.append(trainable[torch.randperm(len(trainable), generator=generator)[:count]])
        return torch.stack(rows)

    def _forward(self, trajectory: Trajectory, cond, rows: Tensor, steps: Tensor, module=None):
        latents = trajectory.latents[rows.to(trajectory.latents.device), steps.to(trajectory.latents.device)]
        next_latents = trajectory.latents[rows.to(trajectory.latents.device), steps.to(trajectory.latents.device) + 1]
        batch_cond = {k: v[trajectory.prompt_rows[rows].to(v.device)] for k, v in cond.items()}
        with autocast_context(self.device, self.config.mixed_precision):
            model_output = self.policy.predict(latents, steps, batch_cond, self.schedule, module=module)
        return model_output, latents, next_latents, batch_cond

    def _reference_output(self, latents, steps, batch_cond):
        with torch.no_grad(), autocast_context(self.device, self.config.mixed_precision):
            if self.config.use_lora:
                self.policy.model.disable_adapters()
                try:
                    return self.policy.predict(latents, steps, batch_cond, self.schedule, module=self.policy.model)
                finally:
                    self.policy.model.enable_adapters()
            return self.policy.predict(latents, steps, batch_cond, self.schedule, module=self.reference_model)

    def update(self, trajectory: Trajectory, advantages: Tensor, training_order: Optional[Tensor] = None) -> UpdateStats:
        """GRPO update on one trajectory: per-sample timestep subsets, the fused loss, gradient
        accumulation, clipping, AdamW; returns logging statistics."""
        c = self.config
        batch = trajectory.batch_size
        steps = self.trained_steps(trajectory)
        count = steps.shape[1]
        if training_order is None:
            generator = torch.Generator().manual_seed(mix_seed(c.seed, self.iteration, 3, self.state.rank))
            training_order = torch.randperm(batch, generator=generator)
        micro_batches = list(training_order.split(c.train_batch_size))
        accumulation = c.gradient_accumulation_steps
        groups = [micro_batches[i:i + accumulation] for i in range(0, len(micro_batches), accumulation)]
        cond = self.policy.encode(trajectory.prompts)
        advantages = advantages.to(self.device, torch.float32)
        old_log_probs = torch.full((batch, count), float("nan"), dtype=torch.float32, device=self.device)
        # Old log-probs of the batches trained after the first optimizer step: training-time forward
        # at the sampling parameters (see the module docstring).
        if len(groups) > 1:
            with torch.no_grad():
                for group in groups[1:]:
                    for rows in group:
                        for j in range(count):
                            v, x, x_next, _ = self._forward(trajectory, cond, rows, steps[rows, j])
                            coeffs = self.schedule.coefficients(steps[rows, j], self.device)
                            old_log_probs[rows.to(self.device), j] = ops.step_log_prob(v, x, x_next, coeffs)
        scale = 1.0 / (accumulation * count)
        # Statistics stay on the device until the end: a float() per micro-step would stall the
        # GPU pipeline at every step.
        zero = torch.zeros((), dtype=torch.float32, device=self.device)
        totals = {"loss": zero.clone(), "ratio": zero.clone(), "clipped": zero.clone(), "kl": zero.clone()}
        n_trained, grad_norms = 0, []
        ratio_max_dev = first_step_dev = zero.clone()
        module = self.policy.forward_model
        for group_index, group in enumerate(groups):
            for k, rows in enumerate(group):
                device_rows = rows.to(self.device)
                for j in range(count):
                    sync = k == len(group) - 1 and j == count - 1
                    with gradient_sync(module, self.policy.model, sync):
                        step = steps[rows, j]
                        v, x, x_next, batch_cond = self._forward(trajectory, cond, rows, step)
                        coeffs = self.schedule.coefficients(step, self.device)
                        reference = self._reference_output(x, step, batch_cond) if c.kl_beta > 0 else None
                        # Before the first optimizer step the sampling policy is the one being
                        # trained: old_log_prob=None makes the op use its own log-prob (ratio 1).
                        old = None if group_index == 0 else old_log_probs[device_rows, j]
                        out = ops.fused_step_loss(v, x, x_next, coeffs, old,
                                                  advantages[device_rows], clip_range=c.clip_range,
                                                  adv_clip_max=c.adv_clip_max, ref_model_output=reference,
                                                  kl_beta=c.kl_beta)
                        (out.loss * scale).backward()
                        if group_index == 0:
                            old_log_probs[device_rows, j] = out.log_prob
                    totals["loss"] += out.loss.detach() * scale
                    totals["ratio"] += out.ratio.sum()
                    totals["clipped"] += out.clipped.sum()
                    totals["kl"] += out.kl.sum()
                    n_trained += int(out.ratio.numel())
                    ratio_max_dev = torch.maximum(ratio_max_dev, (out.ratio - 1).abs().max())
            if group_index == 0:
                first_step_dev = ratio_max_dev.clone()
            grad_norms.append(self._optimizer_step())
        rollout_lp = trajectory.log_probs[torch.arange(batch, device=trajectory.log_probs.device)[:, None],
                                          steps.to(trajectory.log_probs.device)]
        gap = float((rollout_lp.to(self.device) - old_log_probs).abs().max())
        n = max(n_trained, 1)
        return UpdateStats(loss=float(totals["loss"]) / len(groups), ratio_mean=float(totals["ratio"]) / n,
                           ratio_max_dev=float(ratio_max_dev), clip_fraction=float(totals["clipped"]) / n,
                           kl=float(totals["kl"]) / n, grad_norm=sum(grad_norms) / len(grad_norms), log_prob_gap=gap,
                           optimizer_steps=len(groups), first_step_ratio_max_dev=float(first_step_dev))

    def _optimizer_step(self) -> float:
        c = self.config
        # max_grad_norm 0: no clipping (an infinite bound), the norm is still logged.
        bound = c.max_grad_norm if c.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.trainable_parameters, bound)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            with torch.no_grad():
                for name, param in self.policy.model.named_parameters():
                    if name in self.ema:
                        self.ema[name].lerp_(param.detach().float(), 1.0 - c.ema_decay)
        return norm

    def train_iteration(self) -> Dict:
        """One iteration: rollout, rewards, advantages, update; returns the logged row."""
        c, s = self.config, self.state
        trajectory, samples, scores, rollout_seconds, reward_seconds = self.collect_and_score()
        weights = {entry.name: entry.weight for entry in self.rewards}
        # Only the rewards' own scores feed the advantages; "<name>/<criterion>" keys are logged.
        reward_scores = {entry.name: scores[entry.name] for entry in self.rewards}
        advantages, valid = compute_advantages(reward_scores, weights, c.group_size, c.advantage, s)
        skipped = int(all_reduce_sum(torch.tensor([(~valid).sum().item() // c.group_size]), s).item())
        total_groups = c.prompts_per_rank * s.world_size
        if too_many_unusable(skipped, total_groups, c.max_skipped_group_fraction):
            unusable = [name for name, value in reward_scores.items() if not bool(torch.isfinite(value).all())]
            which = (f"reward{'s' if len(unusable) > 1 else ''} {', '.join(map(repr, unusable))}" if unusable
                     else "on other ranks")
            raise RewardError(f"iteration {self.iteration + 1}: {skipped} of {total_groups} groups have NaN/inf rewards "
                              f"({which}), at least max_skipped_group_fraction={c.max_skipped_group_fraction:g} of "
                              f"the iteration's groups: stopping (no checkpoint of this iteration is written)")
        if skipped:
            self.skipped_groups_total += skipped
            if s.is_main:
                warn(f"iteration {self.iteration + 1}: skipped {skipped} group(s) with NaN/inf rewards "
                     f"({self.skipped_groups_total} so far); the run goes on")
        start = time.perf_counter()
        stats = self.update(trajectory, advantages)
        update_seconds = time.perf_counter() - start
        self.iteration += 1
        row = {"iteration": self.iteration, "prompt_position": self.prompts.position}
        for name, value in reward_scores.items():
            finite = self._gathered_finite(value)
            row[f"reward/{name}/mean"] = float(finite.mean()) if finite.numel() else float("nan")
            row[f"reward/{name}/std"] = float(finite.std()) if finite.numel() > 1 else 0.0
        for entry in self.rewards:
            for key, value in scores.items():
                # Per-criterion means (NaN-aware: e.g. position of one-group prompts); "score" is
                # the reward's own score, already logged as its mean.
                if not key.startswith(f"{entry.name}/") or key == f"{entry.name}/score":
                    continue
                finite = self._gathered_finite(value)
                row[f"reward/{key}"] = float(finite.mean()) if finite.numel() else float("nan")
        total_seconds = rollout_seconds + reward_seconds + update_seconds
        row.update({"loss": stats.loss, "ratio_mean": stats.ratio_mean, "ratio_max_dev": stats.ratio_max_dev,
                    "first_step_ratio_max_dev": stats.first_step_ratio_max_dev,
                    "clip_fraction": stats.clip_fraction, "kl": stats.kl, "grad_norm": stats.grad_norm,
                    "log_prob_gap": stats.log_prob_gap, "lr": self.lr_scheduler.get_last_lr()[0],
                    "optimizer_steps": stats.optimizer_steps, "skipped_groups": skipped,
                    "skipped_groups_total": self.skipped_groups_total,
                    "seconds_rollout": rollout_seconds, "seconds_reward": reward_seconds,
                    "seconds_update": update_seconds,
                    "samples_per_second": c.samples_per_rank * s.world_size / max(total_seconds, 1e-9)})
        evaluated = self._eval_due()
        if evaluated:
            row.update(self.evaluate())  # after the update, in this iteration's row
        self.logger.log(row)
        if evaluated:
            self.write_reward_curve()
        if c.sample_every and self.iteration % c.sample_every == 0 and s.is_main:
            save_sample_grid(samples, Path(c.output_dir) / "samples" / f"iter_{self.iteration:06d}.png")
        return row

    def _gathered_finite(self, value: Tensor) -> Tensor:
        """The finite values of a per-sample tensor over all ranks, on the CPU (for logging)."""
        gathered = all_gather(value.to(self.device), self.state).cpu()
        return gathered[torch.isfinite(gathered)]

    # --- held-out evaluation -------------------------------------------------------------------
    def _eval_due(self) -> bool:
        """Evaluate after this iteration: every eval_every iterations and after the last one."""
        c = self.config
        return bool(self.eval_prompts) and (self.iteration % c.eval_every == 0 or self.iteration >= c.num_iterations)

    def evaluate(self) -> Dict[str, float]:
        """Held-out evaluation of the current model (every rank takes part): the eval prompts with
        fixed noise (eval_seed), scored with the training rewards. Returns the metrics
        (eval/<reward>/..., seconds_eval); on rank 0 also writes
        samples/eval_iter_NNNNNN.png (the first 16 samples) and, at iteration 0,
        samples/eval_before.pt (the "before" of before_after.png). {} when evaluation is off."""
        if not self.eval_prompts:
            return {}
        c, s = self.config, self.state
        start = time.perf_counter()
        metrics, images, details = evaluate_policy(self.policy, self.schedule, self.eval_prompts, self.rewards,
                                                   c.eval_samples_per_prompt, c.eval_seed, c.rollout_batch_size,
                                                   c.mixed_precision, s, return_details=True)
        metrics["seconds_eval"] = time.perf_counter() - start
        self._last_eval_iteration = self.iteration
        if s.is_main:
            samples_dir = Path(c.output_dir) / "samples"
            save_sample_grid(images, samples_dir / f"eval_iter_{self.iteration:06d}.png", max_samples=16,
                             min_size=128)
            self._last_eval = (images, details)
            if self.iteration == 0:
                self._save_eval_before(images, details, samples_dir / "eval_before.pt")
        return metrics

    def _before_after_entries(self, details) -> List[int]:
        """Positions (in this rank's eval entries) of the first sample of the first 8 eval prompts."""
        per_prompt = self.config.eval_samples_per_prompt
        return [j for j, k in enumerate(details["indices"].tolist()) if k % per_prompt == 0 and k // per_prompt < 8]

    def _sample_scores(self, details, position: int) -> Dict[str, float]:
        return {entry.name: float(details["scores"][entry.name][position]) for entry in self.rewards}

    def _save_eval_before(self, images: Tensor, details, path: Path) -> None:
        """The iteration-0 eval samples of the before/after sheet, as uint8 with their prompts,
        entry numbers and rewards (kept on disk so a resumed run still has them)."""
        from .reports import to_uint8

        chosen = self._before_after_entries(details)
        torch.save({"iteration": self.iteration, "eval_seed": self.config.eval_seed,
                    "indices": [int(details["indices"][j]) for j in chosen],
                    "prompts": [details["prompts"][j] for j in chosen],
                    "images": to_uint8(images[chosen]) if chosen else torch.zeros(0, dtype=torch.uint8),
                    "scores": [self._sample_scores(details, j) for j in chosen]}, path)

    def write_before_after(self) -> Optional[Path]:
        """Rank 0: output_dir/before_after.png from samples/eval_before.pt (iteration 0) and the
        latest evaluation, pairing samples with the same eval entry (prompt and noise). Problems
        only warn: the checkpoint is already written."""
        if not self.state.is_main or self._last_eval is None:
            return None
        try:
            return self._write_before_after()
        except Exception as error:  # a picture must never fail a finished run
            warn(f"could not write before_after.png: {type(error).__name__}: {error}")
            return None

    def _write_before_after(self) -> Optional[Path]:
        from .reports import save_before_after

        c = self.config
        path = Path(c.output_dir) / "samples" / "eval_before.pt"
        if not path.is_file():
            warn(f"no {path} (the run did not evaluate at iteration 0): no before_after.png")
            return None
        before = torch.load(path, weights_only=True)
        images, details = self._last_eval
        position = {int(k): j for j, k in enumerate(details["indices"].tolist())}
        pairs = [(i, position[k]) for i, k in enumerate(before["indices"])
                 if k in position and details["prompts"][position[k]] == before["prompts"][i]]
        if before.get("eval_seed") != c.eval_seed or not pairs:
            warn("the iteration-0 eval samples do not match this run's eval prompts/seed: no before_after.png")
            return None
        return save_before_after(
            Path(c.output_dir) / "before_after.png",
            before["images"][[i for i, _ in pairs]], images[[j for _, j in pairs]],
            [before["prompts"][i] for i, _ in pairs], [before["scores"][i] for i, _ in pairs],
            [self._sample_scores(details, j) for _, j in pairs],
            before_label=f"before (iteration {before['iteration']})",
            after_label=f"after (iteration {self._last_eval_iteration})")

    def write_reward_curve(self) -> Optional[Path]:
        """Rank 0: output_dir/reward_curve.png from metrics.jsonl (skipped, with one warning,
        when matplotlib is missing; a plotting error only warns)."""
        if not self.state.is_main:
            return None
        from .reports import plot_reward_curve

        try:
            return plot_reward_curve(self.logger.path, Path(self.config.output_dir) / "reward_curve.png")
        except Exception as error:  # a picture must never stop a run
            warn(f"could not write reward_curve.png: {type(error).__name__}: {error}")
            return None

    def train(self) -> List[Dict]:
        """Run until config.num_iterations; checkpoint every K iterations and at exit (also on
        SIGTERM/SIGINT, after the current iteration). With eval_every, evaluate on the held-out
        prompts before the first iteration (fresh runs), every eval_every iterations and after
        the last. Returns the logged rows."""
        c = self.config
        rows = []
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

        def request_stop(signum, frame):
            self._stop_requested = True

        try:
            for sig in previous:
                signal.signal(sig, request_stop)
        except ValueError:  # not the main thread
            previous = {}
        started = time.perf_counter()
        if self.state.is_main:
            names = [f"{entry.name}:{entry.weight:g}" for entry in self.rewards]
            print(start_block(c, self.device, self.state.world_size, self.iteration, names,
                              ops.resolve_backend(self.device)), flush=True)
        progress = None
        if c.progress_bar and self.state.is_main:
            from tqdm import tqdm

            progress = tqdm(total=c.num_iterations, initial=self.iteration, desc="DanceGRPO", dynamic_ncols=True)
        last_saved = first_iteration = self.iteration
        last_checkpoint = None
        try:
            if self.eval_prompts and self.iteration == 0 and c.num_iterations > 0:
                # Before the first iteration of a fresh run (not on resume): the "before" point.
                row = {"iteration": 0, **self.evaluate()}
                self.logger.log(row)
                rows.append(row)
                self.write_reward_curve()
            while self.iteration < c.num_iterations and not self._stop_requested:
                row = self.train_iteration()
                rows.append(row)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(progress_fields(row, c.kl_beta > 0))
                if self.iteration % c.checkpoint_every == 0:
                    last_checkpoint = self.save()
                    last_saved = self.iteration
            if self.iteration != last_saved:
                last_checkpoint = self.save()
            if self.iteration > first_iteration:
                if self.eval_prompts and self._last_eval_iteration != self.iteration:
                    # Stopped early (SIGTERM/SIGINT): the last iteration was not evaluated yet.
                    row = {"iteration": self.iteration, **self.evaluate()}
                    self.logger.log(row)
                    rows.append(row)
                if self.eval_prompts:
                    self.write_before_after()
                    self.write_reward_curve()
        finally:
            if progress is not None:
                progress.close()
            self.logger.close()
            if self._output_lock is not None:
                self._output_lock.release()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self.state.is_main:
            print(summary_block(c, read_metrics(self.logger.path), time.perf_counter() - started, last_checkpoint,
                                self._stop_requested), flush=True)
        return rows


def check_before_loading(config: TrainConfig) -> None:
    """Configuration errors a run would otherwise meet only after minutes of loading: reward
    names the registry does not know, a model folder that does not exist."""
    from .rewards import available_rewards

    known = available_rewards()
    unknown = [spec.name for spec in config.rewards if spec.name not in known]
    if unknown:
        raise ValueError(f"rewards: unknown reward name(s) {unknown}; known: {known} (a reward of your own "
                         f"is registered with dancegrpo_fast.rewards.register_reward)")
    if config.model_path and not Path(config.model_path).is_dir():
        raise ValueError(f"model_path {config.model_path!r} does not exist or is not a folder (expected a local "
                         f"{config.model_family} checkpoint in the diffusers layout)")


# Errors that are the user's to fix: one line and exit code 2, no traceback (DEBUG_ENV=1 shows it).
USER_ERRORS = (CheckpointError, RewardError, ModelLoadError, ValueError, FileNotFoundError)
DEBUG_ENV = "DANCEGRPO_DEBUG"


def _user_error(error: BaseException) -> int:
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        raise error
    print(f"error: {error} (set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
    return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        config = parse_config(argv)
        check_before_loading(config)
    except USER_ERRORS as error:
        return _user_error(error)
    state = init_distributed()
    try:
        Trainer(config, state=state).train()
    except USER_ERRORS as error:
        return _user_error(error)
    finally:
        cleanup(state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
