"""What the trainer prints: progress fields and the end summary, from metric rows."""

from dancegrpo_fast.config import TrainConfig
from dancegrpo_fast.run_report import held_out_lines, progress_fields, summary_block


def test_progress_shows_reward_clip_time_and_held_out_not_the_loss():
    row = {"iteration": 3, "loss": 1.863e-08, "reward/r/mean": 0.5, "reward/r/std": 0.1, "clip_fraction": 0.25,
           "kl": 0.01, "seconds_rollout": 1.0, "seconds_reward": 0.25, "seconds_update": 0.5}
    fields = progress_fields(row, kl_on=False)
    assert fields == {"reward": "0.500", "clip": "0.25", "s/it": "1.75"}
    assert progress_fields({**row, "eval/r/mean": 0.61, "skipped_groups_total": 2}, kl_on=True) == {
        "reward": "0.500", "clip": "0.25", "kl": "0.010", "s/it": "1.75", "held-out": "0.610", "skipped": "2"}


def test_summary_gives_before_after_per_criterion_paths_and_the_next_command(tmp_path):
    rows = [{"iteration": 0, "eval/r/mean": 0.4, "eval/r/color": 0.5, "eval/r/std": 0.2},
            {"iteration": 1, "reward/r/mean": 0.45},
            {"iteration": 2, "reward/r/mean": 0.5, "eval/r/mean": 0.55, "eval/r/color": 0.75}]
    lines = held_out_lines(rows)
    assert lines[0].strip() == "held-out evaluation at iterations 0 -> 2:"
    assert lines[1].split() == ["held-out", "r", "0.400", "->", "0.550", "(+0.150)"]
    assert lines[2].split() == ["color", "0.500", "->", "0.750", "(+0.250)"]
    assert len(lines) == 3  # std is not a criterion
    (tmp_path / "metrics.jsonl").write_text("")
    config = TrainConfig.from_dict(dict(output_dir=str(tmp_path), num_iterations=2))
    text = summary_block(config, rows, 125.0, tmp_path / "checkpoints" / "iter_000002", stopped_early=False)
    assert text.splitlines()[0] == "DanceGRPO finished: 2 of 2 iterations in 2m05s"
    assert f"metrics.jsonl     {tmp_path / 'metrics.jsonl'}" in text
    assert "reward_curve.png" not in text  # only files that exist
    assert text.splitlines()[-1].endswith(f"--output_dir {tmp_path} --resume latest --num_iterations 3")
    stopped = summary_block(config, rows[:2], 5.0, None, stopped_early=True)
    assert stopped.splitlines()[0] == "DanceGRPO stopped at iteration 1 of 2 (signal) in 5s"
    assert stopped.splitlines()[-1].endswith("--resume latest") and "last checkpoint" not in stopped
    assert held_out_lines([{"iteration": 1, "reward/r/mean": 0.1}]) == []
