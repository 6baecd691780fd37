"""The tiny task's ablation: the paper's ablations at a scale anyone can rerun on a CPU.

    python benchmarks/tiny_ablation.py                      # every setting, seeds 0 1 2
    python benchmarks/tiny_ablation.py --settings default ts_0.3 --seeds 0 --iterations 40

Each setting changes one thing of the built-in default (`python -m dancegrpo_fast.train`, the
tiny preset) and runs it for the same number of iterations (the same number of rollout samples)
with each seed; the held-out reward is measured by the trainer's own evaluation (fixed prompts
and noise) before the first and after the last iteration. Runs go two at a time, one torch
thread each (the tiny model is fastest on one thread), so a 2-core machine runs the whole table.

The runs pin the tiny preset's earlier sampler (8 steps, every step SDE, timestep_fraction 0.6,
held-out evaluation every 40 iterations with 2 samples per prompt: EARLIER_PRESET), which the
published table was measured with, on the earlier 400-step base: rebuild that base with
`python -m dancegrpo_fast.pretrain_tiny --out BASE --seed 0 --steps 400` (after its VAE stage, or
with `--vae` of the shipped weights' vae/) and pass `--model_path BASE`; without it the runs use
the shipped (4,000-step) base.

Settings:
    default          shared initial noise, timestep_fraction 0.6, continuous reward, DanceGRPO SDE
    no_shared_noise  every sample of a group starts from its own x_T
    ts_0.3 / ts_1.0  timestep_fraction 0.3 / 1.0 (0.6 is the default)
    binary           the binary reward: 1 when the tiny_geneval score > 0.5, else 0
    flow_grpo        the Flow-GRPO SDE instead of DanceGRPO's (noise_level 0.7, its paper's value)
    ddpo             the DDPO baseline (--advantage ddpo): per-prompt running reward statistics
                     instead of groups, with DDPO's defaults (independent noise, every step trained)

Writes benchmarks/results/tiny_ablation.json (every run: before, after, gain, wall time) and
prints a markdown table of mean and spread per setting. --merge keeps the file's runs of the
settings and seeds not rerun (a new row added later, on another day's machine load).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "tiny_ablation.json"

BINARY_YAML = """rewards:
  - name: tiny_geneval_binary
    weight: 1.0
    kwargs: {threshold: 0.5}
"""

# The tiny preset's sampler and evaluation before the demo's retuning (docs/tiny_task.md): what
# the published ablation table was measured with. A setting's own flags come after and win.
EARLIER_PRESET = ["--num_steps", "8", "--sde_window_start", "0", "--sde_window_size", "0", "--timestep_fraction", "0.6",
                  "--eval_every", "40", "--eval_samples_per_prompt", "2"]
SETTINGS: Dict[str, List[str]] = {
    "default": [],
    "no_shared_noise": ["--shared_noise", "false"],
    "ts_0.3": ["--timestep_fraction", "0.3"],
    "ts_1.0": ["--timestep_fraction", "1.0"],
    "binary": ["--config", "{binary_yaml}"],
    "flow_grpo": ["--sampler", "flow_grpo", "--eta", "0.7"],
    "ddpo": ["--advantage", "ddpo"],
}


def eval_reward(rows: List[Dict], last: bool) -> float:
    """The held-out tiny_geneval mean of the first (iteration 0) or the last evaluation. A binary
    run's own reward is binary: its eval also logs the continuous score, which is what we compare."""
    evals = [r for r in rows if any(k.startswith("eval/") and k.endswith("/mean") for k in r)]
    row = evals[-1] if last else evals[0]
    for key in ("eval/tiny_geneval/mean", "eval/tiny_geneval_binary/inner_score"):
        if row.get(key) is not None:
            return float(row[key])
    raise KeyError(f"no continuous eval reward in {sorted(row)}")


