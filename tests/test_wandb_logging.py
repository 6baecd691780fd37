"""runtime.wandb: what a run hands to Weights & Biases.

- Through a short tiny-FLUX run with a recording stand-in for the wandb module: the run's
  project, name, folder and configuration; every iteration's scalars at its iteration (the same
  values as metrics.jsonl); the sample grid, the evaluation grids, the reward curve and the
  before/after sheet as images; the run finished at the end.
- With the real wandb package, offline (WANDB_MODE=offline; skipped where wandb is not
  installed): the run is written under output_dir/wandb with its images, and a resumed run
  continues the same wandb run.
- wandb: true without wandb installed is a one-line error naming the setting.
"""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from helpers.fixtures import _single_thread, flux_folder, torch_backend  # noqa: E402,F401  (fixtures)
from helpers.tiny_models import flux_train_config  # noqa: E402

from dancegrpo_fast.logging_utils import MetricsLogger  # noqa: E402
from dancegrpo_fast.train import Trainer  # noqa: E402
from dancegrpo_fast.wandb_logging import RUN_ID_FILE, WandbLogger, scalars  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _torch_ops(torch_backend):
    """The trainer's logging, not the kernels."""


def brightness(images, prompts):
    return images.float().mean(dim=tuple(range(1, images.dim())))


class RecordingWandb(types.ModuleType):
    """Stands in for the wandb module: records init's arguments, each log call and finish."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logs, self.finished = [], [], 0
        recorder = self

        class Image:
            def __init__(self, path):
                assert Path(path).is_file(), path
                self.path = str(path)

        class Run:
            id = "run123"

            def log(self, values, step):
                recorder.logs.append((step, dict(values)))

            def finish(self):
                recorder.finished += 1

        self.Image = Image
        self._run = Run

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self._run()


def test_a_run_logs_scalars_and_pictures_to_wandb(flux_folder, tmp_path, monkeypatch):
    recorder = RecordingWandb()
    monkeypatch.setitem(sys.modules, "wandb", recorder)
    config = flux_train_config(flux_folder, tmp_path, wandb=True, wandb_project="proj", num_iterations=2,
                               sample_every=2, eval_every=1, eval_prompt_file=str(tmp_path / "p.txt"),
                               eval_num_prompts=1)
    Trainer(config, rewards={"brightness": (brightness, 1.0)}).train()
    out = Path(config.runtime.output_dir)
    (init,) = recorder.inits
    assert init["project"] == "proj" and init["name"] == "out" and init["dir"] == str(out)
    assert init["config"]["runtime"]["wandb"] is True and init["config"]["grpo"]["group_size"] == 2
    assert init["id"] is None  # a fresh run
    assert (out / RUN_ID_FILE).read_text().strip() == "run123"
    assert recorder.finished == 1
    # Scalars: the metrics.jsonl rows, at their iteration.
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scalar_logs = [(step, values) for step, values in recorder.logs
                   if not any(isinstance(v, recorder.Image) for v in values.values())]
    assert len(scalar_logs) == len(rows) == 3  # before (iteration 0), iterations 1 and 2
    for (step, values), row in zip(scalar_logs, rows):
        assert step == row["iteration"]
        assert values == {k: v for k, v in row.items() if k != "iteration" and v is not None}
    assert "reward/brightness/mean" in scalar_logs[1][1] and "loss" in scalar_logs[1][1]
    # Pictures: evaluation grids and the reward curve at every evaluation, the sample grid of
    # iteration 2, the before/after sheet at the end.
    images = [(step, key, Path(value.path).name) for step, values in recorder.logs
              for key, value in values.items() if isinstance(value, recorder.Image)]
    for step in (0, 1, 2):
        assert (step, "eval/samples", f"eval_iter_{step:06d}.png") in images
    assert (2, "samples", "iter_000002.png") in images
    assert (2, "eval/before_after", "before_after.png") in images
    curves = [step for step, key, name in images if key == "eval/reward_curve"]
    if curves:  # drawn with matplotlib, where it is installed
        assert curves == [0, 1, 2]


def test_scalars_leave_out_the_step_and_non_numbers():
    row = {"iteration": 3, "loss": 0.5, "ok": True, "name": "x", "missing": None, "nan": float("nan"), "n": 2}
    assert scalars(row) == {"loss": 0.5, "n": 2}


def test_wandb_without_the_package_names_the_setting(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ValueError, match="wandb: true needs the wandb package.*dancegrpo_fast\\[wandb\\]"):
        WandbLogger(tmp_path, "proj")


def test_real_wandb_offline(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from PIL import Image

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    picture = tmp_path / "grid.png"
    Image.new("RGB", (8, 8), "red").save(picture)
    logger = MetricsLogger(tmp_path, wandb=WandbLogger(tmp_path, "proj", "first"))
    logger.log({"iteration": 1, "reward/r/mean": 0.25, "loss": -0.1})
    logger.log_image("samples", picture, 1)
    logger.close()
    run_id = (tmp_path / RUN_ID_FILE).read_text().strip()
    (run_dir,) = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}")
    assert list((run_dir / "files" / "media" / "images").glob("samples_1_*.png"))
    assert (run_dir / f"run-{run_id}.wandb").stat().st_size > 0
    # A resumed run continues the same wandb run.
    resumed = WandbLogger(tmp_path, "proj", "first", resume=True)
    assert resumed.run.id == run_id
    resumed.close()
    assert wandb.run is None


def test_tensorboard_gets_the_scalars_and_pictures(tmp_path):
    """TensorBoard (installed by the train extra) receives the same rows and pictures."""
    pytest.importorskip("tensorboard")
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    picture = tmp_path / "grid.png"
    Image.new("RGB", (8, 6), "blue").save(picture)
    logger = MetricsLogger(tmp_path)
    assert logger.writer is not None
    logger.log({"iteration": 1, "loss": 0.5, "reward/r/mean": 0.25})
    logger.log_image("samples", picture, 1)
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 0.5)]
    (image,) = events.Images("samples")
    assert (image.step, image.width, image.height) == (1, 8, 6)
