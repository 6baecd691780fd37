"""Sharded (DCP) checkpoints under FSDP2, the diffusers export, the EMA export and eval_ema.

Two gloo processes on the CPU (tests/helpers/sharded_runner.py): each rank writes its own shard
and never holds the full state; a resumed run equals the uninterrupted one bit for bit (weights
and EMA); the export at the end of the run loads with from_pretrained and equals the trained
weights and the EMA; a sharded checkpoint also resumes in one process. In one process: the export
of the full layout (full fine-tune and LoRA, EMA included), its command line and errors, a crafted
shard index refused without running code, and evaluation on the EMA weights."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers.fixtures import _single_thread, flux_folder, torch_backend  # noqa: E402,F401  (fixtures)
from helpers.tiny_models import flux_train_config, flux_train_values, write_prompts  # noqa: E402

from dancegrpo_fast import export as export_module  # noqa: E402
from dancegrpo_fast.checkpoint import CheckpointError  # noqa: E402
from dancegrpo_fast.config import TrainConfig  # noqa: E402
from dancegrpo_fast.distributed import DistributedState  # noqa: E402
from dancegrpo_fast.evaluator import evaluate_policy  # noqa: E402
from dancegrpo_fast.policies import build_policy  # noqa: E402
from dancegrpo_fast.sharded_checkpoint import (SHARDS_DIR, ShardedCheckpointError, read_full, read_index,  # noqa: E402
                                               save_shards)
from dancegrpo_fast.train import Trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RUNNER = REPO / "tests" / "helpers" / "sharded_runner.py"
LORA = dict(use_lora=True, lora_rank=4, lora_alpha=4.0, lora_target_modules=["to_q", "to_k", "to_v"])


def brightness(images, prompts):
    return images.float().mean(dim=tuple(range(1, images.dim())))


REWARDS = {"brightness": (brightness, 1.0)}


def _trainable(trainer):
    return {n: p.detach().clone() for n, p in trainer.policy.model.named_parameters() if p.requires_grad}


def _torchrun(tmp_path, name, output_dir, **values):
    """2 gloo processes of sharded_runner.py; returns what rank 0 saved."""
    config = {"model_family": "flux", "prompt_file": str(write_prompts(tmp_path / "p.txt")),
              "output_dir": str(output_dir), "height": 16, "width": 16, "num_steps": 4, "group_size": 2,
              "rollout_batch_size": 2, "train_batch_size": 2, "timestep_fraction": 1.0, "max_sequence_length": 16,
              "lr": 1e-3, "num_iterations": 1, "progress_bar": False, "tensorboard": False, "mixed_precision": "no",
              "seed": 5, "prompts_per_rank": 2, "gradient_accumulation_steps": 2, "parallel": "fsdp", **values}
    config_file = tmp_path / f"{name}.json"
    config_file.write_text(json.dumps(config))
    output = tmp_path / f"{name}.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(RUNNER),
               str(config_file), str(output)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, timeout=600)
    assert result.returncode == 0, result.stderr.decode()[-4000:]
    return torch.load(output, weights_only=True)


def _assert_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ----------------------------------------------------------------------------------------------
# Two processes, FSDP2
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fsdp_sharded_save_exact_resume_and_export(flux_folder, tmp_path):
    from diffusers import FluxTransformer2DModel

    straight_dir = tmp_path / "straight"
    straight = _torchrun(tmp_path, "straight", straight_dir, model_path=str(flux_folder), num_iterations=2,
                         checkpoint_every=1, keep_checkpoints=2, ema_decay=0.9)
    assert straight["iteration"] == 2
    checkpoint = straight_dir / "checkpoints" / "iter_000002"

    # Each rank wrote its own shard file; no full weights file; the index covers model, AdamW, EMA.
    meta = json.loads((checkpoint / "meta.json").read_text())
    assert meta["layout"] == "sharded" and meta["format_version"] == 3 and meta["has_ema"]
    shards = checkpoint / SHARDS_DIR
    assert sorted(p.name for p in shards.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (checkpoint / "model").exists() and not list(checkpoint.rglob("*.safetensors"))
    index = read_index(shards)
    names = set(straight["params"])
    assert {k[len("model."):] for k in index if k.startswith("model.")} == names
    assert {k[len("ema."):] for k in index if k.startswith("ema.")} == names
    assert {k.rsplit(".", 1)[1] for k in index if k.startswith("optimizer.")} == {"step", "exp_avg", "exp_avg_sq"}
    sizes = [(shards / f"__{r}_0.distcp").stat().st_size for r in range(2)]
    assert min(sizes) > 0.3 * sum(sizes), sizes  # both ranks wrote a comparable share
    # What each rank handed to DCP: only its local shards (together exactly the full weights).
    full_elements = sum(v.numel() for v in straight["params"].values())
    counts = straight["local_model_counts"]  # (rank, save)
    assert counts.shape == (2, 2)
    assert (counts.sum(0) == full_elements).all() and (counts < 0.75 * full_elements).all(), counts
    for save in straight["saves"]:
        assert save["full"]["model"] == full_elements and save["local"]["model"] < save["full"]["model"]
        assert save["local"]["optimizer"] < save["full"]["optimizer"]

    # Resume from iteration 1 (a copy of the run as it was then) == the uninterrupted run, bit for bit.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(straight_dir, resumed_dir, ignore=shutil.ignore_patterns("iter_000002", "export"))
    resumed = _torchrun(tmp_path, "resumed", resumed_dir, model_path=str(flux_folder), num_iterations=2,
                        checkpoint_every=1, keep_checkpoints=2, ema_decay=0.9, resume="latest")
    assert resumed["iteration"] == 2
    _assert_equal(resumed["params"], straight["params"])
    _assert_equal(resumed["ema"], straight["ema"])
    assert not torch.equal(straight["ema"][next(iter(names))], straight["params"][next(iter(names))])

    # The export at the end of the run (consolidated from the shards): from_pretrained loads it.
    model = FluxTransformer2DModel.from_pretrained(straight_dir / "export" / "transformer")
    _assert_equal({k: v for k, v in model.state_dict().items()}, straight["params"])
    ema_model = FluxTransformer2DModel.from_pretrained(straight_dir / "export" / "ema" / "transformer")
    _assert_equal(ema_model.state_dict(), straight["ema"])

    # On demand, from an earlier checkpoint, into a folder of one's choice.
    out = tmp_path / "iter1_export"
    assert export_module.main([str(resumed_dir), "--checkpoint", "iter_000001", "--out", str(out), "--ema"]) == 0
    first = FluxTransformer2DModel.from_pretrained(out / "transformer").state_dict()
    _assert_equal(first, read_full(resumed_dir / "checkpoints" / "iter_000001" / SHARDS_DIR, "model"))
    assert not torch.equal(first[next(iter(names))], straight["params"][next(iter(names))])

    # A sharded checkpoint resumes in one process too (DCP reshards): the same weights and EMA.
    single = Trainer(flux_train_config(flux_folder, tmp_path / "single", num_iterations=3, ema_decay=0.9,
                                       resume=str(checkpoint)), rewards=REWARDS)
    assert single.iteration == 2
    _assert_equal(_trainable(single), straight["params"])
    _assert_equal(single.setup.ema.shadow, straight["ema"])

    # A crafted index stops the resume with one line, without running its code.
    marker = tmp_path / "code_ran"
    (checkpoint / SHARDS_DIR / ".metadata").write_bytes(pickle.dumps(_Exploit(f"touch {marker}")))
    with pytest.raises(CheckpointError, match=r"shards/.metadata references posix.system.*refusing"):
        Trainer(flux_train_config(flux_folder, tmp_path / "crafted", num_iterations=3, resume=str(checkpoint)),
                rewards=REWARDS)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# One process: the export of the full layout, its command line
# ----------------------------------------------------------------------------------------------


def test_export_of_a_full_fine_tune_and_its_ema(flux_folder, tmp_path):
    from diffusers import FluxTransformer2DModel

    trainer = Trainer(flux_train_config(flux_folder, tmp_path, num_iterations=2, ema_decay=0.5), rewards=REWARDS)
    trainer.train()
    export = tmp_path / "out" / "export"  # written at the end of the run
    assert json.loads((export / "export.json").read_text())["iteration"] == 2
    _assert_equal(FluxTransformer2DModel.from_pretrained(export / "transformer").state_dict(), _trainable(trainer))
    ema = FluxTransformer2DModel.from_pretrained(export / "ema" / "transformer").state_dict()
    _assert_equal(ema, trainer.setup.ema.shadow)
    # EMA after 2 steps from w0 with decay 0.5: 0.25 w0 + 0.25 w1 + 0.5 w2 != w2
    assert any(not torch.equal(ema[k], v) for k, v in _trainable(trainer).items())
    # Again on demand, replacing the earlier export; without --ema no ema/ folder.
    assert export_module.main([str(tmp_path / "out")]) == 0
    assert (export / "transformer").is_dir() and not (export / "ema").exists()


def test_export_of_a_lora_run_and_its_ema(flux_folder, tmp_path):
    from diffusers import FluxPipeline

    trainer = Trainer(flux_train_config(flux_folder, tmp_path, ema_decay=0.5, export=False, **LORA), rewards=REWARDS)
    trainer.train()
    assert not (tmp_path / "out" / "export").exists()  # export: false
    out = export_module.export_run(tmp_path / "out", ema=True)
    for folder, expected in ((out, _trainable(trainer)), (out / "ema", trainer.setup.ema.shadow)):
        pipe = FluxPipeline.from_pretrained(str(flux_folder))
        pipe.load_lora_weights(str(folder))
        loaded = {k: v for k, v in pipe.transformer.state_dict().items() if "lora" in k}
        assert len(loaded) == len(expected) > 0
        assert sorted(torch.cat([v.flatten() for v in loaded.values()]).tolist()) == \
            sorted(torch.cat([v.flatten() for v in expected.values()]).tolist())


def test_export_errors_are_one_line(flux_folder, tmp_path, capsys):
    assert export_module.main([str(tmp_path / "nothing")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    Trainer(flux_train_config(flux_folder, tmp_path, export=False), rewards=REWARDS).train()
    capsys.readouterr()  # the run's own output
    assert export_module.main([str(tmp_path / "out"), "--ema"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "no EMA" in error and "ema_decay" in error
    assert not (tmp_path / "out" / "export").exists()  # nothing half-written
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    assert export_module.main([str(tmp_path / "out"), "--out", str(tmp_path / "taken")]) == 2
    assert "not an earlier export" in capsys.readouterr().err
    assert export_module.main([str(tmp_path / "out"), "--checkpoint", "iter_000099"]) == 2
    assert "does not exist" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Loading shards never runs code
# ----------------------------------------------------------------------------------------------


class _Exploit:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_a_crafted_shard_index_is_refused_without_running(tmp_path):
    folder = tmp_path / SHARDS_DIR
    weights = {"a.weight": torch.randn(3, 4), "b": torch.randn(5)}
    save_shards(folder, {"model": weights}, DistributedState())
    _assert_equal(read_full(folder, "model"), weights)  # the honest index reads
    marker = tmp_path / "code_ran"
    (folder / ".metadata").write_bytes(pickle.dumps(_Exploit(f"touch {marker}")))
    with pytest.raises(ShardedCheckpointError, match=r"shards/.metadata references posix.system.*refusing"):
        read_full(folder, "model")
    assert not marker.exists(), "reading the shard index executed code"


# ----------------------------------------------------------------------------------------------
# Evaluation on the EMA weights
# ----------------------------------------------------------------------------------------------


def test_eval_ema_evaluates_the_ema_and_restores_the_live_weights(flux_folder, tmp_path, torch_backend):
    eval_file = write_prompts(tmp_path / "heldout.txt", ("a red cat", "a blue dog", "a green tree"))
    values = dict(ema_decay=0.5, num_iterations=2, eval_prompt_file=str(eval_file), eval_every=0, lr=3e-3)
    trainer = Trainer(flux_train_config(flux_folder, tmp_path / "a", **values), rewards=REWARDS)
    for _ in range(2):
        trainer.train_iteration()
    trainer.config.eval.every = trainer.evaluator.options.every = 1
    trainer.evaluator.prompts = trainer.evaluator._load_prompts()
    live = _trainable(trainer)
    with_live = trainer._evaluate()
    trainer.config.eval.use_ema = True
    with_ema = trainer._evaluate()
    _assert_equal(_trainable(trainer), live)  # bit for bit after the swap back
    assert with_ema["eval/brightness/mean"] != with_live["eval/brightness/mean"]

    # Reference: a model holding the EMA weights by construction (a copy of the tiny pipeline
    # with its transformer set to the EMA values), evaluated the plain way.
    reference = build_policy(trainer.config.model, trainer.config.sampler)
    reference.model.to(torch.float32)  # the trainer's float32 master weights
    with torch.no_grad():
        for name, param in reference.model.named_parameters():
            param.copy_(trainer.setup.ema.shadow[name])
    metrics, _ = evaluate_policy(reference, reference.schedule(), trainer.evaluator.prompts, REWARDS,
                                 batch_size=trainer.config.rollout.batch_size)
    assert metrics["eval/brightness/mean"] == with_ema["eval/brightness/mean"]
    metrics, _ = evaluate_policy(trainer.policy, trainer.schedule, trainer.evaluator.prompts, REWARDS,
                                 batch_size=trainer.config.rollout.batch_size)
    assert metrics["eval/brightness/mean"] == with_live["eval/brightness/mean"]


def test_eval_ema_needs_an_ema(flux_folder, tmp_path):
    with pytest.raises(ValueError, match=r"eval_ema .*ema_decay > 0"):
        TrainConfig.from_dict(flux_train_values(flux_folder, tmp_path, eval_ema=True)).validate()
    assert TrainConfig.from_dict(flux_train_values(flux_folder, tmp_path, eval_ema=True, ema_decay=0.9)).eval.use_ema
