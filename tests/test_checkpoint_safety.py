"""Checkpoints that survive a full disk and never run code: a failed save cleans up and says
what failed; files are fsynced before the rename; pruning and `--resume latest` follow the run's
lineage; an incomplete folder is reported; one run at a time per output folder; a crafted pickle
is refused without executing; checkpoints of the previous format still resume."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from helpers.fixtures import _single_thread, flux_folder  # noqa: E402,F401  (fixtures)
from helpers.tiny_models import flux_train_values  # noqa: E402

from dancegrpo_fast import checkpoint as checkpoint_module  # noqa: E402
from dancegrpo_fast import output_lock  # noqa: E402
from dancegrpo_fast.checkpoint import CheckpointError, find_latest  # noqa: E402
from dancegrpo_fast.config import TrainConfig  # noqa: E402
from dancegrpo_fast.train import Trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def brightness(images, prompts):
    return images.float().mean(dim=tuple(range(1, images.dim())))


REWARDS = {"brightness": (brightness, 1.0)}


def config_values(folder, tmp_path, **overrides):
    return flux_train_values(folder, tmp_path, **overrides)


def flux_config(folder, tmp_path, **overrides) -> TrainConfig:
    return TrainConfig.from_dict(config_values(folder, tmp_path, **overrides))


def _trainable(trainer):
    return {n: p.detach().clone() for n, p in trainer.policy.model.named_parameters() if p.requires_grad}


def _names(output_dir):
    return sorted(p.name for p in (Path(output_dir) / "checkpoints").iterdir())


def _metrics_iterations(output_dir):
    return [json.loads(line)["iteration"] for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------
# No code runs on load
# ----------------------------------------------------------------------------------------------


class _Exploit:
    """Pickles to a call of os.system: loading it with weights_only=False runs the command."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_a_crafted_pickle_is_refused_without_running(flux_folder, tmp_path):
    Trainer(flux_config(flux_folder, tmp_path), rewards=REWARDS).train()
    latest = find_latest(tmp_path / "out")
    state = torch.load(latest / "training_state.pt", weights_only=True)
    marker = tmp_path / "code_ran"
    state["payload"] = _Exploit(f"touch {marker}")
    torch.save(state, latest / "training_state.pt")
    with pytest.raises(CheckpointError, match=r"training_state.pt .*refus.*posix.system|training_state.pt .*refus"):
        Trainer(flux_config(flux_folder, tmp_path, num_iterations=2, resume="latest"), rewards=REWARDS)
    with pytest.raises(CheckpointError, match="refus"):
        checkpoint_module.load_training_state(latest)
    assert not marker.exists(), "loading the checkpoint executed code"


def test_new_checkpoints_load_with_weights_only_and_hold_the_ema(flux_folder, tmp_path):
    trainer = Trainer(flux_config(flux_folder, tmp_path, ema_decay=0.9), rewards=REWARDS)
    trainer.train()
    latest = find_latest(tmp_path / "out")
    # The docs' EMA example: plain torch.load with weights_only=True, no allow-list needed.
    ema = torch.load(latest / "training_state.pt", weights_only=True)["ema"]
    assert ema.keys() == trainer.setup.ema.shadow.keys() and all(torch.equal(ema[k], trainer.setup.ema.shadow[k]) for k in ema)


def test_a_checkpoint_of_the_previous_format_still_resumes(flux_folder, tmp_path):
    """Format 1 (before lineage): numpy RNG state as an ndarray, meta.json without lineage."""
    straight = Trainer(flux_config(flux_folder, tmp_path / "a", num_iterations=2), rewards=REWARDS)
    straight.train()
    Trainer(flux_config(flux_folder, tmp_path / "b"), rewards=REWARDS).train()
    latest = find_latest(tmp_path / "b" / "out")
    state = torch.load(latest / "training_state.pt", weights_only=True)
    name, keys, pos, has_gauss, cached = state["rng"]["numpy"]
    state["rng"]["numpy"] = (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)
    state["format_version"] = 1
    torch.save(state, latest / "training_state.pt")
    meta = json.loads((latest / "meta.json").read_text())
    (latest / "meta.json").write_text(json.dumps({k: meta[k] for k in ("iteration", "model_family", "use_lora")}
                                                 | {"format_version": 1}))
    resumed = Trainer(flux_config(flux_folder, tmp_path / "b", num_iterations=2, resume="latest"), rewards=REWARDS)
    assert resumed.iteration == 1
    resumed.train()
    a, b = _trainable(straight), _trainable(resumed)
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)


# ----------------------------------------------------------------------------------------------
# A full disk
# ----------------------------------------------------------------------------------------------


