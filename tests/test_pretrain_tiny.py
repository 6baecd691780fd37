"""The tiny model's pretraining script (python -m dancegrpo_fast.pretrain_tiny), both stages, at a
few steps: it writes loadable weights and a record, is deterministic in --seed, and fails
cleanly on bad input."""
from __future__ import annotations

import json

import torch

from dancegrpo_fast import pretrain_tiny
from dancegrpo_fast.tiny.model import TinyFlowPipeline


def _state(folder):
    pipe = TinyFlowPipeline.from_pretrained(folder)
    return {f"{c}.{k}": v for c, m in pipe.components.items() for k, v in m.state_dict().items()}


def test_both_stages_write_weights_records_and_are_deterministic(tmp_path, capsys):
    out = tmp_path / "w"
    assert pretrain_tiny.main(["--stage", "vae", "--out", str(out), "--steps", "2", "--batch_size", "2",
                               "--threads", "1", "--log_every", "1"]) == 0
    vae_record = json.loads((out / "vae_record.json").read_text())
    assert vae_record["stage"] == "vae" and vae_record["steps"] == 2
    assert vae_record["scaling_factor"] > 0 and (out / "vae" / "config.json").is_file()

    flow = ["--out", str(out), "--steps", "3", "--batch_size", "4", "--warmup", "1", "--threads", "1",
            "--log_every", "1", "--snapshot_every", "2", "--caption_noise", "0.5"]
    assert pretrain_tiny.main(flow) == 0
    record = json.loads((out / "pretrain_record.json").read_text())
    assert record["stage"] == "flow" and record["steps"] == 3 and record["data"]["caption_noise"] == 0.5
    assert record["command"].startswith("python -m dancegrpo_fast.pretrain_tiny")
    assert [row["step"] for row in record["loss_curve"]] == [1, 2, 3]
    assert (out / "snapshots" / "step_000002" / "pretrain_record.json").is_file()
    first = _state(out)
    pipe = TinyFlowPipeline.from_pretrained(out)
    assert pipe.vae is not None and pipe.latent_shape == (16, 16)

    # Same seed, same weights (the record's command reproduces the shipped model).
    again = tmp_path / "again"
    again.mkdir()
    assert pretrain_tiny.main([*flow[:1], str(again), *flow[2:], "--vae", str(out / "vae")]) == 0
    second = _state(again)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_errors_name_the_problem(tmp_path, capsys):
    assert pretrain_tiny.main(["--out", str(tmp_path / "none"), "--steps", "1"]) == 2
    assert "no trained VAE" in capsys.readouterr().err
    assert pretrain_tiny.main(["--out", str(tmp_path), "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert pretrain_tiny.main(["--out", str(tmp_path), "--caption_noise", "1.5"]) == 2
    assert "--caption_noise" in capsys.readouterr().err
