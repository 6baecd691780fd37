"""torchrun with 2 CPU processes (gloo): DDP and FSDP2 give the parameters of 1 process on the
same global batch and seeds; a 2-process FSDP2 run resumes from its checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from helpers.fixtures import _single_thread, flux_folder  # noqa: E402,F401  (fixtures)
from helpers.tiny_models import flux_train_config, make_flux, write_prompts  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RUNNER = REPO / "tests" / "helpers" / "dist_runner.py"






def _run(tmp_path, name, processes, **values):
    config = {"model_family": "flux", "prompt_file": str(write_prompts(tmp_path / "p.txt")),
              "output_dir": str(tmp_path / name), "height": 16, "width": 16, "num_steps": 4, "group_size": 2,
              "rollout_batch_size": 2, "train_batch_size": 2, "timestep_fraction": 1.0, "max_sequence_length": 16,
              "lr": 1e-3, "num_iterations": 1, "progress_bar": False, "tensorboard": False, "mixed_precision": "no",
              "seed": 5, **values}
    config_file = tmp_path / f"{name}.json"
    config_file.write_text(json.dumps(config))
    output = tmp_path / f"{name}.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if processes == 1:
        command = [sys.executable, str(RUNNER), str(config_file), str(output)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   str(RUNNER), str(config_file), str(output)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr.decode()[-4000:]
    return torch.load(output)


@pytest.fixture(scope="module")
def single_process(flux_folder, tmp_path_factory):
    """1 process, 2 iterations, a checkpoint after each. Global batch: 4 prompts x G=2 = 8
    samples, one optimizer step per iteration; global advantages (every rank's rewards gathered)."""
    tmp_path = tmp_path_factory.mktemp("single")
    final = _run(tmp_path, "single", 1, model_path=str(flux_folder), prompts_per_rank=4,
                 gradient_accumulation_steps=4, advantage="global", num_iterations=2, checkpoint_every=1)
    weights = tmp_path / "single" / "checkpoints" / "iter_000001" / "model" / "transformer"
    after_one = load_file(str(weights / "diffusion_pytorch_model.safetensors"))
    return {"after_one": {k: after_one[k] for k in final["params"]}, "after_two": final["params"]}


TWO_RANKS = dict(prompts_per_rank=2, gradient_accumulation_steps=2, advantage="global")


def _assert_same(params, reference, atol=1e-5):
    assert params.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(params[key], value, atol=atol, rtol=1e-5, msg=key)


@pytest.mark.slow
def test_ddp_matches_one_process(flux_folder, single_process, tmp_path):
    double = _run(tmp_path, "ddp", 2, model_path=str(flux_folder), parallel="ddp", **TWO_RANKS)
    _assert_same(double["params"], single_process["after_one"])


@pytest.mark.slow
def test_fsdp_matches_one_process_and_resumes(flux_folder, single_process, tmp_path):
    # ema_decay: the sharded EMA is gathered into the checkpoint and re-sharded on resume.
    first = _run(tmp_path, "fsdp", 2, model_path=str(flux_folder), parallel="fsdp", ema_decay=0.9, **TWO_RANKS)
    _assert_same(first["params"], single_process["after_one"])
    resumed = _run(tmp_path, "fsdp", 2, model_path=str(flux_folder), parallel="fsdp", num_iterations=2,
                   resume="latest", ema_decay=0.9, **TWO_RANKS)
    assert resumed["iteration"] == 2
    _assert_same(resumed["params"], single_process["after_two"])


@pytest.mark.slow
def test_fsdp_lora_matches_one_process(flux_folder, tmp_path):
    lora = dict(use_lora=True, lora_rank=4, lora_alpha=4.0, lora_target_modules=["to_q", "to_k", "to_v"],
                ema_decay=0.5)
    single = _run(tmp_path, "single", 1, model_path=str(flux_folder), prompts_per_rank=4,
                  gradient_accumulation_steps=4, **lora)
    double = _run(tmp_path, "fsdp", 2, model_path=str(flux_folder), prompts_per_rank=2,
                  gradient_accumulation_steps=2, parallel="fsdp", **lora)
    assert all("lora" in k for k in single["params"])
    _assert_same(double["params"], single["params"])
    # FSDP2 writes a sharded checkpoint; its export keeps the pipeline's small LoRA format (the
    # EMA adapter too) and equals the single process's.
    checkpoint = tmp_path / "fsdp" / "checkpoints" / "iter_000001"
    assert json.loads((checkpoint / "meta.json").read_text())["layout"] == "sharded"
    assert sorted(p.name for p in (checkpoint / "shards").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    for name in ("export/pytorch_lora_weights.safetensors", "export/ema/pytorch_lora_weights.safetensors"):
        _assert_same(load_file(str(tmp_path / "fsdp" / name)), load_file(str(tmp_path / "single" / name)))
    # The shards hold the adapter under its training-time names: it resumes (here in one process).
    from dancegrpo_fast.train import Trainer

    rewards = {"brightness": (lambda images, prompts: images.mean((1, 2, 3)), 1.0)}
    resumed = Trainer(flux_train_config(flux_folder, tmp_path / "one", resume=str(checkpoint), num_iterations=2,
                                        **lora), rewards=rewards)
    assert resumed.iteration == 1
    params = {n: p.detach() for n, p in resumed.policy.model.named_parameters() if p.requires_grad}
    assert params.keys() == double["params"].keys()
    assert all(torch.equal(params[k], double["params"][k]) for k in params)
