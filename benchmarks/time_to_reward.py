"""Time to reward on the tiny task: DanceGRPO's default against MixGRPO's SDE windows.

    python benchmarks/time_to_reward.py                          # 4 settings x seeds 0 1 2, 240 s each
    python benchmarks/time_to_reward.py --budget 60 --seeds 0 --settings default sliding

Each run is the built-in default (`python -m dancegrpo_fast.train`, the tiny preset) with one
setting changed, stopped (SIGTERM: the trainer finishes the iteration, checkpoints and evaluates)
once its training time reaches the same budget: the sum of the trainer's own seconds_rollout,
seconds_reward and seconds_update, so start-up and held-out evaluations (which cost the same for
every setting) are not charged. Every run evaluates the same way (eval_sde_steps all: DanceGRPO's
sampler on every step, fixed prompts and noise), so the held-out rewards compare models.

The runs pin the tiny preset's earlier sampler (8 steps, every step SDE, timestep_fraction 0.6:
EARLIER_PRESET), which the published table was measured with, on the earlier 400-step base:
rebuild it with `python -m dancegrpo_fast.pretrain_tiny --out BASE --seed 0 --steps 400` and pass
`--model_path BASE` (without it: the shipped 4,000-step base).

Settings (8 steps; the default trains int(7 x 0.6) = 4 of them per sample):
    default       every step SDE, timestep_fraction 0.6 (DanceGRPO)
    fixed         SDE window of 2 steps at the high-noise end, both trained; ODE elsewhere
    sliding       the 2-step window slides toward low noise by 1 step every 10 iterations and
                  rolls back (MixGRPO's progressive schedule)
    sliding_ode2  sliding, and the ODE steps outside the window are second order (DPM-Solver++(2M))
                  with half as many of them (MixGRPO-Flash)

Model evaluations (NFEs) per run come from the trainer's metrics (nfe_total: rollout forwards,
training forwards and backwards). Runs go two at a time, one torch thread each, the settings
interleaved so that the load of a shared machine falls on all of them alike; os.getloadavg() is
recorded before and after every run.

Writes benchmarks/results/time_to_reward.json and .png (held-out mean and fully-correct rate
against training seconds and against NFEs, mean over seeds) and prints the markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "time_to_reward.json"

# The tiny preset's sampler before the demo's retuning; a setting's own flags come after and win.
EARLIER_PRESET = ["--num_steps", "8", "--sde_window_start", "0", "--sde_window_size", "0", "--timestep_fraction", "0.6"]
WINDOW = ["--sde_window_start", "0", "--sde_window_size", "2", "--timestep_fraction", "1.0"]
SLIDING = WINDOW + ["--sde_window_schedule", "progressive", "--sde_window_stride", "1", "--sde_window_every", "10"]
SETTINGS: Dict[str, List[str]] = {
    "default": [],
    "fixed": WINDOW,
    "sliding": SLIDING,
    "sliding_ode2": SLIDING + ["--ode_order", "2", "--ode_steps_fraction", "0.5"],
}
TRAIN_SECONDS = ("seconds_rollout", "seconds_reward", "seconds_update")


def read_rows(path: Path) -> List[Dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return rows


def curve(rows: List[Dict]) -> List[Dict]:
    """The held-out evaluations with the training seconds and NFEs spent before each."""
    spent, nfe, points = 0.0, 0, []
    for row in rows:
        if "seconds_update" in row:
            spent += sum(row[k] for k in TRAIN_SECONDS)
            nfe = row["nfe_total"]
        if row.get("eval/tiny_geneval/mean") is not None:
            points.append({"iteration": row["iteration"], "seconds": round(spent, 2), "nfe": nfe,
                           "mean": row["eval/tiny_geneval/mean"], "fully_correct": row["eval/tiny_geneval/fully_correct"]})
    return points


def run_one(setting: str, seed: int, budget: float, eval_args: List[str], out_root: Path, model_path: str = "") -> Dict:
    out = out_root / f"{setting}_seed{seed}"
    base = ["--model_path", model_path] if model_path else []
    command = [sys.executable, "-m", "dancegrpo_fast.train", "--preset", "tiny", *base, *EARLIER_PRESET, *SETTINGS[setting],
               "--seed", str(seed),
               "--num_iterations", "100000", *eval_args, "--eval_sde_steps", "all",
               "--output_dir", str(out), "--threads", "1", "--progress_bar", "false", "--tensorboard", "false",
               "--checkpoint_every", "100000", "--overwrite", "true"]
    env = dict(os.environ, DANCEGRPO_FAST_BACKEND=os.environ.get("DANCEGRPO_FAST_BACKEND", "torch"))
    load_before = os.getloadavg()
    start = time.perf_counter()
    with open(out_root / f"{setting}_seed{seed}.log", "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        stopped_at: Optional[float] = None
        while process.poll() is None:
            time.sleep(2.0)
            rows = read_rows(out / "metrics.jsonl")
            spent = sum(sum(r[k] for k in TRAIN_SECONDS) for r in rows if "seconds_update" in r)
            if stopped_at is None and spent >= budget:
                process.send_signal(signal.SIGTERM)  # finish the iteration, checkpoint, evaluate
                stopped_at = spent
        if process.returncode != 0:
            raise RuntimeError(f"{setting} seed {seed} failed ({process.returncode}): see {log.name}")
    rows = read_rows(out / "metrics.jsonl")
    points = curve(rows)
    iterations = [r for r in rows if "seconds_update" in r]
    result = {"setting": setting, "seed": seed, "iterations": len(iterations),
              "train_seconds": points[-1]["seconds"], "wall_seconds": round(time.perf_counter() - start, 1),
              "nfe_total": iterations[-1]["nfe_total"], "seconds_per_iteration": round(points[-1]["seconds"] / len(iterations), 3),
              "before": points[0], "after": points[-1], "curve": points,
              "loadavg_before": [round(v, 2) for v in load_before], "loadavg_after": [round(v, 2) for v in os.getloadavg()],
              "command": " ".join(command[1:])}
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}), flush=True)
    return result


def value_at(points: List[Dict], axis: str, x: float, key: str) -> float:
    """The latest evaluation at or before x (the reward the run had reached by then)."""
    seen = [p[key] for p in points if p[axis] <= x]
    return seen[-1] if seen else points[0][key]


def mean_curve(runs: List[Dict], axis: str, key: str, grid: List[float]) -> List[float]:
    return [statistics.mean(value_at(r["curve"], axis, x, key) for r in runs) for x in grid]


def first_reach(runs: List[Dict], axis: str, target: float, grid: List[float]) -> Optional[float]:
    """The first grid point where the seed-mean held-out reward reaches target."""
    for x, value in zip(grid, mean_curve(runs, axis, "mean", grid)):
        if value >= target - 1e-12:
            return x
    return None


def summarize(results: List[Dict], settings: List[str]) -> Dict:
    by = {s: [r for r in results if r["setting"] == s] for s in settings}
    by = {s: runs for s, runs in by.items() if runs}
    summary = {"settings": {}}
    grids = {}
    for axis in ("seconds", "nfe"):
        top = max(p[axis] for runs in by.values() for r in runs for p in r["curve"])
        grids[axis] = [top * k / 400 for k in range(401)]
    target = None
    if "default" in by:
        target = statistics.mean(r["after"]["mean"] for r in by["default"])
        summary["target"] = {"what": "the default's final held-out mean (mean over seeds)", "value": round(target, 4)}
    for setting, runs in by.items():
        entry = {"seeds": len(runs), "iterations": statistics.mean(r["iterations"] for r in runs),
                 "train_seconds": statistics.mean(r["train_seconds"] for r in runs),
                 "seconds_per_iteration": statistics.mean(r["seconds_per_iteration"] for r in runs),
                 "nfe_total": statistics.mean(r["nfe_total"] for r in runs),
                 "nfe_per_iteration": statistics.mean(r["nfe_total"] / r["iterations"] for r in runs)}
        for part in ("mean", "fully_correct"):
            before = [r["before"][part] for r in runs]
            after = [r["after"][part] for r in runs]
            entry[f"before_{part}"] = statistics.mean(before)
            entry[f"after_{part}"] = statistics.mean(after)
            entry[f"after_{part}_std"] = statistics.stdev(after) if len(after) > 1 else 0.0
        if target is not None:
            entry["reaches_target_seconds"] = first_reach(runs, "seconds", target, grids["seconds"])
            entry["reaches_target_nfe"] = first_reach(runs, "nfe", target, grids["nfe"])
        summary["settings"][setting] = entry
    summary["grids"] = grids
    return summary


def table(summary: Dict) -> str:
    lines = ["| setting | seeds | iterations | s / iteration | NFE / iteration | held-out mean before -> after (± std) | "
             "fully correct before -> after | reaches the default's final mean at (s / NFE) |",
             "|---|---|---|---|---|---|---|---|"]
    for setting, e in summary["settings"].items():
        reach = "not within the budget"
        if e.get("reaches_target_seconds") is not None:
            reach = f"{e['reaches_target_seconds']:.0f} s / {e['reaches_target_nfe']:.3g}" if e.get(
                "reaches_target_nfe") is not None else f"{e['reaches_target_seconds']:.0f} s / -"
        lines.append(f"| {setting} | {e['seeds']} | {e['iterations']:.0f} | {e['seconds_per_iteration']:.2f} | "
                     f"{e['nfe_per_iteration']:.0f} | {e['before_mean']:.3f} -> {e['after_mean']:.3f} "
                     f"(± {e['after_mean_std']:.3f}) | {e['before_fully_correct']:.3f} -> {e['after_fully_correct']:.3f} | "
                     f"{reach} |")
    return "\n".join(lines)


def plot(results: List[Dict], summary: Dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharey="row")
    for col, (axis, label) in enumerate((("seconds", "training seconds (1 CPU thread, shared machine)"),
                                         ("nfe", "model evaluations (rollout forwards + training forwards and backwards)"))):
        grid = summary["grids"][axis]
        for setting in summary["settings"]:
            runs = [r for r in results if r["setting"] == setting]
            last = min(r["curve"][-1][axis] for r in runs)  # plot only where every seed has data
            xs = [x for x in grid if x <= last]
            for row, (key, name) in enumerate((("mean", "held-out tiny_geneval mean"),
                                                ("fully_correct", "held-out fully-correct rate"))):
                axes[row][col].plot(xs, mean_curve(runs, axis, key, xs), label=setting)
                axes[row][col].set_ylabel(name)
                axes[row][col].set_xlabel(label)
        if "target" in summary:
            axes[0][col].axhline(summary["target"]["value"], color="gray", linestyle=":", linewidth=1)
    axes[0][0].legend()
    fig.suptitle("Tiny task: held-out reward against compute (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--budget", type=float, default=240.0, help="training seconds per run (the same for every setting)")
    parser.add_argument("--eval_every", type=int, default=10, help="held-out evaluation every K iterations")
    parser.add_argument("--eval_num_prompts", type=int, default=64, help="held-out prompts per evaluation (0 = all 128)")
    parser.add_argument("--eval_samples_per_prompt", type=int, default=1)
    parser.add_argument("--parallel", type=int, default=2, help="runs at once (one torch thread each)")
    parser.add_argument("--out", default=str(RESULTS), help="results JSON (the plot goes next to it, .png)")
    parser.add_argument("--runs_dir", default=None, help="where the runs' output folders go (default: a temp dir)")
    parser.add_argument("--model_path", default="", help="base weights (the published table: the 400-step base, see above; "
                        "default: the shipped base)")
    args = parser.parse_args(argv)
    runs_dir = Path(args.runs_dir or tempfile.mkdtemp(prefix="time_to_reward_"))
    runs_dir.mkdir(parents=True, exist_ok=True)
    # Interleaved: seed by seed, every setting, so that a busy spell of the machine hits them all.
    jobs = [(s, seed) for seed in args.seeds for s in args.settings]
    started, load = time.perf_counter(), os.getloadavg()
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        eval_args = ["--eval_every", str(args.eval_every), "--eval_num_prompts", str(args.eval_num_prompts),
                     "--eval_samples_per_prompt", str(args.eval_samples_per_prompt)]
        results = list(pool.map(lambda job: run_one(job[0], job[1], args.budget, eval_args, runs_dir,
                                                          args.model_path), jobs))
    summary = summarize(results, args.settings)
    report = {"budget_train_seconds": args.budget, "eval_every": args.eval_every, "eval_num_prompts": args.eval_num_prompts,
              "eval_samples_per_prompt": args.eval_samples_per_prompt, "seeds": args.seeds,
              "parallel": args.parallel, "threads_per_run": 1,
              "machine": os.environ.get("BENCH_MACHINE", f"{os.cpu_count()}-core CPU, no GPU, shared with other jobs"),
              "loadavg_start": [round(v, 2) for v in load], "loadavg_end": [round(v, 2) for v in os.getloadavg()],
              "wall_minutes": round((time.perf_counter() - started) / 60, 1),
              "command": "python benchmarks/time_to_reward.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "summary": {k: v for k, v in summary.items() if k != "grids"}, "table": table(summary), "runs": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(results, summary, out.with_suffix(".png"))
    print(report["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