def test_a_save_that_hits_a_full_disk_cleans_up_and_says_so(flux_folder, tmp_path, monkeypatch):
    trainer = Trainer(flux_config(flux_folder, tmp_path, num_iterations=2, checkpoint_every=1), rewards=REWARDS)
    trainer.train_iteration()
    first = trainer.save()
    import safetensors.torch

    real_save_file = safetensors.torch.save_file

    def full_disk(tensors, filename, metadata=None):
        # What a full disk does to a writer: part of the file lands, then ENOSPC.
        Path(filename).write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    trainer.train_iteration()
    with pytest.raises(CheckpointError) as failure:
        trainer.save()
    message = str(failure.value)
    assert "\n" not in message and "iter_000002" in message and "disk is full" in message
    assert _names(tmp_path / "out") == [first.name]  # no partial folder left behind
    assert find_latest(tmp_path / "out") == first  # the previous checkpoint is intact
    monkeypatch.setattr(safetensors.torch, "save_file", real_save_file)
    assert trainer.save().name == "iter_000002"


@pytest.mark.slow
def test_full_disk_on_a_small_tmpfs(flux_folder, tmp_path):
    """A real full disk: output_dir on a 256 KiB tmpfs (in a private user and mount namespace).
    The failed save says so in one line and leaves nothing behind; after the disk grows
    (remount), the same command runs and saves (`--resume latest --overwrite true`: the failed run
    left metrics but no checkpoint, so there is nothing to resume and its files are cleared)."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-r", "-m", "true"],
                                                         capture_output=True).returncode != 0:
        pytest.skip("needs unshare with user and mount namespaces to mount a small tmpfs")
    mount = tmp_path / "small_disk"
    mount.mkdir()
    config = config_values(flux_folder, tmp_path, output_dir=str(mount / "out"), checkpoint_every=1)
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(config))
    result_file = tmp_path / "result.json"
    driver = tmp_path / "driver.py"
    driver.write_text(f"""
import json, os, subprocess, sys
mount, out = {str(mount)!r}, {str(mount / 'out')!r}
command = [sys.executable, "-m", "dancegrpo_fast.train", "--config", {str(config_file)!r},
           "--rewards", "jpeg_compressibility:1.0", "--resume", "latest", "--overwrite", "true"]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", mount], check=True)
runs = []
for size in (None, "16m"):
    if size:
        subprocess.run(["mount", "-o", "remount,size=" + size, mount], check=True)
    run = subprocess.run(command, capture_output=True, text=True)
    root = os.path.join(out, "checkpoints")
    runs.append({{"rc": run.returncode, "stderr": run.stderr[-2000:],
                 "checkpoints": sorted(os.listdir(root)) if os.path.isdir(root) else []}})
