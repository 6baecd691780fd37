"""Evaluate the tiny model: sample prompts with the RL sampler (DanceGRPO SDE by default) and
score them with the rule-based tiny_geneval reward, per criterion.

    python -m dancegrpo_fast.tiny.evaluate --split heldout                # the shipped weights
    python -m dancegrpo_fast.tiny.evaluate --split heldout \\
        --transformer outputs/run/checkpoints/iter_000040/model/transformer  # an RL checkpoint
    python -m dancegrpo_fast.tiny.evaluate --random_init --split heldout  # the untrained model

Sampling is the trainer's held-out evaluation sampling (dancegrpo_fast.rollout.sample_fixed):
TinyPolicy.schedule() (SPEC 1a coefficients), noise.grouped_noise for x_T (one seed per prompt)
and ops.sde_step with per-sample seeds, so a given (prompt list, seed) is reproducible and equals
the trainer's eval samples with eval_seed = seed.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from ..config import ModelConfig, SamplerConfig, apply_preset
from ..logging_utils import save_sample_grid
from ..prompts import load_prompts
from ..rollout import sample_fixed
from ..sde_window import window_fits
from . import WEIGHTS_DIR
from .model import TinyFlowPipeline
from .policy import TinyPolicy
from .reward import TinyGenEvalReward, summarize

PROMPT_DIR = Path(__file__).parent / "prompts"


def prompt_file(split: str) -> Path:
    """The shipped prompt list of a split: prompts/train.txt (RL training prompts) or
    prompts/heldout.txt (evaluation prompts, compositions never trained on)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return PROMPT_DIR / f"{split}.txt"


def load_split_prompts(split: str) -> List[str]:
    return load_prompts(prompt_file(split), "split")


def sampler_config(num_steps: int = 8, eta: float = 0.5, shift: float = 3.0, sampler: str = "dance",
                   cfg_scale: float = 1.0, sde_window_start: int = 0, sde_window_size: int = 0) -> SamplerConfig:
    """The sampler the policy samples with: SDE steps in the window [sde_window_start,
    sde_window_start + sde_window_size) and first-order ODE steps elsewhere (size 0: every step
    is SDE), as the trainer's evaluation samples at the first iteration."""
    return SamplerConfig(name=sampler, num_steps=num_steps, eta=eta, shift=shift, cfg_scale=cfg_scale,
                         sde_window_start=sde_window_start, sde_window_size=sde_window_size)


def load_policy(model_path: str = "", transformer: Optional[str] = None, random_init_seed: Optional[int] = None,
                device="cpu", **sampler_kwargs) -> TinyPolicy:
    """A TinyPolicy: the shipped weights (model_path ""), a weights folder, a randomly initialised
    model (random_init_seed), and/or a fine-tuned transformer folder (an RL checkpoint's
    model/transformer) replacing the transformer."""
    if random_init_seed is not None:
        # A randomly initialised transformer and text encoder over the trained VAE of model_path
        # (the shipped one by default): what the flow itself learned is what the baseline lacks.
        torch.manual_seed(random_init_seed)
        random_pipe = TinyFlowPipeline.from_config()
        trained = TinyFlowPipeline.from_pretrained(model_path or WEIGHTS_DIR)
        folder = tempfile.mkdtemp(prefix="tiny_random_")
        TinyFlowPipeline(random_pipe.transformer, random_pipe.text_encoder, trained.image_size,
                         trained.vae).save_pretrained(folder)
        model_path = folder
    options = ModelConfig(family="tiny", path=str(model_path), height=32, width=32, dtype="float32",
                          mixed_precision="no")
    policy = TinyPolicy(options, sampler_config(**sampler_kwargs), device)
    if transformer:
        from diffusers import FluxTransformer2DModel

        state = FluxTransformer2DModel.from_pretrained(str(transformer)).state_dict()
        policy.model.load_state_dict(state)
    policy.model.eval()
    return policy


@torch.no_grad()
def sample(policy, prompts: Sequence[str], seed: int = 0, batch_size: int = 64) -> torch.Tensor:
    """One image per prompt with the policy's sampler: (B, 3, H, W) float32 in [0, 1]. Prompt k
    uses initial-noise seed (seed, k) and step-noise seed (seed, k): the trainer's held-out
    evaluation sampling, `dancegrpo_fast.rollout.sample_fixed`."""
    return sample_fixed(policy, policy.schedule(), prompts, seed, batch_size, mixed_precision="no")


