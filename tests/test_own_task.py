"""A task of one's own plugs in as the tiny task does: as data. The example of docs/training.md
("A task of your own") run as written there, on the tiny model: its own reward module named in
reward_modules, its own prompt lists, from the command line."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from dancegrpo_fast.train import main

REPO = Path(__file__).resolve().parents[1]


def _doc_block(language: str, first_line: str) -> str:
    text = (REPO / "docs" / "training.md").read_text()
    for block in re.findall(rf"```{language}\n(.*?)```", text, flags=re.S):
        if block.startswith(first_line):
            return block
    raise AssertionError(f"docs/training.md has no {language} block starting with {first_line!r}")


@pytest.fixture
def my_task(tmp_path, monkeypatch):
    package = tmp_path / "my_task"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "rewards.py").write_text(_doc_block("python", "# my_task/rewards.py"))
    (package / "train_prompts.txt").write_text("a red circle\na blue square\n")
    (package / "heldout_prompts.txt").write_text("a red triangle\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    for name in [m for m in sys.modules if m == "my_task" or m.startswith("my_task.")]:
        del sys.modules[name]


def test_the_documented_task_of_ones_own_trains(my_task, capsys):
    import yaml

    config = yaml.safe_load(_doc_block("yaml", "# my_task.yaml"))
    # The documented YAML, on the tiny model (no FLUX weights here) and without the hps model.
    config["model"] = {"family": "tiny"}
    config["rollout"]["rewards"] = "redness:1.0"
    (my_task / "my_task.yaml").write_text(yaml.safe_dump(config))
    code = main(["--preset", "tiny", "--config", "my_task.yaml", "--output_dir", "outputs/red", "--num_iterations", "1",
                 "--group_size", "2", "--prompts_per_rank", "2", "--rollout_batch_size", "4", "--train_batch_size", "4",
                 "--eval_samples_per_prompt", "1", "--num_steps", "3", "--sde_window_size", "0", "--progress_bar", "false",
                 "--tensorboard", "false"])
    assert code == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (my_task / "outputs" / "red" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    assert "eval/redness/mean" in rows[0] and "reward/redness/mean" in rows[1]
    assert "rewards     redness:1" in capsys.readouterr().out


def test_an_unimportable_reward_module_is_a_one_line_error(my_task, capsys):
    code = main(["--rewards", "my_score:1.0", "--reward_modules", "my_task.nope", "--output_dir", "outputs/x"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "reward_modules: could not import 'my_task.nope'" in err
    # Without the module the name is unknown (the check runs before anything loads).
    code = main(["--rewards", "my_score:1.0", "--output_dir", "outputs/y"])
    assert code == 2 and "unknown reward name(s) ['my_score']" in capsys.readouterr().err
