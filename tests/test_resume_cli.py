"""Resuming from the command line: the run's own saved settings come back (num_iterations
included), only the flags given change them, and a finished run says how to extend it."""
from __future__ import annotations

import json

from dancegrpo_fast.train import main

SMALL = ["--num_iterations", "1", "--group_size", "2", "--prompts_per_rank", "2", "--rollout_batch_size", "4",
         "--train_batch_size", "4", "--num_steps", "3", "--sde_window_size", "0", "--eval_every", "0", "--progress_bar", "false",
         "--tensorboard", "false", "--lr", "3e-5"]


def _rows(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_resume_restores_the_saved_settings(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DANCEGRPO_FAST_BACKEND", "torch")
    out = tmp_path / "run"
    assert main(["--output_dir", str(out)] + SMALL) == 0
    capsys.readouterr()
    # Finished: nothing to do (and nothing loads), with the way to go on.
    assert main(["--output_dir", str(out), "--resume", "latest"]) == 0
    said = capsys.readouterr().out
    assert said.startswith(f"nothing to do: the run in {out} has done all of its 1 iterations")
    assert "--num_iterations 2" in said
    assert [r["iteration"] for r in _rows(out)] == [1]
    # Extended: the saved settings (group size 2, 3 steps, lr 3e-5: not the tiny preset's 8, 8,
    # 5e-5), with the new num_iterations, listed.
    assert main(["--output_dir", str(out), "--resume", "latest", "--num_iterations", "2"]) == 0
    said = capsys.readouterr().out
    assert "resuming" in said and "at iteration 1 of 2" in said and "num_iterations 1 -> 2" in said
    rows = _rows(out)
    assert [r["iteration"] for r in rows] == [1, 2] and rows[1]["lr"] == 3e-5
    saved = (out / "config.yaml").read_text()
    assert "group_size: 2" in saved and "num_steps: 3" in saved and "num_iterations: 2" in saved
