"""Weights & Biases logging of a run (optional: runtime.wandb, the `[wandb]` extra).

What a run logs there: every numeric value of each metrics.jsonl row at its iteration (reward
means and stds, loss, ratio, KL, gradient norm, timings, the held-out evaluation's means, ...),
and as images the sample grids (`sample_every`), the held-out evaluation grids, the reward curve
(reward_curve.png, redrawn at each evaluation) and the before/after sheet. metrics.jsonl stays
the record; wandb is a view of it.

Offline: set WANDB_MODE=offline (no account, no network); the run is written under
output_dir/wandb and can be uploaded later with `wandb sync`. A resumed run continues the same
wandb run (its id is kept in output_dir/wandb_run_id).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Optional

RUN_ID_FILE = "wandb_run_id"


def import_wandb():
    """The wandb module, or a one-line error saying how to install it."""
    try:
        import wandb
    except ImportError as error:
        raise ValueError(f"wandb: true needs the wandb package, which does not import here ({error}): "
                         f"pip install 'dancegrpo_fast[wandb]', or set wandb to false") from None
    return wandb


def scalars(row: Dict[str, Any]) -> Dict[str, float]:
    """The numeric values of a metrics row, without the step and without NaN/inf (a missing
    reward mean is logged as missing, not as NaN)."""
    out = {}
    for key, value in row.items():
        if key == "iteration" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[key] = value
    return out


class WandbLogger:
    """One wandb run per training run (rank 0 only; the trainer builds it there).

    project, run_name: wandb's project and run name (empty name: the output folder's name);
    config: the run's configuration as plain data (shown in wandb's config panel); resume: the
    run resumes a checkpoint, so an earlier wandb run of this output folder is continued."""

    def __init__(self, output_dir, project: str, run_name: str = "", config: Optional[Dict[str, Any]] = None,
                 resume: bool = False):
        self.wandb = import_wandb()
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        id_file = output_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
        self.run = self.wandb.init(project=project, name=run_name or output_dir.resolve().name, dir=str(output_dir),
                                   config=config or {}, id=run_id, resume="allow" if run_id else None)
        id_file.write_text(self.run.id + "\n")

    def log(self, row: Dict[str, Any]) -> None:
        values = scalars(row)
        if values:
            self.run.log(values, step=int(row.get("iteration", 0)))

    def log_image(self, key: str, path, step: int) -> None:
        """A PNG the run wrote (a sample grid, an evaluation grid, the reward curve)."""
        self.run.log({key: self.wandb.Image(str(path))}, step=int(step))

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
