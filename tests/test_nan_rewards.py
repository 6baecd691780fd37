"""NaN and infinite scores reach the advantage step from every kind of reward (a registered one
built from the config, and `remote` against a real reward server process), which skips the
affected groups, counts them in the metrics and the progress line, and stops only when
max_skipped_group_fraction of an iteration's groups are unusable."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import unusable_rewards  # noqa: E402,F401  (registers the test rewards)
from helpers.fixtures import _single_thread, flux_folder  # noqa: E402,F401  (fixtures)
from helpers.server_process import reward_server  # noqa: E402
from helpers.tiny_models import flux_train_config  # noqa: E402

from dancegrpo_fast.config import RewardSpec, TrainConfig  # noqa: E402
from dancegrpo_fast.rewards import BinaryReward, build_reward  # noqa: E402
from dancegrpo_fast.rewards import RewardError  # noqa: E402
from dancegrpo_fast.train import Trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MARKED = "test_unusable_for_marked_prompts"


def config_with(folder, tmp_path, rewards, prompts=("a broken cat", "a blue dog"), **overrides) -> TrainConfig:
    """Two prompts per iteration, G = 2: with the default prompts one of the two groups has a
    NaN reward in every iteration."""
    return flux_train_config(folder, tmp_path, list(prompts), **{"num_iterations": 2, "rewards": rewards, **overrides})


def test_a_reward_returns_non_finite_scores_instead_of_raising():
    reward = build_reward(MARKED)
    scores = reward(torch.full((3, 3, 4, 4), 0.5), ["a broken cat", "an infinite dog", "a cat"])
    assert torch.isnan(scores[0]) and scores[1] == float("inf") and scores[2] == 0.5
    # A binary wrapper keeps "no score" as NaN instead of turning it into a 0 that looks real.
    binary = BinaryReward(reward, threshold=0.25)(torch.full((3, 3, 4, 4), 0.5), ["a broken cat", "an infinite dog", "a"])
    assert torch.isnan(binary[0]) and torch.isnan(binary[1]) and binary[2] == 1.0


def test_nan_from_a_registered_reward_skips_the_group(flux_folder, tmp_path, capsys):
    config = config_with(flux_folder, tmp_path, [RewardSpec(MARKED, 1.0)], progress_bar=True)
    trainer = Trainer(config)  # built through the registry, as `--rewards name:1.0` does
    with pytest.warns(RuntimeWarning, match=r"skipped 1 group\(s\) with NaN/inf rewards"):
        rows = trainer.train()
    assert [r["skipped_groups"] for r in rows] == [1, 1] and trainer.skipped_groups_total == 2
    assert rows[-1]["skipped_groups_total"] == 2
    assert "skipped=2" in capsys.readouterr().err  # the progress line counts them too
    assert trainer.iteration == 2


def test_infinite_scores_are_skipped_like_nan(flux_folder, tmp_path):
    config = config_with(flux_folder, tmp_path, [RewardSpec(MARKED, 1.0)], prompts=("an infinite cat", "a blue dog"),
                         num_iterations=1)
    with pytest.warns(RuntimeWarning, match="NaN/inf"):
        rows = Trainer(config).train()
    assert rows[0]["skipped_groups"] == 1


def test_too_many_unusable_groups_stop_with_a_clear_error(flux_folder, tmp_path):
    # Default (1.0): only an iteration where every group is unusable stops the run.
    every = config_with(flux_folder, tmp_path / "every", [RewardSpec(MARKED, 1.0)],
                        prompts=("a broken cat", "a broken dog"))
    trainer = Trainer(every)
    with pytest.raises(RewardError, match=r"iteration 1: 2 of 2 groups have NaN/inf rewards \(reward "
                                          rf"'{MARKED}'\).*max_skipped_group_fraction=1"):
        trainer.train()
    assert trainer.iteration == 0
    # A lower fraction stops earlier: half of the groups is already too many at 0.5.
    half = config_with(flux_folder, tmp_path / "half", [RewardSpec(MARKED, 1.0)], max_skipped_group_fraction=0.5)
    with pytest.raises(RewardError, match=r"1 of 2 groups.*max_skipped_group_fraction=0.5"):
        Trainer(half).train()


def test_max_skipped_group_fraction_is_validated():
    for bad in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"max_skipped_group_fraction must lie in \(0, 1\]"):
            TrainConfig.from_dict(dict(max_skipped_group_fraction=bad)).validate()


@pytest.fixture(scope="module")
def nan_server_url(tmp_path_factory):
    """A real reward server process serving the test reward (its module named by --reward-module)."""
    log_path = tmp_path_factory.mktemp("nan_server") / "stderr.txt"
    command = [sys.executable, "-m", "dancegrpo_fast.rewards.serve", "--reward-module", "helpers.unusable_rewards",
               "--reward", MARKED, "--host", "127.0.0.1", "--port", "0", "--max-wait-ms", "1"]
    with reward_server(command, log_path, env={"PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}) as url:
        yield url


def test_the_server_returns_non_finite_scores_as_data(nan_server_url):
    import urllib.request

    from dancegrpo_fast.rewards.remote import encode_request

    body = encode_request(torch.full((3, 3, 4, 4), 0.5), ["a broken cat", "an infinite dog", "a cat"], "float32")
    request = urllib.request.Request(nan_server_url + "/score", data=body, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        raw = response.read()
        assert response.status == 200
    # Strict JSON on the wire (no bare NaN/Infinity tokens): null stands for "no usable score".
    assert json.loads(raw, parse_constant=lambda token: pytest.fail(f"non-JSON token {token}")) == \
        {"scores": [None, None, 0.5]}
    remote = build_reward("remote", url=nan_server_url, retries=0, dtype="float32")
    scores = remote(torch.full((3, 3, 4, 4), 0.5), ["a broken cat", "an infinite dog", "a cat"])
    assert torch.isnan(scores[:2]).all() and scores[2] == 0.5


def test_nan_from_a_reward_server_skips_the_group(flux_folder, tmp_path, nan_server_url):
    config = config_with(flux_folder, tmp_path, [RewardSpec("remote", 1.0, {"url": nan_server_url, "retries": 0})])
    trainer = Trainer(config)
    with pytest.warns(RuntimeWarning, match=r"skipped 1 group\(s\) with NaN/inf rewards"):
        rows = trainer.train()
    assert [r["skipped_groups"] for r in rows] == [1, 1] and trainer.iteration == 2
    assert all(r["reward/remote/mean"] is not None for r in rows)
