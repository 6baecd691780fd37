"""Per-iteration metrics: one JSONL row per iteration, TensorBoard when installed, sample grids."""
from __future__ import annotations

import json
import math
import textwrap
import warnings
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch


class MetricsLogger:
    """Appends one JSON object per iteration to output_dir/metrics.jsonl (rank 0 only), and
    forwards the rows and the run's pictures to TensorBoard (when installed) and to `wandb` (a
    wandb_logging.WandbLogger, or None)."""

    def __init__(self, output_dir, enabled: bool = True, tensorboard: bool = True, wandb=None):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.writer = None
        self.wandb = wandb if enabled else None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"))
                except Exception:  # tensorboard not installed: JSONL only
                    self.writer = None

    def truncate_after(self, iteration: int) -> None:
        """Drop rows past `iteration` (an interrupted run logged iterations its resume redoes)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("iteration", 0) <= iteration:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a row cut short by a kill
        self.path.write_text("".join(row + "\n" for row in kept))

    def log(self, row: Dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with self.path.open("a") as handle:
            handle.write(json.dumps(clean) + "\n")
        if self.writer is not None:
            step = row.get("iteration", 0)
            for key, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "iteration":
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(row)

    def log_image(self, key: str, path, step: int) -> None:
        """A picture the run wrote (sample grid, evaluation grid, reward curve) under `key`."""
        if not self.enabled or not Path(path).is_file():
            return
        if self.writer is not None:
            import numpy as np
            from PIL import Image

            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.writer.add_image(key, pixels, step, dataformats="HWC")
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log_image(key, path, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.close()
            self.wandb = None


def upscale_nearest(images: torch.Tensor, min_size: int) -> torch.Tensor:
    """Images (B, C, H, W) enlarged by the smallest integer factor that makes each side at least
    `min_size` pixels, nearest-neighbour (every pixel becomes a factor x factor block)."""
    if min_size <= 0 or images.shape[0] == 0:
        return images
    factor = max(1, math.ceil(min_size / min(images.shape[-2:])))
    if factor == 1:
        return images
    return images.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def save_sample_grid(samples: torch.Tensor, path, max_samples: int = 16, columns: Optional[int] = None,
                     min_size: int = 0, labels: Optional[Sequence[str]] = None) -> Path:
    """Write a PNG grid of images (B, 3, H, W) or video first frames (B, T, 3, H, W) in [0, 1].
    min_size: enlarge small images (nearest-neighbour, integer factor) to at least this many
    pixels per side; 0 keeps them as they are. labels: a caption under each image (e.g. its
    prompt and score), wrapped to the image's width."""
    from PIL import Image

    if samples.dim() == 5:
        samples = samples[:, 0]
    samples = upscale_nearest(samples[:max_samples].detach().float().clamp(0, 1).cpu(), min_size)
    count, _, height, width = samples.shape
    columns = columns or min(count, 4)
    rows = math.ceil(count / columns)
    grid = torch.zeros(3, rows * height, columns * width)
    for i in range(count):
        r, c = divmod(i, columns)
        grid[:, r * height:(r + 1) * height, c * width:(c + 1) * width] = samples[i]
    image = Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
    if labels is not None:
        image = _with_captions(image, list(labels)[:count], columns, height, width)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


CAPTION_LINE = 11  # pixels per caption line (PIL's default bitmap font is 11 px tall)


def _with_captions(grid, labels: Sequence[str], columns: int, height: int, width: int):
    """The grid with a white band under each row holding each image's wrapped caption."""
    from PIL import Image, ImageDraw

    chars = max(8, width // 6)  # the default font is about 6 px per character
    wrapped = [textwrap.wrap(label, chars)[:4] or [""] for label in labels]
    band = max(len(lines) for lines in wrapped) * CAPTION_LINE + 4
    rows = math.ceil(len(labels) / columns)
    sheet = Image.new("RGB", (columns * width, rows * (height + band)), "white")
    draw = ImageDraw.Draw(sheet)
    for r in range(rows):
        sheet.paste(grid.crop((0, r * height, columns * width, (r + 1) * height)), (0, r * (height + band)))
    for i, lines in enumerate(wrapped):
        r, c = divmod(i, columns)
        for j, line in enumerate(lines):
            draw.text((c * width + 2, r * (height + band) + height + 2 + j * CAPTION_LINE), line, fill="black")
    return sheet


def warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=2)