def evaluate(policy, prompts: Sequence[str], samples_per_prompt: int = 1, seed: int = 0,
             batch_size: int = 64, reward=None) -> Dict[str, float]:
    """Mean tiny_geneval score and per-criterion means over `samples_per_prompt` samples of
    every prompt; also the fraction of fully correct samples (score > 0.99)."""
    reward = reward or TinyGenEvalReward()
    repeated = [p for p in prompts for _ in range(samples_per_prompt)]
    images = sample(policy, repeated, seed, batch_size)
    criteria = reward.criteria(images, repeated)
    result = summarize(criteria)
    result["fully_correct"] = float((criteria["score"] > 0.99).float().mean())
    result["samples"] = len(repeated)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dancegrpo_fast.tiny.evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="", help="tiny weights folder (default: the shipped weights)")
    parser.add_argument("--transformer", default=None, help="fine-tuned transformer folder (RL checkpoint model/transformer)")
    parser.add_argument("--random_init", action="store_true", help="evaluate a randomly initialised model instead")
    parser.add_argument("--split", default="heldout", choices=("heldout", "train"),
                        help="prompt list: the shipped held-out or RL-train prompts")
    parser.add_argument("--num_prompts", type=int, default=0, help="use the first N prompts of the list (0 = all)")
    # Defaults: the tiny preset's sampler and held-out evaluation, so these numbers are the
    # trainer's held-out numbers of the same weights.
    preset = apply_preset("tiny")
    sampler = preset.sampler
    parser.add_argument("--samples_per_prompt", type=int, default=preset.eval.samples_per_prompt)
    parser.add_argument("--seed", type=int, default=preset.eval.seed, help="the trainer's eval_seed")
    parser.add_argument("--num_steps", type=int, default=sampler.num_steps)
    parser.add_argument("--eta", type=float, default=sampler.eta)
    parser.add_argument("--shift", type=float, default=sampler.shift)
    parser.add_argument("--sampler", default=sampler.name, choices=("dance", "flow_grpo"))
    parser.add_argument("--cfg_scale", type=float, default=sampler.cfg_scale)
    parser.add_argument("--sde_window_start", type=int, default=sampler.sde_window_start,
                        help="first SDE step; steps outside the window are ODE steps")
    parser.add_argument("--sde_window_size", type=int, default=sampler.sde_window_size,
                        help="SDE steps in the window (0 = every step is SDE)")
    parser.add_argument("--threads", type=int, default=preset.runtime.threads, help="torch threads (0 = leave as is)")
    parser.add_argument("--grid", default=None, help="write a PNG grid of the first 16 samples here")
    parser.add_argument("--json", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    if not window_fits(args.num_steps, args.sde_window_start, args.sde_window_size):
        parser.error(f"--sde_window_start {args.sde_window_start} --sde_window_size {args.sde_window_size}: the SDE "
                     f"window must lie in [0, --num_steps={args.num_steps}] (--sde_window_size 0: every step is SDE)")
    if args.threads:
        torch.set_num_threads(args.threads)
    policy = load_policy(args.model, args.transformer, 0 if args.random_init else None, num_steps=args.num_steps,
                         eta=args.eta, shift=args.shift, sampler=args.sampler, cfg_scale=args.cfg_scale,
                         sde_window_start=args.sde_window_start, sde_window_size=args.sde_window_size)
    prompts = load_split_prompts(args.split)
    if args.num_prompts:
        prompts = prompts[:args.num_prompts]
    result = evaluate(policy, prompts, args.samples_per_prompt, args.seed)
    result.update(split=args.split, prompts=len(prompts), num_steps=args.num_steps, eta=args.eta, shift=args.shift,
                  sampler=args.sampler, cfg_scale=args.cfg_scale, sde_window_start=args.sde_window_start,
                  sde_window_size=args.sde_window_size, seed=args.seed, random_init=args.random_init,
                  model=args.model or "shipped", transformer=args.transformer)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.grid:
        images = sample(policy, prompts[:16], args.seed)
        scores = TinyGenEvalReward()(images, prompts[:16])
        save_sample_grid(images, args.grid, max_samples=16, columns=4, min_size=128,
                         labels=[f"{p} | {float(s):.2f}" for p, s in zip(prompts[:16], scores)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