json.dump(runs, open({str(result_file)!r}, "w"))
""")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    subprocess.run(["unshare", "-r", "-m", sys.executable, str(driver)], cwd=REPO, env=env, check=True, timeout=500)
    runs = json.loads(result_file.read_text())
    full, grown = runs
    error = [line for line in full["stderr"].splitlines() if line.startswith("error:")]
    assert full["rc"] == 2 and len(error) == 1, full["stderr"]
    assert "iter_000001" in error[0] and "disk is full" in error[0], error[0]
    assert full["checkpoints"] == []  # no partial folder left to fill the disk further
    assert grown["rc"] == 0, grown["stderr"]
    assert grown["checkpoints"] == ["iter_000001"]


def test_files_are_fsynced_before_the_rename(flux_folder, tmp_path, monkeypatch):
    trainer = Trainer(flux_config(flux_folder, tmp_path, ema_decay=0.9), rewards=REWARDS)
    trainer.train_iteration()
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, **kwargs):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    final = trainer.save()
    renames = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(final)]
    assert len(renames) == 1
    temp = events[renames[0]][1]
    synced = {e[1] for e in events[:renames[0]] if e[0] == "fsync"}
    files = [p.relative_to(final) for p in final.rglob("*")]
    assert files and all(str(Path(temp) / rel) in synced for rel in files), (files, synced)
    # the folder holding the new name is synced after the rename, so the rename itself is durable
    assert ("fsync", str(final.parent)) in events[renames[0]:]


# ----------------------------------------------------------------------------------------------
# Lineage: pruning and --resume latest
# ----------------------------------------------------------------------------------------------


def test_pruning_and_resume_latest_follow_the_lineage(flux_folder, tmp_path):
    out = tmp_path / "out"
    first = Trainer(flux_config(flux_folder, tmp_path, num_iterations=6, checkpoint_every=1, keep_checkpoints=3),
                    rewards=REWARDS)
    first.train()
    assert _names(out) == ["iter_000004", "iter_000005", "iter_000006"]
    del first
    # An explicit resume from iter_4: iter_5 and iter_6 of the first run become an abandoned branch.
    branch = Trainer(flux_config(flux_folder, tmp_path, num_iterations=5, checkpoint_every=1, keep_checkpoints=1,
                                 resume=str(out / "checkpoints" / "iter_000004")), rewards=REWARDS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        branch.train()
    assert any(re.search(r"iter_000006.*abandoned branch", str(w.message)) for w in caught)
    del branch
    # Kept: the checkpoint the run resumed from and the newest one it wrote (keep 1); the abandoned
    # iter_6 is left alone (it is not this lineage's to delete).
    assert _names(out) == ["iter_000004", "iter_000005", "iter_000006"]
    # --resume latest follows this lineage (its iter_5), not the higher-numbered abandoned iter_6.
    with pytest.warns(RuntimeWarning, match=r"iter_000006.*abandoned branch"):
        resumed = Trainer(flux_config(flux_folder, tmp_path, num_iterations=7, checkpoint_every=1,
                                      keep_checkpoints=1, resume="latest"), rewards=REWARDS)
    assert resumed.iteration == 5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the replaced abandoned iter_6 is announced
        resumed.train()
    assert _metrics_iterations(out) == [1, 2, 3, 4, 5, 6, 7]
    assert _names(out)[-1] == "iter_000007" and find_latest(out).name == "iter_000007"
    meta = json.loads((out / "checkpoints" / "iter_000007" / "meta.json").read_text())
    assert meta["iteration"] == 7 and meta["resumed_from"] == "iter_000005"


def test_a_folder_without_meta_json_is_reported(flux_folder, tmp_path):
    Trainer(flux_config(flux_folder, tmp_path), rewards=REWARDS).train()
    stray = tmp_path / "out" / "checkpoints" / "iter_000009"
    stray.mkdir()
    (stray / "training_state.pt").write_bytes(b"partial")
    with pytest.warns(RuntimeWarning, match=r"iter_000009 has no meta.json"):
        resumed = Trainer(flux_config(flux_folder, tmp_path, num_iterations=2, resume="latest"), rewards=REWARDS)
    assert resumed.iteration == 1


# ----------------------------------------------------------------------------------------------
# One run per output folder
# ----------------------------------------------------------------------------------------------


def test_a_second_run_in_the_same_output_folder_is_refused(flux_folder, tmp_path):
    config = config_values(flux_folder, tmp_path, num_iterations=10_000, checkpoint_every=10_000,
                           rewards=[{"name": "jpeg_compressibility", "weight": 1.0}])
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "dancegrpo_fast.train", "--config", str(config_file)], cwd=REPO,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        metrics = tmp_path / "out" / "metrics.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline and process.poll() is None and not metrics.is_file():
            time.sleep(0.05)
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        with pytest.raises(CheckpointError, match=rf"is in use by another training run \(pid {process.pid} on "):
            Trainer(flux_config(flux_folder, tmp_path), rewards=REWARDS)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    # The killed run's lock is stale: the next run takes it over and says so (and, since the killed
    # run left files but no checkpoint, starts over with --overwrite).
    with pytest.warns(RuntimeWarning, match=rf"took over the lock of pid {process.pid}"):
        trainer = Trainer(flux_config(flux_folder, tmp_path, overwrite=True), rewards=REWARDS)
    trainer.train()


def test_lock_without_flock_uses_the_recorded_pid(tmp_path, monkeypatch):
    """File systems without flock: a live pid on this host keeps the folder, a dead one is stale."""
    import fcntl

    from dancegrpo_fast.distributed import DistributedState

    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    state = DistributedState(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock_file = tmp_path / output_lock.LOCK_NAME
        lock_file.write_text(json.dumps({"pid": sleeper.pid, "host": os.uname().nodename}))
        with pytest.raises(CheckpointError, match=rf"in use by another training run \(pid {sleeper.pid}"):
            output_lock.lock_output_dir(tmp_path, state)
    finally:
        sleeper.kill()
        sleeper.wait()
    with pytest.warns(RuntimeWarning, match=rf"took over the lock of pid {sleeper.pid}"):
        lock = output_lock.lock_output_dir(tmp_path, state)
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    lock.release()


def test_a_new_run_never_writes_into_an_earlier_runs_files(tmp_path):
    """A fresh run into a folder holding another run's files stops with the ways out; --resume
    latest continues it; --overwrite clears only the run's own files; nothing is written before."""
    from dancegrpo_fast.distributed import DistributedState

    state = DistributedState(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    folder = tmp_path / "run"
    output_lock.claim_output_dir(folder, overwrite=False, resume_asked=False, state=state)  # empty: fine
    (folder / "checkpoints" / "iter_000004").mkdir(parents=True)
    (folder / "metrics.jsonl").write_text('{"iteration": 1}\n')
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"holds an earlier run \(metrics.jsonl, checkpoints\); continue it "
                                              r"with --resume latest, or choose another --output_dir, or pass "
                                              r"--overwrite true"):
        output_lock.claim_output_dir(folder, overwrite=False, resume_asked=False, state=state)
    with pytest.raises(CheckpointError, match="it has no checkpoint to resume"):
        output_lock.claim_output_dir(folder, overwrite=False, resume_asked=True, state=state)
    assert (folder / "metrics.jsonl").read_text() == '{"iteration": 1}\n'
    output_lock.claim_output_dir(folder, overwrite=True, resume_asked=False, state=state)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def test_the_cli_refuses_a_second_fresh_run_before_loading(tmp_path, capsys, monkeypatch):
    from dancegrpo_fast import train

    (tmp_path / "metrics.jsonl").write_text('{"iteration": 1}\n')
    monkeypatch.setattr(train, "build_policy", lambda *a, **k: pytest.fail("loaded a model before refusing"))
    code = train.main(["--output_dir", str(tmp_path), "--num_iterations", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "holds an earlier run (metrics.jsonl)" in err and len(err.splitlines()) == 1, err