def run_one(setting: str, seed: int, iterations: int, out_root: Path, binary_yaml: Path, model_path: str = "") -> Dict:
    out = out_root / f"{setting}_seed{seed}"
    args = [a.format(binary_yaml=binary_yaml) for a in SETTINGS[setting]]
    base = ["--model_path", model_path] if model_path else []
    command = [sys.executable, "-m", "dancegrpo_fast.train", "--preset", "tiny", *base, *EARLIER_PRESET, *args,
               "--seed", str(seed),
               "--num_iterations", str(iterations), "--output_dir", str(out), "--threads", "1",
               "--progress_bar", "false", "--tensorboard", "false", "--checkpoint_every", str(iterations),
               "--overwrite", "true"]  # a rerun with the same --runs-dir redoes its own runs
    env = dict(os.environ, DANCEGRPO_FAST_BACKEND=os.environ.get("DANCEGRPO_FAST_BACKEND", "torch"))
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{setting} seed {seed} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    before, after = eval_reward(rows, last=False), eval_reward(rows, last=True)
    curve = [[r["iteration"], round(float(r[k]), 4)] for r in rows for k in ("eval/tiny_geneval/mean",
             "eval/tiny_geneval_binary/inner_score") if r.get(k) is not None]
    result = {"setting": setting, "seed": seed, "iterations": iterations, "before": before, "after": after,
              "gain": after - before, "seconds": round(seconds, 1), "curve": curve, "command": " ".join(command[1:])}
    print(json.dumps(result), flush=True)
    return result


def table(results: List[Dict]) -> str:
    lines = ["| setting | held-out before | held-out after | gain (mean ± std over seeds) | seeds | minutes per run |",
             "|---|---|---|---|---|---|"]
    for setting in SETTINGS:
        runs = [r for r in results if r["setting"] == setting]
        if not runs:
            continue
        gains = [r["gain"] for r in runs]
        spread = statistics.stdev(gains) if len(gains) > 1 else 0.0
        lines.append(f"| {setting} | {statistics.mean(r['before'] for r in runs):.3f} | "
                     f"{statistics.mean(r['after'] for r in runs):.3f} | {statistics.mean(gains):+.3f} ± {spread:.3f} | "
                     f"{len(runs)} | {statistics.mean(r['seconds'] for r in runs) / 60:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=100, help="iterations per run (the same for every setting)")
    parser.add_argument("--parallel", type=int, default=2, help="runs at once (one torch thread each)")
    parser.add_argument("--out", default=str(RESULTS), help="results JSON")
    parser.add_argument("--runs_dir", default=None, help="where the runs' output folders go (default: a temp dir)")
    parser.add_argument("--model_path", default="", help="base weights (the published table: the 400-step base, see above; "
                        "default: the shipped base)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the runs already in --out whose (setting, seed) this command does not run")
    args = parser.parse_args(argv)
    runs_dir = Path(args.runs_dir or tempfile.mkdtemp(prefix="tiny_ablation_"))
    runs_dir.mkdir(parents=True, exist_ok=True)
    binary_yaml = runs_dir / "binary_reward.yaml"
    binary_yaml.write_text(BINARY_YAML)
    jobs = [(s, seed) for s in args.settings for seed in args.seeds]
    machine = os.environ.get("ABLATION_MACHINE", "2-core CPU, no GPU (shared)")
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        results = list(pool.map(lambda job: run_one(job[0], job[1], args.iterations, runs_dir, binary_yaml,
                                                          args.model_path), jobs))
    for result in results:
        result["machine"] = machine
    report = {"iterations": args.iterations, "seeds": args.seeds, "parallel": args.parallel, "machine": machine}
    if args.merge and Path(args.out).is_file():
        old = json.loads(Path(args.out).read_text())
        if old.get("iterations") != args.iterations:
            raise SystemExit(f"--merge: {args.out} holds runs of {old.get('iterations')} iterations, not "
                             f"{args.iterations}: the rows would not compare")
        rerun = {(r["setting"], r["seed"]) for r in results}
        kept = [r for r in old["runs"] if (r["setting"], r["seed"]) not in rerun]
        report = {**old, "seeds": sorted({r["seed"] for r in kept + results})}
        results = kept + results
    report.update(runs=results, table=table(results))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(report["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
