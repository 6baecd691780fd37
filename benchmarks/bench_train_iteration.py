"""One training iteration on a tiny FLUX-class model on the CPU: this trainer against the
reference code's loop structure at the same settings.

Reference structure (DanceGRPO's train loop): rollout one sample at a time, the unfused step
written as the paper writes it (`sde.dance_step`: x0 prediction, score, then the Gaussian
log-prob), decoding one sample at a time, training one sample at a time with the log-prob from
the unfused step and the loss from `grpo.grpo_loss`, the rollout log-prob used as "old".
Both loops call the same policy (same model, same text cache), so the difference is the loop
structure and the fused ops.

    .venv/bin/python benchmarks/bench_train_iteration.py [--repeats 7] [--size 32] [--threads 1]

Writes benchmarks/results/train_iteration_cpu.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from dancegrpo_fast import grpo, sde  # noqa: E402
from dancegrpo_fast.config import TrainConfig  # noqa: E402
from dancegrpo_fast.rollout import autocast_context  # noqa: E402
from dancegrpo_fast.sde import flow_sigmas  # noqa: E402
from dancegrpo_fast.grpo import compute_advantages  # noqa: E402
from dancegrpo_fast.train import Trainer  # noqa: E402
from helpers.tiny_models import make_flux, write_prompts  # noqa: E402


def brightness(images, prompts):
    return images.float().mean(dim=tuple(range(1, images.dim())))


def synchronize(device) -> None:
    """Wait for queued GPU work, so that host clocks time what ran (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def reference_iteration(trainer: Trainer) -> dict:
    """The reference loop structure: batch size 1 everywhere, unfused step and loss.

    Runs on the trainer's device with the trainer's autocast, so that only the loop shape and the
    fused ops differ from `Trainer.train_iteration`."""
    c, policy, schedule, device = trainer.config, trainer.policy, trainer.schedule, trainer.device
    sa, g, mixed = c.sampler, c.grpo, c.model.mixed_precision
    sigmas = flow_sigmas(sa.num_steps, sa.shift, dtype=torch.float64)
    prompts, _ = trainer.prompts.take(c.rollout.prompts_per_rank)
    cond_p = policy.encode(prompts)
    generator = torch.Generator(device=device).manual_seed(trainer.iteration)
    order_generator = torch.Generator().manual_seed(trainer.iteration)
    shape = tuple(policy.latent_shape())
    synchronize(device)
    start = time.perf_counter()
    samples = []
    with torch.no_grad():
        for p in range(len(prompts)):
            initial = torch.randn((1,) + shape, generator=generator, device=device)
            cond = {k: v[p:p + 1] for k, v in cond_p.items()}
            for _ in range(g.group_size):
                x = initial.clone()
                latents, log_probs = [x], []
                for i in range(sa.num_steps):
                    with autocast_context(device, mixed):
                        v = policy.predict(x, torch.tensor([i]), cond, schedule)
                    out = sde.dance_step(v, x, float(sigmas[i]), float(sigmas[i + 1]), sa.eta, generator=generator)
                    x = out.prev_sample
                    latents.append(x)
                    log_probs.append(out.log_prob)
                samples.append((p, latents, log_probs))
        images = torch.cat([policy.decode(s[1][-1]) for s in samples])
    synchronize(device)
    rollout_seconds = time.perf_counter() - start
    start = time.perf_counter()
    scores = trainer.rewards(images, [prompts[s[0]] for s in samples])
    reward_seconds = time.perf_counter() - start
    advantages, _ = compute_advantages(scores, trainer.rewards.weights, g.group_size, "group")
    advantages = advantages.to(device)
    start = time.perf_counter()
    count = c.trained_timesteps()
    accumulation = len(samples)  # one optimizer step per iteration, as the trainer's settings
    trainable = torch.tensor(sa.trainable_steps())
    for k, (p, latents, log_probs) in enumerate(samples):
        cond = {key: v[p:p + 1] for key, v in cond_p.items()}
        chosen = trainable[torch.randperm(len(trainable), generator=order_generator)[:count]]
        for i in chosen.tolist():
            with autocast_context(device, mixed):
                v = policy.predict(latents[i], torch.tensor([i]), cond, schedule)
            out = sde.dance_step(v, latents[i], float(sigmas[i]), float(sigmas[i + 1]), sa.eta,
                                 prev_sample=latents[i + 1])
            loss = grpo.grpo_loss(out.log_prob, log_probs[i], advantages[k:k + 1], g.clip_range, g.adv_clip_max)
            (loss / (accumulation * count)).backward()
    torch.nn.utils.clip_grad_norm_(trainer.setup.parameters, c.optim.max_grad_norm)
    trainer.setup.optimizer.step()
    trainer.setup.optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    update_seconds = time.perf_counter() - start
    return {"seconds_rollout": rollout_seconds, "seconds_reward": reward_seconds, "seconds_update": update_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (latent side = size / 2)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "train_iteration_cpu.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = make_flux(tmp / "flux")
        settings = dict(model_family="flux", model_path=str(folder), prompt_file=str(write_prompts(tmp / "p.txt")),
                        output_dir=str(tmp / "out"), height=args.size, width=args.size, num_steps=8, group_size=4,
                        prompts_per_rank=2, rollout_batch_size=8, train_batch_size=4, gradient_accumulation_steps=2,
                        timestep_fraction=0.6, max_sequence_length=16, num_iterations=1000, progress_bar=False,
                        tensorboard=False, mixed_precision="no")
        trainer = Trainer(TrainConfig.from_dict(settings), rewards={"brightness": (brightness, 1.0)})
        reference = Trainer(TrainConfig.from_dict({**settings, "output_dir": str(tmp / "ref")}),
                            rewards={"brightness": (brightness, 1.0)})
        trainer.train_iteration()  # warm-up (text cache, allocator)
        reference_iteration(reference)
        ours, theirs = [], []
        for _ in range(args.repeats):
            row = trainer.train_iteration()
            ours.append({k: row[k] for k in ("seconds_rollout", "seconds_reward", "seconds_update")})
            theirs.append(reference_iteration(reference))

    def summary(rows):
        rows = [{**r, "seconds_total": sum(r.values())} for r in rows]
        return {k: statistics.median(r[k] for r in rows) for k in rows[0]}

    result = {"benchmark": "train_iteration", "device": "cpu", "torch_threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "settings": {k: settings[k] for k in ("height", "width", "num_steps", "group_size", "prompts_per_rank",
                                                    "rollout_batch_size", "train_batch_size",
                                                    "gradient_accumulation_steps", "timestep_fraction")},
              "samples_per_iteration": settings["group_size"] * settings["prompts_per_rank"],
              "repeats": args.repeats, "statistic": "median over repeats",
              "trainer_runs": ours, "reference_runs": theirs,
              "trainer": summary(ours), "reference_loop": summary(theirs)}
    result["speedup_total"] = result["reference_loop"]["seconds_total"] / result["trainer"]["seconds_total"]
    for phase in ("seconds_rollout", "seconds_update"):
        result[f"speedup_{phase[8:]}"] = result["reference_loop"][phase] / result["trainer"][phase]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
