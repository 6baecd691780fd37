"""Reward/rollout overlap in the real trainer, on the built-in tiny model, with a slow reward.

One measured unit is the trainer's `collect_and_score()`: the rollout of an iteration's samples
(the shipped tiny flow model through the DanceGRPO SDE, `--rollout-batch` samples per model
call), decoding, and rewards. With `reward_overlap` each finished rollout batch is scored in a
background thread while the next batch samples; without it, everything is scored after the
rollout. Two deliberately slow rewards:

- "remote": the tiny task's rule-based reward plus a wait of `--seconds-per-sample` per image,
  like a reward model served from another machine (RemoteReward) or another GPU, whose time
  grows with the images it scores: no local CPU while waiting.
- "cpu": the same reward computed `--cpu-repeats` times, competing with the rollout for the same
  two cores; overlap can hide only what free cores allow.

    .venv/bin/python benchmarks/bench_reward_overlap_trainer.py   # -> benchmarks/results/reward_overlap_trainer_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dancegrpo_fast.config import parse_config  # noqa: E402
from dancegrpo_fast.rewards import build_reward  # noqa: E402
import dancegrpo_fast.tiny.reward  # noqa: E402,F401  (registers tiny_geneval)
from dancegrpo_fast.train import Trainer  # noqa: E402


def slow_rewards(kind: str, seconds_per_sample: float, cpu_repeats: int):
    base = build_reward("tiny_geneval")

    def remote_like(images, prompts):
        scores = base(images, prompts)
        time.sleep(seconds_per_sample * len(prompts))
        return scores

    def cpu_heavy(images, prompts):
        for _ in range(cpu_repeats - 1):
            base(images, prompts)
        return base(images, prompts)

    return {"tiny_geneval": (remote_like if kind == "remote" else cpu_heavy, 1.0)}


def measure(kind: str, overlap: bool, args, output_dir: str) -> dict:
    config = parse_config(["--preset", "tiny", "--output_dir", output_dir, "--reward_overlap", str(overlap),
                           "--rollout_batch_size", str(args.rollout_batch), "--progress_bar", "False",
                           "--tensorboard", "False"])
    trainer = Trainer(config, rewards=slow_rewards(kind, args.seconds_per_sample, args.cpu_repeats))
    totals, rollouts, waits = [], [], []
    for repeat in range(args.warmup + args.repeats):
        start = time.perf_counter()
        _, _, _, seconds = trainer.collect_and_score()
        rollout_s, reward_wait_s = seconds["rollout"], seconds["reward"]
        if repeat >= args.warmup:
            totals.append(time.perf_counter() - start)
            rollouts.append(rollout_s)
            waits.append(reward_wait_s)
    return {"iteration_s_median": statistics.median(totals), "iteration_s_all": totals,
            "rollout_s_median": statistics.median(rollouts), "reward_wait_s_median": statistics.median(waits)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds-per-sample", type=float, default=0.02)
    parser.add_argument("--cpu-repeats", type=int, default=20)
    parser.add_argument("--rollout-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "reward_overlap_trainer_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("remote", "cpu"):
            entry = {}
            for overlap in (False, True):
                entry["overlapped" if overlap else "sequential"] = measure(kind, overlap, args, os.path.join(tmp, f"{kind}{overlap}"))
            entry["speedup"] = entry["sequential"]["iteration_s_median"] / entry["overlapped"]["iteration_s_median"]
            results[kind] = entry
            print(f"{kind:7s} sequential {entry['sequential']['iteration_s_median']:.3f} s   "
                  f"overlapped {entry['overlapped']['iteration_s_median']:.3f} s   speedup {entry['speedup']:.2f}x")
    out = {
        "benchmark": "reward_overlap_trainer",
        "what": "Trainer.collect_and_score() on the built-in tiny preset (rollout + decode + rewards), "
                "reward_overlap off vs on, median over repeats",
        "command": " ".join([os.path.relpath(sys.executable)] + sys.argv),
        "machine": {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "load_average_1_5_15_min": list(os.getloadavg())},
        "settings": vars(args),
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
