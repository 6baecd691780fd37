"""Pictures of a run: the reward curve (from metrics.jsonl) and the before/after sheet.

    plot_reward_curve("outputs/tiny/metrics.jsonl", "outputs/tiny/reward_curve.png")
    python -m dancegrpo_fast.reports outputs/tiny/metrics.jsonl outputs/tiny/reward_curve.png

The curve needs matplotlib (the `train` extra); without it a warning is given once and no curve
is written. The before/after sheet only needs PIL.
"""
from __future__ import annotations

import argparse
import json
import math
import textwrap
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .logging_utils import upscale_nearest, warn

_warned_no_matplotlib = False


def read_metrics(path) -> List[Dict]:
    """The rows of a metrics.jsonl of the current run: unreadable lines are skipped, and when
    the iteration goes backwards (a fresh run appended to an old file) only the rows from there
    on are kept."""
    rows: List[Dict] = []
    path = Path(path)
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict) or "iteration" not in row:
            continue
        if rows and row["iteration"] < rows[-1]["iteration"]:
            rows = []
        rows.append(row)
    return rows


def _series(rows: Sequence[Dict], key: str):
    """(iterations, values) of the rows that have a finite value for key; for an iteration logged
    twice the last value wins."""
    values: Dict[int, float] = {}
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            values[int(row["iteration"])] = float(value)
    its = sorted(values)
    return its, [values[i] for i in its]


def moving_average(values: Sequence[float], window: int = 10) -> List[float]:
    """Trailing mean over the last `window` values (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _matplotlib():
    global _warned_no_matplotlib
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _warned_no_matplotlib:
            _warned_no_matplotlib = True
            warn("matplotlib is not installed: no reward_curve.png (pip install matplotlib, or the 'train' extra)")
        return None
    return plt


def _finish_axis(axis, ylabel: str, title: str) -> None:
    """Integer iteration ticks, labels, grid and legend of one panel."""
    from matplotlib.ticker import MaxNLocator

    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("iteration")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="best")


def plot_reward_curve(metrics_path, out_path, window: int = 10) -> Optional[Path]:
    """Write the reward curve PNG: panel 1 the training reward mean per iteration (light line),
    its moving average over `window` iterations and the held-out eval mean at each eval
    (markers); panel 2, when the eval has per-criterion means, those curves. Returns the path,
    or None when matplotlib is missing or there is nothing to plot."""
    rows = read_metrics(metrics_path)
    train_keys = sorted({k for row in rows for k in row if k.startswith("reward/") and k.endswith("/mean")})
    eval_keys = sorted({k for row in rows for k in row if k.startswith("eval/") and k.endswith("/mean")})
    criterion_keys = sorted({k for row in rows for k in row if k.startswith("eval/") and not k.endswith("/mean")})
    if not train_keys and not eval_keys:
        return None
    plt = _matplotlib()
    if plt is None:
        return None
    panels = 2 if criterion_keys else 1
    figure, axes = plt.subplots(panels, 1, figsize=(8, 4 * panels), squeeze=False)
    axis = axes[0][0]
    names = list(dict.fromkeys([k.split("/")[1] for k in train_keys + eval_keys]))
    colors = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    for index, name in enumerate(names):
        color = colors[index % len(colors)]
        its, values = _series(rows, f"reward/{name}/mean")
        if its:
            axis.plot(its, values, color=color, alpha=0.25, linewidth=1, label=f"train {name}")
            axis.plot(its, moving_average(values, window), color=color, linewidth=2,
                      label=f"train {name} (moving average, {window} it.)")
        its, values = _series(rows, f"eval/{name}/mean")
        if its:
            axis.plot(its, values, color=color, linestyle="--", marker="o", markersize=5, linewidth=1.5,
                      label=f"held-out eval {name}")
    _finish_axis(axis, "reward", "reward")
    if criterion_keys:
        axis = axes[1][0]
        for key in criterion_keys:
            its, values = _series(rows, key)
            if its:
                axis.plot(its, values, marker="o", markersize=4, linewidth=1.5, label=key[len("eval/"):])
        _finish_axis(axis, "held-out eval", "held-out eval per criterion")
    figure.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_path, dpi=100)
    plt.close(figure)
    return out_path


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] (or first frames of videos (B, T, 3, H, W)), or already
    uint8 -> uint8 (B, 3, H, W) on the CPU."""
    if images.dim() == 5:
        images = images[:, 0]
    images = images.detach().cpu()
    if images.dtype == torch.uint8:
        return images
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


def _format_scores(scores: Dict[str, float]) -> str:
    return "  ".join(f"{name} {value:.3f}" if value is not None and math.isfinite(value) else f"{name} n/a"
                     for name, value in scores.items())


def save_before_after(path, before: torch.Tensor, after: torch.Tensor, prompts: Sequence[str],
                      before_scores: Sequence[Dict[str, float]], after_scores: Sequence[Dict[str, float]],
                      before_label: str = "before", after_label: str = "after", min_size: int = 128) -> Path:
    """A PNG sheet, one row per prompt: the before sample, the after sample (nearest-neighbour
    enlarged to at least `min_size` pixels), and beside them the prompt and each sample's eval
    reward(s). before/after: (n, 3, H, W) in [0, 1] or uint8."""
    from PIL import Image, ImageDraw

    before = upscale_nearest(to_uint8(before), min_size)
    after = upscale_nearest(to_uint8(after), min_size)
    count = min(len(before), len(after), len(prompts))
    if count == 0:
        raise ValueError("save_before_after needs at least one before/after pair")
    height, width = before.shape[-2:]
    pad, header, text_width, line, chars = 6, 18, 360, 12, 56
    texts = []
    for i in range(count):
        lines = textwrap.wrap(prompts[i], chars) or [""]
        lines += textwrap.wrap(f"before: {_format_scores(before_scores[i])}", chars, subsequent_indent="  ")
        lines += textwrap.wrap(f"after:  {_format_scores(after_scores[i])}", chars, subsequent_indent="  ")
        texts.append(lines)
    row_height = max(height, max(len(lines) for lines in texts) * line) + pad
    sheet = Image.new("RGB", (2 * width + 3 * pad + text_width, header + count * row_height + pad), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 4), before_label, fill="black")
    draw.text((2 * pad + width, 4), after_label, fill="black")
    draw.text((3 * pad + 2 * width, 4), "prompt / held-out eval reward", fill="black")
    for i in range(count):
        top = header + i * row_height
        for column, images in enumerate((before, after)):
            array = images[i].permute(1, 2, 0).numpy()
            sheet.paste(Image.fromarray(array), (pad + column * (width + pad), top))
        left = 3 * pad + 2 * width
        for j, text in enumerate(texts[i]):
            draw.text((left, top + j * line), text, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dancegrpo_fast.reports",
                                     description="Plot a run's reward curve from its metrics.jsonl.")
    parser.add_argument("metrics", help="output_dir/metrics.jsonl of a run")
    parser.add_argument("output", nargs="?", default=None, help="PNG to write (default: reward_curve.png beside it)")
    parser.add_argument("--window", type=int, default=10, help="moving-average window (iterations)")
    args = parser.parse_args(argv)
    output = args.output or str(Path(args.metrics).with_name("reward_curve.png"))
    path = plot_reward_curve(args.metrics, output, args.window)
    if path is None:
        print("nothing plotted (no reward columns, or matplotlib missing)")
        return 1
    print(path)
    return 0


__all__ = ["read_metrics", "moving_average", "plot_reward_curve", "save_before_after", "to_uint8"]


if __name__ == "__main__":
    import sys

    sys.exit(main())
