"""--compile against eager on the shipped tiny model: rollout and update seconds per iteration,
the compile time (what the first iteration costs over a later one), and the largest difference
of the rollout log-probs and of the updated weights from eager.

Each variant trains a few iterations of the tiny task (the tiny preset, scaled down) in its own
process, so every compiled variant compiles from nothing (TORCHINDUCTOR_FORCE_DISABLE_CACHES=1:
no on-disk cache from an earlier run either).

    python benchmarks/bench_compile.py [--device cpu|cuda] [--iterations 4] [--variants eager,blocks,model]
        [--output benchmarks/results/compile_cpu.json]

Variants: eager; blocks (compile_scope=blocks: each repeated block, the default); model
(compile_scope=model: the whole forward). Backend inductor, mode default (--mode to change).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_variant(args) -> None:
    """The child process: trains args.iterations iterations, prints one JSON line."""
    sys.path.insert(0, str(REPO))
    import torch

    from dancegrpo_fast.config import apply_preset
    from dancegrpo_fast.train import Trainer

    torch.set_num_threads(args.threads)
    compiled = args.variant != "eager"
    with tempfile.TemporaryDirectory() as tmp:
        config = apply_preset("tiny")
        overrides = dict(group_size=args.group_size, prompts_per_rank=args.prompts, rollout_batch_size=args.batch,
                         train_batch_size=args.batch, gradient_accumulation_steps=1, num_steps=args.steps,
                         num_iterations=args.iterations, output_dir=tmp, eval_every=0, checkpoint_every=1000,
                         progress_bar=False, tensorboard=False, threads=args.threads, reward_overlap=False,
                         compile=compiled, compile_mode=args.mode,
                         compile_scope=args.variant if compiled else "blocks")
        if args.device == "cuda":
            overrides["mixed_precision"] = "bf16"
        config = type(config).from_dict(overrides, base=config)
        trainer = Trainer(config)
        rows, log_probs = [], []
        original_collect = trainer.collect

        def collect(on_batch=None):  # keep each iteration's rollout log-probs for the comparison
            trajectory = original_collect(on_batch)
            log_probs.append(trajectory.log_probs.detach().cpu())
            return trajectory

        trainer.collect = collect
        for _ in range(args.iterations):
            start = time.perf_counter()
            row = trainer.train_iteration()
            rows.append({"rollout": row["seconds_rollout"], "update": row["seconds_update"],
                         "iteration": time.perf_counter() - start})
        weights = {name: p.detach().float().cpu() for name, p in trainer.policy.model.named_parameters()}
        torch.save({"log_probs": log_probs, "weights": weights}, args.tensors)
        print("RESULT " + json.dumps({"variant": args.variant, "rows": rows}), flush=True)


def compare(eager_file: str, other_file: str) -> dict:
    import torch

    a, b = torch.load(eager_file), torch.load(other_file)
    lp = max(float((x - y).nan_to_num().abs().max()) for x, y in zip(a["log_probs"], b["log_probs"]))
    weights = max(float((a["weights"][k] - b["weights"][k]).abs().max()) for k in a["weights"])
    moved = max(float((a["weights"][k]).abs().max()) for k in a["weights"])
    return {"max_abs_log_prob_diff": lp, "max_abs_weight_diff_after_training": weights,
            "max_abs_weight": moved}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--variants", default="eager,blocks,model")
    parser.add_argument("--mode", default="default")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per variant")
    parser.add_argument("--output", default=None)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--tensors", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        run_variant(args)
        return 0
    output = Path(args.output or REPO / "benchmarks" / "results" / f"compile_{args.device}.json")
    env = dict(os.environ, TORCHINDUCTOR_FORCE_DISABLE_CACHES="1", DANCEGRPO_FAST_BACKEND="torch",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if args.device == "cuda":
        env.pop("DANCEGRPO_FAST_BACKEND")  # the fused Triton kernels, as a GPU run uses them
    results, failures = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants.split(","):
            tensors = str(Path(tmp) / f"{variant}.pt")
            command = [sys.executable, __file__, "--variant", variant, "--tensors", tensors] + [
                f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                if k in ("device", "iterations", "mode", "threads", "prompts", "group_size", "batch", "steps")]
            start = time.perf_counter()
            try:
                done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                failures[variant] = f"timed out after {args.timeout} s"
                print(f"{variant}: timed out", flush=True)
                continue
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not lines:
                failures[variant] = (done.stderr or done.stdout)[-2000:]
                print(f"{variant}: FAILED\n{failures[variant]}", flush=True)
                continue
            rows = json.loads(lines[0][len("RESULT "):])["rows"]
            later = rows[1:] or rows
            entry = {"process_seconds": time.perf_counter() - start, "iterations": rows,
                     "first_iteration_s": rows[0]["iteration"],
                     "rollout_s_per_iteration": statistics.median(r["rollout"] for r in later),
                     "update_s_per_iteration": statistics.median(r["update"] for r in later)}
            if variant != "eager" and "eager" in results:
                eager = results["eager"]
                # The compile time: what the first iteration cost beyond a steady one.
                entry["compile_s"] = entry["first_iteration_s"] - statistics.median(r["iteration"] for r in later)
                entry["rollout_speedup"] = eager["rollout_s_per_iteration"] / entry["rollout_s_per_iteration"]
                entry["update_speedup"] = eager["update_s_per_iteration"] / entry["update_s_per_iteration"]
                entry.update(compare(str(Path(tmp) / "eager.pt"), tensors))
            results[variant] = entry
            print(f"{variant}: " + json.dumps({k: v for k, v in entry.items() if k != "iterations"}), flush=True)
    import torch

    record = {"device": args.device, "torch": torch.__version__, "python": platform.python_version(),
              "machine": platform.machine(), "cpus": os.cpu_count(),
              "load_average_at_end": os.getloadavg(), "settings": {k: v for k, v in vars(args).items()
                                                                   if k not in ("variant", "tensors", "output")},
              "note": "steady iterations: the median of iterations 2..N; compile_s = first iteration minus that",
              "results": results, "failures": failures}
    if args.device == "cuda":
        record["gpu"] = torch.cuda.get_device_name()
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {output}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
